"""The challenger against the registry's champion, on the same ground.

When the flow gives the evaluate stage the champion's lineage inputs — ``champion`` (its finetune
output), ``champion_tokenizer`` (its tokenizer output) and ``frozen`` (the data output whose ``val``
split, made with that tokenizer, is the frozen held-out text of its lineage) — both models are scored on:

* task exact match on the same held-out items (the challenger's), each model prompted through its
  own tokenizer's chat template (a challenger trained from scratch may have a new vocabulary);
* bits per byte on the frozen set: the first ``evaluate.val_batches x batch_size x block_size`` tokens
  of the frozen split, with the *champion's* ``block_size``, as whole documents decoded with the
  champion's tokenizer (``stages.evaluation.text_bpb``). It depends only on the champion's lineage,
  so every challenger measured against this champion reads the same text;
* bits per byte on this run's own ``val`` split, bounded the same way with the challenger's
  ``block_size`` and decoded with this run's tokenizer, reported apart from the frozen set.

Each model reads the text through its own tokenizer (the split's tokens as they are when the
tokenizers are the same), so the figures compare across vocabularies. ``METRICS`` are the flat
figures the stage reports; the differences (challenger - champion) are the report's to show.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stages.core.errors import ArtifactError
from stages.evaluation.answers import generate_answers, score
from stages.evaluation.text_bpb import TextSet, bits_per_byte, text_set
from stages.lm.chat import ChatTemplate
from stages.lm.tokenizer import Tokenizer
from stages.training import checkpoint_format as checkpoint

if TYPE_CHECKING:
    import torch

    from stages.core.sections import EvaluateConfig
    from stages.lm.model import GPT

log = logging.getLogger("gptpipe.evaluate")

LINEAGE_INPUTS = ("champion", "champion_tokenizer", "frozen")
SIDES = ("challenger", "champion")
FIGURES = ("exact_match", "frozen_bpb", "val_bpb")
METRICS = tuple(f"{side}_{figure}" for figure in FIGURES for side in SIDES)


@dataclass(frozen=True)
class Contender:
    """A model and the tokenizer it reads and writes text with."""

    model: GPT
    tokenizer: Tokenizer


def champion_given(inputs: dict[str, Path]) -> bool:
    """Whether the champion's lineage inputs are here: all of them, or none."""
    given = [name for name in LINEAGE_INPUTS if name in inputs]
    if given and len(given) < len(LINEAGE_INPUTS):
        missing = [name for name in LINEAGE_INPUTS if name not in inputs]
        raise ArtifactError(
            f"evaluate got {', '.join(given)} without {', '.join(missing)}: scoring the champion needs all of "
            f"{', '.join(LINEAGE_INPUTS)} (or none of them)"
        )
    return bool(given)


def load_champion(inputs: dict[str, Path], device: str | torch.device) -> Contender:
    """The champion's model and tokenizer, checked against each other and against the frozen split."""
    from stages.storage.shards import read_index

    tokenizer = Tokenizer.load(inputs["champion_tokenizer"])
    model = checkpoint.load_model(checkpoint.model_directory(inputs["champion"]), device=device)
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise ArtifactError(
            f"{inputs['champion']}: the champion model has {model.cfg.vocab_size} token ids, its tokenizer "
            f"{inputs['champion_tokenizer']} {tokenizer.vocab_size}; pass the tokenizer the champion was trained with"
        )
    frozen = read_index(inputs["frozen"])
    if (int(frozen["vocab_size"]), int(frozen["eos_id"])) != (tokenizer.vocab_size, tokenizer.eos_id):
        raise ArtifactError(
            f"{inputs['frozen']}: the frozen data was made with a {frozen['vocab_size']}-id tokenizer, not the "
            f"champion's ({tokenizer.vocab_size} ids, {inputs['champion_tokenizer']}); pass its lineage's data"
        )
    return Contender(model, tokenizer)


def _bpb(contender: Contender, texts: TextSet, batch_size: int) -> float:
    ids = texts.ids_for(contender.tokenizer)
    return bits_per_byte(contender.model, ids, texts.num_bytes, contender.tokenizer.eos_id, batch_size)


def compare_with_champion(
    inputs: dict[str, Path], challenger: Contender, challenger_scores: dict, records: list[dict], ecfg: EvaluateConfig
) -> dict:
    """The report's comparison: both models' exact match on ``records`` (the challenger's already in
    ``challenger_scores``: ``accuracy``, ``per_task``), frozen-set and new-val bits per byte, and the sets' sizes."""
    from stages.storage.shards import TokenShards

    device = next(challenger.model.parameters()).device
    champion = load_champion(inputs, device)
    sequences = ecfg.val_batches * ecfg.batch_size
    frozen = text_set(
        TokenShards(inputs["frozen"], "val"), champion.tokenizer, sequences * champion.model.cfg.block_size
    )
    new_val = text_set(
        TokenShards(inputs["data"], "val"), challenger.tokenizer, sequences * challenger.model.cfg.block_size
    )
    started = time.perf_counter()
    answers = generate_answers(
        champion.model, ChatTemplate(champion.tokenizer), records, ecfg.max_new_tokens, desc="evaluate champion"
    )
    champion_scores = score(records, answers.texts)
    sides = {}
    for side, contender, scores in (
        ("champion", champion, champion_scores),
        ("challenger", challenger, challenger_scores),
    ):
        sides[side] = {
            "exact_match": scores["accuracy"],
            "frozen_bpb": _bpb(contender, frozen, ecfg.batch_size),
            "val_bpb": _bpb(contender, new_val, ecfg.batch_size),
            "per_task": scores["per_task"],
        }
        log.info(
            "%s: exact match %.1f%%, frozen-set bpb %.4f, new val bpb %.4f",
            side,
            100 * sides[side]["exact_match"],
            sides[side]["frozen_bpb"],
            sides[side]["val_bpb"],
        )
    return {
        "task_items": len(records),
        "frozen_set": frozen.describe(),
        "val_set": new_val.describe(),
        "same_tokenizer": champion.tokenizer.model_proto == challenger.tokenizer.model_proto,
        "seconds": round(time.perf_counter() - started, 2),
        **sides,
    }


def comparison_metrics(comparison: dict) -> dict[str, float]:
    """The flat figures the stage reports (``METRICS``, in its order), rounded as its other headline figures."""
    return {f"{side}_{figure}": round(comparison[side][figure], 6) for figure in FIGURES for side in SIDES}
