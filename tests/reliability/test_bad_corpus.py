"""Bad corpora and bad token data: one clear line naming the culprit, and nothing claims success.

Each case runs the stage exactly as a container does (``python -m stages NAME``, in-process)
with a real MLflow child run under a parent, then runs it again: the rerun must refuse the
same way (no cache entry was left for it to reuse).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from stages.core.errors import DataError
from stages.storage.shards import ShardWriter
from tests._training_fixtures import fake_artifact, repetitive_stream, write_shards

from ._failure_checks import (
    assert_refused_cleanly,
    error_line,
    finished_outputs,
    finished_runs,
    run_stage_cli,
    stage_argv,
)
from .conftest import MICRO_TOKENIZER, TINY_PRETRAIN


def _empty_dir(root):
    (root / "corpus").mkdir()
    return root / "corpus", ["matched no files", "corpus.source="]


def _empty_files(root):
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("")
    (root / "corpus" / "b.txt").write_text("   \n\n")
    return root / "corpus", ["no usable documents in 2 file(s)", "2 empty"]


def _binary_and_bad_utf8(root):
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    return corpus, ["no usable documents in 2 file(s)", "1 binary", "1 not UTF-8", "point it at UTF-8 text"]


def _far_smaller_than_vocab(root):
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"a short note number {i}, nothing more.\n")
    return corpus, [
        "tokenizer.vocab_size=4000 is too large",
        "bytes of training text",
        "set tokenizer.vocab_size lower",
    ]


CORPUS_CASES = {
    "empty-directory": (_empty_dir, []),
    "only-empty-files": (_empty_files, []),
    "binary-and-invalid-utf8": (_binary_and_bad_utf8, []),
    "far-smaller-than-vocab": (_far_smaller_than_vocab, ["--set", "tokenizer.vocab_size=4000"]),
}


@pytest.mark.parametrize("case", sorted(CORPUS_CASES))
def test_bad_corpus_is_one_line_and_leaves_nothing_finished(case, tmp_path, capsys, tracking_uri, parent_run):
    make, extra = CORPUS_CASES[case]
    source, expected = make(tmp_path)
    store = tmp_path / "store"
    argv = [
        "tokenizer",
        *MICRO_TOKENIZER,
        "--set",
        f"corpus.source={source}",
        *extra,
        "--out",
        str(store),
        "--tracking-uri",
        tracking_uri,
        "--parent-run-id",
        parent_run,
    ]

    assert_refused_cleanly(capsys, argv, expected, store, tracking_uri, parent_run)
    assert finished_outputs(store) == []


def _pretrain_argv(store, inputs, *sets: str, tracking_uri: str, parent: str) -> list[str]:
    return stage_argv(
        "pretrain",
        sets=[*TINY_PRETRAIN, "pretrain.eval_batches=1", *sets],
        inputs={"tokenizer": inputs["tokenizer"].uri, "data": inputs["data"].uri},
        store=store,
        tracking_uri=tracking_uri,
        parent_run_id=parent,
    )


def test_context_longer_than_the_data_names_the_field_and_a_value_that_fits(tmp_path, capsys, tracking_uri, parent_run):
    from stages.storage.stores import LocalStore

    inputs_store = LocalStore(tmp_path / "inputs")
    stream = repetitive_stream(length=300)
    inputs = {
        "tokenizer": fake_artifact(inputs_store, "tokenizer", lambda d: (d / "tokenizer.model").write_bytes(b"unused")),
        "data": fake_artifact(
            inputs_store, "data", lambda d: write_shards(d, {"train": stream[:250], "val": stream[250:]})
        ),
    }
    store = tmp_path / "store"
    argv = _pretrain_argv(store, inputs, "pretrain.model.block_size=128", tracking_uri=tracking_uri, parent=parent_run)
    line = error_line(*run_stage_cli(capsys, *argv)[::2])
    assert "fewer than pretrain.model.block_size+1 = 129" in line and "holds 50 tokens" in line
    assert "set pretrain.model.block_size=" in line, "the message proposes a value that fits"
    assert finished_outputs(store) == [] and not list(store.glob("pretrain/*/checkpoints/*"))
    assert finished_runs(tracking_uri, parent_run) == []
    assert error_line(*run_stage_cli(capsys, *argv)[::2]) == line


def test_vocab_too_big_for_a_forced_uint16_dtype_is_refused_by_writer_and_reader(
    tmp_path, capsys, tracking_uri, parent_run
):
    from stages.storage.stores import LocalStore

    # The writer: ids above 65535 cannot go into uint16 shards; wrapping them would corrupt the data.
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=1000)
    with pytest.raises(DataError) as refused:
        writer.write(np.array([5, 70_000, 9]))
    writer.close()
    assert "token id 70000 does not fit shard dtype uint16" in str(refused.value) and "train_000.bin" in str(
        refused.value
    )
    assert "\n" not in str(refused.value)

    # The reader: a data artifact whose index forces uint16 for a 70,000-id vocabulary.
    def forced(directory):
        write_shards(directory, {"train": repetitive_stream(length=400), "val": repetitive_stream(length=200)})
        index = json.loads((directory / "shards.json").read_text())
        index.update(dtype="uint16", vocab_size=70_000)
        (directory / "shards.json").write_text(json.dumps(index))

    inputs_store = LocalStore(tmp_path / "inputs")
    inputs = {
        "tokenizer": fake_artifact(inputs_store, "tokenizer", lambda d: (d / "tokenizer.model").write_bytes(b"x")),
        "data": fake_artifact(inputs_store, "data", forced),
    }
    store = tmp_path / "store"
    argv = _pretrain_argv(store, inputs, tracking_uri=tracking_uri, parent=parent_run)
    line = error_line(*run_stage_cli(capsys, *argv)[::2])
    assert "shards.json: dtype uint16 cannot hold vocab_size 70000" in line and "uint32" in line
    assert finished_outputs(store) == []
    assert finished_runs(tracking_uri, parent_run) == []
