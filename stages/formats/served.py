"""The runtime an export is served from: ``gptpipe generate --onnx`` and the registry's MLflow model
both open it here.

The export stage times every runtime it certified on this machine and records the fastest in
``export.json`` (``serve``): an onnxruntime-genai folder (``genai/``, or its quantized twin once that
passed its quality gate) or the KV graph. ``open_served`` opens exactly that one, so what the
certificate measured is what answers. Torch-free: the served MLflow model imports it.
"""

from __future__ import annotations

from pathlib import Path

from stages.formats.chat_replies import ChatReplies
from stages.formats.onnx.runtime import ExportMeta, OnnxGenerator


def served_runtime(export_dir: str | Path) -> str:
    """What ``open_served`` opens for ``export_dir``: a genai folder name or the KV graph's file name."""
    meta = ExportMeta.read(Path(export_dir))
    return meta.serve or meta.graphs["kv"]


def open_served(export_dir: str | Path, threads: int = 0) -> ChatReplies:
    """The generator for the runtime the export certified as its fastest."""
    export_dir = Path(export_dir)
    meta = ExportMeta.read(export_dir)
    if meta.serve and meta.serve != meta.graphs["kv"]:
        from stages.formats.genai.runtime import GenaiGenerator

        return GenaiGenerator(export_dir, meta.serve, threads)
    return OnnxGenerator(export_dir, threads)
