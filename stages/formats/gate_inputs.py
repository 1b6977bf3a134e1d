"""The one set of inputs every export gate compares on, built once per export by ``stages.formats.job``.

Its own module so that the declaration type (``stages.formats.format``) and the job that builds it
both read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from stages.lm.chat import Message


@dataclass(frozen=True)
class GateInputs:
    """What every gate compares on, built once per export (``stages.formats.job.gate_inputs``)."""

    ids: list[np.ndarray]  # random id matrices: (1, 1), (2, block_size) and export.parity_shapes more
    odd_ids: list[np.ndarray]  # one more shape, drawn after ``ids`` from the same generator (model.pt2)
    prompts: list[list[int]]  # held-out chat prompts and one that runs past block_size
    conversations: list[list[Message]]  # held-out conversations: tokenizer checks, the int8 loss
    heldout_source: str  # where they came from: the fine-tune's heldout.jsonl or synthetic tasks
    quality_conversations: list[list[Message]]  # what the quantized twin's quality gate scores
    tolerance: float  # export.tolerance
    new_tokens: int  # export.generation_tokens
    threads: int  # export.threads
