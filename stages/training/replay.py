"""How many rows of each fine-tuning micro-batch replay pretraining text.

Torch-free on purpose: the recipe schema checks it before anything runs, and the finetune stage
uses it to build its batches, so the one formula sits in a module the stage's cache key covers.
"""

from __future__ import annotations


def replay_rows(fraction: float, batch_size: int) -> int:
    """``fraction`` of ``batch_size`` rounded, and at least one row when replay is on (> 0)."""
    if fraction <= 0:
        return 0
    return max(1, round(fraction * batch_size))
