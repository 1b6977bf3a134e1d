"""The artifact contract: content keys, atomic publication, reuse, verification."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from stages import runner
from stages.core.config import load_config
from stages.core.errors import ArtifactError, DataError
from stages.registry import Stage
from stages.storage.artifacts import ArtifactRef, cache_key, read_manifest, verify
from stages.storage.stores import LocalStore


def fake_stage(calls: list, fail: bool = False):
    """A stand-in stage module: writes two files, or half of them and then fails."""

    def run(cfg, inputs, out: Path, tracker):
        calls.append(out)
        (out / "a.txt").write_text("alpha")
        if fail:
            raise DataError("corpus.source: simulated failure halfway")
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(b"\x00\x01")
        return {"answer": 42}

    return types.SimpleNamespace(run=run)


def declare(monkeypatch, modules: dict, sections=("tokenizer",), inputs=()) -> None:
    """Register fake stages (name -> module) with the runner, as ``stages.registry`` declares real ones."""
    specs = {name: Stage(name, "a test stage", sections, inputs) for name in modules}
    monkeypatch.setattr(runner, "stage", lambda name: specs[name])
    monkeypatch.setattr(runner, "stage_module", lambda name: modules[name])


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
    first = runner.run_stage("ok", cfg, {}, store)
    assert not first.reused and first.manifest.metrics == {"answer": 42}
    manifest = read_manifest(Path(first.ref.uri))
    assert set(manifest.files) == {"a.txt", "sub/b.bin"}
    verify(Path(first.ref.uri))
    second = runner.run_stage("ok", cfg, {}, store)
    assert second.reused and second.ref == first.ref
    assert len(patched) == 1  # the stage body ran once
    changed = runner.run_stage("ok", load_config(None, ["tokenizer.vocab_size=512"]), {}, store)
    assert not changed.reused and changed.ref.uri != first.ref.uri


def test_failed_stage_leaves_nothing_reusable(tmp_path: Path, patched):
    store = LocalStore(tmp_path)
    with pytest.raises(DataError):
        runner.run_stage("bad", load_config(None), {}, store)
    assert list((tmp_path / "bad").iterdir()) == []  # the scratch directory is gone
    assert store.find("bad", runner.stage_key("bad", load_config(None), {})) is None


def test_tampered_artifact_is_refused(tmp_path: Path, patched):
    store = LocalStore(tmp_path)
    result = runner.run_stage("ok", load_config(None), {}, store)
    (Path(result.ref.uri) / "a.txt").write_text("alphA")
    with pytest.raises(ArtifactError, match=r"a\.txt: sha256 .* does not match"):
        store.materialize(result.ref)


def test_missing_input_is_named(tmp_path: Path, monkeypatch):
    declare(monkeypatch, {"data": types.SimpleNamespace(run=lambda *a: {})}, sections=(), inputs=("tokenizer",))
    with pytest.raises(ArtifactError, match="needs input artifact.*tokenizer"):
        runner.run_stage("data", load_config(None), {}, LocalStore(tmp_path))


def test_code_version_follows_a_stages_own_imports():
    from stages.storage.artifacts import _local_imports, code_version

    root = Path(__file__).resolve().parents[1] / "stages"
    assert "stages.storage.corpus" in _local_imports(root / "tokenizer.py", "stages")
    assert "stages.lm.model" not in _local_imports(root / "tokenizer.py", "stages")
    assert code_version("stages.tokenizer") != code_version("stages.pretrain")
    assert code_version("stages.tokenizer") == code_version("stages.tokenizer")


def test_keys_cover_only_the_code_that_shapes_an_output(tmp_path: Path, monkeypatch):
    """Editing the MLflow adapter or a field's description re-keys nothing; editing the model re-keys pretrain."""
    import shutil

    from stages.registry import STAGES
    from stages.storage import artifacts

    package = Path(__file__).resolve().parents[1] / "stages"
    copy = tmp_path / "stages"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    fake_file = copy / "storage" / "artifacts.py"
    monkeypatch.setattr(artifacts, "__file__", str(fake_file))

    def versions() -> dict[str, str]:
        return {s.name: artifacts.code_version(s.module) for s in STAGES}

    before = versions()
    assert len(set(before.values())) == len(before)  # every stage has its own code

    tracking = copy / "core" / "tracking.py"
    tracking.write_text(tracking.read_text() + "\n\ndef register_onnx_v2():\n    return None\n")
    config = copy / "core" / "config.py"
    text = config.read_text()
    assert 'description="Recipe name, used in run names and tags."' in text
    config.write_text(text.replace('description="Recipe name, used in run names and tags."', 'description="Renamed."'))
    assert versions() == before

    model = copy / "lm" / "model.py"
    model.write_text(model.read_text() + "\n# a change to the model code\nEXTRA = 1\n")
    after = versions()
    assert after["pretrain"] != before["pretrain"]
    assert after["tokenizer"] == before["tokenizer"] and after["data"] == before["data"]
    assert all(after[name] != before[name] for name in ("finetune", "evaluate", "export"))
