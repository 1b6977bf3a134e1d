"""The one MLflow adapter.

Stages log through the small ``Tracker`` interface. Within ``stages/`` only this module (inside
functions) and the model code it registers, ``mlflow_model.py``, import mlflow, as
tests/test_boundary.py checks; outside, ``gptpipe ui`` (flows/cli/main.py) looks up an experiment.
Runs are addressed by explicit run ids through ``MlflowClient`` — never MLflow's
thread-local "active run", which breaks under Prefect's thread-pool task runner.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from stages.core.errors import GptpipeError, TrackingError

PARAM_LIMIT = 6000  # MLflow's maximum param value length
# How long to wait for an http(s) tracking server before any work starts. MLflow's own client
# retries a refused connection for minutes, so without this a run would sit idle, or fail only
# after training; once a run is open, MLflow's retries ride out a server restart.
CONNECT_WAIT_VARIABLE = "GPTPIPE_TRACKING_CONNECT_TIMEOUT"
DEFAULT_CONNECT_WAIT_S = 20.0
# The experiment's kind, as the MLflow UI's own kind selector writes it: "model training". MLflow
# 3.17's UI no longer reads it to pick an experiment's landing page (a per-browser GenAI / machine
# learning switch does; flows/mlflow_links.py makes gptpipe's links name the mode), but it keeps
# the experiment described for the versions and tools that do. A user's own choice is left alone.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class Tracker(Protocol):
    """What a stage may do with tracking: params, metric curves, artifacts, tags."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class MemoryTracker:
    """Keeps everything in memory: for tests, and for runs with tracking switched off."""

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"pretrain.model.n_layer": "4"}`` with values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:PARAM_LIMIT]
    return flat


def default_tracking_uri(runs_dir: str | Path) -> str:
    """Embedded default: a SQLite file under the runs directory (no server to start). A writer waits
    up to a minute for SQLite's lock (the driver's default is 5 s), so concurrent runs queue, not fail."""
    return f"sqlite:///{(Path(runs_dir).resolve() / 'mlflow.db').as_posix()}?timeout=60"


class MlflowTracker:
    """A ``Tracker`` bound to one MLflow run id."""

    def __init__(self, client: Any, run_id: str, experiment_id: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step or 0)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def child(self, name: str, tags: dict[str, str] | None = None) -> MlflowTracker:
        """Open a nested run under this one (``mlflow.parentRunId`` links them in the UI)."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": self.run_id, **(tags or {})},
        )
        return MlflowTracker(self.client, run.info.run_id, self.experiment_id)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri


def redact_uri(uri: str) -> str:
    """``uri`` without a ``user:password@`` part, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def check_reachable(uri: str, wait_s: float | None = None) -> None:
    """Fail fast, with one line, when an http(s) tracking server does not answer.

    Any HTTP answer counts as reachable (an auth proxy may refuse ``/health``); only a refused
    or timed-out connection fails, after retrying for ``wait_s`` seconds
    (``$GPTPIPE_TRACKING_CONNECT_TIMEOUT``, default 20). Other URIs (sqlite, files) pass.
    """
    import time
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    if wait_s is None:
        try:
            wait_s = float(os.environ.get(CONNECT_WAIT_VARIABLE, DEFAULT_CONNECT_WAIT_S))
        except ValueError:
            raise GptpipeError(
                f"{CONNECT_WAIT_VARIABLE}={os.environ[CONNECT_WAIT_VARIABLE]!r}: expected seconds"
            ) from None
    deadline = time.monotonic() + wait_s
    pause = 0.25
    while True:
        try:
            with urllib.request.urlopen(redact_uri(uri).rstrip("/") + "/health", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            if time.monotonic() + pause > deadline:
                raise TrackingError(
                    f"MLflow tracking server {redact_uri(uri)} is not reachable ({reason}); start it or point "
                    "MLFLOW_TRACKING_URI / tracking.uri elsewhere (or run with --no-track); nothing was started"
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 4.0)


def connect(uri: str, experiment: str, artifact_root: str | Path | None = None) -> tuple[Any, str]:
    """An ``MlflowClient`` for ``uri`` and the id of ``experiment`` (created on first use)."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    check_reachable(uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment made before gptpipe tagged it
                client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return client, found.experiment_id
        location = Path(artifact_root).resolve().as_uri() if artifact_root else None
        try:
            created = client.create_experiment(
                experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            created = client.get_experiment_by_name(experiment).experiment_id  # another run made it first
        return client, created
    except MlflowException as exc:
        raise GptpipeError(f"MLflow at {redact_uri(uri)}: {str(exc).splitlines()[0]}") from None


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    artifact_root: str | Path | None = None,
) -> MlflowTracker:
    """Open a top-level run (the pipeline's parent run)."""
    client, experiment_id = connect(uri, experiment, artifact_root)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    return MlflowTracker(client, run.info.run_id, experiment_id)


def attach_run(uri: str, run_id: str) -> MlflowTracker:
    """Re-open an existing run by id (a stage in another process logging under the pipeline's run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise GptpipeError(f"MLflow at {redact_uri(uri)}: run {run_id!r}: {str(exc).splitlines()[0]}") from None
    return MlflowTracker(client, run_id, run.info.experiment_id)


def executor_tags() -> dict[str, str]:
    """Where the stage ran: the gptpipe image (docker/Dockerfile sets these variables) or a plain process."""
    revision = os.environ.get("GPTPIPE_GIT_REVISION")
    if revision is None:
        return {"gptpipe.executor": "process"}
    return {
        "gptpipe.executor": "container",
        "gptpipe.image_version": os.environ.get("GPTPIPE_VERSION", "unknown"),
        "gptpipe.image_revision": revision,
    }


@contextlib.contextmanager
def stage_run(
    uri: str,
    stage: str,
    *,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    params: Callable[[], dict[str, Any]] | None = None,
) -> Iterator[MlflowTracker]:
    """The MLflow run of one stage, for the length of the ``with`` block: the one run lifecycle.

    With ``parent_run_id`` the stage's child run is opened under the pipeline's run, tagged and
    given ``params()`` (inside the guard: a source that cannot be read marks it FAILED rather than
    leaving it RUNNING), and closed when the block ends: FINISHED, or FAILED with a
    ``gptpipe.error`` tag when it raises. With ``run_id`` the block logs into a stage run that
    another process opened and will close — the flow task that launched ``torchrun`` — so rank 0
    writes its curves into the stage's own run, not a run nested under it.
    """
    if (parent_run_id is None) == (run_id is None):
        raise ValueError("stage_run: pass exactly one of parent_run_id (open a child run) and run_id (attach)")
    if run_id is not None:
        yield attach_run(uri, run_id)  # its opener sets its status
        return
    tracker = attach_run(uri, parent_run_id).child(stage, {"gptpipe.stage": stage, **executor_tags(), **(tags or {})})
    try:
        if params is not None:
            tracker.log_params(params())
        yield tracker
    except BaseException:
        with contextlib.suppress(Exception):  # an unreachable server must not hide the stage's own error
            tracker.set_tags({"gptpipe.error": "stage failed; see the Prefect/terminal log"})
        with contextlib.suppress(Exception):
            tracker.finish(ok=False)
        raise
    tracker.finish(ok=True)


# --------------------------------------------------------------------------- system metrics


class SystemMetrics:
    """Samples CPU, memory and (where ``nvidia-ml-py`` finds one) GPU use into ``system/*`` metrics.

    A daemon thread logs a sample every ``interval`` seconds to the tracker it was given (the
    stage's child run, by id), and ``stop()`` always logs one last sample, so even a stage
    shorter than the interval leaves a point. Used as a context manager around training.
    """

    def __init__(self, tracker: Tracker, interval: float = 5.0):
        import threading

        self.tracker = tracker
        self.interval = interval
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptpipe-system-metrics", daemon=True)
        self._gpus = _nvml_handles()

    def sample(self) -> dict[str, float]:
        import psutil

        memory = psutil.virtual_memory()
        values = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
            "system/system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
            "system/system_memory_usage_percentage": memory.percent,
            "system/process_rss_megabytes": psutil.Process().memory_info().rss / 2**20,
        }
        for index, handle in enumerate(self._gpus):
            values.update(_gpu_sample(index, handle))
        return values

    def _log(self) -> None:
        try:
            self.tracker.log_metrics(self.sample(), step=self.step)
        except Exception:
            return
        self.step += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._log()

    def __enter__(self) -> SystemMetrics:
        import psutil

        psutil.cpu_percent(interval=None)  # the first call only primes the counter
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
        self._log()


def _nvml_handles() -> list[Any]:
    try:
        import pynvml  # nvidia-ml-py: optional; absent or no driver means no GPU metrics

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []


def _gpu_sample(index: int, handle: Any) -> dict[str, float]:
    import pynvml

    try:
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:
        return {}
    return {
        f"system/gpu_{index}_utilization_percentage": float(util.gpu),
        f"system/gpu_{index}_memory_usage_megabytes": memory.used / 2**20,
        f"system/gpu_{index}_memory_usage_percentage": 100.0 * memory.used / max(memory.total, 1),
    }


# --------------------------------------------------------------------------- model registry


def find_version(client: Any, name: str, digest: str) -> Any | None:
    """The version of ``name`` already registered for this exact export (same content digest)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("gptpipe.digest") == digest), None)


# What the served model needs besides mlflow itself: no torch (stages.formats.served runs without it).
PYFUNC_REQUIREMENTS = ("onnxruntime", "onnxruntime-genai", "sentencepiece", "numpy")
# The served model's code is what opening the served runtime imports, found from its import graph (so a
# module it starts to need cannot be left behind): shipped in the model's code/ folder.
PYFUNC_ENTRY = "stages.formats.served"


# The export's files the served model carries (model.pt2 and the int8 twin stay in the store).
def _pyfunc_files() -> tuple[str, ...]:
    from stages.formats.layout import KV_GRAPH, LOGITS_GRAPH, META_FILE

    return LOGITS_GRAPH, KV_GRAPH, f"{LOGITS_GRAPH}.data", f"{KV_GRAPH}.data", META_FILE


def _versions(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def save_pyfunc(export_dir: str | Path, path: str | Path) -> Path:
    """Write an MLflow pyfunc model folder (``MLmodel`` at its root) for an export artifact.

    ``stages/core/mlflow_model.py`` is the model code; the export's graphs, ``export.json`` and
    tokenizer go to ``artifacts/onnx``; the few ``stages`` modules generation needs go to
    ``code/stages``; requirements are onnxruntime, sentencepiece and numpy pinned to the
    versions here (MLflow adds itself). The signature has no input schema (the model takes a
    string, strings, ``prompt`` or ``messages`` rows and checks them itself), the params
    ``max_new_tokens``, ``temperature``, ``top_k``, ``seed``, and the reply text as output.
    """
    import shutil
    import tempfile
    import warnings

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    with warnings.catch_warnings():  # "add type hints to predict": deliberately absent (see mlflow_model)
        warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
        from stages.core import mlflow_model

    export_dir, path = Path(export_dir), Path(path)
    package = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="gptpipe-pyfunc-") as scratch:
        onnx_dir = Path(scratch) / mlflow_model.ARTIFACT
        onnx_dir.mkdir()
        from stages.formats.layout import KV_GRAPH, TOKENIZER_DIR

        for name in _pyfunc_files():
            if (export_dir / name).is_file():
                shutil.copy2(export_dir / name, onnx_dir / name)
        if not (onnx_dir / KV_GRAPH).is_file() or not (export_dir / TOKENIZER_DIR).is_dir():
            raise GptpipeError(f"{export_dir}: no {KV_GRAPH} or {TOKENIZER_DIR}/ to serve; rerun stage 'export'")
        shutil.copytree(export_dir / TOKENIZER_DIR, onnx_dir / TOKENIZER_DIR)
        from stages.formats.served import served_runtime

        served = served_runtime(export_dir)
        if (export_dir / served).is_dir():  # an onnxruntime-genai folder the export certified as fastest
            shutil.copytree(export_dir / served, onnx_dir / served)
        code = Path(scratch) / "code" / "stages"
        from stages.storage.artifacts import code_modules, module_files

        for relative in module_files(code_modules(PYFUNC_ENTRY, leave_out=())):
            (code / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package / relative, code / relative)
        # No input schema, on purpose: MLflow enforces one on every predict input before the model
        # sees it, and no schema lets the four accepted shapes through. With the named columns
        # prompt/messages, a string or a list of strings became column 0, which enforcement drops
        # with only a warning: predict("...") answered []. The model checks its input itself
        # (mlflow_model.requests: the shapes it takes, a one-line error for anything else). The
        # params schema stays (without it MLflow drops params) and the input example shows a call.
        signature = ModelSignature(
            inputs=None,
            outputs=Schema([ColSpec("string")]),
            params=ParamSchema(
                [
                    ParamSpec(k, "long" if isinstance(v, int) else "double", v)
                    for k, v in mlflow_model.DEFAULT_PARAMS.items()
                ]
            ),
        )
        example = (pd.DataFrame({"prompt": ["Reverse: a b c"]}), {"max_new_tokens": 16})
        with warnings.catch_warnings():  # "add type hints to predict": deliberately absent (see mlflow_model)
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            mlflow.pyfunc.save_model(
                path=str(path),
                python_model=mlflow_model.__file__,
                artifacts={mlflow_model.ARTIFACT: str(onnx_dir)},
                code_paths=[str(code)],
                signature=signature,
                input_example=example,
                pip_requirements=[_versions(name) for name in PYFUNC_REQUIREMENTS],
            )
    return path


def register_onnx(
    tracker: MlflowTracker,
    name: str,
    export_dir: str | Path,
    parity: dict[str, Any],
    digest: str,
    artifact_uri: str | None = None,
) -> dict[str, Any]:
    """Register the exported ONNX graph as a version of model ``name`` (once per export digest).

    ``onnx_model/`` in ``tracker``'s run is an MLflow pyfunc model (``save_pyfunc``: the graphs
    and tokenizer under ``artifacts/onnx``, the generation code, ``MLmodel``) plus
    ``parity.json``, so ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` and
    ``mlflow models serve`` work on the version; the version's source is that folder, and the parity figures, the
    export's content digest and its artifact-store location become version tags, so the
    registry entry explains itself. An export already registered (same digest) is not
    registered twice: like a reused stage, its existing version is returned.
    Returns ``{"name", "version", "source", "run_id", "reused"}``.
    """
    from mlflow.exceptions import MlflowException

    existing = find_version(tracker.client, name, digest)
    if existing is not None:
        tracker.set_tags({"gptpipe.registered_model": f"{name}/{existing.version}"})
        return {
            "name": name,
            "version": str(existing.version),
            "source": existing.source,
            "run_id": existing.run_id,
            "reused": True,
        }
    import tempfile

    export_dir = Path(export_dir)
    from stages.formats.layout import LOGITS_GRAPH

    graph = export_dir / LOGITS_GRAPH
    if not graph.is_file():
        raise GptpipeError(f"{export_dir}: no {LOGITS_GRAPH} to register; run stage 'export' first")
    client = tracker.client
    with tempfile.TemporaryDirectory(prefix="gptpipe-register-") as scratch:
        tracker.log_artifact(save_pyfunc(export_dir, Path(scratch) / "onnx_model"), "onnx_model")
    figures = {k: v for k, v in parity.items() if isinstance(v, (int, float, str, bool))}
    client.log_text(tracker.run_id, json.dumps(figures, indent=2, sort_keys=True), "onnx_model/parity.json")
    tags = {f"parity.{k}": str(v) for k, v in figures.items()}
    if parity.get("certificate"):  # one tag per format: the export's equivalence certificate
        from stages.formats.certificate import certificate_tags

        tags.update(certificate_tags(parity["certificate"]))
        tags["gptpipe.served_runtime"] = str(parity.get("serve", ""))
    tags["gptpipe.digest"] = digest
    if artifact_uri:
        tags["gptpipe.artifact"] = artifact_uri
    try:
        try:
            client.create_registered_model(
                name, description="A gptpipe GPT: ONNX graphs served as an MLflow pyfunc chat model"
            )
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
        source = f"{client.get_run(tracker.run_id).info.artifact_uri}/onnx_model"
        version = client.create_model_version(
            name,
            source,
            run_id=tracker.run_id,
            tags=tags,
            description="pyfunc chat model over the export's served runtime + tokenizer; model.onnx; parity.json; "
            "gptpipe.certificate.* tags: the equivalence certificate",
        )
    except MlflowException as exc:
        raise GptpipeError(f"MLflow model registry at {tracker.tracking_uri}: {str(exc).splitlines()[0]}") from None
    tracker.set_tags({"gptpipe.registered_model": f"{name}/{version.version}"})
    return {"name": name, "version": str(version.version), "source": source, "run_id": tracker.run_id, "reused": False}
