"""Performance switches and the MFU report: what 'auto' means per device, the peak table, the probe."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn

from stages.core.config import parse_config
from stages.core.errors import ConfigError
from stages.core.tracking import MemoryTracker
from stages.training import cpu_host, perf
from stages.training.loop import Display, build_optimizer, train
from stages.training.preemption import PreemptionGuard
from tests._numeric import approx
from tests._processes import start_process, stop_process
from tests._training_fixtures import StreamBatches, micro_config, micro_model, repetitive_stream

QUIET = Display(progress=False)  # no progress lines in the test output

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_auto_on_the_cpu_is_fp32_eager_and_every_switch_is_selectable():
    settings = perf.runtime_settings(micro_config(), CPU)
    assert (settings.compile, settings.amp_dtype, settings.fused_optimizer, settings.tf32, settings.grad_scaler) == (
        False,
        None,
        False,
        False,
        False,
    )
    chosen = perf.runtime_settings(
        micro_config(compile="on", precision="bf16", fused_optimizer="on", activation_checkpointing=True), CPU
    )
    assert (
        chosen.compile and chosen.amp_dtype == "bfloat16" and chosen.fused_optimizer and chosen.activation_checkpointing
    )
    assert not chosen.grad_scaler  # bf16 needs no loss scaling
    assert perf.runtime_settings(micro_config(), CPU).describe()["perf.compile"] == "False"
    with pytest.raises(ConfigError, match="precision = 'fp16'.*CUDA"):
        perf.runtime_settings(micro_config(precision="fp16"), CPU)
    with pytest.raises(ConfigError, match=r"pretrain.compile = 'yes'"):
        parse_config({"pretrain": {"compile": "yes"}})


@pytest.mark.parametrize(
    ("name", "pattern", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "H100", 989),
        ("NVIDIA H100 PCIe", "H100 PCIE", 756),
        ("NVIDIA H200", "H200", 989),  # not the H20 it contains
        ("NVIDIA H20", "H20", 148),
        ("NVIDIA A100-SXM4-80GB", "A100", 312),
        ("NVIDIA L4", "L4", 121),
        ("NVIDIA L40S", "L40S", 362),  # not the L4 it starts with
        ("NVIDIA A10G", "A10G", 70),
    ],
)
def test_gpu_peak_table_matches_the_most_specific_name(name, pattern, tflops):
    peak, matched = perf.table_peak(name)
    assert matched == pattern and peak == tflops * 1e12


def test_unknown_devices_get_a_measured_peak_and_the_report_says_so(monkeypatch):
    assert perf.table_peak("Some Future Accelerator") is None
    monkeypatch.setattr(cpu_host, "read_cpu", lambda: None)  # a CPU /proc/cpuinfo says nothing about (ARM)
    peak, source = perf.peak_flops(CPU)
    assert peak > 0 and source.startswith("measured: CPU fp32") and "1 thread" in source
    assert perf.peak_flops(CPU, configured=2e12) == (2e12, "configured (peak_flops = 2e+12 FLOP/s)")
    before = torch.get_rng_state()
    perf.measure_matmul_peak(CPU, size=64, seconds=0.01)
    assert torch.equal(before, torch.get_rng_state())  # probing must not shift the training RNG


def test_mfu_is_model_flops_over_the_peak_of_all_devices():
    assert perf.mfu(1000, 6e6, 1e10) == pytest.approx(0.6)
    assert perf.mfu(1000, 6e6, 1e10, world_size=2) == pytest.approx(0.3)
    assert perf.mfu(1000, 6e6, 0.0) == 0.0
    assert perf.mfu(1000, 6e6, 1e9) == 1.0  # achieving more than the stated peak proves the peak too low


# /proc/cpuinfo as three machines show it: this project's 2-core AMD EPYC (Zen 4) VM; an Intel Xeon with
# two hyper-threads per core; an ARM server (no x86 flags, no clock).
ZEN4 = "".join(
    f"processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    f"cpu MHz\t\t: 2596.146\nphysical id\t: 0\ncore id\t\t: {i}\nflags\t\t: fpu sse2 avx fma avx2 avx512f "
    "avx512_bf16\n\n"
    for i in range(2)
)
XEON = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.90GHz\n"
    f"cpu MHz\t\t: 2900.000\nphysical id\t: 0\ncore id\t\t: {i % 2}\nflags\t\t: sse2 avx fma avx2 avx512f amx_bf16\n\n"
    for i in range(4)
)
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes\nCPU implementer\t: 0x41\n\n"


def test_the_cpu_peak_is_cores_times_flops_per_cycle_times_clock_from_the_hardware():
    zen4 = cpu_host.parse_cpuinfo(ZEN4, allowed=None)
    peak = cpu_host.hardware_peak(zen4, threads=0)
    # AVX-512 on Zen 4 runs on a 256-bit datapath: 2 FMA units x 8 fp32 lanes x 2 = 32 FLOP per cycle.
    assert peak.flops == pytest.approx(2 * 32 * 2596.146e6)
    assert peak.source.startswith("hardware: AMD EPYC, 2 core(s) x 32 fp32 FLOP/cycle") and "2596 MHz" in peak.source
    assert cpu_host.hardware_peak(zen4, threads=1).flops == pytest.approx(peak.flops / 2)  # the threads in use
    assert cpu_host.hardware_peak(cpu_host.parse_cpuinfo(ZEN4, allowed={0}), threads=0).flops == pytest.approx(
        peak.flops / 2
    )  # the cores this process may run on
    assert cpu_host.hardware_peak(zen4, threads=0, amp_dtype="bfloat16").flops == pytest.approx(2 * peak.flops)
    xeon = cpu_host.parse_cpuinfo(XEON, allowed=None, max_khz=3_500_000)
    assert xeon.cores == 2 and xeon.clock_source == "cpufreq cpuinfo_max_freq"  # hyper-threads share a core's units
    assert cpu_host.hardware_peak(xeon, threads=0).flops == pytest.approx(2 * 64 * 3500e6)  # full-width AVX-512
    assert cpu_host.hardware_peak(xeon, threads=0, amp_dtype="bfloat16").flops == pytest.approx(2 * 1024 * 3500e6)
    assert cpu_host.parse_cpuinfo(ARM, allowed=None) is None  # the caller falls back to the matmul probe


def test_a_run_on_cores_another_process_keeps_busy_reports_mfu_at_most_1():
    """The peak comes from the hardware, so load cannot lower it: a probe taken under load gave mfu=1.226."""
    if cpu_host.read_cpu() is None:
        pytest.skip("/proc/cpuinfo names no x86 vector flags here: the peak is the probe's")
    quiet_peak = perf.peak_flops(CPU)
    busy = start_process([sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"])
    try:
        assert perf.peak_flops(CPU) == quiet_peak  # the same figure with a core taken
        tracker = MemoryTracker()
        result = train(
            micro_model(),
            StreamBatches(repetitive_stream(), 32, 4),
            micro_config(max_steps=6, log_interval=2),
            tracker,
            display=QUIET,
        )
    finally:
        stop_process(busy)
    assert result.peak_source.startswith("hardware:") and result.peak_flops == quiet_peak[0]
    achieved = result.tokens_per_s * result.flops_per_token
    assert result.mfu == pytest.approx(achieved / result.peak_flops) and 0 < result.mfu <= 1  # not capped: below
    assert all(0 < mfu <= 1 for _, mfu in tracker.metrics["mfu"])


def test_training_reports_flops_mfu_memory_and_how_the_peak_was_chosen():
    model, tracker = micro_model(), MemoryTracker()
    result = train(
        model,
        StreamBatches(repetitive_stream(), 32, 4),
        micro_config(max_steps=6, log_interval=3, peak_flops=1e13),
        tracker,
        display=QUIET,
    )
    assert result.flops_per_token == model.flops_per_token()
    assert result.total_flops == result.flops_per_token * result.tokens
    assert result.mfu == pytest.approx(result.tokens_per_s * result.flops_per_token / 1e13)
    assert result.peak_source.startswith("configured") and result.peak_memory_mb > 0
    assert [s for s, _ in tracker.metrics["mfu"]] == [3, 6] and "peak_memory_mb" in tracker.metrics
    assert tracker.params["perf.peak_source"] == result.peak_source and tracker.params["perf.compile"] == "False"
    assert {"mfu", "peak_source", "total_flops"} <= result.summary().keys()


def test_activation_checkpointing_keeps_names_and_gives_the_same_training():
    batches = StreamBatches(repetitive_stream(), 32, 4)
    plain = train(micro_model(dropout=0.1), batches, micro_config(max_steps=4), MemoryTracker(), display=QUIET)
    model = micro_model(dropout=0.1)
    names = [n for n, _ in model.named_parameters()]
    recomputed = train(
        model, batches, micro_config(max_steps=4, activation_checkpointing=True), MemoryTracker(), display=QUIET
    )
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints stay interchangeable
    assert all(getattr(b, "_gptpipe_ac", False) for b in model.blocks)
    assert recomputed.final_train_loss == approx(plain.final_train_loss)  # dropout replayed identically


def test_compile_is_selectable_on_the_cpu_and_trains_the_same(monkeypatch):
    # Inductor takes minutes on a shared 2-core machine; dynamo's "eager" backend checks the same
    # wiring (every block compiled in place, names unchanged, same numbers) in seconds.
    compile_ = nn.Module.compile
    compiled = []

    def quick(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return compile_(self, backend="eager")

    monkeypatch.setattr(nn.Module, "compile", quick)
    batches = StreamBatches(repetitive_stream(), 32, 4)
    eager = train(micro_model(), batches, micro_config(max_steps=3), MemoryTracker(), display=QUIET)
    model = micro_model()
    result = train(model, batches, micro_config(max_steps=3, compile="on"), MemoryTracker(), display=QUIET)
    assert compiled == ["Block", "Block"] and result.compiled
    assert "_orig_mod" not in "".join(model.state_dict())
    assert result.final_train_loss == approx(eager.final_train_loss)


def test_fused_adamw_is_selectable_on_the_cpu():
    assert build_optimizer(micro_model(), micro_config(), fused=True).defaults["fused"] is True
    assert not build_optimizer(micro_model(), micro_config()).defaults["fused"]


def test_deterministic_mode_is_restored_after_training():
    assert not torch.are_deterministic_algorithms_enabled()
    train(
        micro_model(),
        StreamBatches(repetitive_stream(), 32, 4),
        micro_config(max_steps=1, deterministic=True),
        MemoryTracker(),
        display=QUIET,
    )
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_sigterm_guard_is_inert_outside_the_main_thread():
    seen = []

    def worker():
        with PreemptionGuard() as guard:
            seen.append(guard.requested)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [False]
