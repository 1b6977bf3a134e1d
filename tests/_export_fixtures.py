"""Fixtures for the export and publish tests: a tiny tokenizer and model committed as artifacts.

Nothing is trained but the tokenizer (about a second): the parity gate compares two runtimes
on the same weights, so random weights exercise it as well as trained ones.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.core.config import TokenizerConfig, parse_config
from stages.lm.model import GPT, GPTConfig
from stages.lm.tasks import make_items
from stages.lm.tokenizer import Tokenizer
from stages.lm.tokenizer_training import train_model, write_artifact
from stages.storage.artifacts import ArtifactRef, Manifest, files_digest, hash_files
from stages.storage.stores import LocalStore
from stages.training.checkpoint_format import save_model
from tests._sft_fixtures import write_chat_jsonl

# The shape every export test uses: small enough that one export takes seconds on 2 cores.
MICRO = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}


def tokenizer_documents() -> list[str]:
    """Chat-task text plus this repository's own source: enough pieces for a 400-id vocabulary."""
    docs = [f"{item.prompt}\n{item.answer}" for item in make_items(400, "train", 0)]
    root = Path(__file__).resolve().parents[1] / "stages"
    docs += [path.read_text(encoding="utf-8") for path in sorted(root.glob("*.py"))]
    return docs


def commit(store: LocalStore, stage: str, key: str, build) -> ArtifactRef:
    """Write files with ``build(dir)`` and commit them as a finished artifact of ``stage``."""
    scratch = store.scratch(stage, key)
    build(scratch)
    files = hash_files(scratch)
    manifest = Manifest(
        stage=stage, key=key, config={}, inputs={}, code_version="test", files=files, digest=files_digest(files)
    )
    return store.commit(scratch, manifest)


def make_tokenizer(store: LocalStore) -> ArtifactRef:
    cfg = TokenizerConfig(vocab_size=400, threads=1)

    def build(out: Path) -> None:
        write_artifact(Tokenizer(train_model(tokenizer_documents(), cfg)), cfg, out)

    return commit(store, "tokenizer", "tiny", build)


def make_model(store: LocalStore, stage: str, vocab_size: int, seed: int = 0, heldout: int = 0, **shape) -> ArtifactRef:
    """A randomly initialised GPT saved the way pretrain/finetune save theirs (``model/``),
    with ``heldout`` held-out conversations in ``heldout.jsonl`` as finetune writes them."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, **{**MICRO, **shape}))

    def build(out: Path) -> None:
        save_model(out / "model", model)
        if heldout:
            write_chat_jsonl([item.messages() for item in make_items(heldout, "heldout", 1)], out / "heldout.jsonl")

    return commit(store, stage, f"seed{seed}", build)


def export_config(store: Path, **export):
    """A recipe whose export section is small and quick (1 thread: the machine is shared; no int4 twin
    unless a test asks for one). A format's section given as a dict is merged over these defaults."""
    fields: dict = {
        "generation_prompts": 3,
        "generation_tokens": 12,
        "parity_shapes": 2,
        "threads": 1,
        "quantized": {"enabled": False},
    }
    for key, value in export.items():
        fields[key] = {**fields.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config({"artifacts": {"store": str(store)}, "export": fields})


@dataclass
class Exported:
    """A finished export artifact of the micro model, and what produced it."""

    cfg: Any
    inputs: dict[str, ArtifactRef]
    export_dir: Path
    metrics: dict
    model_dir: Path
    vocab_size: int


def exported(tmp_path_factory, n_layer: int | None = None) -> Exported:
    """Export the micro model once per session: every caller shares one store under pytest's
    base temp dir, so a second caller gets the executor's cached artifact (same content key).
    ``n_layer`` exports a deeper micro model (its own store, no int8) for the architecture view."""
    from stages.executor import run_stage

    root = tmp_path_factory.getbasetemp() / ("export-store" if n_layer is None else f"export-store-{n_layer}")
    store = LocalStore(root)
    tokenizer = make_tokenizer(store)
    vocab_size = Tokenizer.load(tokenizer.uri).vocab_size
    shape = {} if n_layer is None else {"n_layer": n_layer}
    model = make_model(store, "finetune", vocab_size, heldout=20, **shape)
    # Random weights: int4 moves bits per byte more than a trained model's, so the micro export's
    # quantized variant is held to a loose bound; tests/test_genai.py rejects a damaged one.
    cfg = export_config(
        root, int8={"enabled": n_layer is None}, quantized={"enabled": True, "precision": "int4", "bpb_rise": 1.0}
    )
    inputs = {"tokenizer": tokenizer, "finetune": model}
    result = run_stage("export", cfg, inputs, store)
    return Exported(cfg, inputs, Path(result.ref.uri), result.manifest.metrics, Path(model.uri) / "model", vocab_size)


def reuse_graphs(good_dir: Path):
    """A stand-in for ``export_graphs`` that copies the good export's graphs (the ONNX gate then passes),
    so a test can damage one later format and watch its own gate fail."""

    def fake(model, out, opset, external, program):
        for name in ("model.onnx", "model_kv.onnx"):
            shutil.copy2(good_dir / name, out / name)
        return {"logits": "model.onnx", "kv": "model_kv.onnx"}

    return fake
