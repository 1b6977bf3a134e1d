"""A gptpipe GPT as one GGUF file (f32, llama architecture) for llama.cpp, ollama and transformers.

Written with the ``gguf`` package (llama.cpp's own ``gguf-py``, on PyPI), straight from the live
model and the SentencePiece proto rather than by running llama.cpp's ``convert_hf_to_gguf.py`` on
``hf/``: that script is not on the package index (it lives in a llama.cpp checkout), converts
through a second copy of the weights, and types tokens from the HF tokenizer files, which is how
the chat markers came out as normal tokens split into pieces. Here every metadata key is one line
that says why, and ``stages.formats.llama.gguf_gate`` checks the file with an independent reader.

Weights: ``stages.formats.llama.hf_checkpoint.llama_weights`` gives the Llama parameter names, which
``gguf``'s own name map turns into GGUF names (``blk.N.attn_q.weight`` ...). Two GGUF conventions
differ from Hugging Face's: the tied head is stored once (no ``output.weight``: readers tie it),
and the rows of ``attn_q``/``attn_k`` are permuted so that each head's RoPE pairs are adjacent
(llama.cpp rotates pairs ``(2i, 2i+1)``; gptpipe and HF rotate ``(i, i + head_dim/2)``).
transformers' GGUF loader undoes exactly that permutation when it reads a llama GGUF.

Tokenizer (``tokenizer.ggml.model = "llama"``: llama.cpp's SentencePiece tokenizer): the proto's
pieces, scores and piece types as they are (SentencePiece and GGUF number the types alike:
normal, unknown, control, user-defined, unused, byte), so ``"\\n"`` and the chat markers are
user-defined tokens — always one id, never split, matched wherever they occur like SentencePiece
does — and ``<s>``/``</s>``/``<pad>`` control tokens. No space prefix (the tokenizer has no dummy
prefix), no BOS or EOS added (gptpipe adds neither), ``<|end|>`` as the end-of-turn id, the chat
template of ``hf/``, and for BPE the merges ranked as SentencePiece applies them (llama.cpp ranks
by score and ignores them; transformers' GGUF tokenizer needs them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import ArtifactError, ConfigError
from stages.formats.llama.hf_checkpoint import CHAT_TEMPLATE, llama_weights, rms_norm_eps, tokenizer_json
from stages.lm.chat import END_TOKEN
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer

GGUF_ARCH = "llama"
_BPE = 2  # sentencepiece_model.proto: TrainerSpec.ModelType


def rope_pairs_adjacent(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a query/key projection from half-split RoPE pairs ``(i, i + d/2)`` per
    head to adjacent pairs ``(2i, 2i + 1)``: the layout llama.cpp rotates and GGUF files hold."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """GGUF tensor name -> f32 array, in the order llama.cpp writes them."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.cfg.n_layer)
    tensors = {}
    for hf_name, tensor in llama_weights(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))  # keeps the suffix
        if name is None:
            raise ConfigError(f"GGUF export: no llama GGUF name for {hf_name}; set export.gguf.enabled=false")
        array = tensor.numpy()
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            array = rope_pairs_adjacent(array, model.cfg.n_head)
        tensors[name] = np.ascontiguousarray(array, dtype=np.float32)
    return tensors


def _proto(tokenizer: Tokenizer) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    return proto


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """GGUF's llama tokenizer keys express gptpipe's settings only: identity normalization, no dummy
    prefix, no whitespace squeezing, BPE (llama.cpp's SentencePiece tokenizer merges by score: a
    unigram model's Viterbi segmentation has no GGUF form that both llama.cpp and transformers read)."""
    proto = _proto(tokenizer)
    spec = proto.normalizer_spec
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces or not spec.escape_whitespaces:
        raise ConfigError(
            f"tokenizer normalization {spec.name!r} (dummy prefix {spec.add_dummy_prefix}, squeeze "
            f"{spec.remove_extra_whitespaces}) has no exact GGUF form; retrain stage 'tokenizer' or set export.gguf.enabled=false"
        )
    if proto.trainer_spec.model_type != _BPE:
        raise ConfigError(
            "a unigram tokenizer has no exact GGUF form (llama.cpp's SentencePiece tokenizer merges like BPE); "
            "set tokenizer.model_type=bpe or export.gguf.enabled=false"
        )


def write_gguf(model: GPT, tokenizer: Tokenizer, path: Path) -> Path:
    """Write ``path``: llama architecture metadata, the tokenizer (see the module docstring), f32 weights."""
    import gguf

    check_tokenizer(tokenizer)
    proto = _proto(tokenizer)
    cfg = model.cfg
    if cfg.vocab_size != len(proto.pieces):  # llama.cpp reads the vocabulary size from the token list
        raise ArtifactError(
            f"GGUF export: the model has {cfg.vocab_size} embedding rows but the tokenizer {len(proto.pieces)} "
            "pieces; export the model with the tokenizer it was trained with"
        )
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH)
    writer.add_name("gptpipe")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(rms_norm_eps(model))  # nn.RMSNorm(eps=None): float32's machine epsilon
    writer.add_vocab_size(cfg.vocab_size)

    writer.add_tokenizer_model("llama")
    writer.add_token_list([piece.piece for piece in proto.pieces])
    writer.add_token_scores([piece.score for piece in proto.pieces])
    writer.add_token_types([int(piece.type) for piece in proto.pieces])  # same numbering as gguf.TokenType
    writer.add_token_merges([" ".join(pair) for pair in tokenizer_json(tokenizer)["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.special[END_TOKEN])  # llama.cpp stops a chat turn here
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_remove_extra_whitespaces(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, array in gguf_tensors(model).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
