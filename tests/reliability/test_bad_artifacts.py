"""Missing or tampered input artifacts: refused by sha256 before the stage reads a byte of them."""

from __future__ import annotations

import hashlib
import json

import pytest

from stages.storage.stores import LocalStore
from tests._training_fixtures import fake_artifact, repetitive_stream, write_shards

from ._failure_checks import error_line, finished_outputs, finished_runs, run_stage_cli, stage_argv
from .conftest import TINY_PRETRAIN


@pytest.fixture
def inputs(tmp_path):
    store = LocalStore(tmp_path / "inputs")
    stream = repetitive_stream(length=3000)
    return {
        "tokenizer": fake_artifact(store, "tokenizer", lambda d: (d / "tokenizer.model").write_bytes(b"unused")),
        "data": fake_artifact(store, "data", lambda d: write_shards(d, {"train": stream[:2500], "val": stream[2500:]})),
    }


def _argv(store, tokenizer: str, data: str, tracking_uri: str, parent: str) -> list[str]:
    return stage_argv(
        "pretrain",
        sets=[*TINY_PRETRAIN, "pretrain.model.block_size=16"],
        inputs={"tokenizer": tokenizer, "data": data},
        store=store,
        tracking_uri=tracking_uri,
        parent_run_id=parent,
    )


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _tamper(data_dir, how: str) -> str:
    """Damage the data artifact one way; return the file the message must name."""
    if how == "missing-directory":
        return str(data_dir) + "-gone"
    shard = data_dir / "train_000.bin"
    if how == "file-deleted":
        shard.unlink()
        return "file train_000.bin listed in the manifest is missing"
    if how == "byte-flipped":
        _flip_a_byte(shard)
        return f"{shard}: sha256"
    # "manifest-edited": the file changed and its sha256 in the manifest was updated to match,
    # but the artifact's digest (which the reference holds) was not: the edit shows.
    _flip_a_byte(shard)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["files"]["train_000.bin"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return "manifest.json: digest does not match its file list"


@pytest.mark.parametrize("how", ["missing-directory", "file-deleted", "byte-flipped", "manifest-edited"])
def test_missing_or_tampered_input_is_refused_naming_the_file(how, inputs, tmp_path, capsys, tracking_uri, parent_run):
    from pathlib import Path

    data_dir = Path(inputs["data"].uri)
    culprit = _tamper(data_dir, how)
    data_uri = culprit if how == "missing-directory" else str(data_dir)
    store = tmp_path / "store"
    argv = _argv(store, inputs["tokenizer"].uri, data_uri, tracking_uri, parent_run)
    line = error_line(*run_stage_cli(capsys, *argv)[::2])
    assert culprit in line, line
    if how == "missing-directory":
        assert "no manifest.json; not a finished gptpipe artifact" in line
    elif how != "manifest-edited":
        assert "rerun stage 'data'" in line, "the message says what to do"
    assert finished_outputs(store) == []
    assert not list(store.glob("pretrain/.work-*/checkpoints/*")), "training must not have started"
    assert finished_runs(tracking_uri, parent_run) == []
    assert error_line(*run_stage_cli(capsys, *argv)[::2]) == line
