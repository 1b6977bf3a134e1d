"""torchrun on the CPU (gloo): DDP and FSDP2 give one process's loss curve for the same global batch.

The reference trains batch 8 in one process; the distributed runs train batch 4 on each of 2
ranks (``batch_size`` is per rank), so every step sees the same 8 windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import registry
from stages.core.config import parse_config
from stages.core.errors import ConfigError
from stages.core.tracking import MemoryTracker
from stages.executor import execute, run_stage
from stages.launchers import command_line, needs_torchrun, torchrun_args
from stages.stage_call import StageCall
from stages.storage.shards import TokenShards
from stages.storage.stores import LocalStore
from stages.training import checkpoint_format as ckpt
from stages.training import cpu_host
from stages.training.batches import RandomWindows, for_rank
from tests._numeric import approx
from tests._scale_fixtures import make_inputs, read_metrics, result_of, run_worker

STEPS = 12
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}
BASE = {
    "model": MODEL,
    "max_steps": STEPS,
    "warmup_steps": 2,
    "eval_interval": 6,
    "eval_batches": 2,
    "log_interval": 1,
    "device": "cpu",
    "threads": 1,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference_curve(inputs, tmp_path_factory):
    """One process, global batch 8: the curve the distributed runs must reproduce."""
    torch.set_num_threads(1)
    cfg = parse_config({"name": "dist-test", "pretrain": {**BASE, "batch_size": 8}})
    store = LocalStore(tmp_path_factory.mktemp("reference"))
    result = run_stage("pretrain", cfg, inputs, store, MemoryTracker())
    return json.loads((Path(result.ref.uri) / "curve.json").read_text())


def _losses(curve: list[dict], key: str) -> dict[int, float]:
    return {p["step"]: p[key] for p in curve if key in p}


def _assert_same_curve(curve: list[dict], reference: list[dict]) -> None:
    for key in ("train_loss", "val_loss"):
        ours, theirs = _losses(curve, key), _losses(reference, key)
        assert ours.keys() == theirs.keys(), key
        for s in ours:
            assert ours[s] == approx(theirs[s]), f"{key} at step {s}: {ours[s]} vs {theirs[s]}"


def test_ranks_read_disjoint_slices_that_make_up_the_single_process_batch(inputs):
    shards = TokenShards(inputs["data"].uri, "train")
    whole = RandomWindows(shards, 32, 8, seed=5)
    parts = [for_rank(RandomWindows(shards, 32, 4, seed=5), rank, 2) for rank in range(2)]
    for step in (0, 3):
        x, y = whole.get(step, 0)
        assert torch.equal(torch.cat([p.get(step, 0)[0] for p in parts]), x)
        assert torch.equal(torch.cat([p.get(step, 0)[1] for p in parts]), y)

    class Rows:  # a source that cannot slice itself (like fine-tuning's packed rows): split by step
        def get(self, step, micro):
            return torch.full((2, 3), step), torch.full((2, 3), micro)

    assert [int(for_rank(Rows(), r, 2).get(5, 0)[0][0, 0]) for r in range(2)] == [10, 11]
    assert for_rank(whole, 0, 1) is whole


@pytest.mark.slow  # torchrun: two training processes
def test_ddp_with_torchrun_on_two_cpu_processes_matches_one_process(inputs, reference_curve, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    result = result_of(run_worker(tmp_path / "store", inputs, metrics, {**BASE, "batch_size": 4}, nproc=2))
    curve = json.loads((Path(result["uri"]) / "curve.json").read_text())
    _assert_same_curve(curve, reference_curve)
    assert result["metrics"]["world_size"] == 2 and result["metrics"]["tokens"] == STEPS * 8 * 32
    logged = read_metrics(metrics)
    assert len({p["pid"] for p in logged}) == 1, "only rank 0 may log"
    assert [p["step"] for p in logged if "train_loss" in p] == list(range(1, STEPS + 1))
    # The CPU's peak from the hardware where /proc/cpuinfo tells it, else the probe's (stages/training/cpu_host.py).
    cpu_peak = "hardware:" if cpu_host.read_cpu() is not None else "measured: CPU"
    assert 0 < result["metrics"]["mfu"] <= 1 and result["metrics"]["peak_source"].startswith(cpu_peak)
    published = [p for p in (tmp_path / "store" / "pretrain").iterdir() if not p.name.startswith(".")]
    assert len(published) == 1  # one artifact, written by rank 0


@pytest.mark.slow  # torchrun under the flow's stage task
def test_fsdp2_through_the_flow_launcher_matches_one_process_and_logs_to_the_stage_run(
    inputs, reference_curve, tmp_path, monkeypatch
):
    """The flow's stage task launches torchrun; rank 0's curve lands in the stage's own child run."""
    from mlflow.tracking import MlflowClient

    from flows.stage_task import stage_task
    from stages.core.tracking import start_run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = parse_config(
        {
            "name": "dist-test",
            "artifacts": {"store": str(tmp_path / "store")},
            "pretrain": {**BASE, "batch_size": 4, "nproc_per_node": 2, "parallel": "fsdp", "checkpoint_interval": 6},
        }
    )
    assert needs_torchrun(registry.stage("pretrain"), cfg.sections("pretrain"))
    assert not needs_torchrun(registry.stage("data"), cfg.sections("data"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_run(uri, "dist-test", "dist-test", artifact_root=tmp_path / "mlartifacts")
    call = StageCall.for_recipe("pretrain", cfg, inputs, tracking_uri=uri, parent_run_id=parent.run_id)
    done = stage_task.fn(call.to_dict())
    assert not done["reused"] and done["metrics"]["world_size"] == 2
    out = Path(done["ref"]["uri"])
    curve = json.loads((out / "curve.json").read_text())
    _assert_same_curve(curve, reference_curve)
    model = ckpt.load_model(out / "model")  # gathered from the shards: a plain model
    assert model.num_params(non_embedding=False) == done["metrics"]["params"]
    assert np.isfinite(done["metrics"]["final_val_loss"])
    again = execute(StageCall.for_recipe("pretrain", cfg, inputs))  # the same content key: reused, nothing launched
    assert again.reused and again.ref.to_dict() == done["ref"]

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(done["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.tags["gptpipe.stage"] == "pretrain"
    assert run.info.status == "FINISHED"
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(logged) == list(range(1, STEPS + 1)), "rank 0 must log its curve into the stage's run"
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert nested == [], "no run nested under the stage's run"


def test_launch_command_uses_torchrun_flags_and_the_stage_entry_point(inputs, tmp_path):
    cfg = parse_config({"name": "x", "pretrain": {"nproc_per_node": 8, "nnodes": 2}})
    with pytest.raises(ConfigError, match="GPTPIPE_RDZV_ENDPOINT"):
        torchrun_args(cfg.pretrain, "pretrain", env={})
    call = StageCall.for_recipe("pretrain", cfg, inputs)
    cmd = command_line(call, tmp_path / "out", tmp_path / "status.json", env={"GPTPIPE_RDZV_ENDPOINT": "node0:29400"})
    assert cmd[1:3] == ["-m", "stages.torchrun_agent"]  # torchrun, quiet on a stop it passes on
    assert {"--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400"} <= set(cmd)
    assert cmd[cmd.index("-m", 3) :][:3] == ["-m", "stages.launchers", "--call"]
    sent = StageCall.from_dict(json.loads(cmd[cmd.index("--call") + 1]))  # the same command on every node
    assert sent == call and "--standalone" not in cmd
    single = parse_config({"name": "x", "pretrain": {"nproc_per_node": 2}})
    assert torchrun_args(single.pretrain, "pretrain", env={})[0] == "--standalone"
    finetune = parse_config({"name": "x", "finetune": {"nproc_per_node": 2}})  # fine-tuning runs under torchrun too
    assert needs_torchrun(registry.stage("finetune"), finetune.sections("finetune"))
