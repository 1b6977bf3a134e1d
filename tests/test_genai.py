"""The export's onnxruntime-genai folders and what serves: genai/ (built by onnxruntime-genai's builder
from hf/) runs in og.Model as the same model (logits after each prompt, greedy ids token for token)
and og.Tokenizer tokenizes as gptpipe does; a damaged folder fails the gate and publishes nothing,
and a missing onnxruntime_genai is a ConfigError naming export.genai.enabled=false. Its int4 twin is gated
by quality (kept when it passes, recorded and dropped when it fails); the served runtime is the
fastest certified one, and the certificate has one row per format.
"""

from __future__ import annotations

import builtins
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from _export_fixtures import export_config, exported, reuse_graphs

from stages.core.errors import ArtifactError, ConfigError, ParityError
from stages.core.sections import ExportConfig
from stages.executor import run_stage
from stages.formats.genai import package as genai_package
from stages.formats.genai.runtime import GenaiGenerator
from stages.formats.layout import CERTIFICATE_FILE, GENAI_DIR, GENAI_QUANTIZED_DIR, HF_DIR, KV_GRAPH
from stages.formats.onnx import exporter
from stages.formats.onnx.runtime import OnnxGenerator
from stages.formats.served import open_served, served_runtime
from stages.formats.serving_choice import choose_served
from stages.lm.generate import generate
from stages.lm.tokenizer import Tokenizer
from stages.storage.stores import LocalStore
from stages.training.checkpoint_format import load_model


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
    monkeypatch.setattr(exporter, "export_graphs", reuse_graphs(good.export_dir))
    store = LocalStore(tmp_path / "store")
    cfg = export_config(tmp_path / "store", pt2={"enabled": False}, gguf={"enabled": False})
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
    cfg = export_config(tmp_path / "store", pt2={"enabled": False}, gguf={"enabled": False}, hf={"enabled": False})
    with pytest.raises(ConfigError, match="export.genai.enabled=false"):
        run_stage("export", cfg, good.inputs, LocalStore(tmp_path / "store"))
    assert not (tmp_path / "store" / "export").exists() or list((tmp_path / "store" / "export").iterdir()) == []
    assert (good.export_dir / HF_DIR).is_dir()


def test_the_quantized_twin_passed_its_quality_gate_and_is_kept(good):
    quantized = good.metrics["quantized"]
    assert quantized["precision"] == "int4" and quantized["items"] == 20
    assert quantized["passed"], quantized.get("reason")
    assert quantized["exact_match_drop"] <= good.cfg.export.quantized.exact_match_drop
    assert quantized["bpb_rise"] <= good.cfg.export.quantized.bpb_rise
    assert quantized["tokenizer_matches"] == quantized["tokenizer_texts"] > 10
    assert (good.export_dir / GENAI_QUANTIZED_DIR / genai_package.CONFIG_FILE).is_file()
    # smaller than fp32: MatMulNBits holds 4-bit weights
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert size(good.export_dir / GENAI_QUANTIZED_DIR) < size(good.export_dir / GENAI_DIR)


def test_a_quantized_twin_that_fails_its_quality_gate_is_recorded_and_not_kept(good, tmp_path, monkeypatch):
    build = genai_package.build_package

    def damaged_when_quantized(hf_dir, out, precision="fp32"):
        build(hf_dir, out, precision)
        if precision != "fp32":
            weights = out / "model.onnx.data"
            data = bytearray(weights.read_bytes())
            data[: len(data) // 2] = bytes(b ^ 0x5A for b in data[: len(data) // 2])
            weights.write_bytes(bytes(data))
        return out

    monkeypatch.setattr(genai_package, "build_package", damaged_when_quantized)
    monkeypatch.setattr(exporter, "export_graphs", reuse_graphs(good.export_dir))
    cfg = export_config(
        tmp_path / "store",
        pt2={"enabled": False},
        gguf={"enabled": False},
        quantized={"enabled": True, "precision": "int4", "bpb_rise": 0.0},
    )
    result = run_stage("export", cfg, good.inputs, LocalStore(tmp_path / "store"))
    quantized = result.manifest.metrics["quantized"]
    assert not quantized["passed"] and "bits per byte rose" in quantized["reason"]
    out = Path(result.ref.uri)
    assert not (out / GENAI_QUANTIZED_DIR).exists()
    assert result.manifest.metrics["serve"] != GENAI_QUANTIZED_DIR
    assert GENAI_QUANTIZED_DIR not in result.manifest.metrics["decode_ms"]
    certificate = (out / CERTIFICATE_FILE).read_text()
    assert "rejected: bits per byte rose" in certificate


def test_the_served_runtime_is_the_fastest_certified_one_and_answers_like_pytorch(good):
    metrics = good.metrics
    timed = {name: ms for name, ms in metrics["decode_ms"].items() if name != "pytorch"}
    assert set(timed) == {KV_GRAPH, GENAI_DIR, GENAI_QUANTIZED_DIR}
    assert metrics["serve"] == min(timed, key=timed.get) == served_runtime(good.export_dir)
    prompt = [{"role": "user", "content": "Reverse: a b c"}]
    model = load_model(good.model_dir, "cpu").eval()
    tokenizer = Tokenizer.load(good.inputs["tokenizer"].uri)
    expected = generate(model, tokenizer, prompt, max_new_tokens=12)
    # the quantized twin answers by quality, not bits: compare the bit-exact runtimes only
    for runtime in (OnnxGenerator(good.export_dir, threads=1), GenaiGenerator(good.export_dir, GENAI_DIR, 1)):
        assert runtime.generate(prompt, max_new_tokens=12) == expected, type(runtime).__name__
    assert isinstance(open_served(good.export_dir), (OnnxGenerator, GenaiGenerator))


def test_sampling_with_a_seed_gives_the_same_tokens_in_both_onnx_runtimes(good):
    ids = Tokenizer.load(good.inputs["tokenizer"].uri).encode("def main():")
    onnx = OnnxGenerator(good.export_dir, threads=1).generate_ids(ids, 12, temperature=1.0, top_k=50, seed=3)
    genai = GenaiGenerator(good.export_dir, GENAI_DIR, 1).generate_ids(ids, 12, temperature=1.0, top_k=50, seed=3)
    assert onnx == genai and len(onnx) == 12


def test_export_serve_picks_the_fastest_or_the_pinned_runtime_and_names_a_missing_one():
    timings = {"pytorch": 0.1, KV_GRAPH: 0.5, GENAI_DIR: 0.4}
    assert choose_served(ExportConfig(), timings) == GENAI_DIR
    assert choose_served(ExportConfig(serving={"runtime": "onnx"}), timings) == KV_GRAPH
    with pytest.raises(ConfigError, match="export.serving.runtime = 'quantized': genai-quantized was not certified"):
        choose_served(ExportConfig(serving={"runtime": "quantized"}), timings)


def test_the_certificate_has_a_row_per_format_and_marks_the_served_one(good):
    rows = good.metrics["certificate"]
    names = [row["format"].split(" ")[0] for row in rows]
    assert names == [
        "PyTorch",
        "model.onnx",
        "model_kv.onnx",
        "architecture.onnx",
        "hf/",
        "model.gguf",
        "genai/",
        "genai-quantized/",
    ]
    assert [row["format"].split(" ")[0].rstrip("/") for row in rows if row["served"]] == [good.metrics["serve"]]
    for row in rows[1:-1]:
        assert row["max_abs_diff"] <= good.cfg.export.tolerance
    assert "passed" in rows[-1]["quality"]
    table = (good.export_dir / CERTIFICATE_FILE).read_text()
    # which runtime wins the timing race depends on the CPU (int4 on AVX-512, fp32 genai on some AVX2
    # machines): assert that exactly one row is marked and that the genai row is there, not which one won
    assert table.count("(served)") == 1 and "genai/ (onnxruntime-genai)" in table


def test_a_pinned_runtime_the_recipe_does_not_build_is_refused_before_the_export_runs():
    from stages.core.config import parse_config

    with pytest.raises(ConfigError, match=r"export.serving.runtime = 'quantized' needs export.quantized.enabled=true"):
        parse_config({"export": {"serving": {"runtime": "quantized"}, "quantized": {"enabled": False}}})
    with pytest.raises(ConfigError, match=r"export.serving.runtime = 'genai' needs export.genai.enabled=true"):
        parse_config({"export": {"serving": {"runtime": "genai"}, "genai": {"enabled": False}}})


def test_a_builder_failure_is_one_artifact_error_and_leaves_the_process_as_it_was(tmp_path):
    not_a_checkpoint = tmp_path / "hf"
    not_a_checkpoint.mkdir()
    argv, handlers = list(sys.argv), list(logging.getLogger().handlers)
    with pytest.raises(ArtifactError, match=r"builder failed on hf/ \(exit \d+\): \S"):
        genai_package.build_package(not_a_checkpoint, tmp_path / "genai")
    assert sys.argv == argv and logging.getLogger().handlers == handlers
