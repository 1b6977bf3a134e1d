"""The artifact contract: references, manifests, content keys.

A stage output is a directory holding its files and a ``manifest.json`` written last.
Stages hand each other ``ArtifactRef`` values (where + what hash), never Python objects,
so two stages can run in different processes, containers or machines.
"""

from __future__ import annotations

import ast
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from stages.core.errors import ArtifactError

MANIFEST = "manifest.json"
# Inside a stage's work directory: resumable state that survives a failed attempt (``Store.scratch`` and
# ``Store.discard`` in stores.py keep it).
CHECKPOINTS = "checkpoints"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactRef:
    """Where a finished stage output lives (local path or s3:// URI) and the digest of its files."""

    stage: str
    uri: str
    digest: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> ArtifactRef:
        return cls(stage=data["stage"], uri=data["uri"], digest=data["digest"])


@dataclass
class Manifest:
    """Self-description of a stage output. ``digest`` covers every file listed in ``files``."""

    stage: str
    key: str
    config: dict[str, Any]
    inputs: dict[str, dict[str, str]]
    code_version: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    wall_time_s: float = 0.0
    digest: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST) -> Manifest:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an int too long to parse
            raise ArtifactError(f"{source}: not a valid gptpipe manifest ({_first_line(exc)})") from None
        if not isinstance(data, dict):
            raise ArtifactError(
                f"{source}: not a valid gptpipe manifest (expected a JSON object, got {type(data).__name__})"
            )
        _check_shape(data, source)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:  # named with repr: a key may hold a newline, and the message stays one line
            raise ArtifactError(
                f"{source}: not a valid gptpipe manifest (unexpected key(s) {', '.join(map(repr, unknown))})"
            )
        try:
            manifest = cls(**data)
        except TypeError as exc:  # missing top-level keys
            raise ArtifactError(f"{source}: not a valid gptpipe manifest ({_first_line(exc)})") from None
        for rel in manifest.files:
            check_relative(rel, source)
        return manifest


# Types of the manifest keys every reader relies on; a file that breaks them is refused whole,
# so no reader meets a list where it expects a mapping deep inside a stage.
_SHAPE = {
    "stage": str,
    "key": str,
    "code_version": str,
    "digest": str,
    "config": dict,
    "inputs": dict,
    "files": dict,
    "metrics": dict,
    "created_at": (int, float),
    "wall_time_s": (int, float),
}


def _check_shape(data: dict[str, Any], source: str) -> None:
    for name, kind in _SHAPE.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            raise ArtifactError(
                f"{source}: field {name!r} holds {type(data[name]).__name__}; not a valid gptpipe manifest"
            )
    for rel, sha in data.get("files", {}).items():
        if not isinstance(sha, str):
            raise ArtifactError(f"{source}: files[{rel!r}] holds {type(sha).__name__}, expected a sha256 string")
    for name, ref in data.get("inputs", {}).items():
        if not isinstance(ref, dict) or not all(isinstance(ref.get(k), str) for k in ("stage", "uri", "digest")):
            raise ArtifactError(f"{source}: inputs[{name!r}] is not a reference with stage, uri and digest strings")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_relative(rel: str, source: str) -> None:
    """Refuse manifest paths that could escape the artifact directory."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or "\0" in rel or path.parts[:1] == ("~",):
        raise ArtifactError(f"{source}: refusing file path {rel!r} (must be relative, inside the artifact)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` except the manifest, keyed by POSIX relative path."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(root).as_posix()] = sha256_file(path)
    return files


def files_digest(files: dict[str, str]) -> str:
    """One hash for a whole artifact: the sha256 of its sorted (path, sha256) list."""
    blob = "\n".join(f"{rel}\t{sha}" for rel, sha in sorted(files.items()))
    return hashlib.sha256(blob.encode()).hexdigest()


# Code that never shapes a stage's output stays out of every code version. By package:
# ``stages.core`` is the framework around the stages — the recipe schema (its resolved values are
# in the key already; its descriptions and messages are not), the stage declaration, error types,
# progress bars, the MLflow adapter — and holds nothing else (a test keeps it so). Add to that
# the registry, the executor and its launchers, and where outputs are kept (this module and the
# stores): the key covers what they pass a stage, not how they are written.
NOT_OUTPUT_SHAPING = (
    "stages.core",
    "stages.registry",
    "stages.executor",
    "stages.launchers",
    "stages.stage_call",
    "stages.storage.artifacts",
    "stages.storage.stores",
    "stages.storage.s3",
)


def shapes_outputs(module: str, leave_out: tuple[str, ...] = NOT_OUTPUT_SHAPING) -> bool:
    """Whether ``module``'s code can change a stage's output (it is not in, or under, ``leave_out``)."""
    return not any(module == name or module.startswith(name + ".") for name in leave_out)


def _module_path(root: Path, name: str) -> Path | None:
    """File of module ``name`` (``stages.lm.model``) under the package ``root``, if it has one."""
    rel = name.split(".", 1)[1].replace(".", "/") if "." in name else ""
    for path in (root / f"{rel}.py", root / rel / "__init__.py"):
        if rel and path.is_file():
            return path
    return None


def _local_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that the file at ``path`` imports (statically, any depth in the file).

    ``from stages.lm import model`` names the module ``stages.lm.model``; ``from stages.lm.model
    import GPT`` names ``stages.lm.model`` (``GPT`` is not a module and is dropped later).
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package or node.module.startswith(package + "."):
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package + ".")}
    return found


def code_modules(module: str, leave_out: tuple[str, ...] = NOT_OUTPUT_SHAPING) -> list[str]:
    """``module`` and every ``stages`` module it imports, transitively, but for ``leave_out``
    (by default what cannot shape its output; pass ``()`` for everything it needs to run)."""
    root = Path(__file__).resolve().parents[1]
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_path(root, name)
        if name in seen or not shapes_outputs(name, leave_out) or path is None:
            continue
        seen.add(name)
        todo.extend(_local_imports(path, root.name))
    return sorted(seen)


def module_files(modules: list[str]) -> list[Path]:
    """The files of ``modules`` and of the packages above them, relative to the ``stages`` package."""
    root = Path(__file__).resolve().parents[1]
    files = set()
    for name in modules:
        parts = name.split(".")[1:]
        for depth in range(len(parts)):
            init = root.joinpath(*parts[:depth], "__init__.py")
            if init.is_file():
                files.add(init.relative_to(root))
        files.add(_module_path(root, name).relative_to(root))
    return sorted(files)


def code_version(module: str | None = None) -> str:
    """Hash of the code a stage runs: ``code_modules(module)``, or every file of the package.

    Editing ``finetune.py`` therefore invalidates fine-tuning and what follows, not the tokenizer;
    editing the MLflow adapter or a config field's description invalidates nothing.
    """
    root = Path(__file__).resolve().parents[1]
    if module is None:
        files = sorted(root.rglob("*.py"))
    else:
        files = sorted(_module_path(root, name) for name in code_modules(module))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(stage: str, config: dict[str, Any], inputs: dict[str, ArtifactRef], version: str) -> str:
    """Content key of a stage output: same stage, config, input content and code => same key."""
    blob = json.dumps(
        {
            "stage": stage,
            "config": config,
            "inputs": {name: ref.digest for name, ref in sorted(inputs.items())},
            "code": version,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; not a finished gptpipe artifact")
    return Manifest.from_json(path.read_text(encoding="utf-8"), str(path))


def verify(directory: Path, manifest: Manifest | None = None) -> Manifest:
    """Check every file against the manifest's sha256; raise naming the first mismatch."""
    manifest = manifest or read_manifest(directory)
    root = Path(directory).resolve()
    for rel, expected in manifest.files.items():
        check_relative(rel, f"{directory}/{MANIFEST}")  # also for a manifest built in memory
        path = directory / rel
        if not path.resolve().is_relative_to(root):  # a symlink (file or folder) pointing out of it
            raise ArtifactError(f"{path}: a link out of the artifact (to {path.resolve()}); refusing to read it")
        if not path.is_file():
            raise ArtifactError(
                f"{directory}: file {rel} listed in the manifest is missing; rerun stage '{manifest.stage}'"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest ({expected[:12]}…); "
                f"the artifact was modified — delete it and rerun stage '{manifest.stage}'"
            )
    if files_digest(manifest.files) != manifest.digest:
        raise ArtifactError(f"{directory}/{MANIFEST}: digest does not match its file list; the manifest was edited")
    return manifest
