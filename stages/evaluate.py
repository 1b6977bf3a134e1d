"""Stage ``evaluate``: the base (pretrained) and fine-tuned models on the same held-out data.

For each model:

* validation loss, perplexity and bits per byte on the data artifact's ``val`` split
  (bpb = loss in nats / ln 2 / bytes per token, so tokenizers of different compression compare);
* task accuracy: greedy answers to the held-out conversations the finetune stage set aside,
  scored by exact match after whitespace normalization, cut at the first stop token. Generation
  is batched and each item leaves its batch at its stop token (``generate_greedy_batch``), so a
  model that answers and stops costs a few steps per item, not ``max_new_tokens``;
* the time each model took (loss, generation), and a diagnosis of the answers
  (``stages.lm.diagnosis``: one dominant answer, answers that never stop, a base model that
  already knows the task), so a bad score comes with its likely reason.

Given the registry champion's lineage inputs (``champion``, ``champion_tokenizer``, ``frozen``), the
fine-tuned model is also scored as the challenger against the champion on the same ground: exact
match on the same items, bits per byte on the lineage's frozen held-out text and on this run's val
split, each model through its own tokenizer (``stages.evaluation.champion``); the figures join the
metrics (``champion.METRICS``) and the report gets one table champion / challenger / difference.
Without them nothing of this runs and the outputs are what they were.

Outputs: ``report.json`` and ``report.md`` (base vs fine-tuned side by side, the diagnosis),
``answers.jsonl`` (every item's expected and given answers), ``samples.json`` (a few prompts with
both models' answers) and ``curves.png`` (pretrain and finetune loss curves).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stages.core.errors import ArtifactError
from stages.core.stage import Output, Sections, Stage
from stages.evaluation import champion
from stages.evaluation.answers import generate_answers, score
from stages.lm.chat import ChatTemplate, validate_messages
from stages.lm.diagnosis import Answers, diagnose
from stages.lm.tokenizer import Tokenizer
from stages.training import checkpoint_format as checkpoint
from stages.viewer.eval_report import evaluation_markdown, write_answers

# torch, matplotlib and the model load inside the functions that score: validating a recipe must not.
if TYPE_CHECKING:
    from stages.core.sections import EvaluateConfig
    from stages.core.tracking import Tracker
    from stages.lm.model import GPT
    from stages.storage.shards import TokenShards

log = logging.getLogger("gptpipe.evaluate")

MODELS = ("base", "finetuned")
REPORT_JSON, REPORT_MD, ANSWERS, SAMPLES, CURVES_PNG = (
    "report.json",
    "report.md",
    "answers.jsonl",
    "samples.json",
    "curves.png",
)


def read_heldout(path: Path) -> list[dict]:
    """Held-out records written by the finetune stage: ``{"messages": [...], "task"?: str}``."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the finetune artifact has no held-out set — rerun stage 'finetune'")
    records = []
    # '\n' only: json.dumps(..., ensure_ascii=False) leaves U+2028 in a line, which splitlines() breaks at
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            record = json.loads(line)
            record["messages"] = validate_messages(record, f"{path}:{number}")
            records.append(record)
    return records


def language_metrics(model: GPT, shards: TokenShards, cfg: EvaluateConfig) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte on fixed windows of ``shards``."""
    from stages.training.batches import fixed_windows
    from stages.training.loss import evaluate_loss

    block = min(model.cfg.block_size, len(shards) - 1)
    batches = fixed_windows(shards, block, cfg.batch_size, cfg.val_batches)
    loss = evaluate_loss(model, batches)
    return {
        "val_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss / math.log(2) / max(shards.bytes_per_token, 1e-9),
    }


def lm_eval_figures(
    model: GPT, tokenizer: Tokenizer, val: TokenShards, records: list[dict], cfg: EvaluateConfig, out: Path
) -> dict[str, dict[str, float]]:
    """``evaluate.lm_eval_tasks`` through lm-evaluation-harness (``stages.lm.harness``, lm-eval imported here).

    The local tasks are written once into ``lm_eval_tasks/``: ``gptpipe_heldout`` from the same
    held-out items the exact match above scores, ``gptpipe_bpb`` from the validation tokens the
    bits per byte above reads (as many as ``language_metrics`` can score), decoded to documents.
    """
    from stages.lm import harness

    tasks_dir = out / "lm_eval_tasks"
    if not tasks_dir.is_dir():
        budget = cfg.val_batches * cfg.batch_size * model.cfg.block_size
        harness.write_local_tasks(
            tasks_dir, records, harness.validation_texts(val, tokenizer, budget), cfg.max_new_tokens
        )
    return harness.run_tasks(model, tokenizer, cfg.lm_eval_tasks, tasks_dir, batch_size=cfg.batch_size)


def evaluate_model(
    name: str, model: GPT, template: ChatTemplate, records: list[dict], val: TokenShards, ecfg: EvaluateConfig
) -> tuple[dict, Answers]:
    """One model's language metrics, exact match and times; and its answers (for the diagnosis)."""
    t0 = time.perf_counter()
    metrics: dict = language_metrics(model, val, ecfg)
    t1 = time.perf_counter()
    answers = generate_answers(model, template, records, ecfg.max_new_tokens, desc=f"evaluate {name}")
    metrics.update(score(records, answers.texts))
    t2 = time.perf_counter()
    metrics.update(
        {
            "seconds_loss": round(t1 - t0, 2),
            "seconds_generate": round(t2 - t1, 2),
            "seconds": round(t2 - t0, 2),
            "never_stopped": answers.stopped.count(False),
        }
    )
    log.info(
        "%s: val loss %.4f, bpb %.4f, exact match %.1f%%, %.1fs (loss %.1fs, generation %.1fs)",
        name,
        metrics["val_loss"],
        metrics["bits_per_byte"],
        100 * metrics["accuracy"],
        t2 - t0,
        t1 - t0,
        t2 - t1,
    )
    return metrics, answers


def plot_training_curves(inputs: dict[str, Path], out: Path) -> None:
    """Pretrain and finetune loss curves in one figure (matplotlib is imported only here)."""
    from stages.viewer.plots import plot_curves, read_curve

    curves = {name: read_curve(inputs[name] / checkpoint.CURVE) for name in ("pretrain", "finetune")}
    plot_curves(curves, out / CURVES_PNG)


def headline_figures(results: dict[str, dict]) -> dict[str, float]:
    """The base and fine-tuned figures the manifest, MLflow and report card carry, flat and rounded."""
    summary: dict[str, float] = {}
    for prefix, name in (("base", "base"), ("sft", "finetuned")):
        for key in ("val_loss", "perplexity", "bits_per_byte", "accuracy"):
            summary[f"{prefix}_{key}"] = round(results[name][key], 6)
        figures = results[name].get("lm_eval", {})  # the harness's figures beside gptpipe's own
        if "gptpipe_heldout" in figures:
            summary[f"{prefix}_lm_eval_exact_match"] = round(figures["gptpipe_heldout"]["exact_match"], 6)
        if "gptpipe_bpb" in figures:
            summary[f"{prefix}_lm_eval_bpb"] = round(figures["gptpipe_bpb"]["bits_per_byte"], 6)
    summary["base_seconds"], summary["sft_seconds"] = results["base"]["seconds"], results["finetuned"]["seconds"]
    return summary


def samples_of(records: list[dict], generated: dict[str, Answers], count: int) -> list[dict]:
    """The first ``count`` prompts with their expected answer and both models' answers."""
    return [
        {
            "prompt": " | ".join(m["content"] for m in record["messages"][:-1]),
            "expected": record["messages"][-1]["content"],
            **{name: generated[name].texts[i] for name in MODELS},
            **({"task": record["task"]} if "task" in record else {}),
        }
        for i, record in enumerate(records[:count])
    ]


def run(cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    from stages.storage.shards import TokenShards
    from stages.training.perf import resolve_device, set_threads

    ecfg = cfg.evaluate
    started = time.perf_counter()
    set_threads(ecfg.threads)
    device = resolve_device(ecfg.device)
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    template = ChatTemplate(tokenizer)
    val = TokenShards(inputs["data"], "val")
    records = read_heldout(inputs["finetune"] / checkpoint.HELDOUT)
    if len(records) < ecfg.task_items:
        log.warning(
            "only %d held-out items available (evaluate.task_items = %d); scoring all of them",
            len(records),
            ecfg.task_items,
        )
    records = records[: ecfg.task_items]

    compared = champion.champion_given(inputs)  # the champion's lineage inputs: all three, or none

    results: dict[str, dict] = {}
    generated: dict[str, Answers] = {}
    for name, artifact in (("base", inputs["pretrain"]), ("finetuned", inputs["finetune"])):
        model = checkpoint.load_model(checkpoint.model_directory(artifact), device=device)
        results[name], generated[name] = evaluate_model(name, model, template, records, val, ecfg)
        if ecfg.lm_eval_tasks:  # the harness's figures beside gptpipe's own (stages/lm/harness.py)
            results[name]["lm_eval"] = lm_eval_figures(model, tokenizer, val, records, ecfg, out)
            tracker.log_metrics(
                {
                    f"eval/{name}/lm_eval/{task}/{key}": value
                    for task, figures in results[name]["lm_eval"].items()
                    for key, value in figures.items()
                }
            )
    challenger = champion.Contender(model, tokenizer)  # the fine-tuned model, loaded last
    comparison = (
        champion.compare_with_champion(inputs, challenger, results["finetuned"], records, ecfg) if compared else None
    )
    expected = [r["messages"][-1]["content"] for r in records]
    findings = diagnose(generated, expected, {n: r["accuracy"] for n, r in results.items()}, ecfg.max_new_tokens)
    for finding in findings:
        log.warning("diagnosis: %s", finding)
    write_answers(out / ANSWERS, records, expected, generated)
    samples = samples_of(records, generated, ecfg.samples)
    (out / SAMPLES).write_text(json.dumps(samples, indent=2, ensure_ascii=False), encoding="utf-8")
    report = {
        "task_items": len(records),
        "val_tokens": len(val),
        "bytes_per_token": val.bytes_per_token,
        "base": results["base"],
        "finetuned": results["finetuned"],
        "diagnosis": findings,
        "samples": samples,
        **({"comparison": comparison} if comparison else {}),  # challenger vs champion, when one was given
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / REPORT_MD).write_text(evaluation_markdown(report, CURVES_PNG), encoding="utf-8")
    plot_training_curves(inputs, out)

    summary = {"task_items": len(records), **headline_figures(results)}
    summary.update(champion.comparison_metrics(comparison) if comparison else {})
    tracker.log_metrics({f"eval/{k}": float(v) for k, v in summary.items()})
    for name in (REPORT_MD, REPORT_JSON, ANSWERS, SAMPLES, CURVES_PNG):
        tracker.log_artifact(out / name, "evaluate")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["diagnosis"] = findings  # sentences, not metrics: the report card prints them
    return summary


STAGE = Stage(
    name="evaluate",
    summary="loss, bits per byte and exact match, base vs fine-tuned",
    sections=("evaluate",),
    inputs=("tokenizer", "data", "pretrain", "finetune"),
    # The registry's champion, scored on the same ground: its model, its tokenizer, and the data output
    # whose val split is the frozen held-out text of its lineage.
    lineage_inputs=champion.LINEAGE_INPUTS,  # ("champion", "champion_tokenizer", "frozen")
    outputs=(
        Output(REPORT_JSON, "base vs fine-tuned figures, the diagnosis (and challenger vs champion when given)"),
        Output(REPORT_MD, "the same, to read"),
        Output(ANSWERS, "every held-out item's expected and given answers"),
        Output(SAMPLES, "a few prompts with both models' answers"),
        Output(CURVES_PNG, "pretrain and finetune loss curves"),
    ),
    run=run,
    headline=(
        "base_accuracy",
        "sft_accuracy",
        "base_bits_per_byte",
        "sft_bits_per_byte",
        "base_seconds",
        "sft_seconds",
    ),
    # evaluate.lm_eval_tasks; the champion's lineage inputs
    headline_when_set=("sft_lm_eval_exact_match", "sft_lm_eval_bpb", *champion.METRICS),
)
