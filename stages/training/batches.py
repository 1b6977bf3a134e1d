"""Language-model batches cut from a token stream (one split of a data artifact).

Training windows are drawn at random positions, seeded by (seed, step, micro-step): the batch
of any step can be recomputed on its own, which is what lets a resumed run see exactly the
data an uninterrupted one would — the "data cursor" is simply the step number. Windows may
span a document boundary; the EOS separator between documents is then inside the window and
the model learns that a document ended, as in GPT-2/nanoGPT. Packing per document would waste
the ends of short documents or need attention masks, for little gain at this scale.

Under torchrun every rank reads only its own slice of each step's global batch: the starts
of all ``batch_size × world_size`` windows come from the same seeded draw, and rank r stacks
rows ``r·batch_size … (r+1)·batch_size``. So 2 ranks of batch 4 train on exactly the rows one
process of batch 8 would — the property the DDP equivalence test checks.

Validation uses fixed windows spread evenly over the whole split, so every evaluation scores
the same tokens and val-loss points on a curve are comparable.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.core.errors import DataError
from stages.storage.shards import TokenShards


def require_tokens(shards: TokenShards, block_size: int, field: str = "pretrain.model.block_size") -> None:
    """A split must hold at least one window of block_size+1 tokens (inputs plus shifted targets)."""
    need = block_size + 1
    if len(shards) < need:
        suggestion = max(8, 2 ** int(np.log2(max(len(shards) - 1, 1)))) if len(shards) > 9 else None
        hint = f"set {field}={suggestion} or lower" if suggestion else "use a larger corpus"
        raise DataError(
            f"{shards.split} split holds {len(shards)} tokens, fewer than {field}+1 = {need}; "
            f"{hint} (or give the {shards.split} split more text, e.g. raise data.val_fraction)"
        )


def _stack(shards: TokenShards, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([shards.window(int(s), block_size + 1) for s in starts])
    tokens = torch.from_numpy(rows)  # int64 already
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class RandomWindows:
    """``get(step, micro)`` → (x, y), each (batch_size, block_size), y = x shifted by one token."""

    def __init__(
        self, shards: TokenShards, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        require_tokens(shards, block_size)
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.seed = seed % 2**32  # SeedSequence entropy must be non-negative
        self.max_start = len(shards) - block_size - 1  # inclusive: the last window ends at the last token
        self.rank, self.world_size = rank, world_size

    def shard(self, rank: int, world_size: int) -> RandomWindows:
        """This rank's view: its ``batch_size`` rows of every global batch of ``batch_size × world_size``."""
        return RandomWindows(self.shards, self.block_size, self.batch_size, self.seed, rank, world_size)

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(0, self.max_start + 1, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _stack(self.shards, mine, self.block_size)


class _Interleaved:
    """Any batch source split over ranks by step: rank r of w trains on source step ``s·w + r``.

    For sources that cannot slice a global batch themselves (e.g. fine-tuning's packed rows);
    each rank still reads its own rows and the whole job consumes the source in order.
    """

    def __init__(self, inner, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.get(step * self.world_size + self.rank, micro)


def for_rank(batches, rank: int, world_size: int):
    """The view of ``batches`` that rank ``rank`` of ``world_size`` trains on (itself when alone)."""
    if world_size == 1:
        return batches
    if hasattr(batches, "shard"):
        return batches.shard(rank, world_size)
    return _Interleaved(batches, rank, world_size)


def fixed_windows(
    shards: TokenShards, block_size: int, batch_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` held-out batches spread evenly over the split (overlapping if it is short)."""
    require_tokens(shards, block_size)
    count = batch_size * n_batches
    starts = np.linspace(0, len(shards) - block_size - 1, num=count).astype(np.int64)
    x, y = _stack(shards, starts, block_size)
    return list(zip(x.split(batch_size), y.split(batch_size)))
