"""Two machines that really talk: multi-node pretraining on network-namespace "nodes".

Each node (``tests/_netns.py``) has its own address, hostname and hosts file, and runs exactly the
command docs/scale.md gives for several nodes:

    GPTPIPE_RDZV_ENDPOINT=node1:29400 GPTPIPE_RDZV_ID=<run> \\
        python -m stages pretrain --config RECIPE --input tokenizer=… --input data=… \\
        --out STORE --set pretrain.nnodes=2

with STORE a directory both nodes see. Checked: the nodes of one run hold the key's lease
together (none waits for another), both exit 0, exactly one output is committed, and its weights
equal those of the one-node, two-process run with the same global batch — bit for bit: with two
ranks gloo's allreduce adds the same two gradients in either case, and each rank reads the same
slice of every batch. The same holds with ``parallel: fsdp`` (FSDP2 on gloo) and for
fine-tuning (the micro recipe's, from the suite's shared micro upstream). Then a node dies mid-run (SIGKILL to every process it runs): the other
node's run fails, the same command rerun on both nodes resumes from the last checkpoint in the
shared store, and ends with the same weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import safetensors.torch
import torch
import yaml

from stages.training import checkpoint_format as ckpt
from tests import _netns
from tests._scale_fixtures import make_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REASON = _netns.unavailable()
if REASON and os.environ.get("GPTPIPE_REQUIRE_NODES") == "1":
    raise RuntimeError(f"GPTPIPE_REQUIRE_NODES=1 but the multi-node tests cannot run: {REASON}")
if REASON:
    pytest.skip(REASON, allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 120, 20
# Large enough that a step takes tens of milliseconds (the kill must land mid-run), small enough
# that the whole run is seconds; deterministic, so a resumed run can equal an uninterrupted one.
PRETRAIN = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 96, "block_size": 32},
    "max_steps": STEPS,
    "checkpoint_interval": EVERY,
    "keep_checkpoints": 2,
    "batch_size": 4,
    "warmup_steps": 5,
    "eval_interval": 60,
    "eval_batches": 1,
    "log_interval": 10,
    "device": "cpu",
    "threads": 1,
    "deterministic": True,
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "multinode.yaml"
    path.write_text(yaml.safe_dump({"name": "multinode", "pretrain": PRETRAIN}))
    return path


# Fine-tuning of the micro recipe's pretrained model (the suite's shared micro upstream).
FINETUNE = ("finetune.device=cpu", "finetune.threads=1", "finetune.deterministic=true")


@pytest.fixture(scope="module")
def command(recipe, micro_upstream):
    """The docs' per-node command (docs/scale.md, "Several nodes") for ``stage`` into ``store``:
    pretraining on hand-made shards put in ``store``, or fine-tuning of the micro upstream."""

    def argv(stage: str, store: Path, *overrides: str) -> list[str]:
        if stage == "pretrain":
            config, inputs = recipe, make_inputs(store)
        else:
            config, inputs = ROOT / "configs" / "micro.yaml", micro_upstream()[1]
            overrides = (*FINETUNE, *overrides)
        line = [sys.executable, "-m", "stages", stage, "--config", str(config), "--out", str(store)]
        for name, ref in sorted(inputs.items()):  # every upstream output; the stage takes what it reads
            line += ["--input", f"{name}={ref.uri}"]
        for item in overrides:
            line += ["--set", item]
        return line

    return argv


def _env(run_id: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(GPTPIPE_RDZV_ENDPOINT="node1:29400", GPTPIPE_RDZV_ID=run_id)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _on_both(nodes, argv: list[str], env: dict, logs: Path, attempt: str) -> list[subprocess.Popen]:
    """The same command started on every node, node 2 first (arrival order must not matter)."""
    procs = {}
    for node in (1, 0):
        procs[node] = nodes.popen(node, argv, env, logs / f"{attempt}-node{node + 1}.log")
        time.sleep(0.5)
    return [procs[0], procs[1]]


def _finish(procs: list[subprocess.Popen], logs: Path, attempt: str, timeout: float = 300) -> list[str]:
    texts = []
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                _node_dies(p)
            raise
        texts.append((logs / f"{attempt}-node{i + 1}.log").read_text(errors="replace"))
    return texts


def _node_dies(proc: subprocess.Popen) -> None:
    """Everything the node runs stops at once, as when the machine is lost: the stage command, its
    torchrun (which runs in a session of its own) and the ranks."""
    tree = psutil.Process(proc.pid)
    for process in [tree, *tree.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _published(store: Path, stage: str = "pretrain") -> list[Path]:
    return sorted(p for p in (store / stage).glob("[!.]*") if (p / "manifest.json").is_file())


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(output / "model" / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _checkpoint_steps(store: Path) -> list[int]:
    return [
        step for work in (store / "pretrain").glob(".work-*") for step, _ in ckpt.list_checkpoints(work / "checkpoints")
    ]


@pytest.fixture(scope="module")
def two_nodes():
    with _netns.Nodes(2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def one_node_two_processes(command, tmp_path_factory):
    """The reference for ``stage`` with ``parallel`` (ddp or fsdp): the same recipe on one machine,
    two processes, the same global batch; its weights."""
    weights: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def run(stage: str, parallel: str) -> dict[str, torch.Tensor]:
        if (stage, parallel) not in weights:
            store = tmp_path_factory.mktemp("one-node") / "store"
            argv = command(stage, store, f"{stage}.nproc_per_node=2", f"{stage}.parallel={parallel}")
            env = _env("unused")
            for name in ("GPTPIPE_RDZV_ENDPOINT", "GPTPIPE_RDZV_ID"):
                env.pop(name)
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            (output,) = _published(store, stage)
            weights[stage, parallel] = _weights(output)
        return weights[stage, parallel]

    return run


@pytest.mark.parametrize("stage, parallel", [("pretrain", "ddp"), ("pretrain", "fsdp"), ("finetune", "ddp")])
def test_two_nodes_train_as_one_run_and_match_one_node_with_two_processes(
    stage, parallel, two_nodes, command, one_node_two_processes, tmp_path
):
    store = tmp_path / "store"
    argv = command(stage, store, f"{stage}.nnodes=2", f"{stage}.parallel={parallel}")
    run_id = f"together-{stage}-{parallel}"
    procs = _on_both(two_nodes, argv, _env(run_id), tmp_path, "run")
    logs = _finish(procs, tmp_path, "run")

    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node{i + 1}:\n{log[-4000:]}"
    assert f"joining the claim of a run (nodes of node1:29400/{run_id}) on node" in "".join(logs), (
        "one node claims the key, the other joins that claim instead of waiting for it"
    )
    assert not any("waiting for" in log for log in logs)
    printed = [json.loads(log.strip().splitlines()[-1]) for log in logs]
    assert printed[0]["uri"] == printed[1]["uri"] and printed[0]["digest"] == printed[1]["digest"]
    (output,) = _published(store, stage)
    assert str(output) == printed[0]["uri"]
    assert printed[0]["metrics"]["world_size"] == 2
    assert list((store / ".leases" / stage).glob("*.json")) == [], "the run let the key go"
    assert not list((store / stage).glob(".work-*")), "nothing half-written is left beside the output"
    expected = one_node_two_processes(stage, parallel)
    assert _same(_weights(output), expected), "two nodes × 1 process = 1 node × 2 processes"


def test_a_node_killed_mid_run_resumes_on_rerun_to_the_same_weights(
    two_nodes, command, one_node_two_processes, tmp_path
):
    store = tmp_path / "store"
    argv = command("pretrain", store, "pretrain.nnodes=2")
    env = _env("killed")
    procs = _on_both(two_nodes, argv, env, tmp_path, "first")

    deadline = time.monotonic() + 240
    while not _checkpoint_steps(store):  # a checkpoint in the shared store, then node 2 dies
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint was written"
        time.sleep(0.05)
    _node_dies(procs[1])
    logs = _finish(procs, tmp_path, "first")
    assert procs[1].returncode == -signal.SIGKILL
    assert "this node's ranks finished" not in logs[1]
    assert procs[0].returncode != 0, f"node1 must fail when its peer dies:\n{logs[0][-3000:]}"
    assert _published(store) == [], "a run that lost a node publishes nothing"
    landed = max(_checkpoint_steps(store))
    assert 0 < landed < STEPS

    procs = _on_both(two_nodes, argv, env, tmp_path, "rerun")
    logs = _finish(procs, tmp_path, "rerun")
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node{i + 1}:\n{log[-4000:]}"
    assert f"pretrain: resuming from step {landed}, checkpoint" in "".join(logs)
    (output,) = _published(store)
    assert _same(_weights(output), one_node_two_processes("pretrain", "ddp")), "resumed on two nodes = uninterrupted"
