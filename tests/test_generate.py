"""Generation: KV cache == no cache, cropping past block_size, sampling controls."""

from __future__ import annotations

import pytest
import torch

from stages.lm.generate import Sampling, generate, generate_greedy_batch, generate_ids
from tests._numeric import assert_close
from tests._sft_fixtures import CharTokenizer, tiny_gpt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    net = tiny_gpt(vocab_size=CharTokenizer().vocab_size, block_size=32, seed=1)
    # Larger random weights give peaky, input-dependent logits, so a cache bug would show.
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(8.0)
    return net


def test_kv_cache_matches_no_cache_token_for_token(model):
    prompt = [10, 20, 30, 40, 50]
    cached = generate_ids(model, prompt, max_new_tokens=20, use_cache=True)
    plain = generate_ids(model, prompt, max_new_tokens=20, use_cache=False)
    assert len(cached) == 20
    assert cached == plain
    # Cached logits equal full-context logits at every step.
    ids = torch.tensor([prompt + cached])
    full = model(ids)
    logits, past = model.forward_with_cache(ids[:, :5])
    for t in range(5, ids.shape[1]):
        step, past = model.forward_with_cache(ids[:, t : t + 1], past)
        assert_close(step[0, -1], full[0, t], msg=f"position {t}")


def test_context_beyond_block_size_is_cropped_identically(model):
    prompt = list(range(10, 35))  # 25 tokens, block_size 32: overflows after 7 new tokens
    cached = generate_ids(model, prompt, max_new_tokens=30, use_cache=True)
    plain = generate_ids(model, prompt, max_new_tokens=30, use_cache=False)
    assert cached == plain and len(cached) == 30
    long_prompt = list(range(10, 60))  # longer than the block from the start
    assert generate_ids(model, long_prompt, 5) == generate_ids(model, long_prompt, 5, use_cache=False)


def test_greedy_matches_argmax_and_stops(model):
    prompt = [11, 12, 13]
    first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    out = generate_ids(model, prompt, max_new_tokens=10, stop_ids=(first,))
    assert out == [first]


def test_sampling_is_seeded_and_filters(model):
    prompt = [11, 12, 13]
    a = generate_ids(model, prompt, 15, sampling=Sampling(temperature=1.0, seed=7))
    b = generate_ids(model, prompt, 15, sampling=Sampling(temperature=1.0, seed=7))
    assert a == b
    assert a == generate_ids(model, prompt, 15, sampling=Sampling(temperature=1.0, seed=7), use_cache=False)
    # top_k=1 and a tiny top_p both reduce sampling to greedy.
    greedy = generate_ids(model, prompt, 15)
    assert generate_ids(model, prompt, 15, sampling=Sampling(temperature=1.0, top_k=1, seed=3)) == greedy
    assert generate_ids(model, prompt, 15, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=3)) == greedy
    model.train()
    generate_ids(model, prompt, 2)
    assert model.training  # the caller's mode is restored


def test_generate_wraps_template_and_cuts_at_end(model):
    tok = CharTokenizer()
    text = generate(model, tok, "hello", max_new_tokens=12)
    assert isinstance(text, str) and "<|end|>" not in text
    with pytest.raises(ValueError):
        generate_ids(model, [], 3)


def test_batched_greedy_equals_generate_ids(model):
    prompts = [[10, 20, 30], [11, 21, 31], [5, 6], [40, 41, 42, 43, 44], [12, 22, 32], list(range(10, 40))]
    first = int(model(torch.tensor([prompts[0]]))[0, -1].argmax())
    stops = (first, 3)
    batched = generate_greedy_batch(model, prompts, max_new_tokens=12, stop_ids=stops, batch_size=2)
    # The last prompt (30 tokens + 12 new > block 32) takes the one-by-one path.
    assert batched == [generate_ids(model, p, 12, stop_ids=stops) for p in prompts]
    assert batched[0] == [first]


def test_batched_generation_stops_each_item_at_its_stop_token(model, monkeypatch):
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(8)]
    free = generate_greedy_batch(model, prompts, max_new_tokens=12)  # no stop id: every row runs 12 steps
    stops = (free[0][2],)  # the first prompt stops within 3 tokens; the others whenever they meet that id
    rows_per_call: list[int] = []
    original = model.forward_with_cache

    def counting(idx, past=None):
        rows_per_call.append(idx.shape[0])  # each call yields one new token per row (the prefill the first)
        return original(idx, past)

    monkeypatch.setattr(model, "forward_with_cache", counting)
    batched = generate_greedy_batch(model, prompts, max_new_tokens=12, stop_ids=stops)
    monkeypatch.undo()
    assert batched == [generate_ids(model, p, 12, stop_ids=stops) for p in prompts]
    assert len(batched[0]) == free[0].index(stops[0]) + 1 <= 3 and batched[0][-1] == stops[0]
    # Every token computed is one that was kept: no row generated past its stop ...
    assert sum(rows_per_call) == sum(len(r) for r in batched)
    # ... so the batch did less than max_new_tokens for every item.
    assert sum(rows_per_call) < 12 * len(prompts)


def test_batched_generation_reports_finished_items(model):
    prompts = [[10, 20, 30], [11, 21, 31], [5, 6], list(range(10, 40))]
    finished: list[int] = []
    generate_greedy_batch(model, prompts, max_new_tokens=6, stop_ids=(3,), batch_size=1, on_done=finished.append)
    assert sum(finished) == len(prompts)
