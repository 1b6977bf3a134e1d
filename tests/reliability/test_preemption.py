"""Preemption at random points: SIGKILL (between steps, or halfway through a checkpoint write),
then SIGTERM on the resumed run, then a rerun to the end — the final weights and curve equal an
uninterrupted run's, bit for bit. Three seeds choose the points; each process is a real child.
Fine-tuning (full and LoRA) goes through the same kills and must end the same way.

Platforms stop a run from outside, at a moment of their choosing: the signal matrix (SIGTERM then
SIGKILL after a grace period, SIGINT, a spot notice polled over HTTP, SIGKILL without warning)
stops a pretraining run mid-run that way, states what landed and reruns it to the same weights.

These tests replace the single-point SIGKILL/SIGTERM tests formerly in tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from stages.training import checkpoint_format as ckpt
from stages.training.preemption import NOTICE_POLL_ENV, NOTICE_URL_ENV
from tests._scale_fixtures import RESUMABLE_PRETRAIN, ROOT, result_of, run_worker, worker_args, worker_env
from tests._spot_notice import SpotNoticeEndpoint

# Every case trains in child processes and kills them: the slow tier.
pytestmark = pytest.mark.slow

PRETRAIN = RESUMABLE_PRETRAIN
STEPS, EVERY = PRETRAIN["max_steps"], PRETRAIN["checkpoint_interval"]
TIMED = {"tokens_per_s", "mfu", "peak_memory_mb"}  # differ between runs by nature; nothing else may


def _run(store: Path, inputs, metrics: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_worker(store, inputs, metrics, PRETRAIN, *extra)


def _weights(uri: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(uri) / "model" / "model.safetensors"))


def _curve(uri: str) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in TIMED} for p in json.loads((Path(uri) / "curve.json").read_text())]


def _checkpoints(store: Path, stage: str = "pretrain") -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, names of half-written leftovers) in the stage's work directory."""
    work = list((store / stage).glob(".work-*/checkpoints"))
    if not work:
        return [], []
    leftovers = sorted(p.name for p in work[0].iterdir() if p.name.startswith(".tmp-"))
    return [step for step, _ in ckpt.list_checkpoints(work[0])], leftovers


def _published(store: Path, stage: str = "pretrain") -> list[str]:
    return [p.name for p in (store / stage).glob("[!.]*")] if (store / stage).is_dir() else []


@pytest.fixture(scope="module")
def reference(tiny_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return result_of(_run(root / "store", tiny_inputs, root / "metrics.jsonl"))


def _plan(seed: int, mode: str) -> tuple[list[str], int, int]:
    """(kill arguments, step the rerun resumes from, step of the later SIGTERM), drawn from ``seed``."""
    rng = random.Random(seed)
    if mode == "inside-checkpoint":
        at = rng.choice(range(EVERY, STEPS, EVERY))
        kill, resume_from = ["--sigkill-in-checkpoint", str(at)], at - EVERY
    else:
        at = rng.randint(1, STEPS - 1)
        kill, resume_from = ["--sigkill-at", str(at)], at - at % EVERY
    return kill, resume_from, rng.randint(resume_from + 1, STEPS - 1)


@pytest.mark.parametrize("seed, mode", [(0, "between-steps"), (1, "inside-checkpoint"), (2, "between-steps")])
def test_sigkill_then_sigterm_at_random_points_resume_to_identical_weights(
    seed, mode, reference, tiny_inputs, tmp_path
):
    kill, resume_from, term_at = _plan(seed, mode)
    store, metrics = tmp_path / "store", tmp_path / "metrics.jsonl"
    where = f"seed {seed}: {kill} then SIGTERM at {term_at}"

    killed = _run(store, tiny_inputs, metrics, *kill)
    assert killed.returncode == -signal.SIGKILL, (where, killed.stderr[-2000:])
    assert _published(store) == [], "a killed run must not publish an artifact"
    steps, leftovers = _checkpoints(store)
    assert (steps[-1] if steps else 0) == resume_from, (where, steps)
    if mode == "inside-checkpoint":
        prefix = f".tmp-{ckpt.step_dirname(int(kill[1]))}-"
        assert leftovers and all(name.startswith(prefix) for name in leftovers), (
            "the kill landed inside the write, which left only a hidden temporary directory"
        )

    stopped = _run(store, tiny_inputs, metrics, "--sigterm-at", str(term_at))
    assert stopped.returncode == 2, (where, stopped.stderr[-2000:])
    assert f"stopped by SIGTERM after step {term_at} of {STEPS}" in stopped.stderr
    assert _checkpoints(store)[0][-1] == term_at and _published(store) == []

    final = result_of(_run(store, tiny_inputs, metrics))
    expected, got = _weights(reference["uri"]), _weights(final["uri"])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected), where
    assert _curve(final["uri"]) == _curve(reference["uri"]), "every step once, as uninterrupted"
    assert final["metrics"]["steps"] == STEPS and final["metrics"]["tokens"] == reference["metrics"]["tokens"]

    # Each process logged exactly the steps it trained: no gap, no step twice.
    by_pid: dict[int, list[int]] = {}
    for point in (json.loads(line) for line in metrics.read_text().splitlines()):
        if "train_loss" in point:
            by_pid.setdefault(point["pid"], []).append(point["step"])
    runs = list(by_pid.values())
    assert runs[1] == list(range(resume_from + 1, term_at + 1)) and runs[2] == list(range(term_at + 1, STEPS + 1)), (
        where
    )


# --- fine-tuning -------------------------------------------------------------------------------

# The micro recipe's fine-tuning, shortened, with a checkpoint every 4 of 12 steps; LoRA dropout
# makes the RNG state part of what its checkpoints must carry.
FINETUNE = {
    "max_steps": 12,
    "checkpoint_interval": 4,
    "keep_checkpoints": 2,
    "log_interval": 1,
    "eval_interval": 6,
    "eval_batches": 1,
    "train_items": 60,
    "heldout_items": 8,
    "device": "cpu",
    "threads": 1,
    "deterministic": True,
}
METHODS = {"full": {}, "lora": {"method": "lora", "lora_r": 4, "lora_dropout": 0.1}}


@pytest.fixture(scope="module")
def sft_inputs(micro_upstream):
    """Finished tokenizer, data and pretrain artifacts of the micro recipe (built once per test run)."""
    return micro_upstream()[1]


def _finetune(store: Path, inputs, metrics: Path, method: str, *extra: str) -> subprocess.CompletedProcess:
    return run_worker(store, inputs, metrics, {}, *extra, finetune={**FINETUNE, **METHODS[method]})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_finetune_killed_between_checkpoints_resumes_to_identical_weights(method, sft_inputs, tmp_path):
    reference = result_of(_finetune(tmp_path / "reference", sft_inputs, tmp_path / "reference.jsonl", method))
    store, metrics = tmp_path / "store", tmp_path / "metrics.jsonl"

    killed = _finetune(store, sft_inputs, metrics, method, "--sigkill-at", "6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _published(store, "finetune") == [] and _checkpoints(store, "finetune")[0][-1] == 4

    stopped = _finetune(store, sft_inputs, metrics, method, "--sigterm-at", "9")
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    work = next((store / "finetune").glob(".work-*/checkpoints"))
    assert f"finetune: resuming from step 4, checkpoint {work / ckpt.step_dirname(4)}\n" in stopped.stderr
    assert "stopped by SIGTERM after step 9 of 12" in stopped.stderr
    assert _checkpoints(store, "finetune")[0][-1] == 9 and _published(store, "finetune") == []

    final = _finetune(store, sft_inputs, metrics, method)
    assert f"finetune: resuming from step 9, checkpoint {work / ckpt.step_dirname(9)}\n" in final.stderr
    final = result_of(final)
    expected, got = _weights(reference["uri"]), _weights(final["uri"])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected), method
    assert _curve(final["uri"]) == _curve(reference["uri"]), "every step once, as uninterrupted"
    assert final["metrics"]["tokens"] == reference["metrics"]["tokens"]
    assert not list(Path(final["uri"]).glob("checkpoints")), "the published artifact holds no resumable checkpoints"


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_lease_holder_is_taken_over_and_its_checkpoints_resumed(
    signal_name, reference, tiny_inputs, tmp_path
):
    """The run holding pretraining's lease is killed (SIGKILL: its process is gone) or frozen (SIGSTOP:
    alive, silent, its heartbeat stops for ``artifacts.lease_s``); a second run takes the key over,
    resumes from the first run's checkpoint, says both, and ends with an uninterrupted run's weights."""
    store, metrics = tmp_path / "store", tmp_path / "metrics.jsonl"
    at = "--sigkill-at" if signal_name == "SIGKILL" else "--sigstop-at"
    holder = subprocess.Popen(
        [sys.executable, *worker_args(store, tiny_inputs, metrics, PRETRAIN, at, "6", "--lease-s", "2")],
        env=worker_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 240
        while holder.poll() is None and _state(holder.pid) != "T":  # killed, or stopped, after step 6
            assert time.monotonic() < deadline, "the holder never reached step 6"
            time.sleep(0.2)
        assert _checkpoints(store)[0] == [4]
        leases = list((store / ".leases" / "pretrain").glob("*.json"))
        assert [json.loads(p.read_text())["pid"] for p in leases] == [holder.pid], "the first run holds the key"

        taker = _run(store, tiny_inputs, metrics, "--lease-s", "2")
        result = result_of(taker)
        assert "took over the stale lease" in taker.stderr and f"pid {holder.pid}" in taker.stderr, taker.stderr
        assert "pretrain: resuming from step 4" in taker.stderr, taker.stderr
        ours, theirs = _weights(result["uri"]), _weights(reference["uri"])
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert _curve(result["uri"]) == _curve(reference["uri"])
        assert _published(store) == [Path(result["uri"]).name]
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def _state(pid: int) -> str:
    """The process state letter from /proc (``T`` = stopped by a signal)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()[0]


# --- the signal matrix: stops as platforms deliver them -----------------------------------------

GRACE_S = 20  # the platform's grace period before SIGKILL (Kubernetes' default is 30 s)
PAUSE_S = "0.25"  # each step of the stopped run lasts this much longer: room to stop it mid-run
STOPS = {  # how each platform stops a run, and the words the stopped run uses for it
    "SIGTERM": "SIGTERM",  # Kubernetes eviction, docker/podman stop: then SIGKILL after the grace period
    "SIGINT": "SIGINT",  # Modal's interrupt, Ctrl-C
    "spot-notice": "a spot interruption notice (terminate at ",  # AWS spot: polled from instance metadata
    "SIGKILL": None,  # a machine that vanishes: nothing to catch
}


def _trained_steps(metrics: Path, pid: int) -> list[int]:
    """The training steps process ``pid`` has logged so far (complete lines only: it may be mid-write)."""
    lines = metrics.read_text(encoding="utf-8").split("\n")[:-1] if metrics.exists() else []
    points = [json.loads(line) for line in lines if line]
    return [p["step"] for p in points if p["pid"] == pid and "train_loss" in p]


def _stop_midway(proc: subprocess.Popen, metrics: Path, how: str, endpoint: SpotNoticeEndpoint) -> tuple[int, float]:
    """Once step 5 is logged, stop the run as ``how`` says; SIGKILL it if it is still alive after the
    grace period. Returns (its exit status, seconds from the stop to its exit)."""
    deadline = time.monotonic() + 240
    while not [s for s in _trained_steps(metrics, proc.pid) if s >= 5]:
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step 5"
        assert time.monotonic() < deadline, "the run never reached step 5"
        time.sleep(0.05)
    sent = time.monotonic()
    if how == "spot-notice":
        endpoint.give_notice()
    else:
        proc.send_signal(getattr(signal, how))
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()  # as the platform does after the grace period
        proc.wait()
    return proc.returncode, time.monotonic() - sent


@pytest.mark.parametrize("how", list(STOPS))
def test_a_run_stopped_as_a_platform_does_lands_a_checkpoint_and_reruns_to_identical_weights(
    how, reference, tiny_inputs, tmp_path
):
    store, metrics, log = tmp_path / "store", tmp_path / "metrics.jsonl", tmp_path / "stopped.log"
    with SpotNoticeEndpoint() as endpoint, open(log, "w") as stderr:
        env = {**worker_env(), NOTICE_URL_ENV: endpoint.url, NOTICE_POLL_ENV: "0.2"}  # every case polls
        args = worker_args(store, tiny_inputs, metrics, PRETRAIN, "--step-pause", PAUSE_S)
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)
        try:
            code, took = _stop_midway(proc, metrics, how, endpoint)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    said, trained, landed = log.read_text(encoding="utf-8"), _trained_steps(metrics, proc.pid), _checkpoints(store)[0]
    assert _published(store) == [], "a stopped run publishes nothing"
    if STOPS[how] is None:  # nothing to catch: what landed is the last periodic checkpoint
        assert code == -signal.SIGKILL
        assert landed[-1] % EVERY == 0 and trained[-1] - EVERY < landed[-1] <= trained[-1], (trained, landed)
    else:  # a checkpoint at the step the stop came in, well within the grace period
        assert code == 2 and took < GRACE_S, (how, code, took, said[-2000:])
        assert landed[-1] == trained[-1] < STEPS, (trained, landed)
        assert f"stopped by {STOPS[how]}" in said and f"after step {landed[-1]} of {STEPS}: checkpoint " in said
    assert endpoint.polls, "the run polled the notice endpoint"

    final = _run(store, tiny_inputs, metrics)
    assert f"pretrain: resuming from step {landed[-1]}, checkpoint" in final.stderr, final.stderr[-2000:]
    final = result_of(final)
    expected, got = _weights(reference["uri"]), _weights(final["uri"])
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected), how
    assert _curve(final["uri"]) == _curve(reference["uri"]), "every step once, as uninterrupted"


def test_a_second_ctrl_c_ends_the_run_at_once_without_a_checkpoint(tiny_inputs, tmp_path):
    """Ctrl-C asks for a checkpoint at the end of the step in progress; a person who will not wait
    presses it again, and the run ends there: no checkpoint of that step, nothing published, the
    last periodic checkpoint left for the rerun."""
    store, metrics, log = tmp_path / "store", tmp_path / "metrics.jsonl", tmp_path / "stopped.log"
    args = worker_args(store, tiny_inputs, metrics, PRETRAIN, "--step-pause", "3")  # both presses land in one step
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, *args], env=worker_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        while not [s for s in _trained_steps(metrics, proc.pid) if s >= 5]:
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 5"
            time.sleep(0.05)
        at = _trained_steps(metrics, proc.pid)[-1]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=GRACE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = log.read_text(encoding="utf-8")
    assert proc.returncode not in (0, 2), (proc.returncode, said[-2000:])  # a KeyboardInterrupt, not the orderly 2
    assert "stopped by SIGINT" not in said and "KeyboardInterrupt" in said
    assert _trained_steps(metrics, proc.pid)[-1] == at, "no step after the second Ctrl-C"
    landed = _checkpoints(store)[0]
    assert landed and landed[-1] == at - at % EVERY, (at, landed)  # the periodic one, not one of step `at`
    assert _published(store) == []
