"""Prefill and decode latency of runtimes on the same prompt, measured alternately so that a noisy
machine slows all of them alike. Used by the export's certificate (decode ms/token per format on
the machine that exported) and by ``benchmarks/decode.py``.

Every other round runs the runtimes in reverse order, so that none always inherits the same
predecessor's state (warm caches, another session's threads still spinning). A round times each
runtime twice from the same prompt: one new token (the prefill: the prompt's
forward pass and the first pick) and ``new_tokens`` new tokens. Decode ms/token is
``(T(new) - T(1)) / (new - 1)``; figures are medians over rounds. The runtimes must not stop early
(a stop id would shorten ``T(new)``): callers pass no stop ids.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

# prompt ids, new tokens -> new ids (no stop ids: every run makes exactly ``new tokens`` ids)
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
    short = {label: len(got) for label, got in ids.items() if len(got) != new_tokens}
    if short:  # a runtime that stopped early (an end id) would look faster than it is
        raise RuntimeError(f"time_decode: runtimes made fewer than {new_tokens} tokens: {short}")
    timings = {}
    for label in runners:
        first, total = statistics.median(one[label]), statistics.median(full[label])
        timings[label] = Timing(1000 * first, 1000 * (total - first) / (new_tokens - 1), ids[label])
    return timings
