"""Pretraining that continues from an earlier model (``continue_from``): the parent's weights as the start.

This follows Ibrahim et al. (2024), "Simple and Scalable Strategies to Continually Pre-train Large
Language Models". The continued run builds the recipe's model, checks that it has the parent's
shape, loads the parent's weights and then trains its own ``pretrain.max_steps`` steps with the
usual linear warmup and cosine decay: that re-warms and re-decays the learning rate. It starts
with a fresh AdamW state, because the parent's moments were fitted at the end of its schedule,
where the learning rate was at its floor.

Replay: the data stage tokenizes the whole grown corpus, the old documents as well as the new
ones, and the batches draw windows uniformly over its shards. Old text is therefore replayed at
its share of the corpus, with no separate replay buffer to keep (the paper's remedy for
forgetting is replaying old data, and here the grown corpus already holds it).

Resuming: the continued run's own checkpoints live in its work directory like any run's. The
training loop loads the newest of them *after* the parent's weights were loaded, so a retry of a
killed continued run continues from its own step, not from the parent again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.errors import ConfigError
from stages.storage.artifacts import read_manifest
from stages.training.checkpoint_format import TRAINER, load_weights, model_directory, read_config

if TYPE_CHECKING:
    from stages.lm.model import GPT, GPTConfig

# GPTConfig fields that may differ from the parent's: dropout is a training-time knob, not a shape.
_FREE = frozenset({"dropout"})


def shape_mismatch(ours: GPTConfig, parent: GPTConfig) -> str | None:
    """One line naming every architecture field where ``ours`` differs from the parent's, or None."""
    mine, theirs = ours.to_dict(), parent.to_dict()
    differing = [k for k in mine if k not in _FREE and mine[k] != theirs.get(k)]
    if not differing:
        return None

    def name(key: str) -> str:
        return "the tokenizer's vocab_size" if key == "vocab_size" else f"pretrain.model.{key}"

    parts = [f"{name(k)} = {mine[k]} but the parent has {theirs.get(k)}" for k in differing]
    return (
        f"continue_from: {'; '.join(parts)}; a continued model keeps its parent's shape "
        "(set these to the parent's values, or use continue_from=none to train a new model)"
    )


def start_from_parent(model: GPT, parent_artifact: Path) -> dict[str, Any]:
    """Load the parent's weights into ``model`` after checking its shape; returns what the metrics record:
    ``continued_from`` (the parent output's content key) and ``parent_step`` (its last step)."""
    directory = model_directory(parent_artifact)
    problem = shape_mismatch(model.cfg, read_config(directory))
    if problem:
        raise ConfigError(problem)
    load_weights(directory, model)
    trainer = directory / TRAINER
    step = json.loads(trainer.read_text(encoding="utf-8")).get("step") if trainer.is_file() else None
    return {"continued_from": read_manifest(Path(parent_artifact)).key, "parent_step": step}
