"""The architecture view (architecture.onnx): Block x n_layer as ONNX functions, gated like model.onnx;
its SVG picture; and the self-contained viewer page built from it."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _export_fixtures import exported
from onnx import numpy_helper

from stages.core.errors import ParityError
from stages.formats import layout
from stages.formats.job import gate_inputs
from stages.formats.onnx import architecture as onnx_architecture
from stages.formats.onnx import gate as onnx_gate
from stages.formats.onnx.runtime import open_session
from stages.lm.generate import generate_ids
from stages.lm.tokenizer import Tokenizer
from stages.publish import netron_package
from stages.training.checkpoint_format import load_model
from stages.viewer import netron_page

N_LAYER = 4


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    torch.set_num_threads(1)
    return exported(tmp_path_factory, n_layer=N_LAYER)


def test_top_level_reads_as_the_architecture_with_one_block_per_layer(deep):
    meta = json.loads((deep.export_dir / "export.json").read_text())
    assert meta["graphs"]["architecture"] == "architecture.onnx"
    proto = onnx.load(str(deep.export_dir / "architecture.onnx"))
    assert onnx_architecture.block_count(proto) == meta["n_layer"] == N_LAYER
    assert [n.op_type for n in proto.graph.node] == [
        "Embedding",
        "RotaryTables",
        *["Block"] * N_LAYER,
        "RMSNorm",
        "Linear",
    ]
    assert [n.name for n in proto.graph.node if n.op_type == "Block"] == [f"blocks.{i}" for i in range(N_LAYER)]
    functions = {f.name: f for f in proto.functions}
    assert [n.name for n in functions["Block"].node] == [
        "norm_attn",
        "attn",
        "residual_attn",
        "norm_mlp",
        "mlp",
        "residual_mlp",
    ]
    attention = [n.name for n in functions["Attention"].node if n.op_type != "Constant"]
    assert {"qkv", "rope_q", "rope_k", "sdpa", "proj"} <= set(attention)
    assert [n.name for n in functions["SwiGLU"].node] == [
        "w_gate",
        "sigmoid",
        "silu",
        "w_up",
        "gate_times_up",
        "w_down",
    ]
    # Parameter names follow the module tree, as in the checkpoint.
    assert "blocks.3.attn.qkv.weight" in {i.name for i in proto.graph.initializer}


def test_architecture_graph_passed_the_gate_and_matches_pytorch_here(deep):
    gate = deep.metrics["architecture"]
    assert gate["blocks"] == N_LAYER
    assert gate["generation_matches"] == gate["generation_prompts"] >= 1
    assert gate["max_abs_diff"] <= deep.cfg.export.tolerance
    # Independently of the gate's own numbers: ORT logits vs the saved checkpoint in PyTorch.
    model = load_model(deep.model_dir, "cpu").float().eval()
    session = open_session(deep.export_dir / "architecture.onnx", threads=1)
    ids = np.random.default_rng(7).integers(0, deep.vocab_size, size=(3, 29), dtype=np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    got = session.run(None, {"input_ids": ids})[0]
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    prompt = [int(t) for t in ids[0, :20]]
    assert onnx_architecture.greedy_ids(session, prompt, 10, model.cfg.block_size) == generate_ids(model, prompt, 10)


def _copy_export(deep, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(deep.export_dir, out)
    return out


def test_gate_fails_when_a_block_is_missing(deep, tmp_path):
    out = _copy_export(deep, tmp_path)
    proto = onnx.load(str(out / "architecture.onnx"))
    last = next(n for n in proto.graph.node if n.name == f"blocks.{N_LAYER - 1}")
    for node in proto.graph.node:  # the final norm now reads the block before the last one
        node.input[:] = [last.input[0] if name == last.output[0] else name for name in node.input]
    proto.graph.node.remove(last)
    onnx.save(proto, str(out / "architecture.onnx"))
    model = load_model(deep.model_dir, "cpu").float().eval()
    tokenizer = Tokenizer.load(out / "tokenizer")
    with pytest.raises(ParityError, match=f"{N_LAYER - 1} Block nodes for n_layer={N_LAYER}"):
        onnx_gate.architecture_parity(model, tokenizer, out, gate_inputs(model, tokenizer, deep.cfg.export, out))


def test_gate_fails_when_a_block_weight_differs(deep, tmp_path):
    out = _copy_export(deep, tmp_path)
    proto = onnx.load(str(out / "architecture.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == "blocks.1.mlp.w_down.weight")
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(proto, str(out / "architecture.onnx"))
    model = load_model(deep.model_dir, "cpu").float().eval()
    tokenizer = Tokenizer.load(out / "tokenizer")
    with pytest.raises(ParityError, match="architecture.onnx logits differ"):
        onnx_gate.architecture_parity(model, tokenizer, out, gate_inputs(model, tokenizer, deep.cfg.export, out))


def test_report_picture_shows_one_block_per_layer(deep):
    svg = (deep.export_dir / layout.SVG_FILE).read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    top = re.findall(r'<g class="node" data-op="Block" data-name="(blocks\.\d+)">', svg)
    assert top == [f"blocks.{i}" for i in range(N_LAYER)]
    assert f"{N_LAYER} Block nodes" in svg
    for part in ("Attention", "SwiGLU", "norm_attn", "Embedding", "lm_head"):
        assert part in svg


def test_self_contained_page_inlines_structure_without_weights(deep, tmp_path):
    root, _ = netron_package()
    page = netron_page.write_page(deep.export_dir / "architecture.onnx", tmp_path / "a.html", root, "t").read_text()
    graph = re.search(r'<script type="application/octet-stream" id="gptpipe-graph">([^<]+)</script>', page).group(1)
    proto = onnx.ModelProto.FromString(base64.b64decode(graph))
    full = onnx.load(str(deep.export_dir / "architecture.onnx"))
    assert [(i.name, list(i.dims)) for i in proto.graph.initializer] == [
        (i.name, list(i.dims)) for i in full.graph.initializer
    ]
    assert all(not i.raw_data and not i.float_data for i in proto.graph.initializer)
    assert onnx_architecture.block_count(proto) == N_LAYER
    # Nothing the page loads resolves against its own URL: no relative src/href, imports from data: URLs.
    assert not re.search(r'(src|href)="(?!https://|javascript:|#)', page)
    assert "default-src 'none'" in page and "'./" not in page.split('<script type="importmap">')[0]


def test_report_card_embeds_the_picture(deep):
    from flows.prefect_artifacts import full_markdown

    report = {
        "recipe": "micro",
        "store": "runs/store",
        "stages": {},
        "architecture_svg": str(deep.export_dir / layout.SVG_FILE),
    }
    found = re.search(r"!\[[^\]]*\]\(data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)\)", full_markdown(report))
    assert found and base64.b64decode(found.group(1)).decode().count('data-op="Block"') == N_LAYER
    assert "data:image" not in full_markdown({**report, "architecture_svg": None})
