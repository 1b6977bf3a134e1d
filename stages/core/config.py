"""The recipe: one YAML file -> one validated ``PipelineConfig``.

The stages' own sections live in ``stages.core.sections``; this module composes them with the
pipeline-wide ones (artifacts, tracking, execution), applies ``--set`` overrides, checks what
spans sections before any work starts (each stage's inputs are listed, its own recipe checks
pass), and turns every validation error into one line naming the field. Secrets and service
endpoints never live here: they come from the environment.

What it knows of the stages comes from ``stages.registry`` alone.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from stages import registry
from stages.core.errors import ConfigError
from stages.core.sections import (
    MOVED_KEYS,
    CorpusConfig,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    PublishConfig,
    Section,
    TokenizerConfig,
    TrainConfig,
)
from stages.core.stage import Sections

__all__ = [  # the stage sections, re-exported so a recipe's whole schema is importable from here
    "CorpusConfig",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PretrainConfig",
    "PublishConfig",
    "TokenizerConfig",
    "TrainConfig",
]

StageName = registry.StageName


class ArtifactsConfig(Section):
    store: str = Field("runs/store", description="Local directory (or s3://bucket/prefix) holding stage outputs.")
    lease_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a run's claim on a stage output it is building lasts without a heartbeat (renewed "
        "every third of it); past that another run takes the work over and resumes from its checkpoints.",
    )


class TrackingConfig(Section):
    experiment: str = Field("gptpipe", description="MLflow experiment name.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; default sqlite under runs/. MLFLOW_TRACKING_URI in the environment wins.",
    )
    registered_model: str = Field(
        "", description="Model Registry name for the exported ONNX graph ('' = gptpipe-<recipe name>)."
    )
    system_metrics_interval_s: float = Field(
        5.0, ge=0, description="Seconds between CPU/memory/GPU samples logged for training stages (0 = off)."
    )


class RegistryConfig(Section):
    """When a newly registered version takes the ``champion`` alias (``stages/serving/promotion.py``).

    Every new version gets the alias ``challenger``; ``champion`` moves to it when the policy
    says so. ``gate`` compares it with the champion on the same held-out material (the evaluate
    stage scores both) and needs every export format certified; ``always`` and ``never`` leave the
    decision to a person (``gptpipe promote`` / ``gptpipe rollback``).
    """

    promote: Literal["gate", "always", "never"] = Field(
        "gate", description="'gate' (promote when the tolerances below hold), 'always' or 'never' (manual review)."
    )
    exact_match_drop: float = Field(
        0.02, ge=0, le=1, description="Task exact match the challenger may lose against the champion (absolute)."
    )
    bpb_rise: float = Field(
        0.02,
        ge=0,
        description="Relative rise in bits per byte on the frozen held-out text the challenger may show (0.02 = 2 %).",
    )


def check_continue_from(value: str) -> str:
    """``none``, ``champion``, a registry version number or a store URI of a pretrain/finetune output."""
    value = value.strip()
    if value in ("none", "champion") or value.isdigit() or "/" in value or value.startswith("s3://"):
        return value
    raise ValueError(
        f"continue_from={value!r}: use 'none', 'champion', a registered version number (e.g. 3) "
        "or the store URI of a pretrain or finetune output"
    )


class StageResources(Section):
    """What one stage's container asks the work pool for (``execution.mode: containers``)."""

    gpus: int = Field(0, ge=0, description="GPUs for the stage's container or pod (nvidia.com/gpu).")
    cpu: str | None = Field(None, description="CPU request, e.g. '4' (Kubernetes pools; Docker pools ignore it).")
    memory: str | None = Field(
        None, description="Memory limit, e.g. '16Gi' (a Kubernetes quantity; given to Docker as '16g')."
    )
    image: str | None = Field(None, description="Image for this stage instead of the deployment's (e.g. a -cpu build).")


class ExecutionConfig(Section):
    """Where stages run. ``local``: in the pipeline's own process. ``containers``: each stage is a
    flow run of its own deployment (``gptpipe-stage/<stage>``, made by ``gptpipe deploy --stages``)
    on a Docker or Kubernetes work pool; outputs travel through the shared artifact store."""

    mode: Literal["local", "containers"] = Field("local", description="'local' (in process) or 'containers'.")
    resources: dict[StageName, StageResources] = Field(
        default_factory=dict, description="Per-stage GPU/CPU/memory/image requests (containers mode)."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra non-secret environment for stage containers; credentials come from the work pool.",
    )
    timeout_s: float | None = Field(None, gt=0, description="Give up waiting for one stage's flow run after this.")
    restarts: int = Field(
        2,
        ge=0,
        description="Start a stage's container again (a new flow run) this many times when the platform stopped it "
        "(preempted, evicted, crashed); training resumes from its checkpoints.",
    )


class PipelineConfig(Section):
    """A whole recipe."""

    name: str = Field("tiny", description="Recipe name, used in run names and tags.")
    stages: list[StageName] = Field(
        default_factory=lambda: list(registry.ORDER), description="Stages to run, in pipeline order."
    )
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    continue_from: str = Field(
        "none",
        description="Start from an earlier model: 'none' (from scratch), 'champion' (the registered model's "
        "champion alias; from scratch, with a warning, while it has none), a registered version number, or "
        "the store URI of a pretrain or finetune output. "
        "The run reuses its tokenizer and continues pretraining from its weights.",
    )

    @field_validator("continue_from", mode="before")
    @classmethod
    def _continue_from(cls, value: str) -> str:
        return check_continue_from(str(value))

    @model_validator(mode="after")
    def _runnable(self) -> PipelineConfig:
        """Constraints across sections, checked here so a recipe that cannot run fails before any stage.

        What depends on the machine (GPUs, devices), the environment (PREFECT_API_URL, a
        rendezvous endpoint) or the data is checked where it is known, by the code that needs it.
        """
        problems = [*self._stage_problems()]
        if self.execution.mode == "containers":
            store = self.artifacts.store
            if not store.startswith("s3://") and not store.startswith("/"):
                problems.append(
                    f"artifacts.store={store!r}: with execution.mode=containers the store must be shared "
                    "by the containers — an s3:// URI (or an absolute path every container mounts)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _stage_problems(self) -> list[str]:
        """Each listed stage's inputs come from stages listed before it, and its own checks pass.

        The declarations are read from ``stages.registry`` (which imports the stage modules
        lazily). Stages not listed are still checked: ``--set stages=[...]`` must not hide a bad
        section that a later, full run would meet.
        """
        problems = []
        for declared in registry.stages():
            sections = sections_for(declared, self)
            if declared.name in self.stages:
                missing = [need for need in declared.inputs_for(sections) if need not in self.stages]
                if missing:
                    problems.append(
                        f"stages: '{declared.name}' needs {', '.join(missing)} earlier in the list; add it to `stages`"
                    )
            problems += declared.problems(sections)
        return problems

    def sections(self, name: str) -> Sections:
        """The frozen view stage ``name`` runs with: its declared sections and nothing else."""
        return sections_for(registry.stage(name), self)


def sections_for(declared: Any, cfg: PipelineConfig) -> Sections:
    """Stage ``declared``'s sections of ``cfg``, copied, so the stage cannot change the recipe."""
    values = {}
    for name in declared.sections:
        value = getattr(cfg, name)
        values[name] = value.model_copy(deep=True) if isinstance(value, Section) else value
    return Sections(declared.name, values)


def sections_from_json(stage: str, data: dict[str, Any]) -> Sections:
    """The inverse of ``Sections.to_json``: typed sections from a stage call's JSON (a container, a rank)."""
    declared = registry.stage(stage)
    unknown = sorted(set(data) - set(declared.sections))
    if unknown:
        raise ConfigError(f"stage {stage!r} was sent section(s) {', '.join(unknown)} it does not declare")
    values = {}
    for name in declared.sections:
        annotation = PipelineConfig.model_fields[name].annotation
        try:
            values[name] = TypeAdapter(annotation).validate_python(data[name])
        except KeyError:
            raise ConfigError(f"stage {stage!r} call is missing its section {name!r}") from None
        except ValidationError as exc:
            raise ConfigError("; ".join(_describe(e, f"stage call {stage}.{name}") for e in exc.errors())) from None
    return Sections(stage, values)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}={raw}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def add_override_argument(parser: Any, help: str = "override a recipe field (repeatable)") -> None:
    """``--set KEY=VALUE`` (repeatable) on an argparse parser, read by ``apply_overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a raw config tree, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. pretrain.max_steps=50")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            _set_dotted(tree, key.strip(), raw)
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # YAML turns 2001-13-45 into a bad date
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {_first_line(exc)}") from None
    return tree


def _known_keys(loc: tuple) -> list[str]:
    """Field names of the section that holds the key at ``loc`` (empty when the path leaves the schema)."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        model = fields[part].annotation
    return list(getattr(model, "model_fields", {}))


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so a message stays on one line."""
    return text if text.isprintable() else repr(text)[1:-1]


def _describe(error: dict, source: str) -> str:
    field = _printable(".".join(str(p) for p in error["loc"])) or "<root>"
    if field in MOVED_KEYS:  # a key of an older recipe shape, unknown now or a section now: name its new home
        return (
            f"{source}: '{field}' has moved; use '{MOVED_KEYS[field]}' (see the recipe reference in docs/reference.md)"
        )
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _known_keys(tuple(error["loc"])), n=1, cutoff=0.6)
        hint = (
            f"did you mean '{_printable('.'.join([*map(str, error['loc'][:-1]), close[0]]))}'? "
            if close
            else "check the spelling; "
        )
        return f"{source}: unknown key '{field}' ({hint}see the recipe reference in docs/reference.md)"
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's ValueError
    if isinstance(value, dict):  # a check across fields: its message names them (the input is a whole section)
        return f"{source}: {_printable(message if field == '<root>' else f'{field}: {message}')}"
    return f"{source}: {field} = {value!r}: {_printable(message)}"


def parse_config(tree: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    """Validate a raw tree; a bad field raises ``ConfigError`` naming field, value and rule."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e, source) for e in exc.errors())) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML recipe (or the built-in defaults when ``path`` is None) and apply overrides."""
    tree: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: recipe not found (see configs/ for examples)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read recipe: {exc}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {_first_line(exc)}") from None
        except (ValueError, RecursionError) as exc:  # e.g. a date such as 2001-13-45 that YAML turns into one
            raise ConfigError(f"{source}: a value cannot be read: {_first_line(exc)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    try:
        apply_overrides(tree, list(overrides))
    except (yaml.YAMLError, ValueError, RecursionError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--set: cannot apply override: {_first_line(exc)}") from None
    return parse_config(tree, source)
