"""Helpers for the chat / generation / fine-tuning tests: a character tokenizer and a tiny GPT.

The character tokenizer has the same surface as ``stages.tokenizer.Tokenizer`` (encode,
decode, special ids) so the chat template and generation can be tested without training
SentencePiece.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages import registry
from stages.core.config import PipelineConfig, load_config
from stages.executor import run_stage
from stages.lm.chat import Message
from stages.lm.model import GPT, GPTConfig
from stages.storage.artifacts import ArtifactRef
from stages.storage.stores import LocalStore

SPECIALS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class CharTokenizer:
    """One id per printable ASCII character, after the special tokens."""

    def __init__(self) -> None:
        self.chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.special = {tok: i for i, tok in enumerate(SPECIALS)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.offset = len(SPECIALS)
        self.vocab_size = self.offset + len(self.chars)
        self._index = {ch: self.offset + i for i, ch in enumerate(self.chars)}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self._index[ch] for ch in text if ch in self._index]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        names = {i: tok for tok, i in self.special.items()}
        out = []
        for i in ids:
            i = int(i)
            if i >= self.offset:
                out.append(self.chars[i - self.offset])
            elif i not in (self.pad_id, self.bos_id, self.eos_id):
                out.append(names[i])
        return "".join(out)


def write_chat_jsonl(conversations: list[list[Message]], path: str | Path) -> None:
    """Chat JSONL as people write it: one ``{"messages": [...]}`` per line, non-ASCII (U+2028
    included) unescaped, as ``json.dumps(..., ensure_ascii=False)`` leaves it."""
    with open(path, "w", encoding="utf-8") as handle:
        for messages in conversations:
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def tiny_gpt(vocab_size: int, block_size: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=block_size))


# --- a micro upstream (tokenizer -> data -> pretrain), see the ``micro_upstream`` fixture -------

ROOT = Path(__file__).resolve().parents[1]


def micro_config(*overrides: str) -> PipelineConfig:
    """configs/micro.yaml (2 layers, width 64, block 64, vocab 400) with 1 thread per stage."""
    return load_config(ROOT / "configs" / "micro.yaml", ["tokenizer.threads=1", "pretrain.threads=1", *overrides])


def build_micro_upstream(root: Path) -> tuple[LocalStore, dict[str, ArtifactRef]]:
    """Finished tokenizer, data and pretrain artifacts of the micro recipe in the store at ``root``.

    Each stage goes through the executor, so a store that already holds them (or a process that
    is building them under the stage lease) gives the same artifacts back without training again."""
    store = LocalStore(root)
    cfg = micro_config()
    refs: dict[str, ArtifactRef] = {}
    for name in registry.ORDER[: registry.ORDER.index("finetune")]:
        refs[name] = run_stage(name, cfg, dict(refs), store).ref
    return store, refs
