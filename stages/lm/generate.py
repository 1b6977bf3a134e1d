"""Autoregressive generation for ``stages.lm.model.GPT``: greedy or sampled, with a KV cache.

``generate_ids`` is the reference every export gate compares against (greedy: model, ids, n, stop ids).

Context longer than ``block_size``: the model only has RoPE tables for ``block_size``
positions, so the context is cropped to its last ``block_size`` tokens. While everything fits,
the KV cache feeds one new token per step; once the context overflows, each step recomputes
the cropped window without a cache, which is exactly what the no-cache path does. So cached
and uncached generation agree token for token, at any length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stages.lm.chat import ChatTemplate, ChatTokenizer, Message
from stages.lm.model import GPT


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedily at ``temperature`` 0, else sampled from the
    temperature-scaled distribution cut to the ``top_k`` tokens and the ``top_p`` mass (either
    optional), reproducibly when ``seed`` is given."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


GREEDY = Sampling()


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Next token from one row of logits (vocab,)."""
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
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
    sampling: Sampling = GREEDY,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after ``prompt_ids`` (the stop id itself included when one is hit), chosen as
    ``sampling`` says (greedy by default). ``use_cache=False`` recomputes the window every step: the
    reference the cached path must equal token for token."""
    if not prompt_ids:
        raise ValueError("generate_ids needs at least one prompt token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = model.cfg.block_size
    stops = set(int(s) for s in stop_ids)
    generator = None
    if sampling.seed is not None and sampling.temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed)

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
            token = _pick(logits[0, -1], sampling, generator)
            new.append(token)
            context.append(token)
            if token in stops:
                break
    finally:
        model.train(was_training)
    return new


@torch.no_grad()
def generate_greedy_batch(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids=(),
    batch_size: int = 64,
    on_done: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy ``generate_ids`` for many prompts, same-length prompts sharing one forward pass.

    The model has no padding mask, so only prompts of equal length are batched (exact: no pad
    token can shift a logit). A row leaves the batch at its first stop id, the step that
    produced it included: its cache rows are dropped, so no finished item costs another forward
    step, and the batch ends when its last row stops or after ``max_new_tokens``. Each row gets
    exactly what ``generate_ids`` returns. Groups that would overflow ``block_size`` go through
    ``generate_ids`` one by one. ``on_done(n)`` is called as ``n`` more prompts are finished
    (for a progress bar).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_list = sorted(set(int(s) for s in stop_ids))
    stops = torch.tensor(stop_list or [-1], device=device)
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
                    if on_done is not None:
                        on_done(1)
                continue
            for start in range(0, len(members), batch_size):
                rows = members[start : start + batch_size]
                _greedy_group(model, prompts, rows, max_new_tokens, stops, results, device, on_done)
    finally:
        model.train(was_training)
    return results


def _greedy_group(
    model: GPT,
    prompts: list[list[int]],
    rows: list[int],
    max_new_tokens: int,
    stops: torch.Tensor,
    results: list[list[int]],
    device: torch.device,
    on_done: Callable[[int], None] | None,
) -> None:
    """Decode one batch of equal-length prompts into ``results``, shrinking the batch as rows stop."""
    active = list(rows)  # prompt index of each row still in the batch
    logits, past = model.forward_with_cache(torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device))
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1)
        for i, tok in zip(active, token.tolist()):
            results[i].append(tok)
        stopped = torch.isin(token, stops)
        last = step == max_new_tokens - 1
        finished = len(active) if last else int(stopped.sum())
        if finished and on_done is not None:
            on_done(finished)
        if last or bool(stopped.all()):
            return
        if finished:
            keep = (~stopped).nonzero().flatten()
            active = [active[k] for k in keep.tolist()]
            token = token[keep]
            past = [(k[keep], v[keep]) for k, v in past]
        logits, past = model.forward_with_cache(token[:, None], past)


def generate(model: GPT, tokenizer: ChatTokenizer, prompt: str | list[Message], **kw) -> str:
    """Reply text to a user ``prompt`` (or a message list), via the chat template.

    Stops at ``<|end|>`` or EOS; keyword arguments go to ``generate_ids``
    (``max_new_tokens`` defaults to 64; ``sampling`` to greedy).
    """
    template = ChatTemplate(tokenizer)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("stop_ids", template.stop_ids)
    ids = generate_ids(model, template.render_prompt(messages), **kw)
    return template.decode_answer(ids)
