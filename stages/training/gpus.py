"""What gptpipe knows of each GPU: its dense bf16 tensor-core peak (the MFU denominator) and its memory.

Plain Python, no torch: the training loop matches ``torch.cuda.get_device_name()`` against this table
(``stages.training.perf``), and ``gptpipe plan --gpu NAME`` matches the name a user types.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    pattern: str  # matched, upper case, as a substring of the device's name
    peak_flops: float  # dense (no 2:4 sparsity) bf16 tensor-core FLOP/s (fp16 where the GPU has no bf16)
    memory_gib: int  # the memory of the part the pattern names (the larger one where there are two)
    bf16: bool = True  # has bf16; without it autocast trains in fp16 with a grad scaler


# From NVIDIA datasheets. Matched in order: specific names before their families.
GPUS: tuple[Gpu, ...] = (
    Gpu("GH200", 989e12, 96),
    Gpu("H200", 989e12, 141),
    Gpu("H100 NVL", 835e12, 94),
    Gpu("H100 PCIE", 756e12, 80),
    Gpu("H100", 989e12, 80),  # SXM (HBM3): the common cloud part
    Gpu("H800", 989e12, 80),
    Gpu("H20", 148e12, 96),
    Gpu("B200", 2250e12, 180),
    Gpu("A100", 312e12, 80),  # 40 GB parts exist too: `gptpipe plan --gpu-memory 40`
    Gpu("A800", 312e12, 80),
    Gpu("L40S", 362e12, 48),
    Gpu("L40", 181e12, 48),
    Gpu("L4", 121e12, 24),
    Gpu("A10G", 70e12, 24),  # AWS g5 variant, lower clocks than the A10; not published by NVIDIA
    Gpu("A10", 125e12, 24),
    Gpu("A6000", 155e12, 48),
    Gpu("RTX 4090", 165e12, 24),
    Gpu("RTX 3090", 71e12, 24),
    Gpu("V100", 125e12, 32, bf16=False),  # fp16 tensor cores: the precision it would train in
    Gpu("T4", 65e12, 16, bf16=False),
)


def find_gpu(name: str) -> Gpu | None:
    """The table's entry for a GPU name (as torch reports it or a user types it), or None."""
    upper = name.upper()
    return next((gpu for gpu in GPUS if gpu.pattern in upper), None)


def table_peak(name: str) -> tuple[float, str] | None:
    """(peak FLOP/s, matched table entry) for a GPU name, or None when it is not in the table."""
    gpu = find_gpu(name)
    return None if gpu is None else (gpu.peak_flops, gpu.pattern)
