"""The export's gate for its Hugging Face checkpoint: transformers loads ``hf/`` offline and it is
the same model and tokenizer as gptpipe's.

``check_checkpoint`` runs ``stages.formats.parity``'s logits and greedy-generation comparisons — the
ones the ONNX gate runs — and, since only this artifact carries its own tokenizer, compares that
tokenizer's ids, its decode and its chat template with ``stages.lm.tokenizer`` and
``stages.lm.chat.ChatTemplate``. transformers is imported on use: writing the checkpoint
(``stages.formats.llama.hf_checkpoint``) does not need it.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from stages.core.errors import ParityError
from stages.formats import parity
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import HF_DIR
from stages.lm.chat import END_TOKEN, ChatTemplate
from stages.lm.generate import generate_ids
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer

# Text the tokenizer check always covers besides the held-out items: runs of spaces, tabs,
# blank lines, indentation, accents, scripts and an emoji (byte fallback), digits, chat
# markers inside text and the literal control-token strings (which must stay plain text).
PROBE_TEXT = (
    "def f(x):\n    return  x\t# tab\n\n\n  two leading spaces, trailing   \n"
    "héllo wörld — naïve café · 日本語 · 🤖 · 1234567890 · <|user|>inline<|end|> · <s> </s> <pad> <unk>"
)


def _ids(encoded: Any) -> list[int]:
    """transformers 4 returns a list from apply_chat_template(tokenize=True), 5 a BatchEncoding."""
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def _greedy(hf_model: Any, new_tokens: int, stop_ids: list[int], pad_id: int, prompt: list[int]) -> list[int]:
    out = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    return [int(t) for t in out[0, len(prompt) :]]


@torch.no_grad()
def transformers_parity(
    hf_model: Any, hf_tokenizer: Any, model: GPT, tokenizer: Tokenizer, inputs: GateInputs
) -> tuple[list[str], dict[str, Any]]:
    """What every transformers-loaded format must match (the ``hf/`` checkpoint, the GGUF): logits
    within ``inputs.tolerance`` on each of ``inputs.ids``; greedy ``generate`` token-identical to gptpipe's on
    each prompt (cropped to fit ``block_size`` with the new tokens: HF does not crop, gptpipe does);
    ``encode`` ids identical on every held-out message and ``PROBE_TEXT``; ``apply_chat_template``
    giving ``ChatTemplate.render_prompt``'s ids. Returns one line per failure and the figures."""
    tolerance, new_tokens, conversations = inputs.tolerance, inputs.new_tokens, inputs.conversations
    logits = parity.logits_parity(
        lambda ids: [hf_model(torch.from_numpy(ids)).logits], lambda ids: [model(torch.from_numpy(ids))], inputs.ids
    )
    failures = [
        f"logits {shape}: {diff:.2e} above export.tolerance={tolerance:g}"
        for shape, diff in logits.above(tolerance).items()
    ]
    template = ChatTemplate(tokenizer)
    cropped = [prompt[-max(1, model.cfg.block_size - new_tokens) :] for prompt in inputs.prompts]
    generation = parity.generation_parity(
        partial(_greedy, hf_model, new_tokens, list(template.stop_ids), tokenizer.pad_id),
        lambda prompt: generate_ids(model, prompt, new_tokens, stop_ids=template.stop_ids),
        cropped,
    )
    failures += [
        f"greedy prompt {d.prompt} ({d.prompt_length} ids) diverges at new token {d.at}" for d in generation.divergences
    ]
    texts = held_out_texts(conversations)
    encode = parity.agreement(lambda text: hf_tokenizer.encode(text, add_special_tokens=False), tokenizer.encode, texts)
    if encode.differ:
        failures.append(
            f"tokenization differs on {len(encode.differ)}/{len(texts)} held-out texts "
            f"(first: {texts[encode.differ[0]][:40]!r})"
        )
    chats = [messages[:-1] or messages for messages in conversations]
    chat = parity.agreement(
        lambda messages: _ids(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)),
        template.render_prompt,
        chats,
    )
    if chat.differ:
        failures.append(f"chat template ids differ on {len(chat.differ)}/{len(chats)} held-out conversations")
    return failures, {
        "max_abs_diff": logits.worst,
        "max_abs_diff_by_shape": logits.by_shape,
        "generation_prompts": generation.prompts,
        "generation_matches": generation.matches,
        "tokenizer_texts": len(texts),
        "tokenizer_chars": sum(len(t) for t in texts),
        "tokenizer_matches": encode.matches,
        "chat_template_matches": chat.matches,
    }


def held_out_texts(conversations: list[list[dict[str, str]]]) -> list[str]:
    """The texts a tokenizer check covers: every held-out message, and ``PROBE_TEXT``."""
    return [message["content"] for messages in conversations for message in messages] + [PROBE_TEXT]


@torch.no_grad()
def check_checkpoint(model: GPT, tokenizer: Tokenizer, hf_dir: Path, inputs: GateInputs) -> dict[str, Any]:
    """Load ``hf_dir`` with transformers (offline) and compare it with ``model`` and ``tokenizer``.

    Logits within ``inputs.tolerance`` on each id matrix of ``inputs.ids``; greedy ``generate`` token-identical
    to ``stages.lm.generate.generate_ids`` for each prompt (cropped to fit ``block_size`` with the
    new tokens: HF does not crop, gptpipe does); ``encode`` ids identical on every held-out message
    and ``PROBE_TEXT``, ``decode`` giving the text back (and, on those ids and on chat prompts
    with a reply's end, what ``Tokenizer.decode`` gives with ``skip_special_tokens`` as
    ``not keep_special``), and ``apply_chat_template`` giving ``ChatTemplate.render_prompt``'s ids. Raises ``ParityError`` naming what differs, else returns
    the figures.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask a hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True).float().eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    # The gate encodes held-out texts longer than the context to compare ids, and runs none of them
    # through the model: lift the limit that makes transformers warn about running such a sequence.
    hf_tokenizer.model_max_length = sys.maxsize
    failures, figures = transformers_parity(hf_model, hf_tokenizer, model, tokenizer, inputs)
    conversations = inputs.conversations
    # Only this format carries a tokenizer of its own to decode with: each text's ids and each chat
    # prompt's ids with a reply's end (the marker, then EOS and PAD as a padded batch ends) decode as
    # gptpipe decodes them: the text back with the markers kept, and without them under
    # skip_special_tokens (the bare reply).
    template = ChatTemplate(tokenizer)
    texts = held_out_texts(conversations)
    chats = [messages[:-1] or messages for messages in conversations]
    ending = [tokenizer.special[END_TOKEN], tokenizer.eos_id, tokenizer.pad_id]
    decoded = [tokenizer.encode(text) for text in texts] + [template.render_prompt(c) + ending for c in chats]
    decode = parity.agreement(
        lambda ids: (hf_tokenizer.decode(ids), hf_tokenizer.decode(ids, skip_special_tokens=True)),
        lambda ids: (tokenizer.decode(ids, keep_special=True), tokenizer.decode(ids)),
        decoded,
    )
    round_trip = parity.agreement(lambda text: hf_tokenizer.decode(tokenizer.encode(text)), lambda text: text, texts)
    if round_trip.differ:
        failures.append(f"decode differs on {len(round_trip.differ)}/{len(texts)} held-out texts")
    if decode.differ:
        failures.append(
            f"decode with or without skip_special_tokens differs from gptpipe's on "
            f"{len(decode.differ)}/{len(decoded)} texts and chat prompts"
        )
    if failures:
        raise ParityError(
            f"export parity gate: the Hugging Face checkpoint ({HF_DIR}/, loaded with "
            f"transformers) differs from gptpipe: {'; '.join(failures)} — nothing was published"
        )
    return figures
