"""Running a stage under ``torchrun``: process group, rank-0-only side effects, DDP / FSDP2.

torchrun (never a home-made launcher) starts one process per device and sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; ``setup`` joins them into a process group (NCCL on GPUs, gloo
on CPUs) and pins each process to its GPU. Without those variables everything here is a no-op,
so the same training code runs unchanged in a plain process, a test, or on 8 GPUs.

``parallelize(model, settings, info, parallel)`` applies the run-time transformations in
torchtitan's order — activation checkpointing, then compile, then data parallelism — outside
the model file: ``stages/lm/model.py`` never knows how it is being run.

* ``ddp``: every rank holds the full weights; gradients are averaged in backward.
* ``fsdp``: FSDP2 ``fully_shard`` per transformer block and on the root, so each rank holds
  1/world of weights, gradients and optimizer state — for models that do not fit one GPU.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stages.core.errors import ConfigError
from stages.training.checkpoint_format import is_fsdp
from stages.training.perf import RuntimeSettings, compile_blocks, enable_activation_checkpointing


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs metrics and writes checkpoints and outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """The torchrun variables of this process (defaults: a single process)."""
    try:
        return DistInfo(
            int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        )
    except ValueError:
        raise ConfigError("RANK / LOCAL_RANK / WORLD_SIZE must be integers (they are set by torchrun)") from None


def current() -> DistInfo:
    """This process's place, from the live process group when there is one."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), from_env().local_rank, dist.get_world_size())
    return DistInfo()


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (once) and return (rank info, this rank's device).

    On CUDA, rank ``LOCAL_RANK`` uses GPU ``LOCAL_RANK`` whatever index the recipe named.
    """
    info = from_env()
    if not info.enabled:
        return DistInfo(), device
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"nproc_per_node: LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                "lower nproc_per_node to the GPU count"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return current(), device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few floats (one collective); identity when alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """Whether every rank holds the same integer (e.g. the checkpoint step it would resume from)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    high = torch.tensor([value], dtype=torch.int64, device=device)
    low = high.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return int(high) == int(low)


def exit_worker() -> None:
    """End a non-zero rank once its stage's collective work is done.

    The executor publishes the artifact from every process that returns; only rank 0 may
    publish, so a worker rank leaves here (flushing its output) instead of returning.
    """
    teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class SilentTracker:
    """The tracker of ranks other than 0: they compute the same numbers, rank 0 reports them."""

    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...

    def log_artifact(self, path: object, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict) -> None: ...


# --- model wrapping -----------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names the checkpoint uses (DDP adds a ``module.`` level)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def parallelize(model: nn.Module, settings: RuntimeSettings, info: DistInfo, parallel: str = "ddp") -> nn.Module:
    """Activation checkpointing → compile → DDP or FSDP2; returns the module to train.

    ``model`` must already be on this rank's device. With FSDP2 the module itself becomes the
    sharded one (its parameters turn into DTensors); with DDP a wrapper is returned and the
    module keeps its plain parameters.
    """
    if settings.activation_checkpointing:
        enable_activation_checkpointing(model)
    if settings.compile:
        compile_blocks(model)
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from stages.lm.model import Block

        # The block returns its KV cache (views) beside the output; training never uses them,
        # so FSDP2's warning about in-place ops on returned views does not apply.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(torch.device(settings.device).type, (info.world_size,))
        for module in list(model.modules()):
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings, final norm and the tied head
        return model
    if parallel != "ddp":
        raise ConfigError(f"parallel = {parallel!r}: use 'ddp' or 'fsdp'")
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(settings.device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def set_gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
