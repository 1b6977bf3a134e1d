"""The MLflow model registry: an export registered once per content digest as a pyfunc chat model,
and the aliases that say which version serves: ``challenger`` (the newest) and ``champion`` (moved by
the promotion gate, ``gptpipe promote`` and ``gptpipe rollback``, each move recorded in the model's
history). Who should be champion is decided in ``stages.serving.promotion``; the tag names are in
``stages.serving.version_tags``.

It lives above ``stages.core`` because it reads the export's files and serving runtime
(``stages.lm``) and ships the served code found from the import graph (``stages.storage``);
``stages.core.tracking`` stays the run adapter every stage uses and imports nothing above ``core``.
mlflow is imported inside functions, as in the tracking adapter, so importing this stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.core.errors import GptpipeError
from stages.core.tracking import MlflowTracker
from stages.serving.version_tags import (
    CHALLENGER,
    CHAMPION,
    COMPARED_TAG,
    DECISION_TAG,
    HISTORY_KEPT,
    HISTORY_TAG,
    PENDING,
    REASONS_TAG,
)


def find_version(client: Any, name: str, digest: str) -> Any | None:
    """The version of ``name`` already registered for this exact export (same content digest)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("gptpipe.digest") == digest), None)


# What the served model needs besides mlflow itself: no torch (stages.formats.served runs without it).
PYFUNC_REQUIREMENTS = ("onnxruntime", "onnxruntime-genai", "sentencepiece", "numpy")
# The served model's code is what opening the served runtime imports, found from its import graph (so a
# module it starts to need cannot be left behind): shipped in the model's code/ folder.
PYFUNC_ENTRY = "stages.formats.served"


# The export's files the served model carries (model.pt2 and the int8 twin stay in the store).
def _pyfunc_files() -> tuple[str, ...]:
    from stages.formats.layout import KV_GRAPH, LOGITS_GRAPH, META_FILE

    return LOGITS_GRAPH, KV_GRAPH, f"{LOGITS_GRAPH}.data", f"{KV_GRAPH}.data", META_FILE


def _versions(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def save_pyfunc(export_dir: str | Path, path: str | Path) -> Path:
    """Write an MLflow pyfunc model folder (``MLmodel`` at its root) for an export artifact.

    ``stages/core/pyfunc.py`` is the model code; the export's graphs, ``export.json`` and
    tokenizer go to ``artifacts/onnx``; the few ``stages`` modules generation needs go to
    ``code/stages``; requirements are onnxruntime, sentencepiece and numpy pinned to the
    versions here (MLflow adds itself). The signature has no input schema (the model takes a
    string, strings, ``prompt`` or ``messages`` rows and checks them itself), the params
    ``max_new_tokens``, ``temperature``, ``top_k``, ``seed``, and the reply text as output.
    """
    import shutil
    import tempfile
    import warnings

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    with warnings.catch_warnings():  # "add type hints to predict": deliberately absent (see pyfunc)
        warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
        from stages.serving import pyfunc

    export_dir, path = Path(export_dir), Path(path)
    package = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="gptpipe-pyfunc-") as scratch:
        onnx_dir = Path(scratch) / pyfunc.ARTIFACT
        onnx_dir.mkdir()
        from stages.formats.layout import KV_GRAPH, TOKENIZER_DIR

        for name in _pyfunc_files():
            if (export_dir / name).is_file():
                shutil.copy2(export_dir / name, onnx_dir / name)
        if not (onnx_dir / KV_GRAPH).is_file() or not (export_dir / TOKENIZER_DIR).is_dir():
            raise GptpipeError(f"{export_dir}: no {KV_GRAPH} or {TOKENIZER_DIR}/ to serve; rerun stage 'export'")
        shutil.copytree(export_dir / TOKENIZER_DIR, onnx_dir / TOKENIZER_DIR)
        from stages.formats.served import served_runtime

        served = served_runtime(export_dir)
        if (export_dir / served).is_dir():  # an onnxruntime-genai folder the export certified as fastest
            shutil.copytree(export_dir / served, onnx_dir / served)
        code = Path(scratch) / "code" / "stages"
        from stages.storage.artifacts import code_modules, module_files

        for relative in module_files(code_modules(PYFUNC_ENTRY, leave_out=())):
            (code / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package / relative, code / relative)
        # No input schema, on purpose: MLflow enforces one on every predict input before the model
        # sees it, and no schema lets the four accepted shapes through. With the named columns
        # prompt/messages, a string or a list of strings became column 0, which enforcement drops
        # with only a warning: predict("...") answered []. The model checks its input itself
        # (pyfunc.requests: the shapes it takes, a one-line error for anything else). The
        # params schema stays (without it MLflow drops params) and the input example shows a call.
        signature = ModelSignature(
            inputs=None,
            outputs=Schema([ColSpec("string")]),
            params=ParamSchema(
                [ParamSpec(k, "long" if isinstance(v, int) else "double", v) for k, v in pyfunc.DEFAULT_PARAMS.items()]
            ),
        )
        example = (pd.DataFrame({"prompt": ["Reverse: a b c"]}), {"max_new_tokens": 16})
        with warnings.catch_warnings():  # "add type hints to predict": deliberately absent (see pyfunc)
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            mlflow.pyfunc.save_model(
                path=str(path),
                python_model=pyfunc.__file__,
                artifacts={pyfunc.ARTIFACT: str(onnx_dir)},
                code_paths=[str(code)],
                signature=signature,
                input_example=example,
                pip_requirements=[_versions(name) for name in PYFUNC_REQUIREMENTS],
            )
    return path


def register_onnx(
    tracker: MlflowTracker,
    name: str,
    export_dir: str | Path,
    parity: dict[str, Any],
    digest: str,
    artifact_uri: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register the exported ONNX graph as a version of model ``name`` (once per export digest).

    ``onnx_model/`` in ``tracker``'s run is an MLflow pyfunc model (``save_pyfunc``: the graphs
    and tokenizer under ``artifacts/onnx``, the generation code, ``MLmodel``) plus
    ``parity.json``, so ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` and
    ``mlflow models serve`` work on the version; the version's source is that folder, and the parity figures, the
    export's content digest and its artifact-store location become version tags, so the
    registry entry explains itself; ``extra_tags`` (``version_tags``: evaluation, lineage) join them,
    and the promotion decision starts as ``pending`` until ``record_decision`` writes it. An export
    already registered (same digest) is not registered twice: like a reused stage, its existing
    version is returned, tags and aliases untouched.
    Returns ``{"name", "version", "source", "run_id", "reused"}``.
    """
    from mlflow.exceptions import MlflowException

    existing = find_version(tracker.client, name, digest)
    if existing is not None:
        tracker.set_tags({"gptpipe.registered_model": f"{name}/{existing.version}"})
        return {
            "name": name,
            "version": str(existing.version),
            "source": existing.source,
            "run_id": existing.run_id,
            "reused": True,
        }
    import tempfile

    export_dir = Path(export_dir)
    from stages.formats.layout import LOGITS_GRAPH

    graph = export_dir / LOGITS_GRAPH
    if not graph.is_file():
        raise GptpipeError(f"{export_dir}: no {LOGITS_GRAPH} to register; run stage 'export' first")
    client = tracker.client
    with tempfile.TemporaryDirectory(prefix="gptpipe-register-") as scratch:
        tracker.log_artifact(save_pyfunc(export_dir, Path(scratch) / "onnx_model"), "onnx_model")
    figures = {k: v for k, v in parity.items() if isinstance(v, (int, float, str, bool))}
    client.log_text(tracker.run_id, json.dumps(figures, indent=2, sort_keys=True), "onnx_model/parity.json")
    tags = {f"parity.{k}": str(v) for k, v in figures.items()}
    if parity.get("certificate"):  # one tag per format: the export's equivalence certificate
        from stages.formats.certificate import certificate_tags

        tags.update(certificate_tags(parity["certificate"]))
        tags["gptpipe.served_runtime"] = str(parity.get("serve", ""))
    tags.update(extra_tags or {})
    tags[DECISION_TAG] = PENDING
    tags["gptpipe.digest"] = digest
    if artifact_uri:
        tags["gptpipe.artifact"] = artifact_uri
    try:
        try:
            client.create_registered_model(
                name, description="A gptpipe GPT: ONNX graphs served as an MLflow pyfunc chat model"
            )
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
        source = f"{client.get_run(tracker.run_id).info.artifact_uri}/onnx_model"
        version = client.create_model_version(
            name,
            source,
            run_id=tracker.run_id,
            tags=tags,
            description="pyfunc chat model over the export's served runtime + tokenizer; model.onnx; parity.json; "
            "gptpipe.certificate.* tags: the equivalence certificate",
        )
    except MlflowException as exc:
        raise GptpipeError(f"MLflow model registry at {tracker.tracking_uri}: {str(exc).splitlines()[0]}") from None
    tracker.set_tags({"gptpipe.registered_model": f"{name}/{version.version}"})
    return {"name": name, "version": str(version.version), "source": source, "run_id": tracker.run_id, "reused": False}


# ---- the aliases (stages.serving.promotion decides who is champion; version_tags names the tags)


def _missing(exc: Exception) -> bool:
    """MLflow's 'no such model / version / alias' (an unknown alias is INVALID_PARAMETER_VALUE)."""
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc)


def champion(client: Any, name: str, alias: str = CHAMPION) -> Any | None:
    """The ModelVersion holding ``alias`` (default ``champion``) of model ``name``; None when none does."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise GptpipeError(f"MLflow model registry: {name}@{alias}: {str(exc).splitlines()[0]}") from None


def version_or_none(client: Any, name: str, version: str) -> Any | None:
    """Version ``version`` of ``name``; None when the model or the version does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise GptpipeError(f"MLflow model registry: {name} version {version}: {str(exc).splitlines()[0]}") from None


def model_version(client: Any, name: str, version: str) -> Any:
    """Version ``version`` of ``name``, or one line saying which versions exist."""
    found = version_or_none(client, name, version)
    if found is not None:
        return found
    known = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), reverse=True)
    if not known:
        raise GptpipeError(f"model {name!r} has no registered versions; run the pipeline first (or pass --model)")
    raise GptpipeError(f"model {name!r} has no version {version}; its versions: {', '.join(map(str, known[:20]))}")


def history(client: Any, name: str) -> list[dict[str, Any]]:
    """The registered model's champion moves, oldest first ([] before the first)."""
    tags = client.get_registered_model(name).tags or {}
    try:
        entries = json.loads(tags.get(HISTORY_TAG, "[]"))
    except ValueError:
        raise GptpipeError(
            f"model {name!r}: tag {HISTORY_TAG} is not JSON; fix or delete it in the MLflow UI"
        ) from None
    return entries if isinstance(entries, list) else []


def move_champion(client: Any, name: str, version: str, by: str, reason: str) -> dict[str, str]:
    """Point ``champion`` at ``version`` and record the move: in the model's history, and on the version
    (``gptpipe.promotion.by`` / ``.at`` / ``.reason``: the last time it became champion). Returns the entry."""
    from stages.serving.promotion import history_entry

    entry = history_entry(str(version), by, reason)
    moves = history(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if not moves or (moves[-1].get("version"), moves[-1].get("by")) != (entry["version"], by):  # a retry: once
        moves.append(entry)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(moves[-HISTORY_KEPT:]))
    for key in ("by", "at", "reason"):
        client.set_model_version_tag(name, str(version), f"gptpipe.promotion.{key}", entry[key])
    return entry


def record_decision(client: Any, name: str, version: str, decision: Any, compared_with: str | None) -> None:
    """The gate on a newly registered version: ``challenger`` moves to it, ``champion`` too when the
    decision promotes; then the decision tags replace ``pending`` (the last write: a retry finds it done)."""
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    if decision.promote:
        move_champion(client, name, version, "gate", "; ".join(decision.reasons))
    tags = {
        DECISION_TAG: decision.label,
        REASONS_TAG: json.dumps(decision.reasons),
        COMPARED_TAG: compared_with or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
