"""A gptpipe GPT as a Hugging Face ``LlamaForCausalLM`` checkpoint directory.

The GPT is architecturally a Llama — RoPE on half-split head dimensions (Llama's
``rotate_half``), RMSNorm, SwiGLU, no biases, tied embeddings — so the translation is exact:
the fused ``qkv`` matrix splits row-wise into ``q_proj``/``k_proj``/``v_proj`` (heads are
contiguous rows in both), ``w_gate``/``w_up``/``w_down`` are ``gate_proj``/``up_proj``/
``down_proj``, and ``rms_norm_eps`` is what ``nn.RMSNorm(eps=None)`` really uses:
``torch.finfo(float32).eps``.

The tokenizer becomes a ``tokenizers`` JSON that reproduces SentencePiece exactly: no
normalization but spaces to ``▁`` (identity rules, no dummy prefix, no whitespace squeezing), no
pre-tokenizer split (SentencePiece's BPE merges over the whole string too), merges ranked by
piece score, byte fallback, the chat markers and ``"\\n"`` as atomic added tokens (SentencePiece's
user-defined symbols). The chat template in ``tokenizer_config.json`` renders exactly what
``stages.lm.chat.ChatTemplate`` does.

Special tokens follow what SentencePiece does with each piece type, within what ``tokenizers``
can say. There, one flag (``special``) decides both that ``decode(skip_special_tokens=True)``
drops a token and that ``split_special_tokens=True`` stops matching it in text, so:

- the chat markers are special added tokens, matched in text (``split_special_tokens`` False, the
  transformers default): a literal ``<|end|>`` in a message is the marker id, as in SentencePiece,
  and ``skip_special_tokens=True`` gives the bare answer, as ``Tokenizer.decode`` does;
- the control pieces ``<s>``, ``</s>``, ``<pad>`` and ``<unk>`` are not added tokens at all, since
  SentencePiece never matches them in text (``"<s>"`` typed in a message is plain text): BPE has no
  merge that builds them and the Unigram lattice gets them at a score no path takes. For the same
  reason ``tokenizer_config.json`` names none of them (transformers would add a named special token
  to the matched vocabulary): ``eos_token`` is ``<|end|>`` (where a reply ends and generation stops),
  and there is no ``bos_token`` (gptpipe adds none to a prompt), ``unk_token`` (byte fallback) or
  ``pad_token`` (choose one for batches; ``eos`` is a common choice for inference, but a
  collator that masks pad labels would then never train the stop). The decoder drops BOS/EOS/PAD as
  SentencePiece does, so a generation that ends at ``</s>`` or is padded decodes to bare text too.

Writing needs only torch, safetensors and the tokenizer; ``stages.formats.llama.hf_gate`` loads the directory
with transformers and checks it is the same model and tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from stages.core.errors import ConfigError
from stages.lm.chat import END_TOKEN, ROLE_TOKENS
from stages.lm.model import GPT
from stages.lm.tokenizer import MODEL_FILE, SPECIAL_TOKENS, Tokenizer

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_JSON = "tokenizer.json"  # the tokenizers JSON transformers (and onnxruntime-genai) load
# The ChatTemplate, as Jinja: <|role|>content<|end|> per message, then <|assistant|> to generate.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}" + END_TOKEN + "{% endfor %}"
    "{% if add_generation_prompt %}" + ROLE_TOKENS["assistant"] + "{% endif %}"
)
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# A Unigram score no segmentation takes: SentencePiece leaves control pieces out of its lattice.
NEVER_MATCHED = -1e9


def rms_norm_eps(model: GPT) -> float:
    """The epsilon the model's RMSNorm really adds: its own, or the dtype's machine epsilon when None."""
    eps = model.norm_out.eps
    return float(eps) if eps is not None else float(torch.finfo(model.wte.weight.dtype).eps)


def llama_config(model: GPT, tokenizer: Tokenizer) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": rms_norm_eps(model),
        # Both spellings: transformers 4.x reads rope_theta, 5.x rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def llama_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Llama parameter names -> tensors (contiguous fp32 copies; the tied head is stored once)."""
    width = model.cfg.n_embd
    weights = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.norm_out.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(width, dim=0)
        weights.update(
            {
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.o_proj.weight": block.attn.proj.weight,
                prefix + "mlp.gate_proj.weight": block.mlp.w_gate.weight,
                prefix + "mlp.up_proj.weight": block.mlp.w_up.weight,
                prefix + "mlp.down_proj.weight": block.mlp.w_down.weight,
                prefix + "input_layernorm.weight": block.norm_attn.weight,
                prefix + "post_attention_layernorm.weight": block.norm_mlp.weight,
            }
        )
    return {name: tensor.detach().to(torch.float32).contiguous().clone() for name, tensor in weights.items()}


def _proto(tokenizer: Tokenizer) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    return proto


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """A ``tokenizers`` definition giving SentencePiece's ids for any text (see the module docstring)."""
    proto = _proto(tokenizer)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = pieces[tokenizer.unk_id][0]
    added = [
        {
            "id": i,
            "content": piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": piece in SPECIAL_TOKENS,
        }
        for i, (piece, _, kind) in enumerate(pieces)
        if kind == USER_DEFINED
    ]
    hidden = [pieces[i][0] for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)]
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        mergeable = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
        merges = []
        for piece, merged_id in mergeable.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in mergeable and right in mergeable:
                    merges.append((pieces[merged_id][1], merged_id, mergeable[left], left, right))
        # SentencePiece merges the adjacent pair whose result scores highest (leftmost on ties).
        merges.sort(key=lambda m: (-m[0], m[1], m[2]))
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": byte_fallback,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for *_, left, right in merges],
        }
    else:  # unigram
        model = {
            "type": "Unigram",
            "unk_id": tokenizer.unk_id,
            "byte_fallback": byte_fallback,
            "vocab": [
                [piece, NEVER_MATCHED if kind in (CONTROL, UNKNOWN) else float(score)] for piece, score, kind in pieces
            ],
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                # A whole BOS/EOS/PAD token decodes to nothing, as in SentencePiece (per token: \A...\z).
                {
                    "type": "Replace",
                    "pattern": {"Regex": rf"\A(?:{'|'.join(map(re.escape, hidden))})\z"},
                    "content": "",
                },
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": model,
    }


def check_tokenizer_spec(tokenizer: Tokenizer) -> None:
    """The translation assumes gptpipe's tokenizer settings; anything else would not round-trip."""
    spec = _proto(tokenizer).normalizer_spec
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces or not spec.escape_whitespaces:
        raise ConfigError(
            f"tokenizer normalization {spec.name!r} (dummy prefix {spec.add_dummy_prefix}, squeeze "
            f"{spec.remove_extra_whitespaces}) has no exact Hugging Face form; retrain stage 'tokenizer' or set export.hf.enabled=false"
        )


def tokenizer_config(max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: the fast tokenizer, its special tokens and the chat template."""
    # No bos/unk/pad token and eos = <|end|>: a control piece named here would be matched in text
    # (module docstring). additional_special_tokens, not v5's extra_special_tokens: transformers 4
    # reads that key as a dict of named tokens.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END_TOKEN,
        "additional_special_tokens": [token for token in SPECIAL_TOKENS if token != END_TOKEN],
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_checkpoint(model: GPT, tokenizer: Tokenizer, out: Path) -> Path:
    """Write the checkpoint directory ``out``: config, weights, tokenizer files, generation config."""
    check_tokenizer_spec(tokenizer)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(llama_config(model, tokenizer), indent=2) + "\n", encoding="utf-8")
    save_file(llama_weights(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / TOKENIZER_JSON).write_text(
        json.dumps(tokenizer_json(tokenizer), ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / MODEL_FILE).write_bytes(tokenizer.model_proto)  # what llama.cpp's GGUF converter reads
    config = tokenizer_config(model.cfg.block_size)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    stops = [tokenizer.special[END_TOKEN], tokenizer.eos_id]
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out
