"""The export's gate for its GGUF file: an independent reader — transformers' GGUF loader — reads
``model.gguf`` and it is the same model and tokenizer as gptpipe's.

``check_gguf`` runs ``stages.formats.parity``'s logits and greedy-generation comparisons, as the ONNX
and Hugging Face gates do, and compares the tokenizer transformers builds from the file's metadata
(its tokens, scores, types and merges) with ``stages.lm.tokenizer`` on the held-out texts and
``hf_gate.PROBE_TEXT``, and its chat template with ``stages.lm.chat.ChatTemplate``.

What transformers' reader cannot express, and how the gate checks it instead:

* ``tokenizer.ggml.add_space_prefix``: transformers (5.x) builds every llama-type GGUF tokenizer
  with a ``Metaspace`` pre-tokenizer that prepends ``▁`` to the text, whatever the flag says
  and strips a leading space when decoding, whatever the flag says (llama.cpp honours it). The
  gate reads the flag with transformers' own GGUF metadata reader, fails unless it is false, and
  gives the tokenizer the pre-tokenizer and decoder ``LlamaTokenizer`` builds for
  ``add_prefix_space=False`` before comparing ids and text.
* Control tokens (``<s>``, ``</s>``, ``<pad>``): transformers matches them in text unless the
  tokenizer is loaded with ``split_special_tokens=True``; SentencePiece never does (llama.cpp
  neither, unless asked to parse special tokens). The gate loads it so.

transformers is imported on use: writing the file (``stages.formats.llama.gguf_writer``) does not need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from stages.core.errors import ArtifactError, ParityError
from stages.formats import parity
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import GGUF_FILE
from stages.formats.llama.hf_gate import held_out_texts, transformers_parity
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def read_gguf(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, tokenizer metadata) as transformers reads ``path``; the tokenizer with the
    file's ``add_space_prefix`` applied (see the module docstring). ``ArtifactError`` if unreadable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never ask a hub
    from tokenizers import decoders, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, name = str(path.parent), path.name
    try:
        metadata = load_gguf_checkpoint(str(path), return_tensors=False)["tokenizer"]
        hf_model, loading = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, local_files_only=True, output_loading_info=True
        )
        hf_tokenizer = AutoTokenizer.from_pretrained(
            directory, gguf_file=name, local_files_only=True, split_special_tokens=True
        )
    except Exception as exc:  # any failure to read means the file is broken, whatever raised it
        raise ArtifactError(
            f"export parity gate: transformers cannot read {GGUF_FILE} ({_first_line(exc)}) — nothing was published"
        ) from None
    missing = sorted(loading["missing_keys"])
    if missing:
        raise ArtifactError(
            f"export parity gate: {GGUF_FILE} lacks {len(missing)} tensors transformers expects "
            f"(first: {missing[0]}) — nothing was published"
        )
    if metadata.get("add_prefix_space", True) is False:
        # What transformers' LlamaTokenizer builds for add_prefix_space=False: spaces become ▁ and
        # nothing is prepended; decoding turns ▁ back into spaces and strips nothing.
        backend = hf_tokenizer.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return hf_model.eval(), hf_tokenizer, metadata  # f32 as stored: a GGUF model refuses .float()


@torch.no_grad()
def check_gguf(model: GPT, tokenizer: Tokenizer, path: Path, inputs: GateInputs) -> dict[str, Any]:
    """Read ``path`` with transformers and compare it with ``model`` and ``tokenizer``.

    Logits within ``inputs.tolerance`` on each id matrix of ``inputs.ids``; greedy ``generate`` token-identical
    to ``stages.lm.generate.generate_ids`` for each prompt (cropped to fit ``block_size`` with the new
    tokens); no space prefix; ``encode`` ids identical and ``decode`` giving the text back on every
    held-out message and ``PROBE_TEXT``; ``apply_chat_template`` giving ``ChatTemplate.render_prompt``'s
    ids. Raises ``ParityError`` naming what differs (``ArtifactError`` when unreadable), else returns
    the figures.
    """
    hf_model, hf_tokenizer, metadata = read_gguf(path)
    failures = []
    if metadata.get("add_prefix_space", True) is not False:
        failures.append("tokenizer.ggml.add_space_prefix is not false (gptpipe's tokenizer adds no space)")

    found, figures = transformers_parity(hf_model, hf_tokenizer, model, tokenizer, inputs)
    failures += found
    texts = held_out_texts(inputs.conversations)
    decode = parity.agreement(
        lambda text: hf_tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False), lambda text: text, texts
    )
    if decode.differ:
        failures.append(f"decode differs on {len(decode.differ)}/{len(texts)} held-out texts")
    if failures:
        raise ParityError(
            f"export parity gate: {GGUF_FILE} (read with transformers' GGUF loader) differs from gptpipe: "
            f"{'; '.join(failures)} — nothing was published"
        )
    return {**figures, "reader": "transformers GGUF loader"}
