"""The evaluation diagnosis: which failure modes get named, and when nothing is flagged."""

from __future__ import annotations

from flows.report import render_report, report_markdown
from stages.lm.diagnosis import Answers, diagnose, dominant_answer

DIGITS = [str(i % 10) for i in range(100)]  # expected answers: each digit 10 % of items


def test_one_answer_to_most_items_is_named_with_its_share():
    given = ["him"] * 62 + [str(i) for i in range(38)]
    assert dominant_answer(given, DIGITS) == ("him", 0.62, 0.1)
    found = diagnose({"finetuned": Answers(given, [True] * 100)}, DIGITS, {"finetuned": 0.05}, 32)
    assert found[0].startswith("the fine-tuned model gave 'him' to 62% of items")
    assert "learned the answer format, not the task" in found[0]


def test_a_correct_model_and_a_skewed_reference_are_not_flagged():
    assert dominant_answer(DIGITS, DIGITS) is None
    # Half the items expect "yes": a model answering "yes" to 50 % is not "dominated" by it.
    expected = ["yes"] * 50 + ["no"] * 50
    assert dominant_answer(expected, expected) is None
    found = diagnose(
        {"base": Answers(["x"] * 100, [True] * 100), "finetuned": Answers(expected, [True] * 100)},
        expected,
        {"base": 0.0, "finetuned": 1.0},
        32,
    )
    assert all("fine-tuned" not in f for f in found)


def test_answers_cut_off_at_max_new_tokens_are_not_a_dominant_answer():
    # A model that rambles to the token limit on every item has not learned the format either.
    found = diagnose({"finetuned": Answers([""] * 100, [False] * 100)}, DIGITS, {"finetuned": 0.0}, 16)
    assert not any("gave" in f for f in found)
    assert any(f.startswith("the fine-tuned model never stopped on 100% of items") for f in found)


def test_answers_that_never_stop_and_a_base_that_already_knows():
    stopped = [False] * 40 + [True] * 60
    found = diagnose(
        {"base": Answers(DIGITS, stopped), "finetuned": Answers(DIGITS, [True] * 100)},
        DIGITS,
        {"base": 0.6, "finetuned": 0.55},
        16,
    )
    assert any(f.startswith("the base model never stopped on 40% of items") and "max_new_tokens=16" in f for f in found)
    assert any(f.startswith("the base model already answers 60% of items correctly") for f in found)
    assert any(f.startswith("fine-tuning did not help: 55%") for f in found)


def test_the_report_card_prints_the_findings():
    report = {
        "recipe": "micro",
        "store": "/tmp/s",
        "stages": {
            "evaluate": {
                "reused": False,
                "wall_time_s": 1.0,
                "ref": {"uri": "/tmp/s/evaluate/k"},
                "metrics": {
                    "sft_accuracy": 0.1,
                    "base_seconds": 0.5,
                    "sft_seconds": 0.4,
                    "diagnosis": ["the fine-tuned model gave '5' to 90% of items"],
                },
            }
        },
    }
    text = render_report(report)
    assert "base_seconds=0.5" in text and "sft_seconds=0.4" in text
    assert "evaluate: the fine-tuned model gave '5' to 90% of items" in text
    assert "- evaluate: the fine-tuned model gave '5' to 90% of items" in report_markdown(report)
