"""The Prefect task that runs one stage, and its MLflow child run.

The task body is thin: open the store, open a child run under the pipeline's parent run
(by explicit id), call ``stages.runner.run_stage``, log what the stage produced. Only
transient failures are retried: a ``GptpipeError`` (bad config, bad data, parity failure)
would fail the same way again, so it fails at once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from stages.artifacts import ArtifactRef
from stages.config import PipelineConfig
from stages.errors import GptpipeError
from stages.runner import run_stage, stage_config
from stages.storage import open_store
from stages.tracking import MlflowTracker, attach_run

log = logging.getLogger("gptpipe.flow")

# Summary metrics worth a column in the report card, per stage.
HEADLINE = {
    "tokenizer": ("vocab_size", "bytes_per_token"),
    "data": ("train_tokens", "val_tokens"),
    "pretrain": ("initial_loss", "final_val_loss", "tokens_per_s"),
    "finetune": ("final_train_loss", "merge_max_abs_diff"),
    "evaluate": ("base_accuracy", "sft_accuracy", "base_bpb", "sft_bpb"),
    "export": ("max_abs_diff", "generation_matches"),
    "publish": ("bundle",),
}


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may succeed on a second try: never a GptpipeError."""
    try:
        state.result()
    except GptpipeError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient (I/O, network)
        return True
    return False


def _log_outputs(tracker: MlflowTracker, name: str, result: Any, cfg: PipelineConfig) -> None:
    manifest = result.manifest
    numeric = {k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"{name}.{k}": v for k, v in numeric.items()})
    tracker.log_metrics({"wall_time_s": result.wall_time_s})
    tracker.log_text(manifest.to_json(), "manifest.json")
    local = Path(result.ref.uri)
    small = [p for p in sorted(local.glob("*")) if p.is_file() and p.stat().st_size < 5_000_000 and p.name != "manifest.json"]
    for path in small:
        if path.suffix in {".json", ".md", ".png", ".vocab", ".model", ".txt", ".jsonl"}:
            tracker.log_artifact(path, "outputs")


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
    tracker = None
    if tracking_uri and parent_run_id:
        tracker = attach_run(tracking_uri, parent_run_id).child(name, tags={"gptpipe.stage": name, "gptpipe.recipe": cfg.name})
        tracker.log_params(stage_config(name, cfg))
    started = time.perf_counter()
    ok = False
    try:
        result = run_stage(name, cfg, refs, store, tracker, force=force)
        ok = True
    finally:
        if tracker is not None and not ok:
            tracker.set_tags({"gptpipe.error": "stage failed; see the Prefect/terminal log"})
            tracker.finish(ok=False)
    if tracker is not None:
        tracker.set_tags({"gptpipe.reused": str(result.reused).lower(), "gptpipe.artifact": result.ref.uri})
        _log_outputs(tracker, name, result, cfg)
        tracker.finish(ok=True)
    if result.reused:
        log.info("%s: reused finished output (content key %s) at %s", name, result.manifest.key, result.ref.uri)
    return {
        "stage": name,
        "ref": result.ref.to_dict(),
        "reused": result.reused,
        "wall_time_s": round(time.perf_counter() - started, 2) if not result.reused else 0.0,
        "metrics": result.manifest.metrics,
        "run_id": tracker.run_id if tracker else None,
    }
