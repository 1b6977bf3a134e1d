"""The one MLflow adapter.

Stages log through the small ``Tracker`` interface; only this module imports mlflow.
Runs are addressed by explicit run ids through ``MlflowClient`` — never MLflow's
thread-local "active run", which breaks under Prefect's thread-pool task runner.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from stages.errors import GptpipeError

PARAM_LIMIT = 6000  # MLflow's maximum param value length


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
    """Embedded default: a SQLite file under the runs directory (no server to start)."""
    return f"sqlite:///{(Path(runs_dir).resolve() / 'mlflow.db').as_posix()}"


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


def connect(uri: str, experiment: str, artifact_root: str | Path | None = None) -> tuple[Any, str]:
    """An ``MlflowClient`` for ``uri`` and the id of ``experiment`` (created on first use)."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return client, found.experiment_id
        location = Path(artifact_root).resolve().as_uri() if artifact_root else None
        return client, client.create_experiment(experiment, artifact_location=location)
    except MlflowException as exc:
        raise GptpipeError(f"MLflow at {uri}: {str(exc).splitlines()[0]}") from None


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
              artifact_root: str | Path | None = None) -> MlflowTracker:
    """Open a top-level run (the pipeline's parent run)."""
    client, experiment_id = connect(uri, experiment, artifact_root)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    return MlflowTracker(client, run.info.run_id, experiment_id)


def attach_run(uri: str, run_id: str) -> MlflowTracker:
    """Re-open an existing run by id (a stage in another process logging under the pipeline's run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return MlflowTracker(client, run_id, run.info.experiment_id)
