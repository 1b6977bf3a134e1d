"""The gptpipe pipeline flow: stages chained as Prefect tasks under one MLflow parent run.

The flow only wires: it resolves the recipe, opens the parent run, hands each stage the
references its inputs produced, and prints the report card. All work happens in
``stages/`` through ``flows.stage_task.stage_task``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.report import report_markdown
from flows.stage_task import stage_task
from stages.config import STAGE_ORDER, PipelineConfig, load_config
from stages.errors import ConfigError
from stages.runner import stage_inputs
from stages.tracking import MlflowTracker, default_tracking_uri, start_run

log = logging.getLogger("gptpipe.flow")


def runs_dir(cfg: PipelineConfig) -> Path:
    """Local home of embedded services (MLflow SQLite + artifacts): the store's parent directory."""
    return Path(cfg.artifacts.store).expanduser().resolve().parent


def tracking_uri(cfg: PipelineConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or default_tracking_uri(runs_dir(cfg))


def check_plan(cfg: PipelineConfig) -> list[str]:
    """Stages in pipeline order; each stage's inputs must be produced earlier in the same run."""
    ordered = [name for name in STAGE_ORDER if name in cfg.stages]
    produced: set[str] = set()
    for name in ordered:
        missing = [need for need in stage_inputs(name, cfg) if need not in produced]
        if missing:
            raise ConfigError(f"stages: '{name}' needs {', '.join(missing)} earlier in the list; add it to `stages`")
        produced.add(name)
    return ordered


def open_parent_run(cfg: PipelineConfig, uri: str) -> MlflowTracker:
    artifact_root = runs_dir(cfg) / "mlartifacts" if uri.startswith("sqlite:") else None
    parent = start_run(uri, cfg.tracking.experiment, run_name=f"{cfg.name}", tags={"gptpipe.recipe": cfg.name},
                       artifact_root=artifact_root)
    parent.log_params({"recipe": cfg.name, "stages": ",".join(cfg.stages)})
    return parent


@flow(name="gptpipe")
def pipeline(config_path: str | None = "configs/tiny.yaml", overrides: list[str] | None = None,
             force: bool = False, track: bool = True) -> dict[str, Any]:
    """Run the recipe's stages in order; reuse every stage whose content key already has an output."""
    cfg = load_config(config_path, overrides or [])
    order = check_plan(cfg)
    uri = tracking_uri(cfg) if track else None
    parent = open_parent_run(cfg, uri) if uri else None
    config = cfg.model_dump(mode="json")
    results: dict[str, dict[str, Any]] = {}
    ok = False
    try:
        for name in order:
            needs = stage_inputs(name, cfg)
            inputs = {need: results[need]["ref"] for need in needs}
            results[name] = stage_task(name, config, inputs, uri, parent.run_id if parent else None, force)
        report = {"recipe": cfg.name, "stages": results, "tracking_uri": uri,
                  "parent_run_id": parent.run_id if parent else None,
                  "store": str(Path(cfg.artifacts.store).resolve())}
        if parent is not None:
            parent.log_text(report_markdown(report), "report_card.md")
        ok = True
    finally:
        if parent is not None:
            parent.finish(ok)
    reused = [name for name, result in results.items() if result["reused"]]
    get_run_logger().info("pipeline finished: %d stages, reused by content key: %s", len(results), ", ".join(reused) or "none")
    return report
