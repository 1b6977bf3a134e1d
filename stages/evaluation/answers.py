"""Greedy answers to held-out chat items, and their exact-match score.

A model answers each item's prompt (every message before the last assistant turn), rendered with
its own tokenizer's chat template; the answer is cut at the first stop token and scored against
the item's last message after whitespace normalization (``stages.lm.tasks.exact_match``).
Generation is batched and each item leaves its batch at its stop token
(``generate_greedy_batch``), so a model that answers and stops costs a few steps per item.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.progress import progress_bar
from stages.lm.diagnosis import Answers
from stages.lm.tasks import exact_match

if TYPE_CHECKING:
    from stages.lm.chat import ChatTemplate
    from stages.lm.model import GPT


def generate_answers(
    model: GPT, template: ChatTemplate, records: list[dict], max_new_tokens: int, desc: str = "generate"
) -> Answers:
    """Greedy answers per record (prompt = every message before the last assistant turn), with a
    progress bar over items, and whether each answer ended with a stop token."""
    from stages.lm.generate import generate_greedy_batch

    prompts = [template.render_prompt(template.split_last_answer(r["messages"])[0]) for r in records]
    bar = progress_bar(total=len(prompts), desc=desc, unit="item", leave=False)
    try:
        generated = generate_greedy_batch(
            model, prompts, max_new_tokens, stop_ids=template.stop_ids, on_done=bar.update
        )
    finally:
        bar.close()
    stops = set(template.stop_ids)
    return Answers(
        [template.decode_answer(ids) for ids in generated], [bool(ids) and ids[-1] in stops for ids in generated]
    )


def score(records: list[dict], answers: list[str]) -> dict:
    """Overall and per-task exact-match accuracy."""
    per_task: dict[str, list[bool]] = {}
    hits = []
    for record, answer in zip(records, answers):
        ok = exact_match(answer, record["messages"][-1]["content"])
        hits.append(ok)
        per_task.setdefault(record.get("task", "all"), []).append(ok)
    return {
        "accuracy": sum(hits) / max(len(hits), 1),
        "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
    }
