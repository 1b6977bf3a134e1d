"""Links into the MLflow UI, and the command that starts one on an embedded SQLite store.

MLflow 3's UI has two modes, "GenAI" and "Machine learning", chosen by a ``workflowType``
setting: the ``?workflowType=`` query of the URL when present, else the browser's saved choice
(the sidebar switch), else "genai". In GenAI mode a bare experiment URL opens on the traces
overview (empty for gptpipe), whatever the experiment's tags say. So every link gptpipe prints
names the mode: ``?workflowType=machine_learning`` opens the experiment on its runs table with
the model-training sidebar, in any browser, with nothing saved in it.
"""

from __future__ import annotations

import shlex

MODE_QUERY = "?workflowType=machine_learning"
LOCAL_UI_PORT = 5000


def local_ui(port: int = LOCAL_UI_PORT) -> str:
    """Where ``mlflow ui`` (``gptpipe ui``) serves an embedded store."""
    return f"http://127.0.0.1:{port}"


def _server(uri: str | None) -> str | None:
    """The UI's base URL for an http(s) tracking server; None for an embedded store."""
    if uri and uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return None


def experiment_url(uri: str | None, experiment_id: str | None, base: str | None = None) -> str | None:
    """The experiment's runs table. ``base`` is the UI's address when ``uri`` is not a server
    (``mlflow ui`` started on an embedded store)."""
    root = base.rstrip("/") if base else _server(uri)
    if root and experiment_id:
        return f"{root}/#/experiments/{experiment_id}{MODE_QUERY}"
    return None


def run_url(uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    root = _server(uri)
    if root and experiment_id and run_id:
        return f"{root}/#/experiments/{experiment_id}/runs/{run_id}{MODE_QUERY}"
    return None


def model_url(uri: str | None, model: dict[str, str] | None) -> str | None:
    root = _server(uri)
    if root and model:
        return f"{root}/#/models/{model['name']}/versions/{model['version']}{MODE_QUERY}"
    return None


def ui_command(uri: str | None, port: int = LOCAL_UI_PORT) -> str | None:
    """How to look at the runs: the server's address, or ``mlflow ui`` on the local store."""
    if not uri:
        return None
    if _server(uri):
        return f"open {_server(uri)}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port {port}"
