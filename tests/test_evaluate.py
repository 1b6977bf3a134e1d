"""Evaluation: exact-match scoring, report files, and the stage through the executor."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from stages.core.tracking import MemoryTracker
from stages.evaluate import generate_answers, read_heldout, score
from stages.executor import run_stage
from stages.lm.chat import ChatTemplate
from stages.lm.diagnosis import DOMINANT_SHARE
from stages.lm.tasks import normalize_answer
from stages.storage.shards import TokenShards
from stages.viewer.plots import plot_curves, read_curve
from tests._sft_fixtures import CharTokenizer, micro_config, tiny_gpt

torch.set_num_threads(1)


def _record(prompt: str, answer: str, task: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "task": task}


def test_score_normalizes_whitespace_and_cuts_at_stop():
    records = [
        _record("Sort: 3 1 2", "1 2 3", "sort"),
        _record("Reverse: a b", "b a", "reverse"),
        _record("Sort: 2 1", "1 2", "sort"),
    ]
    answers = ["  1  2\n3 ", "b a<|end|><|user|>and more", "1 2 2"]
    result = score(records, answers)
    assert result["accuracy"] == 2 / 3
    assert result["per_task"] == {"reverse": 1.0, "sort": 0.5}


def test_generated_answers_stop_at_the_end_token():
    tok = CharTokenizer()
    template = ChatTemplate(tok)
    model = tiny_gpt(tok.vocab_size, block_size=64, seed=0)
    # Force the model to answer "b a" then <|end|> then junk, whatever the prompt.
    script = tok.encode("b a") + [tok.special["<|end|>"]] + tok.encode("zzz")

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.step, self.anchor = model.cfg, 0, torch.nn.Parameter(torch.zeros(1))

        def forward_with_cache(self, idx, past=None):
            logits = torch.zeros(1, idx.shape[1], tok.vocab_size)
            logits[0, -1, script[min(self.step, len(script) - 1)]] = 1.0
            self.step += 1
            return logits, [(torch.zeros(1, 1, idx.shape[1] + (0 if past is None else past[0][0].shape[2]), 1),) * 2]

    answers = generate_answers(Scripted(), template, [_record("Reverse: a b", "b a", "reverse")], max_new_tokens=10)
    assert answers.texts == ["b a"] and answers.stopped == [True]
    assert score([_record("Reverse: a b", "b a", "reverse")], answers.texts)["accuracy"] == 1.0


def test_heldout_jsonl_with_a_line_separator_reads_back(tmp_path):
    record = _record("Reverse: a\u2028b", "b\u2028a", "reverse")
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")  # as finetune writes it
    assert read_heldout(path) == [record]


def test_plot_writes_a_png_even_without_curves(tmp_path):
    (tmp_path / "curve.json").write_text(json.dumps([{"step": 0, "val_loss": 3.0}, {"step": 5, "train_loss": 2.5}]))
    curve = read_curve(tmp_path / "curve.json")
    assert len(curve) == 2 and read_curve(tmp_path / "absent.json") == []
    png = plot_curves({"pretrain": curve, "finetune": []}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_stage_through_the_executor(micro_upstream):
    store, refs = micro_upstream()
    cfg = micro_config()
    refs["finetune"] = run_stage("finetune", cfg, refs, store).ref
    tracker = MemoryTracker()
    result = run_stage("evaluate", cfg, refs, store, tracker=tracker)
    out = Path(result.ref.uri)
    metrics = result.manifest.metrics
    assert metrics["task_items"] == cfg.evaluate.task_items
    for prefix in ("base", "sft"):
        assert 0.0 <= metrics[f"{prefix}_accuracy"] <= 1.0
        assert math.isclose(metrics[f"{prefix}_perplexity"], math.exp(metrics[f"{prefix}_val_loss"]), rel_tol=1e-4)
    val = TokenShards(refs["data"].uri, "val")
    expected_bpb = metrics["sft_val_loss"] / math.log(2) / val.bytes_per_token
    assert math.isclose(metrics["sft_bits_per_byte"], expected_bpb, rel_tol=1e-4)
    # Fine-tuning changed the model, so the two columns differ.
    assert metrics["sft_val_loss"] != metrics["base_val_loss"]

    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"base", "finetuned", "samples", "task_items"}
    assert set(report["finetuned"]["per_task"]) == set(cfg.finetune.tasks)
    markdown = (out / "report.md").read_text()
    assert "| metric | base | fine-tuned |" in markdown and "bits per byte" in markdown
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == cfg.evaluate.samples
    assert all({"prompt", "expected", "base", "finetuned"} <= set(s) for s in samples)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    logged = {Path(p).name for p, _ in tracker.artifacts}
    assert {"report.md", "report.json", "curves.png"} <= logged
    assert "eval/sft_accuracy" in tracker.metrics


def test_report_names_the_dominant_answer_when_fine_tuning_learned_only_the_format(micro_upstream):
    # 40 steps teach the micro model the answer format of `last` (one digit, then <|end|>), far
    # from enough to read the digit off the prompt: it gives the same digit to most items.
    store, refs = micro_upstream()
    cfg = micro_config("finetune.max_steps=40", "finetune.tasks=[last]", "evaluate.task_items=20")
    refs["finetune"] = run_stage("finetune", cfg, refs, store).ref
    result = run_stage("evaluate", cfg, refs, store)
    out = Path(result.ref.uri)
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    given = Counter(normalize_answer(r["finetuned"]["answer"]) for r in rows if r["finetuned"]["stopped"])
    answer, count = given.most_common(1)[0]
    share = count / len(rows)
    assert share >= DOMINANT_SHARE, f"the premise failed: answers {given}"
    finding = next(f for f in result.manifest.metrics["diagnosis"] if f.startswith("the fine-tuned model gave"))
    assert f"'{answer}' to {share:.0%} of items" in finding
    assert f"- {finding}" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["diagnosis"] == result.manifest.metrics["diagnosis"]
    # Each model's time is in the report, and generation stopped early for the items that stopped.
    for prefix in ("base", "sft"):
        assert result.manifest.metrics[f"{prefix}_seconds"] > 0


def test_the_evaluate_key_does_not_cover_the_training_loop():
    """Evaluation scores with ``stages.training.loss``: a change to the loop must not re-key (and rerun) it."""
    from stages.storage.artifacts import code_modules

    modules = set(code_modules("stages.evaluate"))
    assert "stages.training.loss" in modules
    assert not modules & {"stages.training.loop", "stages.training.optimizer", "stages.training.state"}
