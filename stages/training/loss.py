"""The next-token loss: summed for a training step, averaged per scored token for evaluation.

Its own module, apart from ``loop.py``, so that a stage that only scores a model (``evaluate``)
imports neither the training loop nor its checkpointing: the content key of a stage hashes every
``stages`` module it imports (``stages.storage.artifacts.code_modules``), and a change to the loop
should not invalidate evaluation results.

Targets equal to ``IGNORE`` (-100) are not scored; fine-tuning masks prompt tokens that way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.errors import TrainingError
from stages.lm.targets import IGNORE
from stages.training.perf import scoring_autocast


def token_loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over targets that are not IGNORE (fp32 logits for the softmax)."""
    logits = model(x)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss per scored token over ``batches`` (fixed held-out batches), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with scoring_autocast(device):
                total += float(token_loss_sum(model, x, y))
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise TrainingError("evaluation batches hold no scored tokens (every target is -100)")
    return total / count
