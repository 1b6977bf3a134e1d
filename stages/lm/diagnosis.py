"""Name the failure modes an exact-match score hides, in sentences a user can act on.

An accuracy of 6 % says that something went wrong, not what. The answers themselves usually do:

* one answer dominates: the model gave the same string to most items, far more often than that
  answer is correct. It learned the answer *format* (a digit, a word, then ``<|end|>``), not the
  task, which is what a stalled fine-tuning run (validation loss on a plateau) looks like;
* answers never stop: generation ran into ``max_new_tokens`` without a stop token, so the model
  has not learned to end its turn (normal for a base model, a bug for a fine-tuned one) and
  evaluation spent the whole budget on every such item;
* the base model already answers correctly: the held-out task is no test of fine-tuning, or the
  task leaked into the pretraining text;
* fine-tuning did not beat the base model.

``diagnose`` returns these as plain sentences (empty when there is nothing to flag); the evaluate
stage writes them into its report and the pipeline's report card prints them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from stages.lm.tasks import normalize_answer

# An answer "dominates" when it is given to at least this share of the items ...
DOMINANT_SHARE = 0.3
# ... and to at least this many times more items than the most common *expected* answer accounts for.
DOMINANT_OVER_EXPECTED = 2.0
NEVER_STOPS_SHARE = 0.1  # flag answers that hit max_new_tokens when they are this common
BASE_ALREADY_SHARE = 0.2  # a base model at or above this exact match already "knows" the task

LABELS = {"base": "base", "finetuned": "fine-tuned"}


@dataclass(frozen=True)
class Answers:
    """One model's answers to the held-out items: text, and whether each stopped on its own."""

    texts: list[str]
    stopped: list[bool]


def _quote(text: str, limit: int = 40) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"'{text}'" if text else "an empty answer"


def dominant_answer(
    answers: list[str], expected: list[str], stopped: list[bool] | None = None
) -> tuple[str, float, float] | None:
    """(answer, its share of all items, the top expected answer's share) when one answer dominates.

    Only answers that ended with a stop token count (``stopped``; all when None): text cut off at
    ``max_new_tokens`` is not an answer the model chose, and a model that never stops has not
    learned the format either (``diagnose_model`` says so instead).
    """
    if not answers:
        return None
    kept = [a for a, ok in zip(answers, stopped if stopped is not None else [True] * len(answers)) if ok]
    if not kept:
        return None
    answer, count = Counter(normalize_answer(a) for a in kept).most_common(1)[0]
    share = count / len(answers)
    expected_top = Counter(normalize_answer(e) for e in expected).most_common(1)[0][1] / max(len(expected), 1)
    if share >= DOMINANT_SHARE and share >= DOMINANT_OVER_EXPECTED * expected_top:
        return answer, share, expected_top
    return None


def diagnose_model(name: str, answers: Answers, expected: list[str], max_new_tokens: int) -> list[str]:
    """The findings about one model's answers (``name``: 'base' or 'finetuned')."""
    label = LABELS.get(name, name)
    found = []
    dominant = dominant_answer(answers.texts, expected, answers.stopped)
    if dominant is not None:
        answer, share, expected_top = dominant
        found.append(
            f"the {label} model gave {_quote(answer)} to {share:.0%} of items (no expected answer covers more than "
            f"{expected_top:.0%}): it learned the answer format, not the task"
            + (
                " — train longer or with a higher learning rate, and check that the fine-tuning validation loss "
                "left its plateau"
                if name == "finetuned"
                else ""
            )
        )
    never = answers.stopped.count(False)
    if answers.stopped and never / len(answers.stopped) >= NEVER_STOPS_SHARE:
        found.append(
            f"the {label} model never stopped on {never / len(answers.stopped):.0%} of items: it ran to "
            f"max_new_tokens={max_new_tokens} without a stop token"
            + (
                ", so it has not learned to end its turn"
                if name == "finetuned"
                else " (a base model has not seen the chat format)"
            )
        )
    return found


def diagnose(
    answers: dict[str, Answers], expected: list[str], accuracy: dict[str, float], max_new_tokens: int
) -> list[str]:
    """Every finding for the base and fine-tuned models, most telling first."""
    found: list[str] = []
    for name in ("finetuned", "base"):
        if name in answers:
            found += diagnose_model(name, answers[name], expected, max_new_tokens)
    base, tuned = accuracy.get("base"), accuracy.get("finetuned")
    if base is not None and base >= BASE_ALREADY_SHARE:
        found.append(
            f"the base model already answers {base:.0%} of items correctly: the held-out task may be in "
            "the pretraining text, or too easy to show what fine-tuning adds"
        )
    if base is not None and tuned is not None and tuned <= base and len(expected) > 0:
        found.append(f"fine-tuning did not help: {tuned:.0%} exact match fine-tuned vs {base:.0%} base")
    return found
