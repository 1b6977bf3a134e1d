"""A plan before launch: what each training stage of a recipe needs on a named device, without running it.

Per stage (pretrain, finetune): processes and devices, parameters, bytes per device
(``stages.training.footprint``) as the recipe sets it and with activation checkpointing and FSDP
toggled, tokens, FLOPs (the training loop's formula, ``stages.lm.shape``), hours at an assumed MFU
against the same peak the loop's MFU uses (``stages.training.gpus`` / ``stages.training.cpu_host``),
and whether it fits. Plain Python: no torch, so it answers in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.errors import ConfigError
from stages.core.sections import FinetuneConfig, TrainConfig
from stages.lm.shape import GPTConfig, training_flops_per_token
from stages.training import cpu_host
from stages.training.footprint import FP32, Footprint, Workload, footprint, lora_params
from stages.training.gpus import GPUS, find_gpu

USABLE = 0.9  # of a device's memory: the rest goes to the CUDA context and the allocator's cache
DEFAULT_GPU = "H100"  # what a recipe on 'cuda' is planned for when no --gpu is named


@dataclass(frozen=True)
class Target:
    """The device a stage is planned on: one GPU of a kind, or this machine's CPU."""

    name: str
    on_cuda: bool
    peak_flops: float  # per device
    peak_source: str
    memory_bytes: int  # per GPU, or this machine's (shared by its processes) on the CPU
    bf16: bool = True


@dataclass(frozen=True)
class Option:
    """One way to run the stage: the recipe's own, or a toggle of activation checkpointing / FSDP."""

    label: str
    parallel: str
    checkpointing: bool
    bytes: Footprint
    needs: int  # bytes that must fit in ``Target.memory_bytes``: per GPU, or all processes on the CPU


@dataclass(frozen=True)
class StagePlan:
    stage: str
    target: Target
    processes: int
    nnodes: int
    precision: str
    n_params: int
    trainable: int
    tokens_per_step: int
    tokens: int
    flops_per_token: float
    options: tuple[Option, ...]  # the recipe's own first

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    def hours(self, mfu: float) -> float:
        """Training time at ``mfu`` of the peak of every device (the CPU's processes share one peak)."""
        devices = self.processes if self.target.on_cuda else 1
        return self.flops / (self.target.peak_flops * devices * mfu) / 3600

    @property
    def usable(self) -> int:
        return int(self.target.memory_bytes * USABLE)

    @property
    def fits(self) -> bool:
        return self.options[0].needs <= self.usable


def gpu_target(name: str, memory_gib: float = 0.0) -> Target:
    """One GPU named as a user types it (``H100``, ``A100``, ``L4`` …); an unknown name is a ConfigError."""
    gpu = find_gpu(name)
    if gpu is None:
        known = ", ".join(g.pattern for g in GPUS)
        raise ConfigError(f"--gpu {name!r}: not in the GPU table (stages/training/gpus.py); use one of {known}")
    gib = memory_gib or gpu.memory_gib
    dtype = "bf16" if gpu.bf16 else "fp16"
    source = f"table: {gpu.pattern} {dtype} dense {gpu.peak_flops / 1e12:.0f} TFLOP/s, {gib:g} GiB"
    return Target(gpu.pattern, True, gpu.peak_flops, source, int(gib * 2**30), gpu.bf16)


def cpu_target(threads: int, processes: int, amp_dtype: str | None = None) -> Target:
    """This machine's CPU: the hardware peak of the cores ``processes`` x ``threads`` use (0 = all), its memory."""
    facts = cpu_host.read_cpu()
    peak = cpu_host.hardware_peak(facts, threads * processes if threads else 0, amp_dtype)
    memory = cpu_host.memory_bytes()
    if peak is None or memory is None:
        raise ConfigError(
            "this machine's CPU or memory is unknown (no /proc/cpuinfo flags): plan for a GPU, --gpu H100"
        )
    return Target(f"this machine's CPU ({facts.model})", False, peak.flops, peak.source, memory)


def target_for(cfg: TrainConfig, gpu: str | None, gpu_memory_gib: float = 0.0) -> Target:
    """Where the stage trains: its ``device`` 'cpu' (or 'auto' with no GPU named) on this machine's CPU,
    else on the named GPU (``DEFAULT_GPU`` when the recipe says 'cuda' and none is named)."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not gpu):
        return cpu_target(cfg.threads, cfg.nproc_per_node, "bfloat16" if cfg.precision == "bf16" else None)
    return gpu_target(gpu or DEFAULT_GPU, gpu_memory_gib)


def _precision(cfg: TrainConfig, target: Target) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return ("bf16" if target.bf16 else "fp16") if target.on_cuda else "fp32"


def _options(cfg: TrainConfig, work: Workload, world: int, on_cuda: bool) -> tuple[Option, ...]:
    """The recipe's setting, then activation checkpointing toggled, then (several processes) DDP/FSDP swapped."""
    parallel = cfg.parallel if world > 1 else "none"
    ways = [(parallel, cfg.activation_checkpointing), (parallel, not cfg.activation_checkpointing)]
    if world > 1:
        other = "ddp" if cfg.parallel == "fsdp" else "fsdp"
        ways += [(other, False), (other, True)]
    options = []
    for index, (way, checkpointing) in enumerate(ways):
        bytes_ = footprint(work, checkpointing, world, way)
        name = {"none": f"{world} process", "ddp": "DDP", "fsdp": "FSDP"}[way]
        label = name + (" + activation checkpointing" if checkpointing else "") + (" (recipe)" if index == 0 else "")
        per_machine = bytes_.total * (1 if on_cuda else cfg.nproc_per_node)
        options.append(Option(label, way, checkpointing, bytes_, per_machine))
    return tuple(options)


def stage_plan(stage: str, cfg: TrainConfig, shape: GPTConfig, target: Target) -> StagePlan:
    """The plan of one training stage with config ``cfg`` training a GPT of ``shape`` on ``target``."""
    world = cfg.nproc_per_node * cfg.nnodes
    precision = _precision(cfg, target)
    lora = isinstance(cfg, FinetuneConfig) and cfg.method == "lora"
    targets = tuple(cfg.lora_targets) if lora else ()
    work = Workload(
        shape,
        cfg.batch_size,
        FP32 if precision == "fp32" else 2,
        target.on_cuda,
        lora_r=cfg.lora_r if lora else 0,
        lora_targets=targets,
    )
    n_params = shape.n_params()
    adapters = lora_params(shape, work.lora_r, targets)[0]
    per_step = cfg.batch_size * cfg.grad_accum * world * shape.block_size
    return StagePlan(
        stage=stage,
        target=target,
        processes=world,
        nnodes=cfg.nnodes,
        precision=precision,
        n_params=n_params + adapters,
        trainable=adapters if lora else n_params,
        tokens_per_step=per_step,
        tokens=per_step * cfg.max_steps,
        flops_per_token=training_flops_per_token(shape, n_params + adapters),  # peft's adapters sit in the GPT
        options=_options(cfg, work, world, target.on_cuda),
    )
