"""Decode timing divides by the tokens each runtime made: onnxruntime-genai stops at the model's end
id even when the caller passes no stop ids (a continued model's int4 twin did so after 3 of 16 tokens,
and the export failed). A fake clock makes the figures exact: no wall-clock in the test."""

from __future__ import annotations

import pytest

from stages.formats import decode_timing

PREFILL_MS, STEP_MS = 5.0, 2.0


class Clock:
    """``time.perf_counter`` for decode_timing, advanced only by the fake runtimes."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def runtime(clock: Clock, stop_after: int | None = None):
    """A runtime whose first new token costs the prefill and each further one a decode step."""

    def run(prompt: list[int], new: int) -> list[int]:
        made = min(new, stop_after) if stop_after else new
        clock.now += (PREFILL_MS + STEP_MS * (made - 1)) / 1000
        return list(range(made))

    return run


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(decode_timing.time, "perf_counter", fake)
    return fake


def test_a_runtime_that_stops_early_is_timed_over_the_tokens_it_made(clock):
    runners = {"full": runtime(clock), "early": runtime(clock, stop_after=3)}
    timings = decode_timing.time_decode(runners, [1, 2, 3], new_tokens=16, rounds=3)
    assert [len(timings[name].ids) for name in runners] == [16, 3]
    for timing in timings.values():  # both cost STEP_MS a token: the early one is not credited 13 free tokens
        assert timing.prefill_ms == pytest.approx(PREFILL_MS)
        assert timing.decode_ms == pytest.approx(STEP_MS)


def test_a_runtime_that_makes_one_token_cannot_be_timed(clock):
    runners = {"full": runtime(clock), "early": runtime(clock, stop_after=1)}
    with pytest.raises(RuntimeError, match="before a second new token: {'early': 1}"):
        decode_timing.time_decode(runners, [1], new_tokens=4, rounds=1)
