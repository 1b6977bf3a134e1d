"""The export's gate for its onnxruntime-genai model folder: ``og.Model`` runs it as the same model,
and ``og.Tokenizer`` tokenizes as gptpipe does.

``check_package`` runs ``stages.formats.parity``'s comparisons, as the other gates do: the logits after
each gate prompt within ``export.tolerance`` (onnxruntime-genai gives only the last position's),
greedy generations token for token against ``stages.lm.generate.generate_ids`` (prompts cropped to
leave room for the new tokens: the folder's context is ``block_size`` and onnxruntime-genai does not
crop), and ``og.Tokenizer``'s ids and decoded text on the held-out texts.
The builder re-saves ``hf/tokenizer.json``; the gate records whether the folder's tokenizes alike
(same model, normalizer, pre-tokenizer, added tokens and decoder).

What ``og.Tokenizer`` does not reproduce, so the gate measures it without gating on it:
onnxruntime-extensions' BPE splits the text before every ``▁`` (space) where ``tokenizer.json``
(and SentencePiece) merge over the whole string, so a run of spaces tokenizes differently
(``"  two"``: ``▁ | ▁t | w | o`` against SentencePiece's ``▁▁ | t | w | o``). The held-out chat
texts must match exactly (gated); ``hf_gate.PROBE_TEXT`` (indented code, runs of spaces) is
recorded as ``probe_text_identical``. Feeding gptpipe's own ids to ``og.Generator`` — what the gate
and the benchmark do — sidesteps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stages.core.errors import ArtifactError, ParityError
from stages.formats import parity
from stages.formats.gate_inputs import GateInputs
from stages.formats.genai import package as genai_package
from stages.formats.genai.runtime import GenaiGenerator
from stages.formats.layout import GENAI_DIR
from stages.formats.llama.hf_checkpoint import TOKENIZER_JSON
from stages.formats.llama.hf_gate import PROBE_TEXT
from stages.lm.chat import ChatTemplate
from stages.lm.generate import generate_ids
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer

# What decides the ids and the text: the builder re-saves hf/'s tokenizer.json through transformers,
# which adds a post-processor that adds nothing (TemplateProcessing with no special tokens).
TOKENIZING_PARTS = ("model", "normalizer", "pre_tokenizer", "added_tokens", "decoder")


def _same_tokenizer(a: Path, b: Path) -> bool:
    if not (a.is_file() and b.is_file()):
        return False
    ours, theirs = json.loads(a.read_text("utf-8")), json.loads(b.read_text("utf-8"))
    return all(ours.get(part) == theirs.get(part) for part in TOKENIZING_PARTS)


def open_checked(folder: Path, threads: int) -> GenaiGenerator:
    """``folder`` opened with onnxruntime-genai (the gate's and the serving timing's one runtime), or
    ``ArtifactError`` naming why it cannot be."""
    try:
        return GenaiGenerator(folder.parent, folder.name, threads)
    except Exception as exc:  # whatever onnxruntime-genai raises, the folder is unusable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(
            f"export parity gate: onnxruntime-genai cannot open {folder.name}/ ({first[:200]}) — nothing was published"
        ) from None


@torch.no_grad()
def check_package(
    model: GPT, tokenizer: Tokenizer, runtime: GenaiGenerator, hf_dir: Path, inputs: GateInputs
) -> dict[str, Any]:
    """Compare the folder ``runtime`` runs with ``model`` and ``tokenizer``; ``hf_dir`` is the checkpoint it
    was built from.

    Raises ``ParityError`` naming what differs, else returns the figures.
    """
    og = genai_package.require_genai()
    og_tokenizer = og.Tokenizer(runtime.model)
    tolerance, new_tokens, prompts, conversations = (
        inputs.tolerance,
        inputs.new_tokens,
        inputs.prompts,
        inputs.conversations,
    )
    block = model.cfg.block_size
    cropped = [prompt[-max(1, block - new_tokens) :] for prompt in prompts]
    # One diff per prompt (logits_parity keys by shape, and prompts may share a length).
    diffs = [
        parity.scaled_max_diff([runtime.last_logits(prompt)], [model(torch.tensor([prompt]))[0, -1]])
        for prompt in cropped
    ]
    failures = [
        f"logits after prompt {number} ({len(cropped[number])} ids): {diff:.2e} above export.tolerance={tolerance:g}"
        for number, diff in enumerate(diffs)
        if not diff <= tolerance
    ]

    template = ChatTemplate(tokenizer)
    generation = parity.generation_parity(
        lambda prompt: runtime.generate_ids(prompt, new_tokens, template.stop_ids),
        lambda prompt: generate_ids(model, prompt, new_tokens, stop_ids=template.stop_ids),
        cropped,
    )
    failures += [
        f"greedy prompt {d.prompt} ({d.prompt_length} ids) diverges at new token {d.at}" for d in generation.divergences
    ]

    texts = [message["content"] for messages in conversations for message in messages]
    encode = parity.agreement(lambda text: [int(i) for i in og_tokenizer.encode(text)], tokenizer.encode, texts)
    decode = parity.agreement(lambda text: og_tokenizer.decode(tokenizer.encode(text)), lambda text: text, texts)
    probe_identical = [int(i) for i in og_tokenizer.encode(PROBE_TEXT)] == tokenizer.encode(PROBE_TEXT)
    if encode.differ:
        failures.append(
            f"og.Tokenizer ids differ on {len(encode.differ)}/{len(texts)} held-out texts "
            f"(first: {texts[encode.differ[0]][:40]!r})"
        )
    if decode.differ:
        failures.append(f"og.Tokenizer decode differs on {len(decode.differ)}/{len(texts)} held-out texts")
    if failures:
        raise ParityError(
            f"export parity gate: the onnxruntime-genai model ({GENAI_DIR}/, run with og.Model) differs from "
            f"gptpipe: {'; '.join(failures)} — nothing was published"
        )
    return {
        "max_abs_diff": max(diffs, default=0.0),
        "generation_prompts": generation.prompts,
        "generation_matches": generation.matches,
        "tokenizer_texts": len(texts),
        "tokenizer_chars": sum(len(t) for t in texts),
        "tokenizer_matches": encode.matches,
        "decode_matches": decode.matches,
        "probe_text_identical": probe_identical,
        "tokenizer_from_hf": _same_tokenizer(runtime.folder / TOKENIZER_JSON, hf_dir / TOKENIZER_JSON),
        "runtime": f"onnxruntime-genai {og.__version__}",
    }
