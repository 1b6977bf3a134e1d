"""Run one stage under the artifact contract: key it, reuse it, or build it atomically.

What a stage reads (recipe sections, upstream artifacts) is declared in ``stages.registry``;
its module exposes ``run(cfg, inputs, out, tracker) -> dict``, which does the work, writing files
under ``out`` (a fresh directory), reading input artifacts from local directories, and returning
summary metrics for the manifest.

This module is the one place that turns that into a content-keyed, verified,
all-or-nothing artifact. The Prefect flow and ``python -m stages`` both call it.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from stages.core.config import PipelineConfig
from stages.core.errors import ArtifactError
from stages.core.tracking import MemoryTracker, Tracker
from stages.registry import stage
from stages.storage.artifacts import ArtifactRef, Manifest, cache_key, code_version, files_digest, hash_files
from stages.storage.stores import Store

log = logging.getLogger("gptpipe.runner")


@dataclass
class StageResult:
    ref: ArtifactRef
    manifest: Manifest
    reused: bool
    wall_time_s: float


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(stage(name).module)


def stage_inputs(name: str, cfg: PipelineConfig) -> tuple[str, ...]:
    """Upstream stages this stage reads under ``cfg`` (a stage may choose, e.g. export's source)."""
    return stage(name).inputs_for(cfg)


def stage_config(name: str, cfg: PipelineConfig) -> dict[str, Any]:
    """The resolved sections a stage reads, as plain data (what its cache key and params hold)."""
    sections = stage(name).sections
    config = {section: getattr(cfg, section).model_dump(mode="json") for section in sections}
    if "corpus" in sections:
        # The corpus files themselves are an input: an edited file must not reuse stale outputs.
        from stages.storage.corpus import fingerprint

        config["corpus"]["fingerprint"] = fingerprint(cfg.corpus)
    return config


def _key_parts(
    name: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef]
) -> tuple[dict[str, Any], dict[str, ArtifactRef], str]:
    """What a stage's content key hashes: its config sections, the inputs it reads, its code version."""
    needs = stage_inputs(name, cfg)
    missing = [need for need in needs if need not in inputs]
    if missing:
        raise ArtifactError(f"stage '{name}' needs input artifact(s) {', '.join(missing)}; pass --input NAME=URI")
    needed = {n: ref for n, ref in inputs.items() if n in needs}
    return stage_config(name, cfg), needed, code_version(stage(name).module)


def stage_key(name: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef]) -> str:
    """The content key of stage ``name``'s output for this recipe and these input artifacts."""
    return cache_key(name, *_key_parts(name, cfg, inputs))


def find_finished(name: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], store: Store) -> StageResult | None:
    """The finished output the store already holds for this stage's content key, or None.

    The one reuse check: ``run_stage``, the torchrun launcher and containers mode all ask this
    before doing any work, so "same key, reuse it" means the same thing however a stage runs.
    """
    return _finished(name, stage_key(name, cfg, inputs), store)


def _finished(name: str, key: str, store: Store) -> StageResult | None:
    existing = store.find(name, key)
    if existing is None:
        return None
    log.info("stage %s: reusing finished output %s (key %s)", name, store.ref(existing).uri, key)
    return StageResult(store.ref(existing), existing, reused=True, wall_time_s=0.0)


def run_stage(
    name: str,
    cfg: PipelineConfig,
    inputs: dict[str, ArtifactRef],
    store: Store,
    tracker: Tracker | None = None,
    force: bool = False,
) -> StageResult:
    """Reuse the finished output for this content key, or build it and publish it atomically."""
    module = stage_module(name)
    config, needed, version = _key_parts(name, cfg, inputs)
    key = cache_key(name, config, needed, version)
    finished = None if force else _finished(name, key, store)  # the key's parts are needed below too
    if finished is not None:
        return finished

    tracker = tracker or MemoryTracker()
    needs = stage_inputs(name, cfg)
    local_inputs = {need: store.materialize(inputs[need]) for need in needs}
    scratch = store.scratch(name, key)
    started = time.perf_counter()
    try:
        metrics = module.run(cfg, local_inputs, scratch, tracker) or {}
        wall = time.perf_counter() - started
        files = hash_files(scratch)
        manifest = Manifest(
            stage=name,
            key=key,
            config=config,
            inputs={n: ref.to_dict() for n, ref in sorted(needed.items())},
            code_version=version,
            files=files,
            metrics=metrics,
            wall_time_s=round(wall, 3),
            digest=files_digest(files),
        )
        ref = store.commit(scratch, manifest)
    except BaseException:
        store.discard(scratch)
        raise
    log.info("stage %s: finished in %.1fs -> %s", name, wall, ref.uri)
    return StageResult(ref, manifest, reused=False, wall_time_s=wall)
