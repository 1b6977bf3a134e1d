"""Autoregressive generation for ``stages.lm.model.GPT``: greedy or sampled, with a KV cache.

``generate_ids`` is the reference the ONNX export compares against: keep its signature.

Context longer than ``block_size``: the model only has RoPE tables for ``block_size``
positions, so the context is cropped to its last ``block_size`` tokens. While everything fits,
the KV cache feeds one new token per step; once the context overflows, each step recomputes
the cropped window without a cache, which is exactly what the no-cache path does. So cached
and uncached generation agree token for token, at any length.
"""

from __future__ import annotations

import torch

from stages.lm.chat import ChatTemplate, ChatTokenizer, Message
from stages.lm.model import GPT


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    """Next token from one row of logits (vocab,)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass *before* them already reaches top_p: the top token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids=(),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    seed: int | None = None,
) -> list[int]:
    """New token ids after ``prompt_ids`` (the stop id itself included when one is hit).

    Greedy when ``temperature == 0``; otherwise samples with optional top-k / top-p,
    reproducibly when ``seed`` is given.
    """
    if not prompt_ids:
        raise ValueError("generate_ids needs at least one prompt token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = model.cfg.block_size
    stops = set(int(s) for s in stop_ids)
    generator = None
    if seed is not None and temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    context = list(prompt_ids)
    new: list[int] = []
    past = None
    try:
        for _ in range(max_new_tokens):
            if use_cache and past is not None and len(context) <= block:
                # The cache holds every token but the last one: feed just that.
                idx = torch.tensor([context[-1:]], dtype=torch.long, device=device)
                logits, past = model.forward_with_cache(idx, past)
            else:
                window = context[-block:]
                idx = torch.tensor([window], dtype=torch.long, device=device)
                logits, past = model.forward_with_cache(idx)
                if not use_cache or len(context) >= block:
                    past = None  # a full (or cropped) window leaves no room to extend the cache
            token = _pick(logits[0, -1], temperature, top_k, top_p, generator)
            new.append(token)
            context.append(token)
            if token in stops:
                break
    finally:
        model.train(was_training)
    return new


@torch.no_grad()
def generate_greedy_batch(
    model: GPT, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), batch_size: int = 64
) -> list[list[int]]:
    """Greedy ``generate_ids`` for many prompts, same-length prompts sharing one forward pass.

    The model has no padding mask, so only prompts of equal length are batched; each row keeps
    its tokens up to and including its first stop id, exactly what ``generate_ids`` returns.
    Groups that would overflow ``block_size`` go through ``generate_ids`` one by one. This is
    what makes scoring hundreds of held-out items take seconds instead of minutes on a CPU.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = torch.tensor(sorted(set(int(s) for s in stop_ids)) or [-1], device=device)
    results: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    try:
        for length, members in sorted(by_length.items()):
            if length == 0:
                raise ValueError("generate_greedy_batch needs at least one prompt token per prompt")
            if length + max_new_tokens > model.cfg.block_size:
                for i in members:
                    results[i] = generate_ids(model, prompts[i], max_new_tokens, stop_ids)
                continue
            for start in range(0, len(members), batch_size):
                rows = members[start : start + batch_size]
                idx = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
                logits, past = model.forward_with_cache(idx)
                done = torch.zeros(len(rows), dtype=torch.bool, device=device)
                steps: list[torch.Tensor] = []
                for step in range(max_new_tokens):
                    token = logits[:, -1].argmax(dim=-1)
                    steps.append(token)
                    done |= torch.isin(token, stops)
                    if bool(done.all()) or step == max_new_tokens - 1:
                        break
                    logits, past = model.forward_with_cache(token[:, None], past)
                generated = torch.stack(steps, dim=1).tolist()
                stop_set = set(stops.tolist())
                for i, row in zip(rows, generated):
                    cut = next((k + 1 for k, tok in enumerate(row) if tok in stop_set), len(row))
                    results[i] = row[:cut]
    finally:
        model.train(was_training)
    return results


def generate(model: GPT, tokenizer: ChatTokenizer, prompt: str | list[Message], **kw) -> str:
    """Reply text to a user ``prompt`` (or a message list), via the chat template.

    Stops at ``<|end|>`` or EOS; keyword arguments go to ``generate_ids``
    (``max_new_tokens`` defaults to 64).
    """
    template = ChatTemplate(tokenizer)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("stop_ids", template.stop_ids)
    ids = generate_ids(model, template.render_prompt(messages), **kw)
    return template.decode_answer(ids)
