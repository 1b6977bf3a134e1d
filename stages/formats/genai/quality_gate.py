"""The gate for a quantized runtime folder: judged by quality, not by bits.

A quantized model cannot give PyTorch's logits to ``export.tolerance``; what a user needs is that it
answers as well. On ``export.quantized.items`` held-out conversations the gate measures, for the fp32
PyTorch model and the quantized folder (run with onnxruntime-genai):

* **held-out exact match**: the greedy answer (``export.generation_tokens`` new tokens at most)
  equals the reference answer (``stages.lm.tasks.exact_match``, the rule ``evaluate`` scores with);
* **bits per byte** of the reference answers: the answer tokens' negative log2-likelihood over their
  UTF-8 bytes (how surprised each model is by the right answer, independent of the tokenizer);
* **tokenizer ids**: ``og.Tokenizer`` over the folder gives gptpipe's ids on every held-out text.

The variant passes when exact match drops by at most ``export.quantized.exact_match_drop``
(absolute), bits per byte rise by at most ``export.quantized.bpb_rise`` (absolute) and the ids are
identical. A variant that fails is not an error: it is recorded with its figures and not served.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stages.core.sections import QuantizedConfig
from stages.formats import parity
from stages.formats.gate_inputs import GateInputs
from stages.formats.genai import package as genai_package
from stages.formats.genai.runtime import GenaiGenerator
from stages.lm.chat import ChatTemplate, Message
from stages.lm.generate import generate_greedy_batch
from stages.lm.model import GPT
from stages.lm.targets import IGNORE
from stages.lm.tasks import exact_match
from stages.lm.tokenizer import Tokenizer


def _answer_positions(template: ChatTemplate, messages: list[Message], block: int) -> tuple[list[int], list[int]]:
    """The conversation's ids (cropped to ``block``) and the positions whose next id is an answer id."""
    inputs, targets = template.render(messages).inputs_targets()
    ids = (inputs + [targets[-1]])[-block:]
    targets = targets[-(len(ids) - 1) :]
    return ids, [i for i, t in enumerate(targets) if t != IGNORE]


@torch.no_grad()
def check_quantized(
    model: GPT, tokenizer: Tokenizer, runtime: GenaiGenerator, inputs: GateInputs, cfg: QuantizedConfig
) -> dict[str, Any]:
    """Figures for ``runtime`` against ``model`` on ``inputs.quality_conversations``, with ``passed`` and,
    when it failed, ``reason``."""
    conversations = inputs.quality_conversations
    template = ChatTemplate(tokenizer)
    block = model.cfg.block_size
    hits = {"fp32": 0, "quantized": 0}
    nats = {"fp32": 0.0, "quantized": 0.0}
    answer_bytes = 0
    split = [template.split_last_answer(messages) for messages in conversations]
    crops = [template.render_prompt(prompt)[-max(1, block - inputs.new_tokens) :] for prompt, _ in split]
    # PyTorch's answers in batches of equal-length prompts: each row is exactly generate_ids' answer
    # (stages.lm.generate), at a fraction of the time of 200 one-by-one loops
    fp32_answers = generate_greedy_batch(model, crops, inputs.new_tokens, stop_ids=template.stop_ids)
    for messages, (_, reference), crop, ours in zip(conversations, split, crops, fp32_answers):
        theirs = runtime.generate_ids(crop, inputs.new_tokens, template.stop_ids)
        hits["fp32"] += exact_match(template.decode_answer(ours), reference)
        hits["quantized"] += exact_match(template.decode_answer(theirs), reference)

        ids, positions = _answer_positions(template, messages, block)
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
        wanted = torch.tensor([ids[p + 1] for p in positions])
        nats["fp32"] -= float(logp[torch.tensor(positions), wanted].sum())
        nats["quantized"] -= float(runtime.log_probs(ids)[positions].sum())
        answer_bytes += sum(len(tokenizer.decode([ids[p + 1]]).encode("utf-8")) for p in positions)

    og_tokenizer = genai_package.require_genai().Tokenizer(runtime.model)
    texts = [message["content"] for messages in conversations for message in messages]
    same_ids = parity.agreement(
        lambda text: [int(i) for i in og_tokenizer.encode(text)], tokenizer.encode, texts
    ).matches

    count = max(len(conversations), 1)
    exact = {name: hits[name] / count for name in hits}
    bpb = {name: nats[name] / np.log(2) / max(answer_bytes, 1) for name in nats}
    drop = exact["fp32"] - exact["quantized"]
    rise = bpb["quantized"] - bpb["fp32"]
    problems = []
    # written as 'not within' so that a NaN (a broken model's log-likelihood) fails too
    if not drop <= cfg.exact_match_drop + 1e-12:
        problems.append(
            f"held-out exact match fell {drop:.3f} (> export.quantized.exact_match_drop={cfg.exact_match_drop:g})"
        )
    if not rise <= cfg.bpb_rise:
        problems.append(f"bits per byte rose {rise:.4f} (> export.quantized.bpb_rise={cfg.bpb_rise:g})")
    if same_ids != len(texts):
        problems.append(f"og.Tokenizer ids differ on {len(texts) - same_ids}/{len(texts)} held-out texts")
    return {
        "items": len(conversations),
        "exact_match_fp32": round(exact["fp32"], 6),
        "exact_match": round(exact["quantized"], 6),
        "exact_match_drop": round(drop, 6),
        "bpb_fp32": round(float(bpb["fp32"]), 6),
        "bpb": round(float(bpb["quantized"]), 6),
        "bpb_rise": round(float(rise), 6),
        "tokenizer_texts": len(texts),
        "tokenizer_matches": same_ids,
        "tolerance": {"exact_match_drop": cfg.exact_match_drop, "bpb_rise": cfg.bpb_rise},
        "passed": not problems,
        **({"reason": "; ".join(problems)} if problems else {}),
    }
