"""This machine's CPU as a training device: its peak FLOP/s from the hardware, and its memory.

Peak = cores x FLOPs per cycle per core x clock, where FLOPs per cycle = FMA units x vector lanes x 2
(a fused multiply-add is two FLOPs). Cores are the physical cores this process may run on (its CPU
affinity, SMT siblings once, a cgroup CPU quota), at most the threads in use; the vector width comes
from the instruction-set flags in ``/proc/cpuinfo``, the clock from cpufreq's maximum when the kernel
exposes it, else the highest ``cpu MHz`` (a virtual machine's nominal clock: a turbo clock above it
is not counted). Where the flags cannot say, the figure is an upper bound: two FMA units per core,
the full vector width, so that an MFU against it never overstates.

Unlike a matmul probe, this figure does not move when other processes load the cores, so a training
run that shares its cores with other work reports a lower MFU, not one above 1 (issue 27: a probe
taken under load gave ``mfu=1.226``). Plain Python: ``gptpipe plan`` uses the same figure.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")
CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")  # kHz
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
AMD_ZEN4_FAMILY = 0x19  # Zen 3 and 4: AVX-512 (Zen 4) runs on a 256-bit datapath, two passes per op
AMX_BF16_FLOPS_PER_CYCLE = 1024  # per core: one AMX tile unit, bf16 in, fp32 accumulate (Intel's figure)


@dataclass(frozen=True)
class CpuFacts:
    """What the kernel says about the CPUs this process may use."""

    model: str
    vendor: str
    family: int
    flags: frozenset[str]
    cores: int  # physical cores in this process's affinity (and cgroup quota)
    mhz: float
    clock_source: str


@dataclass(frozen=True)
class CpuPeak:
    flops: float
    source: str  # the sentence saying how ``flops`` was reached


def _records(text: str) -> list[dict[str, str]]:
    """``/proc/cpuinfo``'s processor blocks as dicts of field -> value."""
    records = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields = (line.split(":", 1) for line in block.splitlines() if ":" in line)
        records.append({key.strip(): value.strip() for key, value in fields})
    return records


def parse_cpuinfo(text: str, allowed: set[int] | None, max_khz: float | None = None) -> CpuFacts | None:
    """The facts in a ``/proc/cpuinfo`` text for the processors in ``allowed`` (None = all); None when the
    text lacks instruction-set flags or a clock (e.g. ARM kernels), so the caller falls back to a probe."""
    records = [r for r in _records(text) if "processor" in r]
    mine = [r for r in records if allowed is None or int(r["processor"]) in allowed] or records
    if not mine or "flags" not in mine[0]:
        return None
    cores = {(r.get("physical id", "0"), r.get("core id", r["processor"])) for r in mine}
    mhz = max((float(r["cpu MHz"]) for r in mine if "cpu MHz" in r), default=0.0)
    source = "cpu MHz in /proc/cpuinfo"
    if max_khz and max_khz / 1000 > mhz:
        mhz, source = max_khz / 1000, "cpufreq cpuinfo_max_freq"
    if mhz <= 0:
        return None
    first = mine[0]
    return CpuFacts(
        model=first.get("model name", "unknown CPU"),
        vendor=first.get("vendor_id", ""),
        family=int(first.get("cpu family", "0")),
        flags=frozenset(first["flags"].split()),
        cores=len(cores),
        mhz=mhz,
        clock_source=source,
    )


def _quota_cores() -> int | None:
    """CPUs a cgroup v2 quota allows (``cpu.max`` = 'quota period'), None when unlimited or unknown."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def read_cpu() -> CpuFacts | None:
    """This machine's facts (None where ``/proc/cpuinfo`` is missing or says too little)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        max_khz = float(CPUFREQ_MAX.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        max_khz = None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    facts = parse_cpuinfo(text, allowed, max_khz)
    quota = _quota_cores()
    if facts is not None and quota is not None and quota < facts.cores:
        facts = replace(facts, cores=quota)
    return facts


def _vector(facts: CpuFacts) -> tuple[int, int, str] | None:
    """(fp32 lanes per FMA unit, FMA units, which instructions) per core, from the flags."""
    flags = facts.flags
    if "avx512f" in flags:
        if facts.vendor == "AuthenticAMD" and facts.family == AMD_ZEN4_FAMILY:
            return 8, 2, "AVX-512 on a 256-bit datapath, AMD family 0x19"
        return 16, 2, "AVX-512"
    if "avx2" in flags and "fma" in flags:
        return 8, 2, "AVX2 + FMA"
    if "avx" in flags:
        return 8, 1, "AVX (separate add and multiply units)"
    if "sse2" in flags:
        return 4, 1, "SSE2"
    return None


def hardware_peak(facts: CpuFacts | None, threads: int, amp_dtype: str | None = None) -> CpuPeak | None:
    """Peak FLOP/s of ``min(cores, threads)`` cores (threads 0 = all), fp32 or the bf16 autocast rate;
    None when the facts are unknown."""
    vector = None if facts is None else _vector(facts)
    if facts is None or vector is None:
        return None
    lanes, units, what = vector
    per_cycle, dtype, unit = units * lanes * 2, "fp32", f"{units} FMA unit(s) x {lanes} fp32 lanes x 2"
    if amp_dtype == "bfloat16" and "amx_bf16" in facts.flags:
        per_cycle, dtype, what, unit = AMX_BF16_FLOPS_PER_CYCLE, "bf16", "AMX", "bf16 tiles"
    elif amp_dtype == "bfloat16" and "avx512_bf16" in facts.flags:
        per_cycle, dtype, unit = per_cycle * 2, "bf16", f"{unit} x 2 bf16 pairs"
    cores = min(facts.cores, threads) if threads > 0 else facts.cores
    flops = cores * per_cycle * facts.mhz * 1e6
    return CpuPeak(
        flops,
        f"hardware: {facts.model}, {cores} core(s) x {per_cycle} {dtype} FLOP/cycle ({what}: {unit}) x "
        f"{facts.mhz:.0f} MHz ({facts.clock_source}) = {flops / 1e9:.1f} GFLOP/s (set peak_flops to override)",
    )


def memory_bytes() -> int | None:
    """Memory this process may use: MemTotal, or a smaller cgroup limit; None when unknown."""
    try:
        match = re.search(r"^MemTotal:\s+(\d+) kB", MEMINFO.read_text(encoding="utf-8"), re.M)
    except OSError:
        return None
    total = int(match.group(1)) * 1024 if match else None
    try:
        limit = CGROUP_MEMORY_MAX.read_text(encoding="utf-8").strip()
    except OSError:
        limit = "max"
    if limit.isdigit() and (total is None or int(limit) < total):
        return int(limit)
    return total
