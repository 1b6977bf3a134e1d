"""Prefill and decode latency of runtimes on the same prompt, measured alternately so that a noisy
machine slows all of them alike. Used by the export's certificate (decode ms/token per format on
the machine that exported) and by ``benchmarks/decode.py``.

Every other round runs the runtimes in reverse order, so that none always inherits the same
predecessor's state (warm caches, another session's threads still spinning). A round times each
runtime twice from the same prompt: one new token (the prefill: the prompt's
forward pass and the first pick) and ``new_tokens`` new tokens. Decode ms/token is
``(T(n) - T(1)) / (n - 1)`` where ``n`` is the number of ids the runtime made; figures are medians
over rounds. Callers pass no stop ids, but onnxruntime-genai stops at the model's end id whatever it
is given (its generator is then done): a runtime that stops early is timed over the tokens it made,
never credited for the ones it did not (a greedy runtime makes the same ids every round).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

# prompt ids, new tokens -> new ids (no stop ids; at most ``new tokens`` ids, fewer at a runtime's own end id)
Runner = Callable[[list[int], int], list[int]]


@dataclass(frozen=True)
class Timing:
    prefill_ms: float
    decode_ms: float  # per token
    ids: list[int]  # the last round's new ids, to check the runtimes agree


def time_decode(runners: dict[str, Runner], prompt: list[int], new_tokens: int, rounds: int) -> dict[str, Timing]:
    """Median prefill ms and decode ms/token of each runner (after one warm-up call each)."""
    if new_tokens < 2:
        raise ValueError("time_decode needs new_tokens >= 2")
    one: dict[str, list[float]] = {label: [] for label in runners}
    full: dict[str, list[float]] = {label: [] for label in runners}
    ids: dict[str, list[int]] = {}
    for run in runners.values():  # first-call allocations and graph setup stay out of the figures
        run(prompt, 2)
    order = list(runners.items())
    for number in range(rounds):
        # every other round runs backwards, so no runtime always follows the same one (caches, threads)
        for label, run in order if number % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run(prompt, 1)
            middle = time.perf_counter()
            ids[label] = run(prompt, new_tokens)
            end = time.perf_counter()
            one[label].append(middle - start)
            full[label].append(end - middle)
    made = {label: len(got) for label, got in ids.items()}
    short = {label: count for label, count in made.items() if count < 2}
    if short:  # one token is all prefill: nothing left to time the decode step by
        raise RuntimeError(
            f"time_decode: runtimes stopped at their end id before a second new token: {short}; "
            "time them on another prompt"
        )
    timings = {}
    for label in runners:
        first, total = statistics.median(one[label]), statistics.median(full[label])
        timings[label] = Timing(1000 * first, 1000 * (total - first) / (made[label] - 1), ids[label])
    return timings
