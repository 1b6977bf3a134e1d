"""Performance switches and the MFU report: what 'auto' means per device, the peak table, the probe."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from stages.core.config import parse_config
from stages.core.errors import ConfigError
from stages.core.tracking import MemoryTracker
from stages.training import perf
from stages.training.loop import Display, build_optimizer, train
from stages.training.preemption import PreemptionGuard
from tests._numeric import approx
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


def test_unknown_devices_get_a_measured_peak_and_the_report_says_so():
    assert perf.table_peak("Some Future Accelerator") is None
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


def test_training_reports_flops_mfu_memory_and_how_the_peak_was_chosen():
    model, tracker = micro_model(), MemoryTracker()
    result = train(
        model,
        StreamBatches(repetitive_stream(), 32, 4),
        micro_config(max_steps=6, log_interval=3, peak_flops=1e10),
        tracker,
        display=QUIET,
    )
    assert result.flops_per_token == model.flops_per_token()
    assert result.total_flops == result.flops_per_token * result.tokens
    assert result.mfu == pytest.approx(result.tokens_per_s * result.flops_per_token / 1e10)
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
