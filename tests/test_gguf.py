"""The export's GGUF file: transformers' GGUF loader reads it as the same model and tokenizer.

Logits are compared like the other gates compare them (max |diff| scaled by max |logit| when above
1, within ``export.tolerance``); greedy ids and tokenizer ids must be identical. The metadata says
what llama.cpp needs to tokenize like gptpipe (chat markers user-defined, no space prefix, no BOS).
A GGUF with flipped bytes in its tensor data, or cut short, fails the gate and publishes nothing.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from _export_fixtures import export_config, exported, reuse_graphs, tokenizer_documents

from stages.core.config import TokenizerConfig
from stages.core.errors import ArtifactError, ConfigError, ParityError
from stages.executor import run_stage
from stages.formats.layout import GGUF_FILE
from stages.formats.llama import gguf_gate, hf_gate
from stages.formats.llama import gguf_writer as gguf_export
from stages.formats.onnx import exporter
from stages.lm.chat import ChatTemplate
from stages.lm.generate import generate_ids
from stages.lm.tokenizer import SPECIAL_TOKENS, Tokenizer
from stages.lm.tokenizer_training import train_model
from stages.storage.stores import LocalStore
from stages.training.checkpoint_format import load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.set_num_threads(1)
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def read(good):
    hf_model, hf_tokenizer, _ = gguf_gate.read_gguf(good.export_dir / GGUF_FILE)
    return hf_model, hf_tokenizer


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_metadata_says_how_to_tokenize_like_gptpipe(good):
    reader = gguf.GGUFReader(good.export_dir / GGUF_FILE)
    tokenizer = Tokenizer.load(good.export_dir / "tokenizer")
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_q.weight" in names and "output.weight" not in names  # tied head stored once
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == tokenizer.vocab_size == _field(reader, "llama.vocab_size")
    kind = {token: gguf.TokenType(t) for token, t in zip(tokens, types)}
    assert all(kind[marker] == gguf.TokenType.USER_DEFINED for marker in (*SPECIAL_TOKENS, "\n"))
    assert kind["<s>"] == kind["</s>"] == kind["<pad>"] == gguf.TokenType.CONTROL
    assert kind["<unk>"] == gguf.TokenType.UNKNOWN and kind["<0x0A>"] == gguf.TokenType.BYTE
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.special["<|end|>"]
    figures = good.metrics["gguf"]
    assert figures["generation_matches"] == figures["generation_prompts"] >= 2
    assert figures["tokenizer_matches"] == figures["tokenizer_texts"] and figures["chat_template_matches"] >= 2
    assert figures["max_abs_diff"] <= good.cfg.export.tolerance
    assert good.metrics["file_bytes"][GGUF_FILE] == (good.export_dir / GGUF_FILE).stat().st_size


def test_query_and_key_rows_are_in_the_layout_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    n_head, head_dim, width = 4, 8, 32
    weight = np.arange(n_head * head_dim * width, dtype=np.float32).reshape(n_head * head_dim, width)
    stored = gguf_export.rope_pairs_adjacent(weight, n_head)
    assert not np.array_equal(stored, weight)
    assert np.array_equal(stored[1], weight[head_dim // 2])  # head 0: pair (0, d/2) becomes rows 0, 1
    undone = LlamaTensorProcessor()._reverse_permute_weights(stored, n_head, n_head)
    assert np.array_equal(undone, weight)


def test_transformers_logits_and_greedy_ids_match(good, read):
    hf_model, _ = read
    model = load_model(good.model_dir).eval()
    tolerance = good.cfg.export.tolerance
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for batch, length in [(1, 1), (3, 17), (2, model.cfg.block_size)]:
            ids = torch.randint(0, model.cfg.vocab_size, (batch, length), generator=generator)
            ref = model(ids)
            scale = max(1.0, float(ref.abs().max()))
            assert float((hf_model(ids).logits - ref).abs().max()) / scale <= tolerance
        stops = ChatTemplate(Tokenizer.load(good.export_dir / "tokenizer")).stop_ids
        for prompt in ([5, 40, 41, 42, 7, 6], [int(t) for t in torch.randint(9, 300, (30,), generator=generator)]):
            ref = generate_ids(model, prompt, 20, stop_ids=stops)
            assert hf_gate._greedy(hf_model, 20, list(stops), 3, prompt) == ref


def test_tokenization_is_identical_on_held_out_text(good, read):
    _, hf_tokenizer = read
    tokenizer = Tokenizer.load(good.export_dir / "tokenizer")
    # The tokenizer was trained on chat tasks and stages/*.py; this module's text is not among them.
    texts = [
        inspect.getsource(textwrap),
        inspect.getsource(json.decoder),
        hf_gate.PROBE_TEXT,
        "  \t\n\n x",
        "ünïcødé ✓ 🚀 \u00a0nbsp",
        "<|user|>Last digit of 4827<|end|><|assistant|>",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b c"}]
    ids = hf_gate._ids(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    assert ids == ChatTemplate(tokenizer).render_prompt(messages)


def test_a_unigram_tokenizer_is_refused_before_anything_is_written():
    cfg = TokenizerConfig(vocab_size=400, model_type="unigram", threads=1)
    tokenizer = Tokenizer(train_model(tokenizer_documents(), cfg))
    with pytest.raises(ConfigError, match="export.gguf.enabled=false"):
        gguf_export.check_tokenizer(tokenizer)


# ---------------------------------------------------------------------------- a corrupted GGUF


def _flip_tensor_bytes(path: Path) -> None:
    """XOR 64 bytes of the first layer's down projection with 0xFF (its values become others, or NaN)."""
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    with path.open("r+b") as handle:
        handle.seek(tensor.data_offset)
        block = handle.read(64)
        handle.seek(tensor.data_offset)
        handle.write(bytes(b ^ 0xFF for b in block))


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, error, expected",
    [
        (_flip_tensor_bytes, ParityError, r"model\.gguf \(read with transformers' GGUF loader\) differs .* logits"),
        (_cut_short, ArtifactError, r"transformers cannot read model\.gguf"),
    ],
)
def test_a_corrupted_gguf_fails_the_gate_and_publishes_nothing(good, tmp_path, monkeypatch, damage, error, expected):
    write = gguf_export.write_gguf

    def damaged(model, tokenizer, path):
        damage(write(model, tokenizer, path))
        return path

    monkeypatch.setattr(gguf_export, "write_gguf", damaged)
    _fails_and_publishes_nothing(good, tmp_path, monkeypatch, error, expected)


def _markers_as_normal_tokens(add_token_types):
    """What llama.cpp's converter wrote from hf/ (issue 21): user-defined pieces typed normal."""
    return lambda writer, types: add_token_types(writer, [1 if t == 4 else t for t in types])


def _space_prefix(add_add_space_prefix):
    return lambda writer, value: add_add_space_prefix(writer, True)


@pytest.mark.parametrize(
    "method, breaker, expected",
    [
        ("add_token_types", _markers_as_normal_tokens, r"tokenization differs on \d+/\d+ held-out texts"),
        ("add_add_space_prefix", _space_prefix, r"tokenizer.ggml.add_space_prefix is not false"),
    ],
)
def test_tokenizer_metadata_that_splits_markers_or_adds_a_space_fails_the_gate(
    good, tmp_path, monkeypatch, method, breaker, expected
):
    monkeypatch.setattr(gguf.GGUFWriter, method, breaker(getattr(gguf.GGUFWriter, method)))
    _fails_and_publishes_nothing(good, tmp_path, monkeypatch, ParityError, expected)


def _fails_and_publishes_nothing(good, tmp_path, monkeypatch, error, expected) -> None:
    monkeypatch.setattr(exporter, "export_graphs", reuse_graphs(good.export_dir))
    store = LocalStore(tmp_path / "store")
    cfg = export_config(tmp_path / "store", pt2={"enabled": False}, hf={"enabled": False})
    with pytest.raises(error, match=expected) as caught:
        run_stage("export", cfg, good.inputs, store)
    assert "nothing was published" in str(caught.value) and "\n" not in str(caught.value)
    assert list((tmp_path / "store" / "export").iterdir()) == []
