"""The stage contract: each stage declares itself, gets only what it declared, and its key covers exactly that.

These checks read the source (``ast``) where the rule is about code — no hand-typed stage lists, no
re-spelled output names, no import cycles — and run the executor where the rule is about behaviour.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from stages import executor, registry
from stages.core.config import load_config
from stages.core.stage import Sections, Stage
from stages.stage_call import StageCall
from stages.storage.stores import LocalStore

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("stages", "flows", "benchmarks", "tests")


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_stage_module_declares_its_stage():
    for name in registry.ORDER:
        declared = registry.stage(name)
        assert isinstance(declared, Stage) and declared.name == name and declared.module == f"stages.{name}"
        assert declared.outputs, f"stage {name} declares no outputs"
        assert set(declared.inputs) <= set(registry.ORDER[: registry.ORDER.index(name)])
    assert registry.model_stages() == ("pretrain", "finetune")


def _string_lists(path: Path) -> list[tuple[int, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            found.append((node.lineno, names))
    return found


def test_no_hand_typed_list_of_stage_names_outside_the_declarations():
    """Lists of stages derive from ``stages.registry``; a stage module may name its own inputs."""
    allowed = {ROOT / "stages" / "registry.py", *(ROOT / "stages" / f"{n}.py" for n in registry.ORDER)}
    offenders = []
    for path in python_files(*SOURCE_DIRS):
        if path in allowed:
            continue
        for line, names in _string_lists(path):
            named = {n for n in names if n in registry.ORDER}
            if len(named) >= 3:
                offenders.append(f"{path.relative_to(ROOT)}:{line} {sorted(named)}")
    assert offenders == []


def _declared_file_names() -> set[str]:
    """Every declared output that is a file name (directory names such as 'model' are ordinary words)."""
    return {o.name for s in registry.stages() for o in s.outputs if "." in o.name}


# Other files that happen to share a declared output's name, each spelled once where it is written.
SAME_NAME = {
    "index.html": ("Netron's own app page inside netron/ (stages/viewer/netron_page.py)",),
    "tokenizer.json": (
        "Hugging Face's tokenizer file inside the export's hf/ (stages/formats/llama/hf_checkpoint.py)",
    ),
}


def test_output_file_names_are_spelled_once_by_their_producer():
    """A reader opens ``curve.json`` through the producer's constant, never by re-typing it."""
    names = _declared_file_names()
    spelled: dict[str, list[str]] = {name: [] for name in names}
    for path in python_files("stages", "flows", "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled[node.value].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    respelled = {name: places for name, places in spelled.items() if len(places) != 1 + len(SAME_NAME.get(name, ()))}
    assert respelled == {}, "each declared output file name must be written exactly once (its constant)"


def _module_level_imports(path: Path) -> set[str]:
    """``stages`` modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.startswith("stages"):
                    found.add(child.module)
                    found |= {f"{child.module}.{a.name}" for a in child.names}
            elif isinstance(child, ast.Import):
                found |= {a.name for a in child.names if a.name.startswith("stages")}
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in python_files("stages"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    return {
        name: {m for m in _module_level_imports(path) if m in modules and m != name} for name, path in modules.items()
    }


def test_the_package_has_no_import_cycle_and_the_schema_imports_no_stage():
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    allowed = {"stages", "stages.core", "stages.registry", "stages.core.errors", "stages.core.sections"}
    allowed.add("stages.core.stage")
    assert graph["stages.core.config"] <= allowed, graph["stages.core.config"] - allowed


def test_run_receives_only_its_declared_sections(tmp_path, monkeypatch):
    """A stage that reads a section it did not declare fails at once, naming the declaration to add."""
    seen = []

    def run(cfg, inputs, out, tracker):
        seen.append(cfg)
        return {"vocab": cfg.tokenizer.vocab_size, "corpus": cfg.corpus.source}

    fake = Stage("peek", "reads too much", ("tokenizer",), (), (), run)
    real = registry.stage
    monkeypatch.setattr(registry, "stage", lambda name: fake if name == "peek" else real(name))
    with pytest.raises(AttributeError, match=r"stage 'peek' reads recipe field 'corpus'.*add 'corpus' to its STAGE"):
        executor.run_stage("peek", load_config(None), {}, LocalStore(tmp_path))
    assert isinstance(seen[0], Sections) and "tokenizer" in seen[0] and "corpus" not in seen[0]
    with pytest.raises(AttributeError, match="read-only"):
        seen[0].tokenizer = None
    assert not list((tmp_path / "peek").glob("*")), "nothing half-written is left"


def _keys(cfg, versions: dict[str, str]) -> dict[str, str]:
    """Each stage's content key for ``cfg``, with fixed input digests (only config and code vary)."""
    from stages.storage.artifacts import ArtifactRef, cache_key

    keys = {}
    for declared in registry.stages():
        call = StageCall.for_recipe(
            declared.name, cfg, {n: ArtifactRef(n, f"/in/{n}", "d-" + n) for n in registry.ORDER}
        )
        config = dict(call.config)  # the corpus fingerprint is the files': not what this test varies
        keys[declared.name] = cache_key(declared.name, config, executor.needed_inputs(call), versions[declared.name])
    return keys


def test_keys_move_with_what_shapes_outputs_and_nothing_else(tmp_path, monkeypatch):
    """On a copy of the package: progress bars and the MLflow adapter re-key nothing; the recipe's
    name re-keys publish alone (it titles the Netron pages); a model edit re-keys what runs the model."""
    from stages.storage import artifacts

    copy = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(artifacts, "__file__", str(copy / "storage" / "artifacts.py"))

    def versions() -> dict[str, str]:
        return {s.name: artifacts.code_version(s.module) for s in registry.stages()}

    cfg = load_config(ROOT / "configs" / "micro.yaml")
    before = _keys(cfg, versions())
    assert len(set(before.values())) == len(before)

    progress = copy / "core" / "progress.py"
    text = progress.read_text(encoding="utf-8")
    first_line = text.splitlines()[0]
    progress.write_text(
        text.replace(first_line, '"""Reworded."""', 1) + "\n# a comment on the bars\n", encoding="utf-8"
    )
    tracking = copy / "core" / "tracking.py"
    tracking.write_text(tracking.read_text(encoding="utf-8") + "\n\ndef log_more():\n    return None\n")
    assert _keys(cfg, versions()) == before, "progress and tracking shape no output"

    renamed = load_config(ROOT / "configs" / "micro.yaml", ["name=renamed-recipe"])
    changed = {n for n, k in _keys(renamed, versions()).items() if k != before[n]}
    assert changed == {"publish"}, changed

    model = copy / "lm" / "model.py"
    model.write_text(model.read_text(encoding="utf-8") + "\nEXTRA = 1\n", encoding="utf-8")
    after = _keys(cfg, versions())
    moved = {n for n in after if after[n] != before[n]}
    runs_the_model = {s.name for s in registry.stages() if "stages.lm.model" in artifacts.code_modules(s.module)}
    assert moved == runs_the_model and "tokenizer" not in moved and "pretrain" in moved


def test_core_holds_only_code_that_shapes_no_output():
    """``stages.core`` is outside every code version: a stage module must not import library code from it
    that writes outputs. What lives there is the framework, listed here so a new file is a decision."""
    core = sorted(p.stem for p in (ROOT / "stages" / "core").glob("*.py"))
    # cpu_threads: how idle threads wait, which moves the speed, never a number (benchmarks/cpu_wait_policy.py)
    assert core == ["__init__", "config", "cpu_threads", "errors", "progress", "sections", "stage", "tracking"]
