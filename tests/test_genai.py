"""The export's onnxruntime-genai folder: built by onnxruntime-genai's builder from hf/, it runs in
og.Model as the same model (logits after each prompt, greedy ids token for token) and og.Tokenizer
tokenizes as gptpipe does; a damaged folder fails the gate and publishes nothing, and a missing
onnxruntime_genai is a ConfigError naming export.genai=false.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from _export_fixtures import export_config, exported

from stages import export
from stages.core.errors import ConfigError, ParityError
from stages.executor import run_stage
from stages.lm import genai_package
from stages.lm.export_layout import GENAI_DIR, HF_DIR
from stages.storage.stores import LocalStore


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.set_num_threads(1)
    return exported(tmp_path_factory)


def test_the_genai_folder_passes_the_gate(good):
    folder = good.export_dir / GENAI_DIR
    assert (folder / genai_package.CONFIG_FILE).is_file() and (folder / "model.onnx").is_file()
    config = json.loads((folder / genai_package.CONFIG_FILE).read_text())
    assert config["model"]["vocab_size"] == good.vocab_size
    figures = good.metrics["genai"]
    assert figures["generation_matches"] == figures["generation_prompts"] >= 2
    assert figures["tokenizer_matches"] == figures["decode_matches"] == figures["tokenizer_texts"] > 10
    assert figures["probe_text_identical"] in (True, False)
    assert figures["tokenizer_from_hf"] is True
    assert figures["max_abs_diff"] <= good.cfg.export.tolerance


def _reuse_graphs(good_dir: Path):
    """A stand-in for ``export_graphs`` that copies the good export's graphs (the ONNX gate then passes)."""

    def fake(model, out, opset, external, pt2):
        for name in ("model.onnx", "model_kv.onnx"):
            shutil.copy2(good_dir / name, out / name)
        return {"logits": "model.onnx", "kv": "model_kv.onnx"}

    return fake


def test_a_corrupted_genai_model_fails_the_export_and_publishes_nothing(good, tmp_path, monkeypatch):
    build = genai_package.build_package

    def damaged(hf_dir, out, precision="fp32"):
        build(hf_dir, out, precision)
        weights = out / "model.onnx.data"
        data = bytearray(weights.read_bytes())
        data[:4096] = bytes(b ^ 0xFF for b in data[:4096])  # the first layer's norm and qkv weights
        weights.write_bytes(bytes(data))
        return out

    monkeypatch.setattr(genai_package, "build_package", damaged)
    monkeypatch.setattr(export, "export_graphs", _reuse_graphs(good.export_dir))
    store = LocalStore(tmp_path / "store")
    cfg = export_config(tmp_path / "store", pt2=False, gguf=False)
    with pytest.raises(ParityError, match=r"onnxruntime-genai model \(genai/, run with og\.Model\) differs") as caught:
        run_stage("export", cfg, good.inputs, store)
    assert "nothing was published" in str(caught.value) and "\n" not in str(caught.value)
    assert list((tmp_path / "store" / "export").iterdir()) == []


def test_without_onnxruntime_genai_the_export_names_the_way_out(good, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_genai(name, *args, **kwargs):
        if name.startswith("onnxruntime_genai"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_genai)
    cfg = export_config(tmp_path / "store", pt2=False, gguf=False, hf=False)
    with pytest.raises(ConfigError, match="export.genai=false"):
        run_stage("export", cfg, good.inputs, LocalStore(tmp_path / "store"))
    assert not (tmp_path / "store" / "export").exists() or list((tmp_path / "store" / "export").iterdir()) == []
    assert (good.export_dir / HF_DIR).is_dir()
