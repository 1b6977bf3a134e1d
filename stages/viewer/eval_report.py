"""The evaluation report as a person reads it: one Markdown page of base vs fine-tuned figures
(and, when a champion was given, the challenger against it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.lm.diagnosis import Answers


def evaluation_markdown(report: dict, curves_image: str) -> str:
    """The evaluate stage's report as Markdown: base vs fine-tuned, the diagnosis, samples, the curves."""
    base, tuned = report["base"], report["finetuned"]
    rows = [
        ("validation loss (nats/token)", "val_loss", "{:.4f}"),
        ("perplexity", "perplexity", "{:.2f}"),
        ("bits per byte", "bits_per_byte", "{:.4f}"),
        (f"task exact match ({report['task_items']} held-out items)", "accuracy", "{:.1%}"),
    ]
    lines = ["# Evaluation: base vs fine-tuned", "", "| metric | base | fine-tuned |", "|---|---:|---:|"]
    lines += [f"| {label} | {fmt.format(base[key])} | {fmt.format(tuned[key])} |" for label, key, fmt in rows]
    for task, figures in tuned.get("lm_eval", {}).items():  # lm-evaluation-harness, beside gptpipe's own
        for key, value in figures.items():
            lines.append(f"| lm-eval {task}: {key} | {base['lm_eval'][task][key]:.4f} | {value:.4f} |")
    for task in tuned["per_task"]:
        lines.append(f"| exact match: {task} | {base['per_task'].get(task, 0):.1%} | {tuned['per_task'][task]:.1%} |")
    lines.append(f"| time: loss + generation (s) | {base['seconds']:.1f} | {tuned['seconds']:.1f} |")
    lines += [
        "",
        f"Validation split: {report['val_tokens']:,} tokens, {report['bytes_per_token']:.3f} bytes/token.",
        "",
    ]
    if "comparison" in report:
        lines += comparison_markdown(report["comparison"])
    lines += ["## Diagnosis", ""]
    lines += [f"- {finding}" for finding in report["diagnosis"]] or ["- nothing to flag"]
    lines += [""]
    lines += ["## Samples", ""]
    for sample in report["samples"]:
        lines += [
            f"- **prompt** `{sample['prompt']}` — expected `{sample['expected']}`",
            f"  - base: `{sample['base']}`",
            f"  - fine-tuned: `{sample['finetuned']}`",
        ]
    lines += ["", f"![loss curves]({curves_image})", ""]
    return "\n".join(lines)


# The challenger-vs-champion figures as both report cards show them: (label, key, value format, difference
# format); the key names the figure in report.json's comparison and, prefixed, in the stage metrics.
COMPARED = (
    ("task exact match", "exact_match", "{:.1%}", "{:+.1%}"),
    ("frozen-set bits per byte", "frozen_bpb", "{:.4f}", "{:+.4f}"),
    ("new val bits per byte", "val_bpb", "{:.4f}", "{:+.4f}"),
)


def comparison_markdown(comparison: dict) -> list[str]:
    """One table: exact match, frozen-set and new-val bits per byte of champion and challenger, and the difference."""
    champion, challenger = comparison["champion"], comparison["challenger"]

    def described(texts: dict) -> str:
        return f"{texts['documents']} documents, {texts['bytes']:,} bytes"

    which = {
        "exact_match": f"{comparison['task_items']} held-out items",
        "frozen_bpb": described(comparison["frozen_set"]),
        "val_bpb": described(comparison["val_set"]),
    }
    lines = ["## Challenger vs champion", "", "| metric | champion | challenger | difference |", "|---|---:|---:|---:|"]
    for name, key, fmt, signed in COMPARED:
        label = f"{name} ({which[key]})"
        figures = (
            fmt.format(champion[key]),
            fmt.format(challenger[key]),
            signed.format(challenger[key] - champion[key]),
        )
        lines.append(f"| {label} | {' | '.join(figures)} |")
    tokenizers = "the same tokenizer" if comparison["same_tokenizer"] else "different tokenizers (text re-encoded)"
    lines += [
        "",
        f"Difference = challenger - champion: higher exact match and lower bits per byte are better. "
        f"The two models read the same text through {tokenizers}; the frozen set is the champion lineage's "
        "held-out text.",
        "",
    ]
    return lines


def write_answers(path: Path, records: list[dict], expected: list[str], generated: dict[str, Answers]) -> None:
    """``answers.jsonl``: per held-out item, the expected answer and each model's answer and whether it stopped."""
    with open(path, "w", encoding="utf-8") as handle:
        for i, record in enumerate(records):
            row = {
                "expected": expected[i],
                **{n: {"answer": g.texts[i], "stopped": g.stopped[i]} for n, g in generated.items()},
            }
            handle.write(
                json.dumps({**({"task": record["task"]} if "task" in record else {}), **row}, ensure_ascii=False) + "\n"
            )
