"""The checkpoint policy of one training run: when to write a checkpoint, what goes in it, which
ones stay on disk, and resuming from the newest — torchtitan's ``CheckpointManager`` in small.

``checkpoint_format.py`` is the format (what a checkpoint directory holds, read by every stage);
this component decides how one run uses it. The loop hands it every step and asks nothing:

* ``save(step, state, last_step=…)`` is called after every optimizer step. It writes
  ``<root>/step_00000050`` when the step is due — every ``interval`` steps (0: none between), the
  last step, or ``force`` (a stop request) — and otherwise returns None without calling ``state``. A
  checkpoint holds the weights and optimizer (gathered from the shards under FSDP2), every RNG,
  the world size and the trainer's own ``state()`` (JSON); rank 0 writes it, then prunes to the
  newest ``keep`` and removes leftovers of interrupted writes; every rank waits for the write;
* ``resume_latest()`` loads the newest complete checkpoint into the model and optimizer,
  restores the RNGs and returns what the trainer saved, or None to start from scratch;
* with a ``mirror`` (an ``s3://`` store), each checkpoint written is also copied up, and a run
  resuming on a machine without it brings it back first (``checkpoint_mirror.py``);
* ``latest()`` names that checkpoint (error messages point at it).

Step numbers live in the directory names; only ``checkpoint_format.list_checkpoints`` reads them,
so no caller parses a name. Without a root (``None``) nothing is written and nothing is resumable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.core.errors import TrainingError
from stages.training import checkpoint_format as ckpt
from stages.training import distributed
from stages.training.checkpoint_mirror import CheckpointMirror


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run continues from: its step, where it is, and the trainer state it saved."""

    step: int
    path: Path
    state: dict[str, Any]


class Checkpointer:
    """When and what to checkpoint of ``model`` + ``optimizer`` under ``root`` (None: checkpointing off)."""

    def __init__(
        self,
        root: Path | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        interval: int = 0,
        keep: int = 1,
        info: distributed.DistInfo | None = None,
        device: torch.device | None = None,
        mirror: CheckpointMirror | None = None,
    ):
        if interval < 0 or keep < 1:
            raise ValueError(f"checkpoint interval {interval} must be >= 0 and keep {keep} >= 1")
        self.root = Path(root) if root is not None else None
        self.model, self.optimizer = model, optimizer
        self.interval, self.keep = interval, keep
        self.info = info or distributed.DistInfo()  # one process unless told otherwise
        self.device = device or torch.device("cpu")
        self.mirror = mirror  # a copy beside an s3:// store, for a run that resumes on another machine

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def latest(self) -> tuple[int, Path] | None:
        """(step, directory) of the newest complete checkpoint, or None."""
        found = ckpt.list_checkpoints(self.root) if self.root is not None else []
        return found[-1] if found else None

    def due(self, step: int, last_step: bool = False, force: bool = False) -> bool:
        """Whether the checkpoint of ``step`` is written: every ``interval`` steps, the last step, or forced."""
        if self.root is None:
            return False
        return force or last_step or (self.interval > 0 and step % self.interval == 0)

    def save(
        self, step: int, state: Callable[[], dict[str, Any]], *, last_step: bool = False, force: bool = False
    ) -> Path | None:
        """Called after every step: write the checkpoint of ``step`` when it is ``due``, with the trainer's
        ``state()`` (JSON), and return its directory; else None. Collective under torchrun."""
        if not self.due(step, last_step, force):
            return None
        directory = self.root / ckpt.step_dirname(step)
        if ckpt.is_fsdp(self.model):
            weights, optimizer_state = ckpt.gather_full_state(self.model, self.optimizer)  # every rank takes part
        else:
            weights, optimizer_state = distributed.unwrap(self.model), None
        if self.info.is_main:
            saved = {**state(), "rng": ckpt.rng_state(), "world_size": self.info.world_size}
            ckpt.save_checkpoint(directory, weights, self.optimizer, saved, optimizer_state=optimizer_state)
            self.prune()
            if self.mirror is not None:
                self.mirror.push(directory, self.keep)
        distributed.barrier()  # no rank may exit (or be killed by torchrun) while rank 0 writes
        return directory

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted writes."""
        return ckpt.prune_checkpoints(self.root, self.keep) if self.root is not None else []

    def resume_latest(self) -> Resumed | None:
        """Load the newest checkpoint into the model and optimizer and restore the RNGs; None when there is none.
        With a mirror, the first rank of each machine first brings back a newer checkpoint from it."""
        if self.mirror is not None and self.root is not None:
            if self.info.local_rank == 0:
                self.mirror.pull_newer(self.root)
            distributed.barrier()
        found = self.latest()
        if self.info.enabled and not distributed.same_on_all_ranks(-1 if found is None else found[0], self.device):
            raise TrainingError(
                f"{self.root}: the ranks see different checkpoints; on several nodes every node must use the "
                "same store (a filesystem all of them mount, or s3://, whose mirrored checkpoints each node "
                "brings back) so every rank resumes from the same one"
            )
        if found is None:
            return None
        step, path = found
        state = ckpt.load_checkpoint(path, distributed.unwrap(self.model), self.optimizer)
        written_by = state.get("world_size", 1)
        if written_by != self.info.world_size and self.info.is_main:
            sys.stderr.write(
                f"warning: {path} was written by {written_by} process(es), this run has "
                f"{self.info.world_size}: the global batch changes, so the continuation is not exact\n"
            )
        ckpt.set_rng_state(state["rng"])
        return Resumed(step, path, state)
