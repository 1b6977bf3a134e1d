"""The export's onnxruntime-genai model folder: built by onnxruntime-genai's own model builder
from the export's Hugging Face checkpoint (``hf/``), and opened for the gate and the benchmark.

The builder (``python -m onnxruntime_genai.models.builder -i <hf dir> -o <out> -p <precision> -e cpu``)
reads ``hf/`` as a ``LlamaForCausalLM`` and writes one ONNX graph with onnxruntime's fused
operators (GroupQueryAttention, SkipSimplifiedLayerNormalization, rotary embedding), its weights
beside it, ``genai_config.json`` (shapes, stop ids, search defaults) and the tokenizer files it
copies from ``hf/`` (``tokenizer.json``, the chat template). ``og.Model``/``og.Generator`` run it.

The builder runs in the export's own process, through its command line (``runpy``, so the
interface used is the documented one): a child process re-imported torch, transformers and onnx
for 4 of its 5.5 s on the micro recipe. What it prints is kept and shown only when it fails, and
a failure of any kind becomes one ``ArtifactError``. ``stages.formats.genai.gate`` checks the
folder against PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Any

from stages.core.errors import ArtifactError, ConfigError

CONFIG_FILE = "genai_config.json"  # what og.Model reads first
PRECISIONS = ("fp32", "int4", "int8")  # what the builder's -p accepts for the CPU provider
BUILDER = "onnxruntime_genai.models.builder"  # the module `python -m` runs as the builder's command line


def require_genai() -> Any:
    """The ``onnxruntime_genai`` module, or ``ConfigError`` naming the way out when it is not installed."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise ConfigError(
            f"export.genai.enabled: onnxruntime_genai cannot be imported ({exc}); "
            "pip install 'onnxruntime-genai>=0.18' or set export.genai.enabled=false"
        ) from None
    return onnxruntime_genai


def build_package(hf_dir: Path, out: Path, precision: str = "fp32") -> Path:
    """Run onnxruntime-genai's model builder on ``hf_dir`` into ``out`` (CPU provider); returns ``out``.

    ``ArtifactError`` with the builder's last output line when it fails or writes no config.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"genai precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    require_genai()
    with tempfile.TemporaryDirectory(prefix="genai-cache-") as cache:
        arguments = ["-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu", "-c", cache]
        code, printed = _run_builder(arguments)
    if code != 0 or not (out / CONFIG_FILE).is_file():
        lines = [line for line in printed.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise ArtifactError(f"onnxruntime-genai's builder failed on {hf_dir.name}/ (exit {code}): {last[:300]}")
    return out


def _run_builder(arguments: list[str]) -> tuple[int, str]:
    """``python -m onnxruntime_genai.models.builder ARGUMENTS`` in this process: (exit code, what it printed)."""
    printed = io.StringIO()
    argv = sys.argv
    sys.argv = [BUILDER, *arguments]
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            runpy.run_module(BUILDER, run_name="__main__")
        code = 0
    except SystemExit as stop:  # argparse and the builder's own exits
        code = stop.code if isinstance(stop.code, int) else 1
    except Exception as exc:  # any builder failure is one ArtifactError, raised by the caller
        printed.write(f"\n{type(exc).__name__}: {exc}")
        code = 1
    finally:
        sys.argv = argv
    return code, printed.getvalue()


def open_model(folder: Path, threads: int = 0) -> Any:
    """``og.Model`` for ``folder``, its decoder on ``threads`` intra-op threads (0 = onnxruntime's default)."""
    og = require_genai()
    config = og.Config(str(folder))
    if threads > 0:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def context_length(folder: Path) -> int:
    """The longest sequence the folder's model takes (``genai_config.json``'s ``context_length``)."""
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    return int(config["model"]["context_length"])
