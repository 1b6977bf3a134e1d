"""The export's Hugging Face checkpoint: transformers loads it offline and it is the same model and tokenizer.

Logits are compared like the ONNX gate compares them (max |diff| scaled by max |logit| when above
1, within ``export.tolerance``); greedy ids and tokenizer ids must be identical. A corrupted
checkpoint (one weight changed) or a mismatched tokenizer (merges dropped) fails the gate and the
executor publishes nothing.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
from _export_fixtures import export_config, exported, reuse_graphs, tokenizer_documents
from safetensors import safe_open

from stages.core.errors import ParityError
from stages.executor import run_stage
from stages.formats.llama import hf_checkpoint, hf_gate
from stages.formats.onnx import exporter
from stages.lm.chat import ChatTemplate
from stages.lm.generate import generate_ids
from stages.lm.tokenizer import SPECIAL_TOKENS, Tokenizer
from stages.storage.stores import LocalStore
from stages.training.checkpoint_format import load_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.set_num_threads(1)
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(good):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = good.export_dir / "hf"
    return (
        AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval(),
        AutoTokenizer.from_pretrained(hf_dir, local_files_only=True),
    )


def test_checkpoint_files_and_config_say_what_the_model_is(good):
    hf_dir = good.export_dir / "hf"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "tokenizer.model",
    ):
        assert (hf_dir / name).is_file(), name
    config = json.loads((hf_dir / "config.json").read_text())
    model = load_model(good.model_dir)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) in fp32
    assert config["rope_theta"] == model.cfg.rope_theta and config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == model.cfg.block_size
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names  # tied
    assert good.metrics["hf"]["generation_matches"] == good.metrics["hf"]["generation_prompts"] >= 2


def test_transformers_logits_and_greedy_ids_match(good, loaded):
    hf_model, _ = loaded
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
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=3,
            )
            assert out[0, len(prompt) :].tolist() == ref


def test_tokenization_is_identical_on_held_out_text(good, loaded):
    _, hf_tokenizer = loaded
    tokenizer = Tokenizer.load(good.export_dir / "tokenizer")
    # The tokenizer was trained on chat tasks and stages/*.py; this module's text is not among them.
    texts = [
        inspect.getsource(textwrap),
        inspect.getsource(json.decoder),
        hf_gate.PROBE_TEXT,
        "  \t\n\n x",
        "ünïcødé ✓ 🚀 \u00a0nbsp",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b c"}]
    ids = hf_gate._ids(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    assert ids == ChatTemplate(tokenizer).render_prompt(messages)


def test_chat_markers_are_special_so_skip_special_tokens_gives_the_bare_answer(good, loaded):
    hf_model, hf_tokenizer = loaded
    tokenizer = Tokenizer.load(good.export_dir / "tokenizer")
    hf_dir = good.export_dir / "hf"
    added = {t["content"]: t["special"] for t in json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert added == {**dict.fromkeys(SPECIAL_TOKENS, True), "\n": False}  # no control piece is matched in text
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|end|>" and set(config["additional_special_tokens"]) == set(SPECIAL_TOKENS) - {
        "<|end|>"
    }
    assert hf_tokenizer.eos_token_id == tokenizer.special["<|end|>"]

    messages = [{"role": "user", "content": "Reverse: a b c"}]
    chat = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = hf_model.generate(**chat, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_id)
    answer = out[0, chat["input_ids"].shape[1] :].tolist()
    ids = chat["input_ids"][0].tolist() + answer + [tokenizer.special["<|end|>"], tokenizer.eos_id, tokenizer.pad_id]
    bare = hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(marker in bare for marker in SPECIAL_TOKENS)
    assert bare == tokenizer.decode(ids) and bare.startswith("Reverse: a b c")
    assert hf_tokenizer.decode(answer + [tokenizer.special["<|end|>"]], skip_special_tokens=True) == tokenizer.decode(
        answer
    )
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids, keep_special=True)  # markers kept, BOS/EOS/PAD dropped


def test_marker_strings_in_text_encode_as_in_sentencepiece(good, loaded):
    """A typed ``<|end|>`` is the marker (a SentencePiece user-defined symbol); a typed ``</s>`` is text."""
    _, hf_tokenizer = loaded
    tokenizer = Tokenizer.load(good.export_dir / "tokenizer")
    for text in ["x<|end|>y", "<|user|>", "<s></s><pad><unk>", "a</s>\n<|assistant|>b"]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text), text
    assert tokenizer.special["<|end|>"] in tokenizer.encode("x<|end|>y")
    assert not {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} & set(tokenizer.encode("<s></s><pad>"))


def test_a_unigram_tokenizer_also_keeps_control_strings_as_text(tmp_path):
    """The Unigram model holds the control pieces too: no segmentation may choose them."""
    from transformers import PreTrainedTokenizerFast

    from stages.core.config import TokenizerConfig
    from stages.lm.tokenizer_training import train_model

    tokenizer = Tokenizer(
        train_model(tokenizer_documents(), TokenizerConfig(vocab_size=400, threads=1, model_type="unigram"))
    )
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf_checkpoint.tokenizer_json(tokenizer)), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(hf_checkpoint.tokenizer_config(64)), encoding="utf-8")
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    for text in [hf_gate.PROBE_TEXT, "<s>", "x</s>y<pad><unk>"]:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert hf_tokenizer.decode(ids) == text


def _bump_one_weight(weights):
    def changed(model):
        tensors = weights(model)
        tensors["model.layers.0.mlp.down_proj.weight"][0, :] += 0.5
        return tensors

    return changed


def _drop_merges(definition):
    def changed(tokenizer):
        tokens = definition(tokenizer)
        tokens["model"]["merges"] = tokens["model"]["merges"][10:]
        return tokens

    return changed


def _markers_as_plain_tokens(definition):
    def changed(tokenizer):
        tokens = definition(tokenizer)
        for token in tokens["added_tokens"]:
            token["special"] = False
        return tokens

    return changed


@pytest.mark.parametrize(
    "target, breaker, expected",
    [
        ("llama_weights", _bump_one_weight, r"Hugging Face checkpoint .* logits 1x1: .* above export.tolerance"),
        ("tokenizer_json", _drop_merges, r"Hugging Face checkpoint .* tokenization differs on \d+/\d+ held-out texts"),
        (
            "tokenizer_json",
            _markers_as_plain_tokens,
            r"Hugging Face checkpoint .* decode with or without skip_special_tokens differs from gptpipe's on \d+/\d+",
        ),
    ],
)
def test_a_corrupted_checkpoint_fails_the_gate_and_publishes_nothing(
    good, tmp_path, monkeypatch, target, breaker, expected
):
    monkeypatch.setattr(exporter, "export_graphs", reuse_graphs(good.export_dir))
    monkeypatch.setattr(hf_checkpoint, target, breaker(getattr(hf_checkpoint, target)))
    store = LocalStore(tmp_path / "store")
    cfg = export_config(tmp_path / "store", pt2={"enabled": False})
    with pytest.raises(ParityError, match=expected) as caught:
        run_stage("export", cfg, good.inputs, store)
    assert "nothing was published" in str(caught.value) and "\n" not in str(caught.value)
    assert list((tmp_path / "store" / "export").iterdir()) == []
