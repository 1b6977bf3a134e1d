"""Security: safetensors weights, no code run from a checkpoint, no pickle anywhere, no path
traversal through a manifest, and every server the project starts listens on 127.0.0.1 only.

(The pickle scan moved here from tests/test_boundary.py and grew; the traversal test from
tests/test_artifacts.py likewise.)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.core.errors import ArtifactError
from stages.storage.artifacts import Manifest, files_digest, hash_files, verify
from stages.storage.stores import LocalStore
from stages.training import checkpoint_format as ckpt

from ._failure_checks import one_line
from .conftest import ROOT, clean_env

# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def pretrained(tiny_inputs, tmp_path_factory):
    from stages.core.config import parse_config
    from stages.executor import run_stage

    section = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "max_steps": 2,
        "batch_size": 2,
        "warmup_steps": 0,
        "eval_interval": 2,
        "eval_batches": 1,
        "device": "cpu",
    }
    cfg = parse_config({"name": "security", "pretrain": section})
    return Path(run_stage("pretrain", cfg, tiny_inputs, LocalStore(tmp_path_factory.mktemp("store"))).ref.uri)


def test_checkpoints_are_safetensors_and_json_with_the_optimizer_as_plain_tensors(pretrained):
    from safetensors import safe_open

    model_dir = pretrained / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "model.json",
        "model.safetensors",
        "optimizer.pt",
        "trainer.json",
    ]
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        assert "blocks.0.attn.qkv.weight" in set(weights.keys())
    json.loads((model_dir / "model.json").read_text())
    json.loads((model_dir / "trainer.json").read_text())
    # The optimizer state loads under the restricted unpickler: tensors and plain containers only.
    state = torch.load(model_dir / "optimizer.pt", weights_only=True)
    assert set(state) == {"state", "param_groups"}


class _RunsCode:
    """What a hostile optimizer.pt would hold: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_whose_optimizer_state_would_run_code_is_refused_without_running_it(pretrained, tmp_path):
    from stages.lm.model import GPT
    from stages.training.loop import build_optimizer
    from tests._training_fixtures import micro_config

    hostile = tmp_path / "hostile"
    ckpt.save_model(hostile, ckpt.load_model(pretrained / "model"))
    (hostile / ckpt.TRAINER).write_text((pretrained / "model" / ckpt.TRAINER).read_text())
    marker = tmp_path / "code-ran"
    torch.save({"state": {0: _RunsCode(str(marker))}, "param_groups": []}, hostile / ckpt.OPTIMIZER)

    model: GPT = ckpt.load_model(hostile)
    optimizer = build_optimizer(model, micro_config())
    with pytest.raises(ArtifactError) as refused:
        ckpt.load_checkpoint(hostile, model, optimizer)
    message = one_line(refused.value)
    assert f"{hostile / ckpt.OPTIMIZER}: refusing to load" in message and "delete" in message
    assert not marker.exists(), "the payload ran"


# --------------------------------------------------------------------------- no pickle in the code


_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _pickle_uses(path: Path) -> list[str]:
    """Every way the file could unpickle data: imports of pickle-like modules, torch.load without
    weights_only=True, numpy with allow_pickle=True, pandas.read_pickle, unsafe YAML loaders."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _PICKLE_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
                if keywords.get("weights_only") != "True":
                    found.append(f"{where} {name}(...) without weights_only=True")
            if keywords.get("allow_pickle") == "True":
                found.append(f"{where} {name}(allow_pickle=True)")
            if name.endswith(("read_pickle", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all")):
                found.append(f"{where} {name}(...)")
    return found


def test_no_code_path_can_unpickle_untrusted_data():
    files = sorted([*(ROOT / "stages").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])
    assert len(files) > 20
    assert [use for path in files for use in _pickle_uses(path)] == []


def test_the_pickle_scan_finds_what_it_looks_for(tmp_path):
    sample = ROOT / "tests" / "reliability" / "_scan_sample.py"
    sample.write_text(
        "import pickle\nimport torch, numpy as np, yaml\ntorch.load('x')\n"
        "torch.load('y', weights_only=False)\nnp.load('z', allow_pickle=True)\nyaml.load('a')\n"
    )
    try:
        assert len(_pickle_uses(sample)) == 5
    finally:
        sample.unlink()


# --------------------------------------------------------------------------- path traversal


@pytest.mark.parametrize(
    "rel", ["../../etc/passwd", "/etc/passwd", "a/../../b", "..", "~/.ssh/id_rsa", "a\\..\\..\\b", "", "x\0y"]
)
def test_manifest_file_paths_outside_the_artifact_are_refused(rel):
    manifest = Manifest(stage="x", key="k", config={}, inputs={}, code_version="v", files={rel: "0" * 64})
    with pytest.raises(ArtifactError) as refused:
        Manifest.from_json(manifest.to_json(), "evil/manifest.json")
    assert "evil/manifest.json: refusing file path" in one_line(refused.value)


def test_verify_refuses_traversal_in_a_manifest_built_in_memory(tmp_path):
    (tmp_path / "secret").write_text("outside")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    files = {"../secret": "0" * 64}
    with pytest.raises(ArtifactError, match="refusing file path '../secret'"):
        verify(
            artifact,
            Manifest(
                stage="x", key="k", config={}, inputs={}, code_version="v", files=files, digest=files_digest(files)
            ),
        )


def test_a_symlink_out_of_an_artifact_is_refused_by_materialize(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("a file the artifact must not reach")
    store = LocalStore(tmp_path / "store")
    scratch = store.scratch("data", "k")
    (scratch / "shards.json").symlink_to(outside)
    files = hash_files(scratch)
    ref = store.commit(
        scratch,
        Manifest(
            stage="data", key="k", config={}, inputs={}, code_version="v", files=files, digest=files_digest(files)
        ),
    )
    with pytest.raises(ArtifactError) as refused:
        store.materialize(ref)
    assert "shards.json: a link out of the artifact" in one_line(refused.value)


# --------------------------------------------------------------------------- loopback only


def test_every_service_command_binds_loopback(tmp_path):
    from flows.cli.services import START_ORDER, Layout

    layout = Layout(tmp_path)
    for name in START_ORDER:
        command = layout.command(name)
        flag = "-H" if name == "s3" else "--host"
        assert command[command.index(flag) + 1] == "127.0.0.1", (name, command)
        assert "0.0.0.0" not in command and "::" not in command


def test_gptpipe_ui_binds_loopback(monkeypatch, tmp_path):
    from flows.cli import main as cli

    seen = {}
    monkeypatch.setattr(os, "execvp", lambda file, args: seen.setdefault("args", args))
    cli.main(["ui", "--config", str(ROOT / "configs" / "micro.yaml"), "--set", f"artifacts.store={tmp_path}/s"])
    args = seen["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"


def listening_addresses(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_publish_serve_listens_on_loopback_only(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "index.html").write_text("<html></html>")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.viewer.serve", "serve", str(bundle), "--port", "0"],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "at http://127.0.0.1:" in line, line
        addresses: set[str] = set()
        for _ in range(50):  # the socket is bound before the line is printed; this only guards a slow /proc
            addresses = listening_addresses(proc.pid)
            if addresses:
                break
            time.sleep(0.1)
        assert addresses == {"127.0.0.1"}
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_running_services_listen_on_loopback_only(servers):
    import psutil

    from flows.cli import services as svc

    for name, info in svc.status(servers.home).items():
        if name == "supervisor":
            continue
        family = [psutil.Process(info["pid"]), *psutil.Process(info["pid"]).children(recursive=True)]
        addresses = set().union(*(listening_addresses(p.pid) for p in family))
        assert addresses == {"127.0.0.1"}, (name, addresses)
