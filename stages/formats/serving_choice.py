"""Which certified runtime an export serves from: each candidate is timed on the exporting machine,
alternately (``stages.formats.decode_timing``), and the fastest wins unless ``export.serving.runtime``
pins one.

Candidates are the formats whose declaration names a serving runtime and whose gate kept them: today
``model_kv.onnx`` under ONNX Runtime, ``genai/`` and, when it passed its quality gate,
``genai-quantized/`` under onnxruntime-genai. Each is the runtime its gate already opened (opening an
onnxruntime-genai folder costs seconds). PyTorch is timed beside them as the reference the certificate
quotes. ``stages.formats.served`` opens the choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.errors import ConfigError
from stages.core.sections import ExportConfig
from stages.formats.decode_timing import Runner, time_decode

if TYPE_CHECKING:
    from stages.formats.format import Format
    from stages.formats.job import ExportJob


def serving_runtimes(formats: tuple[Format, ...]) -> dict[str, str]:
    """export.serving.runtime's choices (the format names) -> the runtime export.json's ``serve`` names."""
    return {f.name: f.serving.runtime for f in formats if f.serving is not None}


def choose_served(cfg: ExportConfig, decode_ms: dict[str, float], formats: tuple[Format, ...] = ()) -> str:
    """The runtime ``export.serving.runtime`` asks for among those certified (``decode_ms`` keys), fastest
    by default."""
    from stages.formats.registry import FORMATS

    certified = [name for name in decode_ms if name != "pytorch"]
    wanted = serving_runtimes(formats or FORMATS)
    choice = cfg.serving.runtime
    if choice == "fastest":
        return min(certified, key=decode_ms.__getitem__)
    if wanted.get(choice) not in certified:
        raise ConfigError(
            f"export.serving.runtime = {choice!r}: {wanted.get(choice, choice)} was not certified by this export "
            f"(certified: {', '.join(certified)}); use 'fastest' or turn on export.genai.enabled / export.quantized.enabled"
        )
    return wanted[choice]


def time_serving(job: ExportJob, served: list[Format]) -> dict[str, float]:
    """Decode ms/token of PyTorch and every kept serving format on this machine, alternately."""
    import torch

    from stages.lm.chat import ChatTemplate
    from stages.lm.generate import generate_ids

    model, cfg = job.model, job.cfg.serving
    runners: dict[str, Runner] = {"pytorch": lambda prompt, n: generate_ids(model, prompt, n)}
    runners.update({f.serving.runtime: f.serving.open(job) for f in served if f.serving is not None})
    prompt = ChatTemplate(job.tokenizer).render_prompt([{"role": "user", "content": "Reverse: a b c d e f"}])
    new = min(cfg.timing_tokens, model.cfg.block_size - len(prompt))
    with torch.no_grad():
        timings = time_decode(runners, prompt, new, cfg.timing_rounds)
    return {name: round(t.decode_ms, 4) for name, t in timings.items()}
