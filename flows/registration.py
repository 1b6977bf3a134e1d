"""After the stages: the export becomes a registry version, and the promotion gate says whether it is champion.

Two Prefect tasks, each safe to retry:

* ``register-model`` registers the export (``stages.serving.model_registry.register_onnx``) once per
  content digest, with the tags that say what the version is (``stages.serving.version_tags``: its
  evaluation, the run's stage outputs, its lineage) and the decision ``pending``;
* ``promotion-gate`` moves ``challenger`` to a new version, decides (``stages.serving.promotion``:
  ``registry.promote``, the evaluate stage's champion-vs-challenger figures, the export's certificate)
  and moves ``champion`` when the decision promotes. The decision tags are its last write, so a retry
  finds it made; a version registered by an earlier run (same export) keeps its recorded decision and
  moves no alias.

``register_and_gate`` runs both for the pipeline and gives the report its ``registered_model`` and
``promotion`` entries; the decision also goes on the pipeline's MLflow parent run as tags.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.stage_task import retry_transient
from stages.core.config import PipelineConfig
from stages.core.tracking import MlflowTracker, attach_run
from stages.serving.version_tags import COMPARED_TAG, DECISION_TAG, PENDING, REASONS_TAG
from stages.storage.artifacts import ArtifactRef
from stages.storage.stores import open_store

log = logging.getLogger("gptpipe.flow")


@task(
    name="register-model", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE
)
def register_model(
    config: dict[str, Any], results: dict[str, dict[str, Any]], tracking_uri: str, name: str, lineage: dict[str, str]
) -> dict[str, Any]:
    """Register the export stage's output (graphs, tokenizer, parity figures) under its child run, tagged with
    the run's evaluation, stage outputs and lineage."""
    from stages.serving.model_registry import register_onnx
    from stages.serving.version_tags import version_tags

    cfg = PipelineConfig.model_validate(config)
    export = results["export"]
    ref = ArtifactRef.from_dict(export["ref"])
    local = open_store(cfg.artifacts.store).materialize(ref)
    tracker = attach_run(tracking_uri, export["run_id"])
    evaluation = results.get("evaluate", {}).get("metrics", {})
    tags = version_tags(evaluation, {stage: done["ref"] for stage, done in results.items()}, lineage)
    model = register_onnx(tracker, name, local, export["metrics"], ref.digest, ref.uri, tags)
    log.info(
        "model registry: %s version %s (%s)",
        model["name"],
        model["version"],
        "existing version, same export" if model["reused"] else "new version",
    )
    return model


@task(
    name="promotion-gate", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE
)
def promotion_gate(
    config: dict[str, Any],
    model: dict[str, Any],
    results: dict[str, dict[str, Any]],
    tracking_uri: str,
    champion_version: str | None,
) -> dict[str, Any]:
    """Decide on ``model`` (a ``register_onnx`` answer) and move the aliases; returns the report's ``promotion``."""
    from mlflow.tracking import MlflowClient

    from stages.serving.model_registry import champion, model_version, record_decision
    from stages.serving.promotion import decide
    from stages.serving.version_tags import recorded_decision

    cfg = PipelineConfig.model_validate(config)
    client = MlflowClient(tracking_uri=tracking_uri)
    name, number = model["name"], str(model["version"])
    recorded = recorded_decision(model_version(client, name, number))
    base = {"name": name, "version": number, "policy": cfg.registry.promote}
    if recorded["decision"] != PENDING:  # decided before: by the run that registered it, or this task's try
        return {**base, **recorded, "unchanged": bool(model["reused"])}
    if champion_version is None:  # the caller resolved none at the start: whoever holds it now
        held = champion(client, name)
        champion_version = str(held.version) if held is not None else None
    if champion_version == number:  # this version already won (an earlier try moved champion)
        champion_version = None
    evaluation = results.get("evaluate", {}).get("metrics", {})
    certificate = results["export"]["metrics"].get("certificate") or []
    decision = decide(cfg.registry, evaluation, certificate, champion_version is not None)
    record_decision(client, name, number, decision, champion_version)
    log.info("promotion gate: %s version %s: %s (%s)", name, number, decision.label, "; ".join(decision.reasons))
    return {
        **base,
        "decision": decision.label,
        "reasons": decision.reasons,
        "compared_with": champion_version,
        "unchanged": False,
    }


def decision_tags(promotion: dict[str, Any]) -> dict[str, str]:
    """The decision as the pipeline's parent run records it (``unchanged`` for a version an earlier run made)."""
    if promotion["unchanged"]:
        said = promotion["decision"] or "none recorded"
        reasons = [f"existing version {promotion['version']}, decision unchanged ({said})", *promotion["reasons"]]
        decision = "unchanged"
    else:
        decision, reasons = promotion["decision"], promotion["reasons"]
    return {
        DECISION_TAG: decision,
        REASONS_TAG: json.dumps(reasons),
        COMPARED_TAG: promotion["compared_with"] or "none",
    }


def register_and_gate(
    config: dict[str, Any],
    name: str,
    results: dict[str, dict[str, Any]],
    parent: MlflowTracker,
    lineage: dict[str, str] | None = None,
    champion_version: str | None = None,
) -> dict[str, Any]:
    """Register the run's export (``config``: the resolved recipe as JSON) as a version of ``name`` and run
    the promotion gate on it.

    ``lineage``: the ``gptpipe.lineage.*`` tags of the run (what it continued from); ``champion_version``:
    the champion resolved when the run started (what evaluate compared with; None: the one holding the
    alias now). Returns ``{"registered_model", "promotion"}`` for the report.
    """
    uri, tags = parent.tracking_uri, [f"recipe:{config['name']}"]
    model = register_model.with_options(tags=tags)(config, results, uri, name, dict(lineage or {}))
    promotion = promotion_gate.with_options(tags=tags)(config, model, results, uri, champion_version)
    parent.set_tags({"gptpipe.registered_model": f"{model['name']}/{model['version']}", **decision_tags(promotion)})
    return {"registered_model": model, "promotion": promotion}
