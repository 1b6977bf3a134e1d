"""Which certified runtime an export serves from: each candidate is timed on the exporting machine,
alternately (``stages.lm.decode_timing``), and the fastest wins unless ``export.serve`` pins one.

Candidates are the runtimes that passed their gate and can answer a chat request without torch:
``model_kv.onnx`` under ONNX Runtime (``stages.lm.onnx_runtime``), ``genai/`` and, when it passed its
quality gate, ``genai-quantized/`` under onnxruntime-genai (``stages.lm.genai_runtime``). PyTorch is
timed beside them as the reference the certificate quotes. ``stages.lm.served`` opens the choice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.core.errors import ConfigError
from stages.core.sections import ExportConfig
from stages.lm import export_layout as layout
from stages.lm.chat import ChatTemplate
from stages.lm.decode_timing import Runner, time_decode
from stages.lm.genai_runtime import GenaiGenerator
from stages.lm.generate import generate_ids
from stages.lm.model import GPT
from stages.lm.onnx_runtime import OnnxGenerator
from stages.lm.tokenizer import Tokenizer


def serving_candidates(model: GPT, out: Path, cfg: ExportConfig, metrics: dict) -> dict[str, Runner]:
    """Each certified runtime that can serve, by the name ``export.json``'s ``serve`` takes (and PyTorch, timed
    as the reference); greedy runs with no stop ids, so every run makes the same number of tokens."""
    kv = OnnxGenerator(out, threads=cfg.threads)
    runners: dict[str, Runner] = {
        "pytorch": lambda prompt, n: generate_ids(model, prompt, n),
        layout.KV_GRAPH: kv.generate_ids,
    }
    if "genai" in metrics:
        runners[layout.GENAI_DIR] = GenaiGenerator(out, layout.GENAI_DIR, cfg.threads).generate_ids
    if metrics.get("quantized", {}).get("passed"):
        runners[layout.GENAI_QUANTIZED_DIR] = GenaiGenerator(out, layout.GENAI_QUANTIZED_DIR, cfg.threads).generate_ids
    return runners


def choose_served(cfg: ExportConfig, decode_ms: dict[str, float]) -> str:
    """The runtime ``export.serve`` asks for among those certified (``decode_ms`` keys), fastest by default."""
    certified = [name for name in decode_ms if name != "pytorch"]
    wanted = {"onnx": layout.KV_GRAPH, "genai": layout.GENAI_DIR, "quantized": layout.GENAI_QUANTIZED_DIR}
    if cfg.serve == "fastest":
        return min(certified, key=decode_ms.__getitem__)
    if wanted[cfg.serve] not in certified:
        raise ConfigError(
            f"export.serve = {cfg.serve!r}: {wanted[cfg.serve]} was not certified by this export "
            f"(certified: {', '.join(certified)}); use 'fastest' or turn on export.genai / export.quantized"
        )
    return wanted[cfg.serve]


@torch.no_grad()
def time_serving(model: GPT, tokenizer: Tokenizer, out: Path, cfg: ExportConfig, metrics: dict) -> dict[str, float]:
    """Decode ms/token of every serving candidate on this machine, alternately (``stages.lm.decode_timing``)."""
    template = ChatTemplate(tokenizer)
    prompt = template.render_prompt([{"role": "user", "content": "Reverse: a b c d e f"}])
    new = min(cfg.timing_tokens, model.cfg.block_size - len(prompt))
    timings = time_decode(serving_candidates(model, out, cfg, metrics), prompt, new, cfg.timing_rounds)
    return {name: round(t.decode_ms, 4) for name, t in timings.items()}
