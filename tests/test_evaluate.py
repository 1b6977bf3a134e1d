"""Evaluation: exact-match scoring, report files, and the stage through the executor."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.core.errors import ArtifactError, DataError
from stages.core.sections import TokenizerConfig
from stages.core.tracking import MemoryTracker
from stages.evaluate import generate_answers, read_heldout, score
from stages.evaluation import champion
from stages.evaluation.text_bpb import bits_per_byte, text_set
from stages.executor import run_stage
from stages.lm.chat import ChatTemplate
from stages.lm.diagnosis import DOMINANT_SHARE
from stages.lm.model import GPT
from stages.lm.tasks import normalize_answer
from stages.lm.tokenizer import MODEL_FILE, Tokenizer
from stages.lm.tokenizer_training import train_model
from stages.storage.shards import TokenShards
from stages.training import checkpoint_format as checkpoint
from stages.viewer.plots import plot_curves, read_curve
from tests._data_fixtures import stdlib_documents
from tests._sft_fixtures import CharTokenizer, micro_config, tiny_gpt
from tests._training_fixtures import fake_artifact, write_shards

torch.set_num_threads(1)

FIGURES = ("val_loss", "perplexity", "bits_per_byte", "accuracy", "seconds")  # each model's, without a champion


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
    # Without the champion's lineage inputs: today's figures, nothing more.
    assert set(metrics) == {
        *(f"{prefix}_{key}" for prefix in ("base", "sft") for key in FIGURES),
        *("task_items", "seconds", "diagnosis"),
    }
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
    assert set(report) == {"task_items", "val_tokens", "bytes_per_token", "base", "finetuned", "diagnosis", "samples"}
    assert set(report["finetuned"]["per_task"]) == set(cfg.finetune.tasks)
    markdown = (out / "report.md").read_text()
    assert "| metric | base | fine-tuned |" in markdown and "bits per byte" in markdown
    assert "champion" not in markdown
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


# --- the challenger against the champion (issue 26) --------------------------------------------

COMPARED = ("exact_match", "frozen_bpb", "val_bpb")
# Text the micro tokenizer never saw whole: code, prose and characters only byte fallback encodes.
FROZEN_DOCUMENTS = [
    'def area(r):\n    """Circle area."""\n    return 3.14159 * r * r\n',
    "The frozen set is text, not tokens: naïve café — ü ß 漢字 ✓\nsecond line\n",
    "for i in range(10):\n    print(i, i * i)\n",
]


@pytest.fixture(scope="module")
def other_tokenizer():
    """A second gptpipe tokenizer (a smaller vocabulary, other text): a champion trained from scratch."""
    texts = [d * 3 for d in FROZEN_DOCUMENTS] + stdlib_documents(12, chars=2500)
    return Tokenizer(train_model(texts, TokenizerConfig(vocab_size=360, character_coverage=0.995, threads=1)))


def _frozen_data(directory: Path, tokenizer: Tokenizer, documents: list[str]) -> Path:
    """A data output whose val split is ``documents`` tokenized with ``tokenizer``, each followed by EOS."""
    ids = [i for doc in documents for i in (*tokenizer.encode(doc), tokenizer.eos_id)]
    return write_shards(directory, {"val": np.asarray(ids)}, vocab=tokenizer.vocab_size, eos_id=tokenizer.eos_id)


def test_frozen_set_bpb_is_the_same_through_the_set_s_tokens_or_re_encoded_text(
    micro_upstream, other_tokenizer, tmp_path
):
    """One model, one text: scored from the split's own tokens (its tokenizer made the set) or from the
    text decoded out of a set another tokenizer made and encoded again, the figure is the same.

    gptpipe tokenizers use the identity normalization, no dummy prefix and byte fallback, so decoding
    gives the documents back byte for byte and encoding them again gives the very ids the set holds:
    the two figures are equal, not merely close. (A NFKC or whitespace-squeezing tokenizer would
    re-encode a normalized text and could differ by the few bytes normalization changes.)"""
    _, refs = micro_upstream()
    tokenizer = Tokenizer.load(refs["tokenizer"].uri)
    model = checkpoint.load_model(checkpoint.model_directory(refs["pretrain"].uri))
    own = text_set(TokenShards(_frozen_data(tmp_path / "own", tokenizer, FROZEN_DOCUMENTS), "val"), tokenizer, 10**6)
    other = text_set(
        TokenShards(_frozen_data(tmp_path / "other", other_tokenizer, FROZEN_DOCUMENTS), "val"), other_tokenizer, 10**6
    )
    assert own.texts == other.texts == FROZEN_DOCUMENTS and own.num_bytes == other.num_bytes
    assert own.ids_for(tokenizer) is own.ids  # the token path: the split's ids as they are
    assert other.ids_for(tokenizer) == own.ids  # decoded and re-encoded: the same ids
    assert other.ids != own.ids  # ... though the set itself holds another tokenizer's ids

    via_tokens = bits_per_byte(model, own.ids_for(tokenizer), own.num_bytes, tokenizer.eos_id, batch_size=2)
    via_text = bits_per_byte(model, other.ids_for(tokenizer), other.num_bytes, tokenizer.eos_id, batch_size=2)
    assert via_tokens == pytest.approx(via_text, rel=1e-9)

    # The figure is the summed loss of each document after one EOS, in windows of block_size, / ln 2 / bytes.
    shorter = replace(model.cfg, block_size=8)
    short = GPT(shorter)
    short.load_state_dict(model.state_dict())
    total = 0.0
    with torch.no_grad():
        for ids in own.ids:
            sequence = torch.tensor([tokenizer.eos_id, *ids])
            for start in range(0, len(ids), 8):
                x, y = sequence[start : start + 8], sequence[start + 1 : start + 9]
                total += float(F.cross_entropy(short(x[: len(y)][None])[0], y, reduction="sum"))
    expected = total / math.log(2) / sum(len(d.encode("utf-8")) for d in FROZEN_DOCUMENTS)
    assert bits_per_byte(short, own.ids, own.num_bytes, tokenizer.eos_id, batch_size=3) == pytest.approx(
        expected, rel=1e-5
    )


def test_frozen_set_is_whole_documents_from_the_front_and_the_cut_one_s_whole_lines(micro_upstream, tmp_path):
    _, refs = micro_upstream()
    tokenizer = Tokenizer.load(refs["tokenizer"].uri)
    shards = TokenShards(_frozen_data(tmp_path / "d", tokenizer, FROZEN_DOCUMENTS), "val")
    first = tokenizer.encode(FROZEN_DOCUMENTS[0])
    # The bound falls inside the second document's second line: the first document whole, then its first line.
    bound = len(first) + 1 + len(tokenizer.encode(FROZEN_DOCUMENTS[1].split("\n")[0] + "\n")) + 2
    texts = text_set(shards, tokenizer, bound)
    assert texts.texts == [FROZEN_DOCUMENTS[0], FROZEN_DOCUMENTS[1].split("\n")[0] + "\n"]
    assert texts.describe()["tokens"] <= bound and text_set(shards, tokenizer, bound) == texts
    with pytest.raises(DataError, match="no whole line of text in its first 3 tokens"):
        text_set(TokenShards(_frozen_data(tmp_path / "e", tokenizer, ["no newline at all"]), "val"), tokenizer, 3)


def _own_artifacts_as_champion(refs: dict) -> dict:
    return {**refs, "champion": refs["finetune"], "champion_tokenizer": refs["tokenizer"], "frozen": refs["data"]}


def test_a_champion_equal_to_the_challenger_scores_the_same(micro_upstream):
    store, refs = micro_upstream()
    cfg = micro_config()
    refs["finetune"] = run_stage("finetune", cfg, refs, store).ref
    plain = run_stage("evaluate", cfg, refs, store)
    tracker = MemoryTracker()
    result = run_stage("evaluate", cfg, _own_artifacts_as_champion(refs), store, tracker=tracker)
    assert result.ref.digest != plain.ref.digest  # the lineage inputs enter the key
    metrics = result.manifest.metrics
    assert set(metrics) == set(plain.manifest.metrics) | set(champion.METRICS)
    for figure in COMPARED:
        assert metrics[f"champion_{figure}"] == pytest.approx(metrics[f"challenger_{figure}"], abs=1e-9)
    assert metrics["challenger_exact_match"] == metrics["sft_accuracy"]  # the same items, the same answers
    assert all(f"eval/{name}" in tracker.metrics for name in champion.METRICS)
    out = Path(result.ref.uri)
    comparison = json.loads((out / "report.json").read_text())["comparison"]
    assert comparison["same_tokenizer"] and comparison["task_items"] == cfg.evaluate.task_items
    markdown = (out / "report.md").read_text()
    assert markdown.count("| metric | champion | challenger | difference |") == 1
    assert "| +0.0000 |" in markdown and "| +0.0% |" in markdown


def _perturbed_champion(store, refs: dict, other_tokenizer: Tokenizer) -> dict:
    """The fine-tuned model with noise on every weight; its lineage's frozen set is text of its own."""
    model = checkpoint.load_model(checkpoint.model_directory(refs["finetune"].uri))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    tokenizer = Tokenizer.load(refs["tokenizer"].uri)
    return {
        "champion": fake_artifact(store, "finetune", lambda d: checkpoint.save_model(d / checkpoint.MODEL_DIR, model)),
        "champion_tokenizer": refs["tokenizer"],
        "frozen": fake_artifact(store, "data", lambda d: _frozen_data(d, tokenizer, FROZEN_DOCUMENTS)),
    }


def _champion_of_another_tokenizer(store, refs: dict, other_tokenizer: Tokenizer) -> dict:
    """An untrained model of another vocabulary and block size (a champion trained from scratch)."""
    model = tiny_gpt(other_tokenizer.vocab_size, block_size=16, seed=1)
    return {
        "champion": fake_artifact(store, "finetune", lambda d: checkpoint.save_model(d / checkpoint.MODEL_DIR, model)),
        "champion_tokenizer": fake_artifact(
            store, "tokenizer", lambda d: (d / MODEL_FILE).write_bytes(other_tokenizer.model_proto)
        ),
        "frozen": fake_artifact(store, "data", lambda d: _frozen_data(d, other_tokenizer, FROZEN_DOCUMENTS)),
    }


@pytest.mark.parametrize("make_champion", [_perturbed_champion, _champion_of_another_tokenizer])
def test_a_worse_champion_scores_worse_on_every_figure(micro_upstream, other_tokenizer, make_champion):
    # 40 steps on `last` teach the format and a few right digits (the dominant-answer test's fine-tuning).
    store, refs = micro_upstream()
    cfg = micro_config("finetune.max_steps=40", "finetune.tasks=[last]", "evaluate.task_items=20")
    refs["finetune"] = run_stage("finetune", cfg, refs, store).ref
    lineage = make_champion(store, refs, other_tokenizer)
    result = run_stage("evaluate", cfg, {**refs, **lineage}, store)
    metrics = result.manifest.metrics
    assert metrics["challenger_exact_match"] > 0, "the premise failed: the fine-tuned model answers nothing right"
    assert metrics["champion_exact_match"] < metrics["challenger_exact_match"]
    assert metrics["champion_frozen_bpb"] > metrics["challenger_frozen_bpb"]
    assert metrics["champion_val_bpb"] > metrics["challenger_val_bpb"]
    comparison = json.loads((Path(result.ref.uri) / "report.json").read_text())["comparison"]
    # The frozen set is the lineage's own text, bounded by val_batches x batch_size x the champion's block_size.
    champion_block = checkpoint.load_model(checkpoint.model_directory(lineage["champion"].uri)).cfg.block_size
    assert comparison["frozen_set"]["tokens"] <= cfg.evaluate.val_batches * cfg.evaluate.batch_size * champion_block
    assert comparison["frozen_set"]["bytes"] != comparison["val_set"]["bytes"]
    assert comparison["same_tokenizer"] == (lineage["champion_tokenizer"] == refs["tokenizer"])
    rows = [line for line in (Path(result.ref.uri) / "report.md").read_text().splitlines() if "bits per byte (" in line]
    assert len(rows) == 2 and all(row.split("|")[-2].strip().startswith("-") for row in rows)  # challenger lower


def test_champion_inputs_come_all_together_and_the_frozen_set_in_the_champion_s_tokens(
    micro_upstream, other_tokenizer, tmp_path
):
    assert champion.champion_given({"tokenizer": Path("t")}) is False
    with pytest.raises(ArtifactError, match="evaluate got champion without champion_tokenizer, frozen"):
        champion.champion_given({"champion": Path("c")})
    _, refs = micro_upstream()
    inputs = {
        "champion": Path(refs["pretrain"].uri),
        "champion_tokenizer": Path(refs["tokenizer"].uri),
        "frozen": _frozen_data(tmp_path / "frozen", other_tokenizer, FROZEN_DOCUMENTS),
    }
    with pytest.raises(ArtifactError, match="frozen data was made with a 360-id tokenizer, not the champion's"):
        champion.load_champion(inputs, "cpu")
