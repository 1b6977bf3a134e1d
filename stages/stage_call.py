"""A stage call as plain data: which stage, its resolved sections, its inputs, the store, where to track.

It is what the executor runs and what travels as JSON to wherever the stage runs: a Prefect task,
a stage container, or each rank of a ``torchrun`` job (``stages.launchers``). A module of its own so
the executor and the launchers both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages import registry
from stages.core.stage import Sections, Stage
from stages.storage.artifacts import ArtifactRef
from stages.storage.lease import DEFAULT_LEASE_S


@dataclass(frozen=True)
class Tracking:
    """Where a stage's MLflow run goes: a child of the pipeline's run, or an existing stage run."""

    uri: str
    parent_run_id: str | None = None  # open the stage's child run under this run
    run_id: str | None = None  # or log into this run, which its opener closes (a torchrun rank 0)
    tags: dict[str, str] = field(default_factory=dict)  # e.g. the recipe's name: labels, never key material
    system_metrics_interval_s: float = 0.0  # CPU/memory/GPU samples for training stages (0 = off)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "parent_run_id": self.parent_run_id,
            "run_id": self.run_id,
            "tags": dict(self.tags),
            "system_metrics_interval_s": self.system_metrics_interval_s,
        }


@dataclass(frozen=True)
class StageCall:
    """One stage to run: everything the executor needs, as plain data that travels as JSON."""

    stage: str
    config: dict[str, Any]  # the stage's declared sections, resolved (``Sections.to_json``)
    inputs: dict[str, ArtifactRef]
    store: str  # artifacts.store: a local directory or s3://bucket/prefix
    tracking: Tracking | None = None
    force: bool = False  # recompute even when a finished output exists (a finished output is never replaced)
    lease_s: float = DEFAULT_LEASE_S  # artifacts.lease_s: how long a claim on the key lasts without a heartbeat

    @classmethod
    def for_recipe(
        cls,
        name: str,
        cfg: Any,
        inputs: dict[str, ArtifactRef],
        *,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        force: bool = False,
        store: str | None = None,
    ) -> StageCall:
        """The call for stage ``name`` of the recipe ``cfg`` (a ``PipelineConfig``), tracked when
        ``tracking_uri`` and ``parent_run_id`` are given. Only the stage's own sections go in."""
        tracking = None
        if tracking_uri and parent_run_id:
            tracking = Tracking(
                tracking_uri,
                parent_run_id=parent_run_id,
                tags={"gptpipe.recipe": cfg.name},
                system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
            )
        needs = registry.stage(name).present_inputs(cfg.sections(name), inputs)
        return cls(
            stage=name,
            config=cfg.sections(name).to_json(),
            inputs={need: inputs[need] for need in needs if need in inputs},
            store=store or cfg.artifacts.store,
            tracking=tracking,
            force=force,
            lease_s=cfg.artifacts.lease_s,
        )

    @property
    def declared(self) -> Stage:
        return registry.stage(self.stage)

    def sections(self) -> Sections:
        from stages.core.config import sections_from_json  # the recipe schema types the JSON back

        return sections_from_json(self.stage, self.config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config": self.config,
            "inputs": {name: ref.to_dict() for name, ref in sorted(self.inputs.items())},
            "store": self.store,
            "tracking": self.tracking.to_dict() if self.tracking else None,
            "force": self.force,
            "lease_s": self.lease_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageCall:
        tracking = data.get("tracking")
        return cls(
            stage=data["stage"],
            config=data["config"],
            inputs={name: ArtifactRef.from_dict(ref) for name, ref in data["inputs"].items()},
            store=data["store"],
            tracking=Tracking(**tracking) if tracking else None,
            force=bool(data.get("force", False)),
            lease_s=float(data.get("lease_s", DEFAULT_LEASE_S)),
        )
