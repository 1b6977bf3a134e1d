"""The artifact contract: content keys, atomic publication, reuse, verification."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages import executor, registry
from stages.core.config import load_config
from stages.core.errors import ArtifactError, DataError
from stages.core.stage import Stage
from stages.executor import call_key
from stages.stage_call import StageCall
from stages.storage.artifacts import ArtifactRef, cache_key, read_manifest, verify
from stages.storage.stores import LocalStore


def fake_stage(calls: list, fail: bool = False):
    """A stand-in stage's run(): writes two files, or half of them and then fails."""

    def run(cfg, inputs, out: Path, tracker):
        calls.append(out)
        (out / "a.txt").write_text("alpha")
        if fail:
            raise DataError("corpus.source: simulated failure halfway")
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(b"\x00\x01")
        return {"answer": 42}

    return run


def declare(monkeypatch, runs: dict, sections=("tokenizer",), inputs=()) -> None:
    """Register fake stages (name -> run function), as the stage modules declare real ones."""
    specs = {name: Stage(name, "a test stage", sections, inputs, (), run) for name, run in runs.items()}
    real = registry.stage
    monkeypatch.setattr(registry, "stage", lambda name: specs[name] if name in specs else real(name))


@pytest.fixture
def patched(monkeypatch):
    calls: list = []
    declare(monkeypatch, {"ok": fake_stage(calls), "bad": fake_stage(calls, fail=True)})
    return calls


def test_cache_key_depends_on_config_inputs_and_code():
    ref = ArtifactRef("tokenizer", "/x", "d1")
    base = cache_key("data", {"a": 1}, {"tokenizer": ref}, "v1")
    assert base == cache_key("data", {"a": 1}, {"tokenizer": ref}, "v1")
    assert base != cache_key("data", {"a": 2}, {"tokenizer": ref}, "v1")
    assert base != cache_key("data", {"a": 1}, {"tokenizer": ArtifactRef("tokenizer", "/x", "d2")}, "v1")
    assert base != cache_key("data", {"a": 1}, {"tokenizer": ref}, "v2")


def test_run_publishes_then_reuses(tmp_path: Path, patched):
    store = LocalStore(tmp_path)
    cfg = load_config(None)
    first = executor.run_stage("ok", cfg, {}, store)
    assert not first.reused and first.manifest.metrics == {"answer": 42}
    manifest = read_manifest(Path(first.ref.uri))
    assert set(manifest.files) == {"a.txt", "sub/b.bin"}
    verify(Path(first.ref.uri))
    second = executor.run_stage("ok", cfg, {}, store)
    assert second.reused and second.ref == first.ref
    assert len(patched) == 1  # the stage body ran once
    changed = executor.run_stage("ok", load_config(None, ["tokenizer.vocab_size=512"]), {}, store)
    assert not changed.reused and changed.ref.uri != first.ref.uri


def test_failed_stage_leaves_nothing_reusable(tmp_path: Path, patched):
    store = LocalStore(tmp_path)
    with pytest.raises(DataError):
        executor.run_stage("bad", load_config(None), {}, store)
    assert list((tmp_path / "bad").iterdir()) == []  # the scratch directory is gone
    assert store.find("bad", call_key(StageCall.for_recipe("bad", load_config(None), {}))) is None


def test_tampered_artifact_is_refused(tmp_path: Path, patched):
    store = LocalStore(tmp_path)
    result = executor.run_stage("ok", load_config(None), {}, store)
    (Path(result.ref.uri) / "a.txt").write_text("alphA")
    with pytest.raises(ArtifactError, match=r"a\.txt: sha256 .* does not match"):
        store.materialize(result.ref)


def test_missing_input_is_named(tmp_path: Path, monkeypatch):
    declare(monkeypatch, {"data": lambda *a: {}}, sections=(), inputs=("tokenizer",))
    with pytest.raises(ArtifactError, match="needs input artifact.*tokenizer"):
        executor.run_stage("data", load_config(None), {}, LocalStore(tmp_path))


def test_code_version_follows_a_stages_own_imports():
    from stages.storage.artifacts import _local_imports, code_version

    root = Path(__file__).resolve().parents[1] / "stages"
    assert "stages.storage.corpus" in _local_imports(root / "tokenizer.py", "stages")
    assert "stages.lm.model" not in _local_imports(root / "tokenizer.py", "stages")
    assert code_version("stages.tokenizer") != code_version("stages.pretrain")
    assert code_version("stages.tokenizer") == code_version("stages.tokenizer")
