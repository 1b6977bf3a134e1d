"""The Prefect task that runs one stage, and its MLflow child run.

The task body is thin: open the store, open the stage's child run under the pipeline's parent
run (``stages.core.tracking.stage_run``, by explicit id), call ``stages.runner.run_stage`` — or,
for several processes, ``flows.launch.run_stage_torchrun``, whose rank 0 logs into that same
child run — and log what the stage produced. Only
transient failures are retried: a ``GptpipeError`` (bad config, bad data, parity failure)
would fail the same way again, so it fails at once — unless it says it is transient (an S3
endpoint that could not be reached after botocore's own retries may be back a minute later).
Training stages also log ``system/*`` metrics (CPU, memory, GPU) to their child run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.launch import needs_torchrun, run_stage_torchrun
from stages.core.config import PipelineConfig
from stages.core.errors import GptpipeError
from stages.core.tracking import MlflowTracker, SystemMetrics, stage_run
from stages.registry import stage
from stages.runner import run_stage, stage_config
from stages.storage.artifacts import ArtifactRef
from stages.storage.stores import LocalStore, Store, open_store

log = logging.getLogger("gptpipe.flow")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may succeed on a second try: a GptpipeError only when it says ``transient``."""
    try:
        state.result()
    except GptpipeError as exc:
        return bool(getattr(exc, "transient", False))
    except Exception:
        return True
    return False


def _local_copy(store: Store, result: Any) -> Path | None:
    """The output's files on this machine without downloading: a local store's directory, or the
    S3 store's cached copy of an output this process just built."""
    if isinstance(store, LocalStore):
        return Path(result.ref.uri)
    cache = getattr(store, "cache", None)
    if cache is not None and cache.find(result.manifest.stage, result.manifest.key) is not None:
        return cache.location(result.manifest.stage, result.manifest.key)
    return None


def _log_outputs(tracker: MlflowTracker, name: str, result: Any, store: Store) -> None:
    manifest = result.manifest
    numeric = {k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"{name}.{k}": v for k, v in numeric.items()})
    tracker.log_metrics({"wall_time_s": result.wall_time_s})
    tracker.log_text(manifest.to_json(), "manifest.json")
    local = _local_copy(store, result)
    if local is None:  # reused from S3 and not cached here: the manifest says what it holds
        return
    small = [
        p for p in sorted(local.glob("*")) if p.is_file() and p.stat().st_size < 5_000_000 and p.name != "manifest.json"
    ]
    for path in small:
        if path.suffix in {".json", ".md", ".png", ".svg", ".vocab", ".model", ".txt", ".jsonl"}:
            tracker.log_artifact(path, "outputs")


def _system_metrics(name: str, cfg: PipelineConfig, tracker: MlflowTracker | None) -> Any:
    """``system/*`` metrics around a training stage that has a child run (a reused one logs a single sample)."""
    interval = cfg.tracking.system_metrics_interval_s
    if tracker is None or not stage(name).trains or interval <= 0:
        return contextlib.nullcontext()
    return SystemMetrics(tracker, interval)


@task(
    name="stage",
    task_run_name="{name}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def stage_task(
    name: str,
    config: dict[str, Any],
    inputs: dict[str, dict[str, str]],
    tracking_uri: str | None,
    parent_run_id: str | None,
    force: bool = False,
) -> dict[str, Any]:
    """Run stage ``name`` (or reuse its finished output) and return its reference and summary."""
    cfg = PipelineConfig.model_validate(config)
    store = open_store(cfg.artifacts.store)
    refs = {k: ArtifactRef.from_dict(v) for k, v in inputs.items()}
    tracking: Any = contextlib.nullcontext()  # yields None: no tracking
    if tracking_uri and parent_run_id:
        tracking = stage_run(
            tracking_uri,
            name,
            parent_run_id=parent_run_id,
            tags={"gptpipe.recipe": cfg.name},
            params=lambda: stage_config(name, cfg),
        )
    started = time.perf_counter()
    try:
        with tracking as tracker:
            with _system_metrics(name, cfg, tracker):
                if needs_torchrun(name, cfg):  # several processes: rank 0 logs into this stage's run
                    run_id = tracker.run_id if tracker else None
                    result = run_stage_torchrun(name, cfg, refs, tracking_uri, run_id, force=force)
                else:
                    result = run_stage(name, cfg, refs, store, tracker, force=force)
            if tracker is not None:
                tracker.set_tags({"gptpipe.reused": str(result.reused).lower(), "gptpipe.artifact": result.ref.uri})
                _log_outputs(tracker, name, result, store)
    except GptpipeError as exc:
        log.error("stage %s failed: %s", name, exc)
        raise
    if result.reused:
        log.info("%s: reused finished output (content key %s) at %s", name, result.manifest.key, result.ref.uri)
    return {
        "stage": name,
        "ref": result.ref.to_dict(),
        "reused": result.reused,
        "wall_time_s": round(time.perf_counter() - started, 2) if not result.reused else 0.0,
        "metrics": result.manifest.metrics,
        "run_id": tracker.run_id if tracker else None,
        "experiment_id": tracker.experiment_id if tracker else None,
    }
