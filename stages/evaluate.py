"""Stage ``evaluate``: the base (pretrained) and fine-tuned models on the same held-out data.

For each model:

* validation loss, perplexity and bits per byte on the data artifact's ``val`` split
  (bpb = loss in nats / ln 2 / bytes per token, so tokenizers of different compression compare);
* task accuracy: greedy answers to the held-out conversations the finetune stage set aside,
  scored by exact match after whitespace normalization, cut at the first stop token.

Outputs: ``report.json`` and ``report.md`` (base vs fine-tuned side by side), ``samples.json``
(a few prompts with both models' answers) and ``curves.png`` (pretrain and finetune loss curves).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path


from stages.training import checkpoint
from stages.training.batches import fixed_windows
from stages.lm.chat import ChatTemplate, validate_messages
from stages.core.config import EvaluateConfig, PipelineConfig
from stages.core.errors import ArtifactError
from stages.lm.generate import generate_greedy_batch
from stages.lm.model import GPT
from stages.core.plots import plot_curves, read_curve
from stages.storage.shards import TokenShards
from stages.lm.tasks import exact_match
from stages.lm.tokenizer import Tokenizer
from stages.core.tracking import Tracker
from stages.training.loop import evaluate_loss, resolve_device
from stages.training.perf import set_threads


log = logging.getLogger("gptpipe.evaluate")

MODELS = ("base", "finetuned")


def read_heldout(path: Path) -> list[dict]:
    """Held-out records written by the finetune stage: ``{"messages": [...], "task"?: str}``."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the finetune artifact has no held-out set — rerun stage 'finetune'")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            record["messages"] = validate_messages(record, f"{path}:{number}")
            records.append(record)
    return records


def language_metrics(model: GPT, shards: TokenShards, cfg: EvaluateConfig) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte on fixed windows of ``shards``."""
    block = min(model.cfg.block_size, len(shards) - 1)
    batches = fixed_windows(shards, block, cfg.batch_size, cfg.val_batches)
    loss = evaluate_loss(model, batches)
    return {
        "val_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss / math.log(2) / max(shards.bytes_per_token, 1e-9),
    }


def answer_items(model: GPT, template: ChatTemplate, records: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answer text per record (prompt = every message before the last assistant turn)."""
    prompts = [template.render_prompt(template.split_last_answer(r["messages"])[0]) for r in records]
    generated = generate_greedy_batch(model, prompts, max_new_tokens, stop_ids=template.stop_ids)
    return [template.decode_answer(ids) for ids in generated]


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


def write_markdown(report: dict, path: Path) -> None:
    base, tuned = report["base"], report["finetuned"]
    rows = [
        ("validation loss (nats/token)", "val_loss", "{:.4f}"),
        ("perplexity", "perplexity", "{:.2f}"),
        ("bits per byte", "bits_per_byte", "{:.4f}"),
        (f"task exact match ({report['task_items']} held-out items)", "accuracy", "{:.1%}"),
    ]
    lines = ["# Evaluation: base vs fine-tuned", "", "| metric | base | fine-tuned |", "|---|---:|---:|"]
    lines += [f"| {label} | {fmt.format(base[key])} | {fmt.format(tuned[key])} |" for label, key, fmt in rows]
    for task in tuned["per_task"]:
        lines.append(f"| exact match: {task} | {base['per_task'].get(task, 0):.1%} | {tuned['per_task'][task]:.1%} |")
    lines += ["", f"Validation split: {report['val_tokens']:,} tokens, {report['bytes_per_token']:.3f} bytes/token.", ""]
    lines += ["## Samples", ""]
    for sample in report["samples"]:
        lines += [f"- **prompt** `{sample['prompt']}` — expected `{sample['expected']}`",
                  f"  - base: `{sample['base']}`", f"  - fine-tuned: `{sample['finetuned']}`"]
    lines += ["", "![loss curves](curves.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    ecfg = cfg.evaluate
    started = time.perf_counter()
    set_threads(ecfg.threads)
    device = resolve_device(ecfg.device)
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    template = ChatTemplate(tokenizer)
    val = TokenShards(inputs["data"], "val")
    records = read_heldout(inputs["finetune"] / "heldout.jsonl")
    if len(records) < ecfg.task_items:
        log.warning("only %d held-out items available (evaluate.task_items = %d); scoring all of them",
                    len(records), ecfg.task_items)
    records = records[: ecfg.task_items]

    results: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    for name, artifact in (("base", inputs["pretrain"]), ("finetuned", inputs["finetune"])):
        model = checkpoint.load_model(checkpoint.model_directory(artifact), device=device)
        t0 = time.perf_counter()
        metrics = language_metrics(model, val, ecfg)
        t1 = time.perf_counter()
        answers[name] = answer_items(model, template, records, ecfg.max_new_tokens)
        metrics.update(score(records, answers[name]))
        metrics["seconds_loss"], metrics["seconds_generate"] = round(t1 - t0, 2), round(time.perf_counter() - t1, 2)
        results[name] = metrics
        log.info("%s: val loss %.4f, bpb %.4f, exact match %.1f%%", name, metrics["val_loss"],
                 metrics["bits_per_byte"], 100 * metrics["accuracy"])

    samples = [
        {
            "prompt": " | ".join(m["content"] for m in record["messages"][:-1]),
            "expected": record["messages"][-1]["content"],
            "base": answers["base"][i],
            "finetuned": answers["finetuned"][i],
            **({"task": record["task"]} if "task" in record else {}),
        }
        for i, record in enumerate(records[: ecfg.samples])
    ]
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False), encoding="utf-8")
    report = {
        "task_items": len(records),
        "val_tokens": len(val),
        "bytes_per_token": val.bytes_per_token,
        "base": results["base"],
        "finetuned": results["finetuned"],
        "samples": samples,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    write_markdown(report, out / "report.md")
    plot_curves(
        {"pretrain": read_curve(inputs["pretrain"] / "curve.json"), "finetune": read_curve(inputs["finetune"] / "curve.json")},
        out / "curves.png",
    )

    summary = {"task_items": len(records)}
    for prefix, name in (("base", "base"), ("sft", "finetuned")):
        for key in ("val_loss", "perplexity", "bits_per_byte", "accuracy"):
            summary[f"{prefix}_{key}"] = round(results[name][key], 6)
    tracker.log_metrics({f"eval/{k}": float(v) for k, v in summary.items()})
    for name in ("report.md", "report.json", "samples.json", "curves.png"):
        tracker.log_artifact(out / name, "evaluate")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary
