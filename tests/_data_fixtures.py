"""Small corpora and a micro tokenizer shared by the corpus, tokenizer and data tests.

The corpus is made on the spot: slices of the standard library's own sources (real code,
real indentation) plus a few documents with non-ASCII text, so every test runs offline
in well under a second of tokenizer training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.core.config import CorpusConfig, PipelineConfig, load_config
from stages.executor import StageResult, run_stage
from stages.lm.tokenizer import Tokenizer
from stages.storage.corpus import CorpusStats, iter_documents, stdlib_root
from stages.storage.shards import TokenShards
from stages.storage.splits import SPLITS, SplitRule
from stages.storage.stores import LocalStore

# Micro settings every test starts from: a tiny vocabulary trained on a few hundred KB.
MICRO = ["tokenizer.vocab_size=400", "tokenizer.train_bytes=200000", "tokenizer.threads=1", "data.workers=1"]

UNICODE_DOCS = [
    "Café crème brûlée: déjà vu à la française.\nNaïve façade, coöperate.\n",
    "漢字とかなの混じった文章です。\n中文也可以。\n",
    "Emoji 😀🚀✨ and symbols → ≤ ≥ ∑ π ∞ — “quotes”.\n",
    'def grüße(name: str) -> str:\n    """Say hello."""\n\treturn f\'Hallo {name} 👋\'\n',
]

# Text never seen in training: code with tabs, trailing spaces, blank lines and CRs, and
# characters the tiny vocabulary can only spell with byte fallback.
HELDOUT_TEXTS = [
    "class Ünïcödé:\n    def __init__(self):\n        self.x = {'漢字': 1, 'emoji': '🐍'}\n\n\n",
    "\tif x:\n\t\treturn  y   \n  \n    # trailing spaces   \n",
    "   leading spaces and\r\nwindows line ends\r\n",
    "\n\nstarts with newlines, ends without",
    "números 0123456789 and 3.14159e-10",
    " ",
    "\n",
]


def stdlib_documents(count: int, chars: int = 4000) -> list[str]:
    """The first ``chars`` characters of ``count`` standard-library modules (sorted, deterministic)."""
    root = stdlib_root()
    docs = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8")[:chars]
        if text.strip():
            docs.append(text)
        if len(docs) == count:
            break
    return docs


def write_corpus(directory: Path, documents: list[str], suffix: str = ".txt") -> Path:
    """One file per document, zero-padded names so sorted order is document order."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(documents):
        (directory / f"doc_{i:04d}{suffix}").write_text(doc, encoding="utf-8", newline="")
    return directory


def micro_config(*overrides: str) -> PipelineConfig:
    return load_config(None, [*MICRO, *overrides])


def run(stage: str, cfg: PipelineConfig, store_root: Path, inputs: dict | None = None) -> StageResult:
    return run_stage(stage, cfg, inputs or {}, LocalStore(store_root))


def read_documents(cfg: CorpusConfig) -> tuple[list[str], CorpusStats]:
    """Every document of the source as the stages stream it (``iter_documents``), and the stats."""
    stats = CorpusStats(source=cfg.source)
    return list(iter_documents(cfg, stats)), stats


def expected_splits(cfg: PipelineConfig) -> dict[str, list[str]]:
    """The corpus's documents, in corpus order, on the side ``data.seed``'s rule puts them
    (for a corpus where the rule leaves neither side empty: no repair)."""
    documents, _ = read_documents(cfg.corpus)
    rule = SplitRule.seeded(cfg.data.seed, cfg.data.val_fraction)
    sides = [rule.split(rule.score(doc), i) for i, doc in enumerate(documents)]
    splits = {split: [doc for doc, side in zip(documents, sides) if side == split] for split in SPLITS}
    assert all(splits.values()), "pick a corpus whose split needs no repair"
    return splits


def shard_documents(directory: Path | str, split: str, tokenizer: Tokenizer) -> list[str]:
    """The documents of one split of a data artifact, decoded one by one (EOS ends each)."""
    stream = TokenShards(directory, split)
    ids = stream.window(0, len(stream))
    ends = np.flatnonzero(ids == stream.eos_id)
    assert len(ends) == stream.documents and (not len(ids) or ends[-1] == len(ids) - 1)
    starts = [0, *(ends[:-1] + 1)]
    return [tokenizer.decode(ids[a:b], keep_special=True) for a, b in zip(starts, ends)]


def stdlib_lines() -> list[str]:
    """Non-blank lines of the standard library's top-level modules (deterministic, offline)."""
    lines: list[str] = []
    for path in sorted(stdlib_root().glob("*.py")):
        lines.extend(line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    return lines


def synthetic_corpus(directory: Path, total_bytes: int, file_bytes: int, seed: int = 0) -> Path:
    """``total_bytes`` of shuffled standard-library lines as files of about ``file_bytes`` each:
    a corpus of any size, made on the spot, the same for the same arguments."""
    import random

    rng = random.Random(seed)
    lines = stdlib_lines()
    directory.mkdir(parents=True, exist_ok=True)
    written, number = 0, 0
    while written < total_bytes:
        chunk, size = [], 0
        while size < min(file_bytes, total_bytes - written):
            line = lines[rng.randrange(len(lines))] + "\n"
            chunk.append(line)
            size += len(line.encode("utf-8"))
        (directory / f"part_{number:05d}.txt").write_text("".join(chunk), encoding="utf-8", newline="")
        written += size
        number += 1
    return directory
