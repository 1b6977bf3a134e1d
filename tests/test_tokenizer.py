"""Tokenizer stage: exact round trips, reserved ids, compression report, helpful failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _data_fixtures import HELDOUT_TEXTS, UNICODE_DOCS, micro_config, run, stdlib_documents, write_corpus

from stages.core.errors import ArtifactError, DataError
from stages.lm.tokenizer import SPECIAL_TOKENS, Tokenizer
from stages.lm.tokenizer_training import train_model
from stages.storage.splits import SplitRule
from stages.tokenizer import HELDOUT_KEY, stream_sample
from tests._token_bytes import token_bytes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 400-piece BPE tokenizer trained through the executor on ~300 KB of the standard library."""
    store = tmp_path_factory.mktemp("store")
    cfg = micro_config("corpus.max_bytes=300000")
    result = run("tokenizer", cfg, store)
    return result, Tokenizer.load(result.ref.uri)


def test_stage_writes_artifact_and_reports_compression(trained):
    result, tok = trained
    files = set(result.manifest.files)
    assert {"tokenizer.model", "tokenizer.vocab", "tokenizer.json"} <= files
    metrics = result.manifest.metrics
    assert metrics["vocab_size"] == tok.vocab_size == 400
    assert metrics["compression_measured_on"] == "heldout" and metrics["heldout_documents"] >= 1
    assert metrics["roundtrip_failures"] == 0
    assert metrics["train_bytes"] <= 200_000
    # Compression is what it says: held-out bytes over held-out tokens, and BPE beats one byte a token.
    assert metrics["bytes_per_token"] == pytest.approx(metrics["eval_bytes"] / metrics["eval_tokens"], rel=1e-3)
    assert metrics["bytes_per_token"] > 1.0 and metrics["chars_per_token"] > 1.0
    assert metrics["corpus_bytes"] == 300_000
    vocab_lines = (Path(result.ref.uri) / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 400 and vocab_lines[tok.newline_id].split("\t")[0] == "\\n"


def test_the_executor_reuses_the_finished_artifact(trained):
    result, _ = trained
    again = run("tokenizer", micro_config("corpus.max_bytes=300000"), Path(result.ref.uri).parents[1])
    assert again.reused and again.ref == result.ref


@pytest.mark.parametrize("text", HELDOUT_TEXTS + UNICODE_DOCS)
def test_round_trip_is_exact_on_unseen_text(trained, text):
    _, tok = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(token_bytes(tok, ids).sum()) == len(text.encode("utf-8"))


def test_round_trip_on_python_source(trained):
    _, tok = trained
    # Modules far past the training cap (which took the first ~300 KB) are unseen text.
    for doc in stdlib_documents(120, chars=3000)[-5:]:
        assert tok.decode(tok.encode(doc)) == doc


def test_newline_and_indentation_are_pieces(trained):
    _, tok = trained
    assert tok.encode("\n") == [tok.newline_id] and tok.id_to_piece(tok.newline_id) == "\n"
    ids = tok.encode("x\n        y")
    assert tok.newline_id in ids
    # Indentation becomes whitespace-only pieces, not one id per space.
    assert len(ids) < len("x\n        y")


def test_special_tokens_are_single_reserved_ids(trained):
    result, tok = trained
    info = json.loads((Path(result.ref.uri) / "tokenizer.json").read_text(encoding="utf-8"))
    assert set(tok.special) == set(SPECIAL_TOKENS)
    for token, index in tok.special.items():
        assert tok.encode(token) == [index]
        assert info["special"][token] == index
    ids = {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, *tok.special.values()}
    assert len(ids) == 4 + len(SPECIAL_TOKENS)
    assert (info["bos_id"], info["eos_id"], info["pad_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)

    chat = "<|user|>What is 2+2?<|end|><|assistant|>4<|end|>"
    ids = tok.encode(chat, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1] == tok.special["<|user|>"]
    assert ids.count(tok.special["<|end|>"]) == 2
    assert tok.decode(ids) == "What is 2+2?4"
    assert tok.decode(ids, keep_special=True) == chat
    assert tok.decode([tok.pad_id, *tok.encode("hi"), tok.vocab_size + 3]) == "hi"


def test_encode_batch_matches_encode(trained):
    _, tok = trained
    texts = HELDOUT_TEXTS + UNICODE_DOCS
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode(np.array(tok.encode("numpy ids"), dtype=np.uint16)) == "numpy ids"


def test_unigram_round_trips(tmp_path):
    cfg = micro_config("tokenizer.model_type=unigram", "corpus.max_bytes=150000", "tokenizer.heldout_fraction=0")
    result = run("tokenizer", cfg, tmp_path)
    tok = Tokenizer.load(result.ref.uri)
    assert result.manifest.metrics["compression_measured_on"] == "train"
    for text in HELDOUT_TEXTS + UNICODE_DOCS:
        assert tok.decode(tok.encode(text)) == text


def test_corpus_too_small_for_vocab_is_a_helpful_error(tmp_path):
    write_corpus(tmp_path / "c", ["tiny corpus, tiny corpus\n", "just a few words\n"])
    cfg = micro_config(f"corpus.source={tmp_path / 'c'}", "tokenizer.vocab_size=2048")
    with pytest.raises(
        DataError, match=r"tokenizer\.vocab_size=2048 is too large .*at most \d+.*set tokenizer\.vocab_size lower"
    ):
        run("tokenizer", cfg, tmp_path / "store")


def test_vocab_too_small_for_characters_is_a_helpful_error():
    from stages.core.config import TokenizerConfig

    many_chars = ["".join(chr(0x4E00 + i) for i in range(500))] * 3
    cfg = TokenizerConfig(vocab_size=300, character_coverage=1.0)
    with pytest.raises(DataError, match=r"cannot hold the corpus's \d+ required characters.*character_coverage"):
        train_model(many_chars, cfg)


def test_heldout_split_is_deterministic_and_never_empty(tmp_path):
    docs = [f"document number {i}\n" for i in range(30)]
    cfg = micro_config(f"corpus.source={write_corpus(tmp_path / 'c', docs)}", "tokenizer.heldout_fraction=0.02")
    train, held, stats = stream_sample(cfg)
    assert stream_sample(cfg)[:2] == (train, held)
    assert held and train and sorted(train + held) == sorted(docs) and stats.documents == 30
    # Held out by the same rule as everything else: the documents scoring below the fraction,
    # or, when the hash holds out none of 30 at 2 %, the lowest-scoring one.
    rule = SplitRule(HELDOUT_KEY, 0.02)
    below = [doc for doc in docs if rule.score(doc) < rule.fraction]
    assert sorted(held) == sorted(below or [min(docs, key=rule.score)])
    train, held, _ = stream_sample(micro_config(f"corpus.source={tmp_path / 'c'}", "tokenizer.heldout_fraction=0"))
    assert held == [] and sorted(train) == sorted(docs)


def test_one_document_is_never_held_out(tmp_path):
    rule = SplitRule(HELDOUT_KEY, 0.4)
    only = next(doc for doc in (f"the only one {i}\n" for i in range(100)) if rule.score(doc) < rule.fraction)
    corpus = write_corpus(tmp_path / "c", [only])  # one the hash would hold out: it stays for training
    assert stream_sample(micro_config(f"corpus.source={corpus}", "tokenizer.heldout_fraction=0.4"))[:2] == ([only], [])


def test_load_without_model_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match=r"no tokenizer\.model"):
        Tokenizer.load(tmp_path)
