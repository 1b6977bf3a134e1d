"""A stage that crashes after writing half its output leaves nothing a rerun would reuse.

Two crashes: an exception (the executor's cleanup runs) and a process that dies on the spot
(``os._exit``: no cleanup at all, like an OOM kill). Either way ``find`` sees no output, and
the rerun builds a fresh, verified one without the dead attempt's files.
(An S3 upload cut mid-artifact is covered in tests/integration/test_s3_store.py.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages import tokenizer as tokenizer_stage
from stages.executor import call_key, run_stage
from stages.lm.tokenizer import MODEL_FILE
from stages.stage_call import StageCall
from stages.storage.artifacts import verify
from stages.storage.stores import LocalStore
from tests._data_fixtures import micro_config, stdlib_documents, write_corpus

from .conftest import ROOT, clean_env


@pytest.fixture
def setup(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", stdlib_documents(30))
    cfg = micro_config(f"corpus.source={corpus}")
    return cfg, LocalStore(tmp_path / "store")


def _assert_rerun_builds_afresh(cfg, store: LocalStore) -> None:
    key = call_key(StageCall.for_recipe("tokenizer", cfg, {}))
    assert store.find("tokenizer", key) is None
    assert not (store.root / "tokenizer" / key).exists()
    result = run_stage("tokenizer", cfg, {}, store)
    assert not result.reused
    manifest = verify(Path(result.ref.uri))
    assert sorted(manifest.files) == ["tokenizer.json", "tokenizer.model", "tokenizer.vocab"]
    assert run_stage("tokenizer", cfg, {}, store).reused, "the finished output is the one reused next"


def test_exception_after_half_the_files_leaves_no_output(setup, monkeypatch):
    cfg, store = setup
    real = tokenizer_stage.write_artifact

    def half_then_crash(tokenizer, tcfg, out):
        (out / MODEL_FILE).write_bytes(tokenizer.model_proto)
        (out / "half.vocab").write_text("partial")
        raise RuntimeError("worker lost mid-write")

    monkeypatch.setattr(tokenizer_stage, "write_artifact", half_then_crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        run_stage("tokenizer", cfg, {}, store)
    assert not list((store.root / "tokenizer").iterdir()), "the executor removed the failed attempt"
    monkeypatch.setattr(tokenizer_stage, "write_artifact", real)
    _assert_rerun_builds_afresh(cfg, store)


def test_process_dying_mid_write_leaves_only_a_hidden_work_directory(setup, tmp_path):
    cfg, store = setup
    corpus = cfg.corpus.source
    script = textwrap.dedent(f"""
        import os
        from stages import tokenizer as stage
        from stages.executor import run_stage
        from stages.lm.tokenizer import MODEL_FILE
        from stages.storage.stores import LocalStore
        from tests._data_fixtures import micro_config

        def half_then_die(tokenizer, tcfg, out):
            (out / MODEL_FILE).write_bytes(tokenizer.model_proto[: len(tokenizer.model_proto) // 2])
            (out / "half.vocab").write_text("partial")
            os._exit(9)  # no finally, no cleanup: the process is simply gone

        stage.write_artifact = half_then_die
        run_stage("tokenizer", micro_config("corpus.source={corpus}"), {{}}, LocalStore({str(store.root)!r}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 9, done.stderr[-2000:]
    left = sorted(p.name for p in (store.root / "tokenizer").iterdir())
    assert len(left) == 1 and left[0].startswith(".work-"), left
    assert sorted(p.name for p in (store.root / "tokenizer" / left[0]).iterdir()) == ["half.vocab", "tokenizer.model"]

    _assert_rerun_builds_afresh(cfg, store)  # "half.vocab" must not slip into the new artifact
    assert not (store.root / "tokenizer" / left[0]).exists(), "the rebuilt output replaced the dead attempt's directory"
