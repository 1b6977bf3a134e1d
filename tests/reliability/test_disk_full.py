"""A disk that fills while a checkpoint is written: a clear error, the previous checkpoint intact,
and a rerun that resumes from it to the same weights as a run that never failed."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import safetensors.torch
import torch

from stages.core.config import parse_config
from stages.core.errors import ArtifactError
from stages.core.tracking import MemoryTracker
from stages.executor import call_key, run_stage
from stages.stage_call import StageCall
from stages.storage.stores import LocalStore
from stages.training import checkpoint_format as ckpt

from ._failure_checks import one_line

SECTION = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
    "max_steps": 8,
    "batch_size": 4,
    "warmup_steps": 1,
    "eval_interval": 8,
    "eval_batches": 1,
    "log_interval": 1,
    "checkpoint_interval": 2,
    "keep_checkpoints": 3,
    "device": "cpu",
    "deterministic": True,
}


def _cfg():
    return parse_config({"name": "disk-full", "pretrain": SECTION})


def _weights(uri: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(uri) / "model" / "model.safetensors"))


def test_enospc_mid_checkpoint_keeps_the_previous_one_and_the_rerun_resumes_exactly(tiny_inputs, tmp_path, monkeypatch):
    cfg = _cfg()
    reference = run_stage("pretrain", cfg, tiny_inputs, LocalStore(tmp_path / "reference"), MemoryTracker())

    store = LocalStore(tmp_path / "store")
    real_save = torch.save
    writes = []

    def fills_the_disk(obj, path, *args, **kwargs):
        writes.append(Path(path))
        if len(writes) == 2:  # the second checkpoint (step 4): half the file lands, then the disk is full
            Path(path).write_bytes(b"\0" * 512)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(ArtifactError) as failure:
        run_stage("pretrain", cfg, tiny_inputs, store, MemoryTracker())
    monkeypatch.setattr(torch, "save", real_save)

    message = one_line(failure.value)
    assert "step_00000004: cannot write checkpoint: No space left on device" in message
    assert "free space on" in message and "rerun to resume" in message
    assert store.find("pretrain", call_key(StageCall.for_recipe("pretrain", cfg, tiny_inputs))) is None
    assert not [p for p in store.root.glob("pretrain/*") if not p.name.startswith(".")], "nothing published"

    work = next(store.root.glob("pretrain/.work-*/checkpoints"))
    assert [step for step, _ in ckpt.list_checkpoints(work)] == [2], "the checkpoint before the failure is kept"
    assert not [p.name for p in work.iterdir() if p.name.startswith((".tmp-", ".old-"))], "the half write is gone"
    state = ckpt.load_checkpoint(work / ckpt.step_dirname(2), ckpt.load_model(work / ckpt.step_dirname(2)))
    assert state["step"] == 2

    tracker = MemoryTracker()
    resumed = run_stage("pretrain", cfg, tiny_inputs, store, tracker)
    assert [step for step, _ in tracker.metrics["train_loss"]] == list(range(3, 9)), "resumed after step 2"
    expected, got = _weights(reference.ref.uri), _weights(resumed.ref.uri)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
