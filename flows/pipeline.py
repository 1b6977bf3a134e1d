"""The gptpipe pipeline flow: stages chained as Prefect tasks under one MLflow parent run.

The flow only wires: it resolves the recipe, opens the parent run, hands each stage the
references its inputs produced, registers the exported ONNX graph in the MLflow Model
Registry, and attaches the report card and links to the flow run as Prefect artifacts.
All work happens in ``stages/`` through ``flows.stage_task.stage_task`` — in this process, or
with ``execution.mode: containers`` in one container per stage (``flows/containers.py``).

The same flow runs embedded (``gptpipe run``) and from a deployment on a work pool
(``flows/deploy.py``); ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` / an ``s3://`` store
point it at shared services without any change here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.containers import check_containers_mode, run_stage_in_container
from flows.embedded import prepare_mlflow
from flows.lineage import (
    Champion,
    Parent,
    lineage_tags,
    parent_tokenizer,
    resolve_champion,
    resolve_parent,
    stage_inputs,
    tokenizer_drift,
)
from flows.prefect_artifacts import full_markdown, publish_artifacts
from flows.registration import register_and_gate
from flows.report import FROM_PARENT
from flows.run_logs import explain_errors_in_one_line, forward_stage_logs
from flows.stage_task import stage_task
from stages.core.config import PipelineConfig, load_config
from stages.core.tracking import MlflowTracker, default_tracking_uri, redact_uri, start_run
from stages.formats.layout import SVG_FILE
from stages.registry import ORDER
from stages.stage_call import StageCall
from stages.storage.artifacts import ArtifactRef
from stages.storage.stores import describe_store, open_store

log = logging.getLogger("gptpipe.flow")


def runs_dir(cfg: PipelineConfig) -> Path:
    """Local home of embedded services (MLflow SQLite + artifacts): the store's parent directory
    (``./runs`` when the store is in S3)."""
    if cfg.artifacts.store.startswith("s3://"):
        return Path("runs").resolve()
    return Path(cfg.artifacts.store).expanduser().resolve().parent


def tracking_uri(cfg: PipelineConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or default_tracking_uri(runs_dir(cfg))


def ordered_stages(cfg: PipelineConfig) -> list[str]:
    """The recipe's stages in pipeline order (the recipe's validation made sure each one's inputs are among them)."""
    return [name for name in ORDER if name in cfg.stages]


def open_parent_run(cfg: PipelineConfig, uri: str, sweep_run_id: str | None = None) -> MlflowTracker:
    artifact_root = runs_dir(cfg) / "mlartifacts" if uri.startswith("sqlite:") else None
    prepare_mlflow(uri, cfg.tracking.experiment, artifact_root)  # concurrent runs on one SQLite file
    parent = start_run(
        uri,
        cfg.tracking.experiment,
        run_name=f"{cfg.name}",
        tags={"gptpipe.recipe": cfg.name, **({"mlflow.parentRunId": sweep_run_id} if sweep_run_id else {})},
        artifact_root=artifact_root,
    )
    parent.log_params({"recipe": cfg.name, "stages": ",".join(cfg.stages)})
    return parent


def architecture_picture(cfg: PipelineConfig, results: dict[str, dict[str, Any]]) -> str | None:
    """Local path of the export's architecture.svg (from the store's copy), or None without an export."""
    if "export" not in results:
        return None
    local = open_store(cfg.artifacts.store).materialize(ArtifactRef.from_dict(results["export"]["ref"]))
    path = local / SVG_FILE
    return str(path) if path.is_file() else None


def registered_model_name(cfg: PipelineConfig) -> str:
    return cfg.tracking.registered_model or f"gptpipe-{cfg.name}"


def resolve_lineage(cfg: PipelineConfig, run: MlflowTracker | None) -> tuple[Parent | None, Champion | None]:
    """(the model ``continue_from`` names, the registry's champion to compare with), said in a line each;
    both read the registry through the pipeline's MLflow run (none without tracking)."""
    client, model = (run.client if run else None), registered_model_name(cfg)
    origin = resolve_parent(cfg.continue_from, cfg.artifacts.store, client, model)
    champion = resolve_champion(client, model)
    logger = get_run_logger()
    if origin is not None:
        logger.info(
            "continue_from=%s: the parent's tokenizer %s (the recipe's tokenizer section is not used) and "
            "its pretrain output %s as the starting weights",
            origin.describe(),
            origin.tokenizer.uri,
            origin.pretrain.uri,
        )
    if champion is not None:
        logger.info(
            "champion: %s version %s (%s); evaluate scores this run beside it",
            model,
            champion.version,
            champion.finetune.uri,
        )
    return origin, champion


@flow(name="gptpipe")
def pipeline(
    config_path: str | None = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    force: bool = False,
    track: bool = True,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages in order; reuse every stage whose content key already has an output."""
    forward_stage_logs()
    explain_errors_in_one_line()
    cfg = load_config(config_path, overrides or [])
    order = ordered_stages(cfg)
    if cfg.execution.mode == "containers":
        check_containers_mode(cfg)
    uri = tracking_uri(cfg) if track else None
    parent = open_parent_run(cfg, uri, parent_run_id) if uri else None
    config = cfg.model_dump(mode="json")
    results: dict[str, dict[str, Any]] = {}
    ok = False
    drift = None
    try:
        origin, champion = resolve_lineage(cfg, parent)
        for name in order:
            if name == "tokenizer" and origin is not None:  # a lineage keeps its tokenizer
                results[name] = parent_tokenizer(origin)
                continue
            inputs = stage_inputs(results, origin, champion)
            call = StageCall.for_recipe(
                name, cfg, inputs, tracking_uri=uri, parent_run_id=parent.run_id if parent else None, force=force
            )
            done = None
            if cfg.execution.mode == "containers":  # its own flow run, in its own container
                done = run_stage_in_container(call, cfg)
            if done is None:  # in this process (local mode, or an output the store already has)
                labelled = stage_task.with_options(
                    task_run_name=f"{name} · {cfg.name}", tags=[f"stage:{name}", f"recipe:{cfg.name}"]
                )
                done = labelled(call.to_dict())
            results[name] = done
            if name == "data" and origin is not None and (drift := tokenizer_drift(origin, done["metrics"])):
                (get_run_logger().warning if drift[1] else get_run_logger().info)(drift[0])
        lineage = lineage_tags(origin, results)  # for the registered version too
        champion_version = champion.version if champion else None
        if parent is not None:
            parent.set_tags({**lineage, "gptpipe.lineage.continue_from": cfg.continue_from})
        report = {
            "recipe": cfg.name,
            "stages": results,
            "tracking_uri": redact_uri(uri) if uri else None,
            "parent_run_id": parent.run_id if parent else None,
            "experiment_id": parent.experiment_id if parent else None,
            "store": describe_store(cfg.artifacts.store),
            "registered_model": None,
            "continued_from": origin.describe() if origin else None,
            "lineage": lineage,
            "champion_version": champion_version,
            "tokenizer_drift": drift[0] if drift else None,
            "promotion": None,
        }
        if parent is not None and "export" in results and results["export"].get("run_id"):
            # the registry version with its lineage, its aliases and the promotion gate, which judges it
            # against the champion evaluate compared it with (flows/registration.py)
            report.update(
                register_and_gate(config, registered_model_name(cfg), results, parent, lineage, champion_version)
            )
        report["architecture_svg"] = architecture_picture(cfg, results)
        if parent is not None:
            parent.log_text(full_markdown(report), "report_card.md")
            if report["architecture_svg"]:
                parent.log_artifact(report["architecture_svg"], "report")
        publish_artifacts(report)
        ok = True
    finally:
        if parent is not None:
            parent.finish(ok)
    reused = [name for name, result in results.items() if result["reused"] and result.get("status") != FROM_PARENT]
    get_run_logger().info(
        "pipeline finished: %d stages, reused by content key: %s", len(results), ", ".join(reused) or "none"
    )
    return report
