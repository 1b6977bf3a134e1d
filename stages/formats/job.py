"""One export in progress: the model, its tokenizer, the recipe's export section, the gate inputs built
once, and what the formats share (the traced program, a scratch Hugging Face checkpoint, the runtimes
the gates opened, which the serving timing reuses instead of opening them again).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.sections import ExportConfig
from stages.formats import layout, parity
from stages.formats.gate_inputs import GateInputs
from stages.lm.chat import Message, read_chat_jsonl
from stages.lm.model import GPT
from stages.lm.tasks import make_items
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import MANIFEST
from stages.training.checkpoint_format import HELDOUT


def heldout_conversations(model_artifact: Path, count: int, seed: int) -> tuple[list[list[Message]], str]:
    """The fine-tune's own held-out conversations when it saved them, else built-in held-out tasks."""
    path = model_artifact / HELDOUT
    if path.is_file():
        return read_chat_jsonl(path)[:count], HELDOUT
    return [item.messages() for item in make_items(count, "heldout", seed)], "synthetic tasks"


def gate_inputs(model: GPT, tokenizer: Tokenizer, cfg: ExportConfig, model_artifact: Path) -> GateInputs:
    """The one ``GateInputs`` of an export: every gate draws the same ids and prompts from ``export.seed``."""
    block = model.cfg.block_size
    rng = np.random.default_rng(cfg.seed)
    ids = parity.gate_inputs(cfg.parity_shapes, block, model.cfg.vocab_size, rng)
    odd = [rng.integers(0, model.cfg.vocab_size, size=(3, max(2, block // 3)), dtype=np.int64)]
    count = max(cfg.heldout_items, cfg.generation_prompts)
    # One read for both sets: the file's first lines, or the seeded task stream's first items, are
    # the same whatever count is asked for, so the shorter set is a prefix of the longer one.
    quality_count = cfg.quantized.items if cfg.quantized.enabled else 0
    read, source = heldout_conversations(model_artifact, max(count, quality_count), cfg.seed)
    conversations, quality = read[:count], read[:quality_count]
    prompts = parity.parity_prompts(
        tokenizer, conversations, cfg.generation_prompts, block, cfg.generation_tokens, cfg.seed
    )
    return GateInputs(
        ids=ids,
        odd_ids=odd,
        prompts=prompts,
        conversations=conversations,
        heldout_source=source,
        quality_conversations=quality,
        tolerance=cfg.tolerance,
        new_tokens=cfg.generation_tokens,
        threads=cfg.threads,
    )


@dataclass
class ExportJob:
    """What the formats of one export write from and share."""

    model: GPT
    tokenizer: Tokenizer
    out: Path
    cfg: ExportConfig
    external: bool  # weights beside the graphs (export.onnx.external_data, or a model over 2 GB)
    graphs: dict[str, str] = field(default_factory=dict)  # role -> file: export.json's ``graphs``
    runtimes: dict[str, Any] = field(default_factory=dict)  # opened once by a gate, reused by the timing
    shared: dict[str, Any] = field(default_factory=dict)  # made once, used by several formats
    scratch: Path | None = None  # a temporary directory, removed by ``close``

    def once(self, key: str, make) -> Any:
        """``make()`` the first time ``key`` is asked for, the same value after: one build per export."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def hf_dir(self) -> Path:
        """The export's ``hf/`` when export.hf wrote it, else a scratch checkpoint written once."""
        written = self.out / layout.HF_DIR
        if written.is_dir():
            return written
        from stages.formats.llama.hf_checkpoint import write_checkpoint

        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="gptpipe-export-"))
        return self.once(
            "scratch_hf", lambda: write_checkpoint(self.model, self.tokenizer, self.scratch / layout.HF_DIR)
        )

    def close(self) -> None:
        """Release the runtimes (og.Model holds its folder's files open) and the scratch directory."""
        self.runtimes.clear()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer artifact's files into the export, so it runs on its own."""
    target = out / layout.TOKENIZER_DIR
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.name != MANIFEST:
            shutil.copy2(path, target / path.name)
