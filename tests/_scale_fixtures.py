"""Shared by the distributed and reliability tests: a store with input artifacts, and runs of
``tests/_scale_worker.py`` in child processes (plain or under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stages.storage.artifacts import ArtifactRef
from stages.storage.stores import LocalStore
from tests._training_fixtures import fake_artifact, repetitive_stream, write_shards

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_scale_worker.py"


# Tiny and deterministic: a resumed run must reproduce an uninterrupted one bit for bit, and
# dropout makes the RNG state part of what a checkpoint has to carry.
RESUMABLE_PRETRAIN = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.1},
    "max_steps": 16,
    "checkpoint_interval": 4,
    "keep_checkpoints": 2,
    "batch_size": 4,
    "warmup_steps": 2,
    "eval_interval": 8,
    "eval_batches": 1,
    "log_interval": 1,
    "device": "cpu",
    "threads": 1,
    "deterministic": True,
}


def make_inputs(root: Path) -> dict[str, ArtifactRef]:
    """Tokenizer and data artifacts (hand-made shards of a learnable stream) in a store at ``root``."""
    store = LocalStore(root)
    stream = repetitive_stream(length=6000)
    tokenizer = fake_artifact(store, "tokenizer", lambda d: (d / "tokenizer.model").write_bytes(b"unused"))
    data = fake_artifact(store, "data", lambda d: write_shards(d, {"train": stream[:5000], "val": stream[5000:]}))
    return {"tokenizer": tokenizer, "data": data}


def worker_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def worker_args(
    store: Path,
    inputs: dict[str, ArtifactRef],
    metrics: Path,
    pretrain: dict,
    *extra: str,
    finetune: dict | None = None,
) -> list[str]:
    args = [
        str(WORKER),
        "--store",
        str(store),
        "--tokenizer",
        inputs["tokenizer"].uri,
        "--data",
        inputs["data"].uri,
        "--metrics",
        str(metrics),
        "--pretrain",
        json.dumps(pretrain),
    ]
    if finetune is not None:  # stage finetune, from the pretrain artifact in ``inputs``
        args += ["--finetune", json.dumps(finetune), "--model", inputs["pretrain"].uri]
    return args + list(extra)


def run_worker(
    store: Path,
    inputs,
    metrics: Path,
    pretrain: dict,
    *extra: str,
    nproc: int = 1,
    timeout: float = 300,
    finetune: dict | None = None,
) -> subprocess.CompletedProcess:
    """One run to completion; with ``nproc`` > 1 under ``torchrun --standalone``; with ``finetune``
    (its fields) stage finetune on the micro recipe instead of pretrain."""
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    return subprocess.run(
        launcher + worker_args(store, inputs, metrics, pretrain, *extra, finetune=finetune),
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def result_of(proc: subprocess.CompletedProcess) -> dict:
    """The JSON line the worker prints on success (fails the test with its stderr otherwise)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
