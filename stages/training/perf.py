"""Performance switches and the model-FLOPs-utilisation (MFU) report.

``runtime_settings(cfg, device)`` turns the recipe's ``compile`` / ``precision`` / ``fused_optimizer`` /
``tf32`` / ``activation_checkpointing`` / ``deterministic`` fields into concrete choices for one
device: 'auto' means what pays off there — on CUDA compile, bf16 autocast (fp16 with a grad
scaler on GPUs without bf16), fused AdamW and TF32; on the CPU plain fp32 eager, because bf16
autocast is ~20x slower on the CPUs we measured and compile gave no gain for small GPTs.

MFU = achieved model FLOP/s ÷ peak FLOP/s of the device. Model FLOPs per token come from
``GPT.flops_per_token`` (6N + attention, PaLM appendix B), so activation recomputation does not
inflate it. The peak is, in order: ``peak_flops`` from the recipe; the bf16 dense tensor-core
peak of a known GPU (``stages.training.gpus``; nanoGPT hard-codes the A100's 312 TFLOP/s, which
understates H100/H200 runs' denominator by 3x); on the CPU, cores x vector width x FMA units x clock
from the hardware (``stages.training.cpu_host``); else a short matmul probe on the device itself.
Every report says which one was used, because an MFU figure is meaningless without its denominator.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from stages.core.errors import ConfigError
from stages.core.sections import TrainConfig
from stages.training import cpu_host
from stages.training.gpus import table_peak

_PROBE_CACHE: dict[tuple[str, int, str], float] = {}


@dataclass(frozen=True)
class RuntimeSettings:
    """Concrete performance choices for one device (what 'auto' resolved to)."""

    device: str
    compile: bool
    amp_dtype: str | None  # 'bfloat16' / 'float16' autocast, or None for plain fp32
    grad_scaler: bool
    fused_optimizer: bool
    tf32: bool
    activation_checkpointing: bool
    deterministic: bool

    def describe(self) -> dict[str, str]:
        return {f"perf.{k}": str(v) for k, v in asdict(self).items()}

    @property
    def precision(self) -> str:
        """The recipe's name for the autocast dtype: 'fp32', 'bf16' or 'fp16'."""
        return {None: "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training forward pass's precision context, as the recipe chose it (no-op for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=getattr(torch, self.amp_dtype))


def _on_off(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def set_threads(threads: int) -> None:
    """torch's CPU thread count for this process, as a recipe's ``threads`` field asks (0 = torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def runtime_settings(cfg: TrainConfig, device: torch.device) -> RuntimeSettings:
    """Resolve the recipe's switches for ``device``; an impossible choice is a ConfigError."""
    cuda = device.type == "cuda"
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision = 'fp16': fp16 training needs a CUDA GPU; use fp32 on the CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision = 'bf16': {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    amp = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[precision]
    return RuntimeSettings(
        device=str(device),
        compile=_on_off(cfg.compile, auto=cuda),
        amp_dtype=amp,
        grad_scaler=amp == "float16",  # bf16 has fp32's range: no loss scaling needed
        fused_optimizer=_on_off(cfg.fused_optimizer, auto=cuda),
        tf32=cfg.tf32 and cuda,
        activation_checkpointing=cfg.activation_checkpointing,
        deterministic=cfg.deterministic,
    )


@contextlib.contextmanager
def backend_flags(settings: RuntimeSettings):
    """TF32, the flash SDPA path and deterministic mode for the duration of a training run.

    Deterministic mode is process-global in torch, so the previous setting is restored on exit
    (a test or a second stage in the same process must not inherit it).
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if settings.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
        torch.backends.cuda.enable_flash_sdp(True)  # the default today; explicit so nobody turns it off
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        if settings.deterministic:
            # cuBLAS reads this when it creates its handle; harmless if already set.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if settings.deterministic and not was_deterministic:
            torch.use_deterministic_algorithms(False)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block's activations in backward; returns the block count.

    The block's ``forward`` is replaced on the instance (not wrapped in a new module), so
    parameter names — and hence checkpoints — stay the same with and without it.
    """
    from torch.utils.checkpoint import checkpoint

    from stages.lm.model import Block

    count = 0
    for module in model.modules():
        if isinstance(module, Block) and not getattr(module, "_gptpipe_ac", False):
            inner = module.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            module._gptpipe_ac = True
            count += 1
    return count


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each transformer block in place (torchtitan's per-block style).

    Per block rather than the whole model: one compiled graph is reused by every layer (short
    compile), it composes with FSDP2's per-block sharding, and ``Module.compile`` keeps the
    parameter names, so checkpoints do not grow an ``_orig_mod.`` prefix.
    """
    from stages.lm.model import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


# --- devices ---------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """'auto' → the first GPU when there is one, else the CPU; an unavailable GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device = {name!r}: not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device = {name!r}: this machine has no usable CUDA GPU; use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device = {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ConfigError(f"device = {name!r}: only 'cpu' and 'cuda' devices are supported")
    return device


def scoring_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The precision for scoring a model outside the recipe's training settings (``evaluate_loss``):
    bf16 autocast on CUDA GPUs that have it; plain fp32 on the CPU, where bf16 autocast is ~20x
    slower. Inside training ``RuntimeSettings.autocast()`` is already active and is kept."""
    if device.type == "cuda" and not torch.is_autocast_enabled("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- MFU --------------------------------------------------------------------------------------


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.6
) -> float:
    """Achieved FLOP/s of square matmuls on ``device``: a practical peak for CPUs/unknown GPUs.

    Cached per (device, threads, dtype), so many short training runs in one process probe once.
    """
    key = (str(device), torch.get_num_threads(), str(dtype), size)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    # A private generator: probing must not move the global RNG that dropout and resume rely on.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.rand(size, size, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: thread pools, kernels, caches
        a @ b
    sync()
    # Best single multiply, not the average: on a shared machine other processes steal time,
    # and an average would understate the peak (and overstate MFU, even past 100 %).
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        started = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - started)
    peak = 2.0 * size**3 / best
    _PROBE_CACHE[key] = peak
    return peak


def peak_flops(device: torch.device, configured: float = 0.0, amp_dtype: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, how it was chosen) — the MFU denominator."""
    if configured > 0:
        return configured, f"configured (peak_flops = {configured:.3g} FLOP/s)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = table_peak(name)
        if found is not None:
            return found[0], f"table: {name} -> {found[1]} bf16 dense {found[0] / 1e12:.0f} TFLOP/s"
        dtype = getattr(torch, amp_dtype) if amp_dtype else torch.float32
        measured = measure_matmul_peak(device, dtype, size=4096, seconds=0.5)
        return measured, (
            f"measured: {name} is not in the peak table; {dtype} 4096^2 matmul probe gave "
            f"{measured / 1e12:.1f} TFLOP/s (set peak_flops to override)"
        )
    # The CPU: cores x FLOPs per cycle x clock on the threads in use, from the hardware, which other
    # processes' load cannot lower (a probe taken under load once gave mfu=1.226). The probe only where
    # /proc/cpuinfo cannot say (no x86 flags, no clock).
    hardware = cpu_host.hardware_peak(cpu_host.read_cpu(), torch.get_num_threads(), amp_dtype)
    if hardware is not None:
        return hardware.flops, hardware.source
    measured = measure_matmul_peak(device)
    return measured, (
        f"measured: CPU fp32 1024^2 matmul probe (best of repeats) on {torch.get_num_threads()} thread(s) gave "
        f"{measured / 1e9:.1f} GFLOP/s (set peak_flops to override)"
    )


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all ``world_size`` devices.

    A run that achieves more than the stated peak proves that peak too low (a probe taken while other
    work loaded the cores, a clock above the one the hardware states): the achieved rate is then the
    better lower bound of the peak, so MFU never exceeds 1.
    """
    if peak <= 0 or world_size <= 0:
        return 0.0
    achieved = tokens_per_s * flops_per_token
    return achieved / max(peak * world_size, achieved)


def peak_memory_mb(device: torch.device) -> float:
    """High-water mark of memory: CUDA allocator peak on GPUs, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
