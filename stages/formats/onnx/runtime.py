"""Run an exported model with ONNX Runtime alone: numpy + onnxruntime + sentencepiece, no torch.

An export artifact describes itself in ``export.json`` (model shape, graph files, tensor
names, tokenizer folder), so ``OnnxGenerator(export_dir)`` needs nothing else. Generation
follows ``stages.lm.generate.generate_ids`` step for step — cache while the context fits in
``block_size``, recompute the cropped window once it overflows — because the export's parity
gate requires the two to produce the same token ids.

This module must stay importable where torch is absent (a serving container); the parity
test checks that importing it pulls in no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from stages.core.errors import ArtifactError
from stages.formats.chat_replies import ChatReplies, pick_token
from stages.formats.layout import META_FILE, TOKENIZER_DIR


@dataclass(frozen=True)
class ExportMeta:
    """What ``export.json`` records: enough to feed the graphs without torch or the config."""

    n_layer: int
    n_head: int
    head_dim: int
    block_size: int
    vocab_size: int
    graphs: dict[str, str]
    kv_inputs: list[str]
    kv_outputs: list[str]
    # The runtime the export certified as fastest (``stages.formats.served``): an onnxruntime-genai folder
    # name, or empty for the KV graph (exports older than the field serve from the KV graph).
    serve: str = ""

    @classmethod
    def read(cls, export_dir: Path) -> ExportMeta:
        path = Path(export_dir) / META_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            # a field with a default (``serve``) may be absent from older exports; a missing required one is
            # a TypeError, reported below
            return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        except FileNotFoundError:
            raise ArtifactError(
                f"{path}: missing; {export_dir} is not an export artifact (run stage 'export')"
            ) from None
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: unreadable export description ({exc!r}); rerun stage 'export'") from None


def kv_names(n_layer: int) -> tuple[list[str], list[str]]:
    """Input and output names of the KV-cache graph, in the order the export wrapper uses."""
    past = [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def session_options(threads: int = 0, level: str = "all") -> ort.SessionOptions:
    """CPU session options: fixed thread count, sequential execution, full graph optimisation.

    ``threads=0`` leaves ORT's default (one per physical core). Inter-op threads stay at 1:
    a decoder step is a chain of small ops, so parallel branches only add scheduling cost.
    """
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    return options


def open_session(path: Path, threads: int = 0, level: str = "all") -> ort.InferenceSession:
    """An ORT CPU session for one graph file (external weight files are found beside it)."""
    if not Path(path).is_file():
        raise ArtifactError(f"{path}: graph file missing; rerun stage 'export'")
    return ort.InferenceSession(str(path), session_options(threads, level), providers=["CPUExecutionProvider"])


class OnnxGenerator(ChatReplies):
    """Generation with the KV-cache graph of an export artifact (``generate`` answers a chat prompt)."""

    def __init__(self, export_dir: str | Path, threads: int = 0, level: str = "all", graph: str | None = None):
        self.export_dir = Path(export_dir)
        self.meta = ExportMeta.read(self.export_dir)
        self.session = open_session(self.export_dir / (graph or self.meta.graphs["kv"]), threads, level)
        self.tokenizer_dir = self.export_dir / TOKENIZER_DIR

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        """A zero-length cache: the KV graph then behaves as a plain causal forward pass."""
        meta = self.meta
        shape = (batch, meta.n_head, 0, meta.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * meta.n_layer)]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (batch, length, vocab) for ``ids`` after ``past``, and the extended cache."""
        feeds = {self.meta.kv_inputs[0]: np.ascontiguousarray(ids, dtype=np.int64)}
        feeds.update(zip(self.meta.kv_inputs[1:], past))
        outputs = self.session.run(None, feeds)
        return outputs[0], outputs[1:]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits through the KV graph with an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.step(ids, self.empty_past(ids.shape[0]))[0]

    def generate_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        stop_ids=(),
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[int]:
        """New token ids after ``prompt_ids`` (a stop id included when hit); greedy unless ``temperature > 0``.

        Mirrors ``stages.lm.generate.generate_ids`` with ``use_cache=True``: the cache holds every
        token but the last one; once the context reaches ``block_size`` the cache is dropped and
        each step recomputes the last ``block_size`` tokens (RoPE has no positions beyond).
        """
        if not prompt_ids:
            raise ValueError("generate_ids needs at least one prompt token")
        block = self.meta.block_size
        stops = {int(s) for s in stop_ids}
        context = [int(t) for t in prompt_ids]
        new: list[int] = []
        past: list[np.ndarray] | None = None
        rng = np.random.default_rng(seed)
        for _ in range(max_new_tokens):
            if past is not None and len(context) <= block:
                logits, past = self.step(np.array([context[-1:]], dtype=np.int64), past)
            else:
                window = np.array([context[-block:]], dtype=np.int64)
                logits, past = self.step(window, self.empty_past())
                if len(context) >= block:
                    past = None
            token = pick_token(logits[0, -1], temperature, top_k, rng)
            new.append(token)
            context.append(token)
            if token in stops:
                break
        return new
