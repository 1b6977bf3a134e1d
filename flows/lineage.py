"""Where a run comes from and what it is judged against, as artifact references.

Two questions each pipeline run asks before its first stage:

* **What does it continue from?** The recipe's ``continue_from``: ``none`` (a new lineage),
  ``champion`` (the registered model's ``champion`` alias), a registered version number, or the
  store URI of a pretrain or finetune output (``champion`` before there is one: from scratch, with a
  warning). ``resolve_parent`` turns it into a ``Parent``: the references of the parent's tokenizer,
  data, pretrain and finetune outputs, its registry version (when it came from the registry) and its
  lineage's ``root_data``. A version is read through its
  tags (``gptpipe.ref.<stage>``, ``gptpipe.lineage.root_data``: written when it was registered); a
  URI through the manifests in the store, whose ``inputs`` name the references each output read.
  A run with a parent reuses the parent's tokenizer (the tokenizer stage is not rerun: a lineage
  keeps one vocabulary) and pretrains from the parent's weights (``stages/training/continuation.py``).
* **Who is the champion?** Whatever ``continue_from`` says, the evaluate stage scores every new
  model beside the registry's current champion, on the same held-out material: ``resolve_champion``
  gives its finetune and tokenizer references, its lineage's ``root_data`` (whose val split is the
  frozen held-out text) and its version; None before the first champion or with tracking off.

``root_data`` is the data output of the run that started the lineage (the one that trained its
tokenizer): its val split is the held-out text every model of the lineage is compared on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.report import FROM_PARENT
from stages.core.errors import ArtifactError, ConfigError
from stages.registry import ORDER
from stages.serving import model_registry as registry
from stages.storage.artifacts import MANIFEST, ArtifactRef, Manifest, read_manifest
from stages.storage.stores import ref_from_path, s3_output_manifest

log = logging.getLogger("gptpipe.flow")

CHAMPION = "champion"  # the registry alias the gate moves and everything loads
REF_TAG = "gptpipe.ref."  # + stage: a registered version's reference to that stage's output (JSON)
PARENT_VERSION_TAG = "gptpipe.lineage.parent_version"
PARENT_TAG = "gptpipe.lineage.parent"  # JSON reference of the parent's pretrain output
ROOT_DATA_TAG = "gptpipe.lineage.root_data"  # JSON reference of the lineage's root data output
# Warn when the parent's tokenizer gets this much fewer bytes per token on the new corpus than on the
# text it was trained on. Samples of one distribution differ by about 1 %; 5 % fewer bytes per token
# means the new text holds what the vocabulary was not built for (another language, new identifiers),
# each sequence of block_size tokens sees less text, and a fresh lineage (continue_from=none) may pay.
DRIFT_WARNING = 0.05


@dataclass(frozen=True)
class Parent:
    """The model a run continues from: its outputs, its registry version and its lineage's root data."""

    source: str  # the continue_from value it was resolved from
    tokenizer: ArtifactRef
    pretrain: ArtifactRef
    data: ArtifactRef | None = None
    finetune: ArtifactRef | None = None
    version: str | None = None
    root_data: ArtifactRef | None = None

    def describe(self) -> str:
        return (
            f"{self.source} (version {self.version})" if self.version and self.version != self.source else self.source
        )


@dataclass(frozen=True)
class Champion:
    """The registry's champion, as the evaluate stage needs it to score a challenger beside it."""

    version: str
    finetune: ArtifactRef
    tokenizer: ArtifactRef
    root_data: ArtifactRef


# --- continue_from ----------------------------------------------------------------------------


def resolve_parent(value: str, store: str, client: Any | None, model: str) -> Parent | None:
    """The ``Parent`` that ``continue_from=value`` names; None for ``none``, and for ``champion`` while
    the registry has no champion (a warning): a recipe that continues from the champion every night
    trains from scratch on its first night, and its registered version becomes the first champion.

    ``client`` is the MLflow client of the run's tracking store (None: tracking is off, so only a
    store URI can be resolved), ``model`` the registered model's name, ``store`` the recipe's store.
    Anything that cannot be resolved is a ``GptpipeError`` of one line saying what to do.
    """
    if value == "none":
        return None
    if value == CHAMPION or value.isdigit():
        if client is None:
            raise ConfigError(
                f"continue_from={value}: the model registry is read from MLflow, but tracking is off "
                "(--no-track); turn tracking on, or continue from the store URI of a pretrain output"
            )
        version = (
            registry.champion(client, model) if value == CHAMPION else registry.version_or_none(client, model, value)
        )
        if version is None and value == CHAMPION:  # the first run of a recipe meant to continue each night
            log.warning(
                "continue_from=champion: model %r has no %r alias yet; training from scratch, "
                "as continue_from=none would (a new lineage)",
                model,
                CHAMPION,
            )
            return None
        if version is None:
            raise ConfigError(
                f"continue_from={value}: model {model!r} has no version {value}; see its versions in the MLflow UI"
            )
        parent = _parent_from_tags(value, model, str(version.version), version.tags)
    else:
        try:
            parent = _parent_from_store(value)
        except ArtifactError as exc:  # a manifest missing or incomplete: say which continue_from led to it
            raise ArtifactError(f"continue_from={value}: {exc}") from None
    for ref in (parent.tokenizer, parent.pretrain):
        _check_in_store(value, ref, store)
        _check_finished(f"continue_from={value}", ref, "or continue from another model")
    return parent


def _tag_ref(tags: dict[str, str], name: str) -> ArtifactRef | None:
    """The artifact reference a version tag holds as JSON, or None when the tag is absent or unreadable."""
    text = tags.get(name)
    if not text:
        return None
    try:
        return ArtifactRef.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError):
        log.warning("registry tag %s is not an artifact reference (%r); ignoring it", name, text[:120])
        return None


# The stages up to the model a later run continues from: what a version's refs name of its lineage.
LINEAGE_STAGES = ORDER[: ORDER.index("finetune") + 1]


def _parent_from_tags(value: str, model: str, version: str, tags: dict[str, str]) -> Parent:
    refs = {stage: _tag_ref(tags, REF_TAG + stage) for stage in LINEAGE_STAGES}
    missing = [REF_TAG + stage for stage in ("tokenizer", "pretrain") if refs[stage] is None]
    if missing:
        raise ArtifactError(
            f"continue_from={value}: version {version} of model {model!r} has no {' or '.join(missing)} tag "
            "(registered before lineage tags); continue from the store URI of its pretrain output instead"
        )
    return Parent(
        source=value,
        tokenizer=refs["tokenizer"],
        pretrain=refs["pretrain"],
        data=refs["data"],
        finetune=refs["finetune"],
        version=version,
        root_data=_tag_ref(tags, ROOT_DATA_TAG) or refs["data"],
    )


def read_output_manifest(ref: ArtifactRef) -> Manifest:
    """The manifest of a finished output (local or ``s3://``), checked against the reference's digest;
    only the manifest is read, so walking a lineage downloads no weights or shards."""
    if ref.uri.startswith("s3://"):
        manifest = s3_output_manifest(ref.uri)
    else:
        manifest = read_manifest(Path(ref.uri)) if (Path(ref.uri) / MANIFEST).is_file() else None
    if manifest is None:
        raise ArtifactError(f"{ref.uri}: no finished {ref.stage} output there (deleted, or never finished)")
    if manifest.digest != ref.digest:
        raise ArtifactError(
            f"{ref.uri}: content digest {manifest.digest[:12]}… differs from the recorded {ref.digest[:12]}… "
            "(the output was rebuilt or edited)"
        )
    return manifest


def _input(manifest: Manifest, name: str) -> ArtifactRef | None:
    ref = manifest.inputs.get(name)
    return ArtifactRef.from_dict(ref) if ref else None


def _parent_from_store(value: str) -> Parent:
    """The parent a store URI names: a pretrain output, or a finetune output (then its pretrain input)."""
    named = ref_from_path(value)
    if named.stage not in ("pretrain", "finetune"):
        raise ConfigError(
            f"continue_from={value}: that is a {named.stage} output; pass the store URI of a pretrain or finetune output"
        )
    finetune = None
    if named.stage == "finetune":
        finetune, named = named, _input(read_output_manifest(named), "pretrain")
        if named is None:
            raise ArtifactError(f"{finetune.uri}/{MANIFEST} names no pretrain input")
    manifest = read_output_manifest(named)
    tokenizer = _input(manifest, "tokenizer")
    if tokenizer is None:
        raise ArtifactError(f"{named.uri}/{MANIFEST} names no tokenizer input")
    return Parent(
        source=value,
        tokenizer=tokenizer,
        pretrain=named,
        data=_input(manifest, "data"),
        finetune=finetune,
        root_data=_root_data(manifest),
    )


def _root_data(manifest: Manifest) -> ArtifactRef | None:
    """The data input of the lineage's first pretrain: follow ``parent`` inputs back to one without."""
    seen = {manifest.key}
    while "parent" in manifest.inputs:
        manifest = read_output_manifest(ArtifactRef.from_dict(manifest.inputs["parent"]))
        if manifest.key in seen:  # cannot happen with content keys; never loop on a hand-edited store
            break
        seen.add(manifest.key)
    return _input(manifest, "data")


def _check_in_store(value: str, ref: ArtifactRef, store: str) -> None:
    """The pipeline reads the parent's outputs through the recipe's store: they must be in it."""
    if store.startswith("s3://"):
        inside = ref.uri.startswith(store.rstrip("/") + "/")
    else:
        inside = not ref.uri.startswith("s3://")
    if not inside:
        raise ConfigError(
            f"continue_from={value}: its {ref.stage} output {ref.uri} is not in the recipe's store "
            f"({store}); set artifacts.store to the store it was built in"
        )


def _check_finished(whose: str, ref: ArtifactRef, otherwise: str) -> None:
    """A recorded output must still be in the store, or the stage reading it would fail later, vaguely."""
    try:
        read_output_manifest(ref)
    except ArtifactError as exc:
        raise ArtifactError(f"{whose}: {exc}; rebuild it by rerunning the recipe that made it, {otherwise}") from None


# --- the champion, for comparison ------------------------------------------------------------


def resolve_champion(client: Any | None, model: str) -> Champion | None:
    """The registry's champion of ``model`` with the references evaluate needs; None when there is no
    registry (tracking off), no champion yet, or a champion registered before lineage tags (said once)."""
    if client is None:
        return None
    version = registry.champion(client, model)
    if version is None:
        return None
    tags = version.tags
    finetune, tokenizer = _tag_ref(tags, REF_TAG + "finetune"), _tag_ref(tags, REF_TAG + "tokenizer")
    root_data = _tag_ref(tags, ROOT_DATA_TAG) or _tag_ref(tags, REF_TAG + "data")
    if finetune is None or tokenizer is None or root_data is None:
        log.warning(
            "%s@%s (version %s) carries no %sfinetune/tokenizer/data tags (registered before lineage tags): "
            "this run is not compared with it",
            model,
            CHAMPION,
            version.version,
            REF_TAG,
        )
        return None
    for ref in (finetune, tokenizer, root_data):
        _check_finished(
            f"the champion ({model} version {version.version})", ref, "or move the alias to another version"
        )
    return Champion(str(version.version), finetune, tokenizer, root_data)


# --- what the pipeline hands the stages and the registry ------------------------------------


def stage_inputs(results: dict[str, dict[str, Any]], parent: Parent | None, champion: Champion | None) -> dict:
    """The references a stage is offered: every earlier output, and the lineage inputs.

    ``parent`` (pretrain) is the parent's pretrain output. The champion's (evaluate) come only when
    this run's finetune output is another model than the champion's: scoring a model against itself
    says nothing, and leaving them out keeps evaluate's content key, so a rerun of the champion's
    own recipe reuses every stage. A stage takes only the lineage inputs it declares.
    """
    inputs = {stage: ArtifactRef.from_dict(done["ref"]) for stage, done in results.items()}
    if parent is not None:
        inputs["parent"] = parent.pretrain
    finetune = inputs.get("finetune")
    if champion is not None and finetune is not None and finetune.digest != champion.finetune.digest:
        inputs.update(champion=champion.finetune, champion_tokenizer=champion.tokenizer, frozen=champion.root_data)
    return inputs


def parent_tokenizer(parent: Parent) -> dict[str, Any]:
    """The tokenizer stage's record when a parent's tokenizer is reused: its output and metrics, labelled
    as the parent's (status ``from parent``), not as a content-key reuse."""
    manifest = read_output_manifest(parent.tokenizer)
    return {
        "stage": "tokenizer",
        "ref": parent.tokenizer.to_dict(),
        "reused": True,
        "status": FROM_PARENT,
        "waited_s": 0.0,
        "wall_time_s": 0.0,
        "metrics": manifest.metrics,
        "run_id": None,
        "experiment_id": None,
    }


def lineage_tags(parent: Parent | None, results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The ``gptpipe.lineage.*`` tags of this run (MLflow run and registered version): its parent's
    version and pretrain output when continuing, and the lineage's root data — the parent's when
    continuing, else this run's own data output (it starts a lineage)."""
    tags: dict[str, str] = {}
    root = None
    if parent is not None:
        if parent.version:
            tags[PARENT_VERSION_TAG] = parent.version
        tags[PARENT_TAG] = json.dumps(parent.pretrain.to_dict())
        root = parent.root_data
    elif "data" in results:
        root = ArtifactRef.from_dict(results["data"]["ref"])
    if root is not None:
        tags[ROOT_DATA_TAG] = json.dumps(root.to_dict())
    return tags


def tokenizer_drift(parent: Parent, data_metrics: dict[str, Any]) -> tuple[str, bool] | None:
    """(a line comparing the parent tokenizer's bytes per token on the new corpus with its figure on the
    text it was trained on, whether it is past ``DRIFT_WARNING``); None when either figure is unknown.

    The reference is the data stage's figure on the lineage's root corpus (the tokenizer was trained on
    it), else on the parent's corpus, else the tokenizer stage's own held-out figure.
    """
    new = data_metrics.get("bytes_per_token")
    reference, source = None, ""
    for ref, label in ((parent.root_data, "its training corpus"), (parent.data, "the parent's corpus")):
        if ref is not None and reference is None:
            reference, source = read_output_manifest(ref).metrics.get("bytes_per_token"), label
    if reference is None:
        reference, source = read_output_manifest(parent.tokenizer).metrics.get("bytes_per_token"), "its held-out text"
    if not new or not reference:
        return None
    change = new / reference - 1.0
    line = (
        f"tokenizer drift: the parent's tokenizer gets {new:.3f} bytes/token on the new corpus, "
        f"{reference:.3f} on {source} ({change:+.1%})"
    )
    warn = change < -DRIFT_WARNING
    if warn:
        line += (
            f"; past the {DRIFT_WARNING:.0%} warning level: the new text fits its vocabulary worse — "
            "consider a new lineage (continue_from=none) with a tokenizer trained on it"
        )
    return line, warn
