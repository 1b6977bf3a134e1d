"""Helpers for the model / training / pretrain tests: micro configs, toy token streams, fake artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stages.core.config import TrainConfig
from stages.lm.model import GPT, GPTConfig
from stages.storage.artifacts import ArtifactRef, Manifest, files_digest, hash_files
from stages.storage.shards import INDEX, ShardWriter, dtype_for
from stages.storage.stores import LocalStore

VOCAB = 500


def micro_config(**overrides) -> TrainConfig:
    """A training config that runs in well under a second per step on one CPU thread."""
    values = dict(
        max_steps=30,
        batch_size=8,
        lr=3e-3,
        warmup_steps=3,
        eval_interval=10,
        eval_batches=2,
        log_interval=5,
        device="cpu",
        seed=7,
    )
    values.update(overrides)
    return TrainConfig(**values)


def micro_model(vocab: int = VOCAB, block: int = 32, seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=64, block_size=block, dropout=dropout))


def repetitive_stream(vocab: int = VOCAB, length: int = 4000, period: int = 17, seed: int = 0) -> np.ndarray:
    """A short random phrase repeated: easy to learn, so a working loop drives the loss down fast."""
    phrase = np.random.default_rng(seed).integers(0, vocab, size=period)
    return np.tile(phrase, length // period + 1)[:length].astype(np.int64)


class StreamBatches:
    """Random windows of a token array, a pure function of (step, micro) like the real batches."""

    def __init__(self, tokens: np.ndarray, block: int, batch: int, seed: int = 0):
        self.tokens, self.block, self.batch, self.seed = torch.from_numpy(tokens), block, batch, seed

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        starts = torch.randint(0, len(self.tokens) - self.block - 1, (self.batch,), generator=gen)
        rows = torch.stack([self.tokens[s : s + self.block + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


def write_shards(directory: Path, splits: dict[str, np.ndarray], vocab: int = VOCAB, eos_id: int = 2) -> Path:
    """A data artifact's files (shards + shards.json) written the way the data stage writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(vocab)
    index = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": eos_id, "splits": {}}
    for split, tokens in splits.items():
        writer = ShardWriter(directory, split, dtype, shard_tokens=max(len(tokens) // 2, 1))  # two files: cross them
        writer.write(tokens)
        writer.close()
        index["splits"][split] = {
            "files": writer.files,
            "tokens": writer.tokens,
            "documents": 1,
            "bytes": 3 * writer.tokens,
        }
    (directory / INDEX).write_text(json.dumps(index), encoding="utf-8")
    return directory


def fake_artifact(store: LocalStore, stage: str, fill) -> ArtifactRef:
    """Publish a hand-made stage output in ``store`` (``fill(directory)`` writes its files)."""
    scratch = store.scratch(stage, "fake")
    fill(scratch)
    files = hash_files(scratch)
    manifest = Manifest(
        stage=stage,
        key=f"fake-{files_digest(files)[:12]}",
        config={},
        inputs={},
        code_version="test",
        files=files,
        digest=files_digest(files),
    )
    return store.commit(scratch, manifest)
