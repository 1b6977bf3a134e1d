"""Exact resume after preemption: SIGKILL between checkpoints, SIGTERM, NaN — all on the CPU.

Each run is a real child process running stage ``pretrain`` through the runner and the local
store, like ``python -m stages pretrain``; a rerun with the same store finds the stage's
``checkpoints/`` in its work directory and continues from the newest one.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from stages import checkpoint as ckpt
from stages.errors import TrainingError
from stages.tracking import MemoryTracker
from stages.training import train
from tests._scale_fixtures import (
    make_inputs,
    read_metrics,
    result_of,
    run_worker,
    train_points,
    weights,
    work_checkpoints,
    worker_args,
    worker_env,
)
from tests._training_fixtures import StreamBatches, micro_config, micro_model, repetitive_stream

STEPS, EVERY = 20, 5
# Dropout makes the RNG part of the state; deterministic mode is what "bitwise" is promised under.
RECIPE = {"max_steps": STEPS, "checkpoint_interval": EVERY, "keep_checkpoints": 2, "log_interval": 1,
          "deterministic": True, "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "dropout": 0.1}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted run: (artifact result, logged metrics)."""
    root = tmp_path_factory.mktemp("reference")
    result = result_of(run_worker(root / "store", inputs, root / "metrics.jsonl", RECIPE))
    return result, read_metrics(root / "metrics.jsonl")


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _curve(artifact_uri: str) -> list[dict]:
    import json
    from pathlib import Path

    # Timing-dependent entries (throughput, MFU, memory) differ between runs; the rest must not.
    timed = {"tokens_per_s", "mfu", "peak_memory_mb"}
    points = json.loads((Path(artifact_uri) / "curve.json").read_text())
    return [{k: v for k, v in p.items() if k not in timed} for p in points]


def test_sigkill_between_checkpoints_then_rerun_is_bitwise_identical(inputs, reference, tmp_path):
    kill_at = random.choice([s for s in range(EVERY + 1, STEPS) if s % EVERY])  # strictly between checkpoints
    resume_from = kill_at - kill_at % EVERY
    store, metrics, marker = tmp_path / "store", tmp_path / "metrics.jsonl", tmp_path / "blocked"

    proc = subprocess.Popen([sys.executable, *worker_args(store, inputs, metrics, RECIPE, "--block-at", str(kill_at),
                                                          "--marker", str(marker))],
                            env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"worker never reached step {kill_at}: {proc.stderr.read()[-2000:] if proc.poll() is not None else 'timeout'}"
    proc.send_signal(signal.SIGKILL)  # no handler runs: like a machine that vanished
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not list((store / "pretrain").glob("[!.]*")), "a killed run must not publish an artifact"
    saved = [step for step, _ in ckpt.list_checkpoints(work_checkpoints(store))]
    assert saved[-1] == resume_from, (kill_at, saved)
    killed_pid = read_metrics(metrics)[-1]["pid"]

    resumed = result_of(run_worker(store, inputs, metrics, RECIPE))
    ref_result, ref_metrics = reference
    _same_weights(weights(ref_result["uri"]), weights(resumed["uri"]))
    assert resumed["metrics"]["final_train_loss"] == ref_result["metrics"]["final_train_loss"]
    assert resumed["metrics"]["steps"] == STEPS and resumed["metrics"]["tokens"] == ref_result["metrics"]["tokens"]

    # The rerun's own log starts right after the checkpoint and runs to the end: no gap, no repeat.
    after = train_points([p for p in read_metrics(metrics) if p["pid"] != killed_pid])
    assert [p["step"] for p in after] == list(range(resume_from + 1, STEPS + 1)), f"killed at {kill_at}"
    reference_loss = {p["step"]: p["train_loss"] for p in train_points(ref_metrics)}
    assert all(p["train_loss"] == reference_loss[p["step"]] for p in after), f"killed at {kill_at}"
    # The artifact's curve joins the checkpoint's history and the rerun: each step once, as uninterrupted.
    assert _curve(resumed["uri"]) == _curve(ref_result["uri"])


def test_sigterm_writes_a_checkpoint_at_that_step_and_exits_then_rerun_finishes_exactly(inputs, reference, tmp_path):
    store, metrics = tmp_path / "store", tmp_path / "metrics.jsonl"
    stopped = run_worker(store, inputs, metrics, RECIPE, "--sigterm-at", "7")
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 7 of 20" in stopped.stderr and "rerun the same command to resume" in stopped.stderr
    saved = [step for step, _ in ckpt.list_checkpoints(work_checkpoints(store))]
    assert saved == [5, 7]  # the regular one, and the one written on the signal (keep_checkpoints = 2)
    assert max(p["step"] for p in train_points(read_metrics(metrics))) == 7

    resumed = result_of(run_worker(store, inputs, metrics, RECIPE))
    _same_weights(weights(reference[0]["uri"]), weights(resumed["uri"]))
    assert _curve(resumed["uri"]) == _curve(reference[0]["uri"])


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.set_num_threads(1)
    model = micro_model()
    stream_batches = StreamBatches(repetitive_stream(), 32, 4)

    class PoisonAt:
        def get(self, step, micro):
            if step == 6:
                with torch.no_grad():
                    model.norm_out.weight.fill_(float("nan"))
            return stream_batches.get(step, micro)

    cfg = micro_config(max_steps=10, checkpoint_interval=4, keep_checkpoints=3)
    with pytest.raises(TrainingError, match=r"step 7: the training loss is nan.*step_00000004 is kept"):
        train(model, PoisonAt(), cfg, MemoryTracker(), tmp_path, progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    good = micro_model()
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), good)
    assert all(bool(torch.isfinite(p.detach()).all()) for p in good.parameters())
