"""``hf/``: a Hugging Face LlamaForCausalLM checkpoint with its tokenizer and chat template, so
``transformers`` loads the model offline (``stages.formats.llama.hf_checkpoint`` writes it).

Gated through transformers (``stages.formats.llama.hf_gate``): logits, greedy ids, tokenizer ids and
decode, and the chat template must be gptpipe's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core.stage import Output
from stages.formats.certificate import fraction
from stages.formats.format import Format, GateResult
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import HF_DIR

if TYPE_CHECKING:
    from stages.formats.job import ExportJob


def write(job: ExportJob) -> None:
    from stages.formats.llama import hf_checkpoint

    hf_checkpoint.write_checkpoint(job.model, job.tokenizer, job.out / HF_DIR)


def transformers_row(name: str, figures: dict) -> dict:
    """The certificate row of a format transformers reads (``hf/``, ``model.gguf``)."""
    return {
        "format": name,
        "max_abs_diff": figures["max_abs_diff"],
        "greedy": fraction(figures["generation_matches"], figures["generation_prompts"]),
        "tokenizer": fraction(figures["tokenizer_matches"], figures["tokenizer_texts"]),
    }


def gate(job: ExportJob, inputs: GateInputs) -> GateResult:
    from stages.formats.llama.hf_gate import check_checkpoint

    figures = check_checkpoint(job.model, job.tokenizer, job.out / HF_DIR, inputs)
    logged = {
        "export.hf_max_abs_diff": figures["max_abs_diff"],
        "export.hf_tokenizer_matches": figures["tokenizer_matches"],
    }
    return GateResult(figures, [transformers_row(f"{HF_DIR}/ (transformers)", figures)], logged)


FORMAT = Format(
    name="hf",
    files=(Output(HF_DIR, "a Hugging Face LlamaForCausalLM checkpoint with its tokenizer (export.hf; gated too)"),),
    write=write,
    gate=gate,
    enabled=lambda cfg: cfg.hf.enabled,
    artifact=HF_DIR,
)
