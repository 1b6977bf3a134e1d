"""Export stage: ONNX + KV graph + .pt2, the parity gate, ORT generation, external data, int8."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _export_fixtures import export_config, exported, make_model
from onnx import numpy_helper

from stages import export
from stages.core.errors import ConfigError, ParityError
from stages.executor import run_stage
from stages.formats.job import gate_inputs
from stages.formats.onnx import exporter
from stages.formats.onnx import gate as onnx_gate
from stages.formats.onnx.runtime import OnnxGenerator
from stages.lm.generate import generate, generate_ids
from stages.lm.tokenizer import Tokenizer
from stages.registry import stage
from stages.storage.stores import LocalStore
from stages.training.checkpoint_format import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.set_num_threads(1)
    return exported(tmp_path_factory)


def perturb(path: Path, pick, change) -> None:
    """Rewrite the first initializer for which ``pick(init)`` holds as ``change(array)``."""
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if pick(i))
    init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), init.name))
    onnx.save(model, str(path))


def head(init) -> bool:
    return init.name.endswith("lm_head.weight")  # the tied embedding / output matrix


def mlp_down(init) -> bool:
    return list(init.dims) == [192, 64]  # the first SwiGLU down-projection (stored transposed)


def bump_one(array: np.ndarray) -> np.ndarray:
    array.flat[0] += 0.5
    return array


def test_export_writes_graphs_that_pass_the_gate(good):
    out, metrics = good.export_dir, good.metrics
    for name in (
        "model.onnx",
        "model_kv.onnx",
        "model.pt2",
        "model.int8.onnx",
        "export.json",
        "tokenizer/tokenizer.model",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.data"))  # a small model keeps its weights inline
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    kv_inputs = [i.name for i in onnx.load(str(out / "model_kv.onnx")).graph.input]
    assert kv_inputs == ["input_ids"] + [f"past_{kv}_{i}" for i in range(2) for kv in ("key", "value")]

    assert metrics["max_abs_diff"] <= metrics["tolerance"] == 1e-4
    assert set(metrics["max_abs_diff_by_shape"]) >= {"1x1", "2x64"}
    assert len(metrics["max_abs_diff_by_shape"]) == 2 + good.cfg.export.parity_shapes
    assert metrics["generation_matches"] == metrics["generation_prompts"] == 3
    assert metrics["pt2_max_abs_diff"] <= 1e-4
    assert metrics["file_bytes"]["model.onnx"] > 0 and metrics["external_data"] is False
    assert np.isfinite(metrics["int8"]["loss_delta"]) and metrics["int8"]["tokens"] > 0
    assert metrics["int8"]["heldout"] == "heldout.jsonl"  # the fine-tune's own held-out set
    assert metrics["file_bytes"]["model.int8.onnx"] < metrics["file_bytes"]["model.onnx"]


def test_ort_kv_generation_equals_pytorch_greedy(good):
    model = load_model(good.model_dir)
    tokenizer = Tokenizer.load(good.export_dir / "tokenizer")
    generator = OnnxGenerator(good.export_dir, threads=1)
    rng = np.random.default_rng(7)
    block = model.cfg.block_size
    # Short prompts, and one that overflows block_size mid-generation (the cropped-window path).
    prompts = [tokenizer.encode("def main():\n"), [5], rng.integers(0, model.cfg.vocab_size, block - 4).tolist()]
    for prompt in prompts:
        ours = generator.generate_ids(prompt, 16, stop_ids=[tokenizer.eos_id])
        assert ours == generate_ids(model, prompt, 16, stop_ids=[tokenizer.eos_id])
        assert len(ours) >= 1
    assert generator.generate("Reverse: a b c", max_new_tokens=10) == generate(
        model, tokenizer, "Reverse: a b c", max_new_tokens=10
    )


def test_onnx_generator_runs_without_torch(good):
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from stages.formats.onnx.runtime import OnnxGenerator\n"
        f"g = OnnxGenerator({str(good.export_dir)!r}, threads=1)\n"
        "ids = g.generate_ids([5, 6, 7], 4)\n"
        "text = g.generate('Sort: c a b', max_new_tokens=4)\n"
        "print(len(ids), type(text).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "str"]


def test_gate_rejects_one_perturbed_onnx_weight(good, tmp_path):
    broken = tmp_path / "export"
    shutil.copytree(good.export_dir, broken)
    perturb(broken / "model.onnx", head, bump_one)
    model = load_model(good.model_dir)
    with pytest.raises(ParityError) as caught:
        tokenizer = Tokenizer.load(broken / "tokenizer")
        inputs = gate_inputs(model, tokenizer, good.cfg.export, good.model_dir.parent)
        onnx_gate.check_parity(model, tokenizer, OnnxGenerator(broken, threads=1), inputs)
    message = str(caught.value)
    assert "model.onnx 1x1" in message and "export.tolerance=0.0001" in message and "\n" not in message
    assert "model_kv.onnx" not in message  # only the graph that was changed is blamed


def _copy_and_break(good_dir: Path, break_graph):
    """A stand-in for ``export_graphs`` that copies the good export and breaks the KV graph."""

    def fake(model, out, opset, external, program):
        for name in ("model.onnx", "model_kv.onnx"):
            shutil.copy2(good_dir / name, out / name)
        break_graph(out / "model_kv.onnx")
        return {"logits": "model.onnx", "kv": "model_kv.onnx"}

    return fake


@pytest.mark.parametrize(
    "tolerance, pick, change, expected",
    [
        (1e-4, head, bump_one, r"above export.tolerance=0.0001 for model_kv.onnx 1x1"),  # the logits check fails
        # A loud MLP: logits stay within a huge tolerance (RMSNorm bounds them), greedy ids do not.
        (
            1e3,
            mlp_down,
            lambda w: w * 1000.0,
            r"greedy ORT\+KV generation \(model_kv.onnx\) differs from PyTorch for 3/3 prompts",
        ),
    ],
)
def test_runner_publishes_nothing_when_the_gate_fails(good, tmp_path, monkeypatch, tolerance, pick, change, expected):
    breaker = _copy_and_break(good.export_dir, lambda path: perturb(path, pick, change))
    monkeypatch.setattr(exporter, "export_graphs", breaker)
    store = LocalStore(tmp_path / "store")
    cfg = export_config(tmp_path / "store", tolerance=tolerance)
    with pytest.raises(ParityError, match=expected):
        run_stage("export", cfg, good.inputs, store)
    assert list((tmp_path / "store" / "export").iterdir()) == []  # no artifact, no leftover scratch


def test_external_data_when_forced(good, tmp_path):
    store = LocalStore(tmp_path / "store")
    model_ref = make_model(store, "finetune", good.vocab_size, seed=3, n_layer=1)
    cfg = export_config(
        tmp_path / "store", onnx={"external_data": True}, pt2={"enabled": False}, generation_prompts=2, parity_shapes=1
    )
    result = run_stage("export", cfg, {"tokenizer": good.inputs["tokenizer"], "finetune": model_ref}, store)
    out = Path(result.ref.uri)
    assert result.manifest.metrics["external_data"] is True
    sizes = result.manifest.metrics["file_bytes"]
    for graph in ("model.onnx", "model_kv.onnx"):
        # The weights (the embedding alone is vocab x 64 floats) live in the side file.
        assert sizes[f"{graph}.data"] >= good.vocab_size * 64 * 4
        proto = onnx.load(str(out / graph), load_external_data=False)
        assert next(i for i in proto.graph.initializer if head(i)).data_location == onnx.TensorProto.EXTERNAL
        onnx.checker.check_model(str(out / graph), full_check=True)
    assert sizes["architecture.onnx.data"] >= good.vocab_size * 64 * 4  # the architecture view follows suit
    assert result.manifest.metrics["architecture"]["generation_matches"] == 2
    assert not (out / "model.pt2").exists()
    assert result.manifest.metrics["generation_matches"] == 2
    assert "model.onnx.data" in result.manifest.files  # hashed like every other file
    assert OnnxGenerator(out, threads=1).generate_ids([1, 2, 3], 3)


def test_missing_source_artifact_is_a_config_error(good, tmp_path):
    cfg = export_config(tmp_path, source="pretrain")
    with pytest.raises(ConfigError, match=r"export.source = 'pretrain'.*--input pretrain="):
        export.run(cfg, {"tokenizer": Path(good.inputs["tokenizer"].uri), "finetune": good.model_dir}, tmp_path, None)
    assert stage("export").inputs_for(cfg) == ("tokenizer", "pretrain")


def test_export_json_describes_the_graphs(good):
    meta = json.loads((good.export_dir / "export.json").read_text())
    assert meta["graphs"] == {
        "logits": "model.onnx",
        "kv": "model_kv.onnx",
        "pt2": "model.pt2",
        "int8": "model.int8.onnx",
        "architecture": "architecture.onnx",
    }
    assert (meta["n_layer"], meta["block_size"], meta["vocab_size"]) == (2, 64, good.vocab_size)
