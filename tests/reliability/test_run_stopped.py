"""``gptpipe run`` as a container's main process, sent SIGTERM mid-pretraining (what ``podman stop``
and a Kubernetes eviction send to PID 1): the training stage checkpoints, the run exits within the
grace period with a non-zero status and one line saying where it stopped, and the same command run
again reuses the finished stages and resumes training from the checkpoint that landed. In one process
(the default), and with the stage under torchrun in a session of its own, where ``gptpipe run`` must
pass the signal on. Between training steps (the data stage) the run ends at once, in one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stages.training import checkpoint_format as ckpt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "micro.yaml"
GRACE_S = 20  # podman stop's default is 10 s, Kubernetes' 30 s
STEPS = 200
# The micro recipe's first three stages, with a pretraining long enough to be stopped in the middle.
LONGER = [
    "stages=[tokenizer, data, pretrain]",
    f"pretrain.max_steps={STEPS}",
    "pretrain.checkpoint_interval=10",
    "pretrain.threads=1",
    "tokenizer.threads=1",
]
STOPPED = re.compile(rf"gptpipe: error: stopped by SIGTERM after step (\d+) of {STEPS}: checkpoint (\S+) written")


def _gptpipe_run(cwd: Path, store: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli.main", "run", "--config", str(MICRO), "--no-track"]
    cmd += ["--report-json", str(cwd / "report.json")]
    for item in [f"artifacts.store={store}", *LONGER, *extra]:
        cmd += ["--set", item]
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect"), "PYTHONPATH": str(ROOT)}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _checkpoints(store: Path) -> list[int]:
    work = list((store / "pretrain").glob(".work-*/checkpoints"))
    return [step for step, _ in ckpt.list_checkpoints(work[0])] if work else []


@pytest.mark.parametrize("nproc", [1, 2], ids=["in-process", "torchrun"])
def test_sigterm_to_gptpipe_run_checkpoints_exits_promptly_and_the_rerun_resumes(nproc, tmp_path):
    store, first, second = tmp_path / "store", tmp_path / "first.log", tmp_path / "second.log"
    extra = [f"pretrain.nproc_per_node={nproc}"]
    proc = _gptpipe_run(tmp_path, store, first, *extra)
    try:
        deadline = time.monotonic() + 600
        while not _checkpoints(store):  # pretraining is under way: its first periodic checkpoint is there
            assert proc.poll() is None, first.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "pretraining never wrote its first checkpoint"
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # to gptpipe run alone, as a container platform does
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gptpipe run was still running {GRACE_S} s after SIGTERM")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:  # the test failed: end the run and torchrun's session beside it
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
    said = first.read_text(errors="replace")
    stopped = STOPPED.findall(said)
    assert proc.returncode == 2 and len(stopped) == 1, (proc.returncode, said[-3000:])
    step = int(stopped[0][0])
    ours = [line for line in said.splitlines() if line.startswith("gptpipe: ")]
    assert len(ours) == 1 and ours[0].endswith("rerun the same command to resume"), ours  # one line says it all
    assert "Traceback" not in said, said[-3000:]  # an explained stop, not a crash (flows/run_logs.py)
    assert 10 <= step < STEPS and _checkpoints(store)[-1] == step, (step, _checkpoints(store))
    assert not [p for p in (store / "pretrain").iterdir() if not p.name.startswith(".")], "nothing published"
    print(f"SIGTERM to exit: {took:.1f} s, stopped after step {step}")

    rerun = _gptpipe_run(tmp_path, store, second, *extra)
    assert rerun.wait(timeout=900) == 0, second.read_text(errors="replace")[-3000:]
    assert f"pretrain: resuming from step {step}, checkpoint" in second.read_text(errors="replace")
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["stages"]
    assert {name: report[name]["status"] for name in report} == {
        "tokenizer": "reused",
        "data": "reused",
        "pretrain": "ran",
    }
    assert report["pretrain"]["metrics"]["steps"] == STEPS


def test_sigterm_to_gptpipe_run_between_training_steps_ends_it_at_once_in_one_line(tmp_path):
    """Outside training (here the data stage) nothing is worth finishing: the run ends at once, says so
    in one line with status 143 (128 + SIGTERM), and keeps the stages that finished."""
    store, log = tmp_path / "store", tmp_path / "run.log"
    proc = _gptpipe_run(tmp_path, store, log)
    try:
        deadline = time.monotonic() + 600
        while not list((store / "data").glob(".work-*")):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the data stage never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gptpipe run was still running {GRACE_S} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = log.read_text(errors="replace")
    ours = [line for line in said.splitlines() if line.startswith("gptpipe: ")]
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, said[-3000:])
    assert ours == ["gptpipe: stopped by SIGTERM; finished stages are kept: rerun the same command to continue"]
    assert [p.name for p in (store / "tokenizer").iterdir() if not p.name.startswith(".")], "the tokenizer is kept"
