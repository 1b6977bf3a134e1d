"""Export formats are declared values: a new one is one module and one registry line, and each
format's description has one source. The export config nests per format, and an old flat key fails
in one line naming its new home."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _export_fixtures import export_config, make_model, make_tokenizer

from stages import export, publish
from stages.core.config import parse_config
from stages.core.errors import ConfigError
from stages.core.sections import MOVED_KEYS
from stages.core.stage import Output
from stages.core.tracking import MemoryTracker
from stages.formats import registry
from stages.formats.format import Format, GateResult
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import CERTIFICATE_FILE
from stages.storage.stores import LocalStore

REPO = Path(__file__).resolve().parents[1]
DUMMY_FILE = "dummy.txt"


def _write_dummy(job) -> None:
    (job.out / DUMMY_FILE).write_text(f"{job.model.cfg.n_layer} layers\n", encoding="utf-8")


def _gate_dummy(job, inputs: GateInputs) -> GateResult:
    """Reads its file back; its figures, certificate row and logged metric come from what it read."""
    layers = int((job.out / DUMMY_FILE).read_text(encoding="utf-8").split()[0])
    row = {"format": f"{DUMMY_FILE} (a test format)", "max_abs_diff": 0.0, "greedy": "—", "tokenizer": "—"}
    figures = {"layers": layers, "prompts_seen": len(inputs.prompts)}
    return GateResult(figures, [row], {"export.dummy_layers": float(layers)})


DUMMY = Format(
    name="dummy",
    files=(Output(DUMMY_FILE, "a format only this test declares"),),
    write=_write_dummy,
    gate=_gate_dummy,
)


def test_a_format_added_to_the_registry_is_exported_gated_and_certified(tmp_path, monkeypatch, caplog):
    store = LocalStore(tmp_path / "store")
    tokenizer = make_tokenizer(store)
    from stages.lm.tokenizer import Tokenizer

    model = make_model(store, "finetune", Tokenizer.load(tokenizer.uri).vocab_size, heldout=4)
    monkeypatch.setattr(registry, "FORMATS", (*registry.FORMATS, DUMMY))
    cfg = export_config(
        tmp_path / "store",
        pt2={"enabled": False},
        hf={"enabled": False},
        gguf={"enabled": False},
        genai={"enabled": False},
        generation_prompts=2,
        parity_shapes=1,
        serving={"timing_rounds": 1, "timing_tokens": 4},
    )
    out = tmp_path / "out"
    out.mkdir()
    tracker = MemoryTracker()
    with caplog.at_level(logging.INFO, logger="gptpipe.export"):
        metrics = export.run(cfg, {"tokenizer": Path(tokenizer.uri), "finetune": Path(model.uri)}, out, tracker)

    assert (out / DUMMY_FILE).read_text() == "2 layers\n"  # written
    assert metrics["dummy"] == {"layers": 2, "prompts_seen": 2}  # gated, its result in the metrics
    assert set(metrics["seconds"]["dummy"]) == {"write", "gate"}
    assert tracker.metrics["export.dummy_layers"] == [(None, 2.0)]  # logged
    names = [row["format"] for row in metrics["certificate"]]
    assert names[-1] == "dummy.txt (a test format)" and names[:3] == [
        "PyTorch (reference)",
        "model.onnx",
        "model_kv.onnx",
    ]
    assert "| dummy.txt (a test format) |" in (out / CERTIFICATE_FILE).read_text()  # in the certificate
    assert {"hf", "gguf", "genai", "quantized", "pt2"}.isdisjoint(metrics["seconds"])  # turned off: not run
    ran = [name for name in metrics["seconds"] if name != "timing"]
    progress = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("export ") and "/" in r.getMessage()
    ]
    said = [re.fullmatch(r"export (\d+)/(\d+): (\w+) written and gated in \d+\.\ds", line) for line in progress]
    assert all(said), progress  # one progress line per format, in order, the added one last
    assert list(dict.fromkeys((int(m[1]), int(m[2]), m[3]) for m in said)) == [
        (i, len(ran), name) for i, name in enumerate(ran, 1)
    ]


def test_each_format_description_is_the_one_export_and_publish_read():
    declared = {output.name: output.about for output in export.STAGE.outputs}
    for fmt in registry.FORMATS:
        for name, about in fmt.describe().items():
            assert declared[name] == about, name
            if name in fmt.viewer:
                assert publish.DESCRIPTIONS[name] == about, name
    viewable = {name for fmt in registry.FORMATS for name in fmt.viewer}
    assert set(publish.DESCRIPTIONS) == viewable
    assert next(iter(publish.DESCRIPTIONS)) == "architecture.onnx"  # the bundle opens on the picture


def test_every_format_is_declared_once_at_the_end_of_its_own_module():
    modules = {fmt.write.__module__ for fmt in registry.FORMATS}
    assert len(modules) == len(registry.FORMATS)
    for module in modules:
        body = ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text()).body
        last = body[-1]
        assert isinstance(last, ast.Assign) and [t.id for t in last.targets] == ["FORMAT"], module
    assert len({fmt.name for fmt in registry.FORMATS}) == len(registry.FORMATS)


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_an_old_flat_export_key_fails_in_one_line_naming_its_new_key(old):
    with pytest.raises(ConfigError) as caught:
        parse_config({"export": {old.split(".", 1)[1]: 1}}, "old.yaml")
    message = str(caught.value)
    assert "\n" not in message and f"'{old}' has moved" in message and MOVED_KEYS[old] in message


def test_the_nested_export_sections_validate_each_field():
    cfg = parse_config({"export": {"int8": {"enabled": True}, "quantized": {"precision": "int8", "items": 5}}})
    assert cfg.export.int8.enabled and cfg.export.quantized.precision == "int8" and cfg.export.quantized.items == 5
    with pytest.raises(ConfigError, match=r"export.quantized.precision = 'int3'"):
        parse_config({"export": {"quantized": {"precision": "int3"}}})
    with pytest.raises(ConfigError, match=r"did you mean 'export.onnx.opset'"):
        parse_config({"export": {"onnx": {"opsett": 18}}})


def test_the_export_stage_module_imports_no_deep_learning_stack():
    script = "import sys, stages.export\nprint(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _parameters(node: ast.FunctionDef) -> int:
    a = node.args
    return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)


def test_export_runs_in_a_short_loop_and_no_format_function_takes_more_than_eight_parameters():
    tree = ast.parse((REPO / "stages" / "export.py").read_text())
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 40
    paths = [REPO / "stages" / "export.py", *sorted((REPO / "stages" / "formats").rglob("*.py"))]
    wide = [
        f"{path.relative_to(REPO)}:{node.name}"
        for path in paths
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _parameters(node) > 8
    ]
    assert wide == []
