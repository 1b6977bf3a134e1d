"""Stage ``export``: the trained GPT as ONNX graphs and a torch.export program, behind a parity gate.

Outputs (one self-contained directory)::

    model.onnx        logits for input ids; batch and sequence axes dynamic
    model_kv.onnx     input ids + past keys/values -> logits + present keys/values
    architecture.onnx the same logits as model.onnx, drawn as embedding -> Block x N -> norm -> lm_head
                      (ONNX local functions; stages.lm.onnx_architecture), gated like model.onnx
    architecture.svg  a static picture of it for the report (stages.viewer.architecture_svg)
    model.pt2         torch.export program of the logits model (export.pt2)
    model.int8.onnx   dynamic int8 quantization of model.onnx (export.quantize; measured, not gated)
    *.onnx.data       weights beside the graph when the model is over 2 GB (or export.external_data)
    tokenizer/        the tokenizer artifact's files, so the export runs on its own
    export.json       shapes, tensor names and graph files: what ``stages.lm.onnx_runtime`` reads
    hf/               a Hugging Face LlamaForCausalLM checkpoint with its tokenizer (export.hf; gated too)
    model.gguf        the model and its tokenizer as one GGUF file (f32) for llama.cpp (export.gguf; gated too)
    genai/            an onnxruntime-genai model folder built by its builder from hf/ (export.genai; gated too)

The graphs are written by ``stages.lm.onnx_export``, the int8 twin by ``stages.lm.onnx_int8``.

The gate fails the stage with ``ParityError`` — so the runner publishes nothing — unless
``onnx.checker`` accepts every graph, ORT logits (and KV presents) match PyTorch within
``export.tolerance`` for every checked shape, and greedy ORT+KV generation gives exactly
PyTorch's token ids for every prompt (``stages.lm.onnx_gate``); the Hugging Face checkpoint
passes the same checks in transformers (``stages.lm.hf_gate``), and so does the GGUF file
(``stages.lm.gguf_export`` writes it, ``stages.lm.gguf_gate`` reads it with transformers' GGUF
loader), and so does the onnxruntime-genai folder (``stages.lm.genai_package`` builds it,
``stages.lm.genai_gate`` runs it with og.Model). Every gate compares with ``stages.lm.parity``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages import registry
from stages.core.errors import ConfigError
from stages.core.sections import ExportConfig
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.lm import export_layout as layout
from stages.lm import (
    genai_gate,
    genai_package,
    gguf_export,
    gguf_gate,
    hf_checkpoint,
    hf_gate,
    onnx_architecture,
    parity,
    quantized_gate,
)
from stages.lm.certificate import certificate_markdown, certificate_rows
from stages.lm.chat import Message, read_chat_jsonl
from stages.lm.export_layout import INT8_FILE, PT2_FILE
from stages.lm.genai_runtime import GenaiGenerator
from stages.lm.model import GPT
from stages.lm.onnx_export import PROTOBUF_LIMIT, export_graphs, quiet_exporter, weight_bytes, write_meta
from stages.lm.onnx_gate import architecture_parity, check_graphs, check_parity
from stages.lm.onnx_int8 import heldout_loss_change, quantize_int8
from stages.lm.serving_choice import choose_served, time_serving
from stages.lm.tasks import make_items
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import MANIFEST
from stages.training.checkpoint_format import HELDOUT, load_model, model_directory
from stages.training.perf import set_threads
from stages.viewer import architecture_svg

log = logging.getLogger("gptpipe.export")


def copy_tokenizer(source: Path, out: Path) -> None:
    target = out / layout.TOKENIZER_DIR
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.name != MANIFEST:
            shutil.copy2(path, target / path.name)


def file_sizes(out: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in sorted(out.iterdir())
        if p.is_file() and p.suffix in (".onnx", ".pt2", ".data", ".gguf")
    }


def heldout_conversations(model_artifact: Path, count: int, seed: int) -> tuple[list[list[Message]], str]:
    """The fine-tune's own held-out conversations when it saved them, else built-in held-out tasks."""
    path = model_artifact / HELDOUT
    if path.is_file():
        return read_chat_jsonl(path)[:count], HELDOUT
    return [item.messages() for item in make_items(count, "heldout", seed)], "synthetic tasks"


def gate_checks(
    model: GPT, tokenizer: Tokenizer, cfg: ExportConfig, conversations: list[list[Message]]
) -> tuple[list[np.ndarray], list[list[int]]]:
    """The gate's id matrices and prompts: the same for every format checked against transformers."""
    block = model.cfg.block_size
    inputs = parity.gate_inputs(cfg.parity_shapes, block, model.cfg.vocab_size, np.random.default_rng(cfg.seed))
    prompts = parity.parity_prompts(
        tokenizer, conversations, cfg.generation_prompts, block, cfg.generation_tokens, cfg.seed
    )
    return inputs, prompts


def export_hf(
    model: GPT, tokenizer: Tokenizer, out: Path, cfg: ExportConfig, conversations: list[list[Message]]
) -> dict:
    """Write ``hf/`` and check it with transformers on the gate's shapes, prompts and held-out items."""
    started = time.perf_counter()
    hf_dir = hf_checkpoint.write_checkpoint(model, tokenizer, out / layout.HF_DIR)
    inputs, prompts = gate_checks(model, tokenizer, cfg, conversations)
    figures = hf_gate.check_checkpoint(
        model, tokenizer, hf_dir, cfg.tolerance, inputs, prompts, cfg.generation_tokens, conversations
    )
    return {**figures, "seconds": round(time.perf_counter() - started, 3)}


def export_gguf(
    model: GPT, tokenizer: Tokenizer, out: Path, cfg: ExportConfig, conversations: list[list[Message]]
) -> dict:
    """Write ``model.gguf`` and check it through transformers' GGUF loader like ``hf/``."""
    started = time.perf_counter()
    path = gguf_export.write_gguf(model, tokenizer, out / layout.GGUF_FILE)
    inputs, prompts = gate_checks(model, tokenizer, cfg, conversations)
    figures = gguf_gate.check_gguf(
        model, tokenizer, path, cfg.tolerance, inputs, prompts, cfg.generation_tokens, conversations
    )
    return {**figures, "seconds": round(time.perf_counter() - started, 3)}


def export_genai(
    model: GPT,
    tokenizer: Tokenizer,
    out: Path,
    cfg: ExportConfig,
    conversations: list[list[Message]],
    quality_conversations: list[list[Message]],
) -> dict:
    """Build ``genai/`` from ``hf/`` (a scratch checkpoint when export.hf is off) and check it with og.Model;
    then, unless export.quantized is 'none', its quantized twin, kept only when it passes its quality gate.

    Returns ``{"genai": figures, "quantized": figures}`` (``quantized`` absent when not asked for).
    """
    started = time.perf_counter()
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="gptpipe-hf-") as scratch:
        hf_dir = out / layout.HF_DIR
        if not hf_dir.is_dir():
            hf_dir = hf_checkpoint.write_checkpoint(model, tokenizer, Path(scratch) / layout.HF_DIR)
        folder = genai_package.build_package(hf_dir, out / layout.GENAI_DIR)
        built = time.perf_counter() - started
        _, prompts = gate_checks(model, tokenizer, cfg, conversations)
        gate = genai_gate.check_package(
            model, tokenizer, folder, hf_dir, cfg.tolerance, prompts, cfg.generation_tokens, conversations, cfg.threads
        )
        figures["genai"] = {
            **gate,
            "build_seconds": round(built, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if cfg.quantized != "none":
            started = time.perf_counter()
            folder = genai_package.build_package(hf_dir, out / layout.GENAI_QUANTIZED_DIR, cfg.quantized)
            runtime = GenaiGenerator(out, layout.GENAI_QUANTIZED_DIR, cfg.threads)
            quality = quantized_gate.check_quantized(model, tokenizer, runtime, quality_conversations, cfg)
            del runtime  # og.Model holds the folder's files open
            if not quality["passed"]:
                shutil.rmtree(folder)
                log.warning("export: %s quantized variant not kept: %s", cfg.quantized, quality["reason"])
            figures["quantized"] = {
                **quality,
                "precision": cfg.quantized,
                "folder": layout.GENAI_QUANTIZED_DIR,
                "seconds": round(time.perf_counter() - started, 3),
            }
    return figures


# ---------------------------------------------------------------------------- stage


def run(cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    ecfg = cfg.export
    if ecfg.source not in inputs:
        raise ConfigError(
            f"export.source = {ecfg.source!r}: no '{ecfg.source}' input artifact was given; "
            f"pass --input {ecfg.source}=<artifact dir> or set export.source to a stage that ran"
        )
    set_threads(ecfg.threads)
    model = load_model(model_directory(inputs[ecfg.source]), "cpu").float().eval()
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    if ecfg.gguf:
        gguf_export.check_tokenizer(tokenizer)  # before the graphs: a tokenizer GGUF cannot hold fails fast
    if ecfg.genai:
        genai_package.require_genai()  # before the graphs: a missing runtime fails fast, naming export.genai=false
    copy_tokenizer(inputs["tokenizer"], out)

    external = ecfg.external_data or weight_bytes(model) > PROTOBUF_LIMIT
    started = time.perf_counter()
    with torch.no_grad(), quiet_exporter():
        graphs = export_graphs(model, out, ecfg.opset, external, ecfg.pt2)
    graphs["architecture"] = onnx_architecture.save_architecture(model, out, ecfg.opset, external)  # architecture view
    architecture_svg.write_svg(out / graphs["architecture"], out / layout.SVG_FILE)
    export_seconds = time.perf_counter() - started
    write_meta(model, out, graphs, ecfg, external)
    check_graphs(out, [graphs["logits"], graphs["kv"], graphs["architecture"]])

    started = time.perf_counter()
    conversations, heldout_source = heldout_conversations(
        inputs[ecfg.source], max(ecfg.heldout_items, ecfg.generation_prompts), ecfg.seed
    )
    quality_conversations = heldout_conversations(inputs[ecfg.source], ecfg.quantized_items, ecfg.seed)[0]
    metrics = check_parity(model, out, tokenizer, ecfg, conversations)
    metrics["architecture"] = architecture_parity(model, out, tokenizer, ecfg, conversations)  # architecture view
    metrics["parity_seconds"] = round(time.perf_counter() - started, 3)

    if ecfg.hf:  # ---- Hugging Face checkpoint, behind its own gate (stages/lm/hf_gate.py)
        metrics["hf"] = export_hf(model, tokenizer, out, ecfg, conversations)
        tracker.log_artifact(out / layout.HF_DIR, layout.HF_DIR)
        tracker.log_metrics(
            {
                "export.hf_max_abs_diff": metrics["hf"]["max_abs_diff"],
                "export.hf_tokenizer_matches": metrics["hf"]["tokenizer_matches"],
            }
        )

    if ecfg.gguf:  # ---- GGUF for llama.cpp, behind its own gate (stages/lm/gguf_gate.py)
        metrics["gguf"] = export_gguf(model, tokenizer, out, ecfg, conversations)
        tracker.log_artifact(out / layout.GGUF_FILE, "gguf")
        tracker.log_metrics(
            {
                "export.gguf_max_abs_diff": metrics["gguf"]["max_abs_diff"],
                "export.gguf_generation_matches": metrics["gguf"]["generation_matches"],
                "export.gguf_tokenizer_matches": metrics["gguf"]["tokenizer_matches"],
            }
        )

    if ecfg.genai:  # ---- onnxruntime-genai folder(s), behind their own gates (genai_gate, quantized_gate)
        metrics.update(export_genai(model, tokenizer, out, ecfg, conversations, quality_conversations))
        tracker.log_artifact(out / layout.GENAI_DIR, layout.GENAI_DIR)
        tracker.log_metrics(
            {
                "export.genai_max_abs_diff": metrics["genai"]["max_abs_diff"],
                "export.genai_generation_matches": metrics["genai"]["generation_matches"],
                "export.genai_tokenizer_matches": metrics["genai"]["tokenizer_matches"],
            }
        )
        if "quantized" in metrics:
            quantized = metrics["quantized"]
            tracker.log_metrics(
                {
                    "export.quantized_exact_match": quantized["exact_match"],
                    "export.quantized_exact_match_drop": quantized["exact_match_drop"],
                    "export.quantized_bpb_rise": quantized["bpb_rise"],
                    "export.quantized_passed": float(quantized["passed"]),
                }
            )
            if quantized["passed"]:
                tracker.log_artifact(out / layout.GENAI_QUANTIZED_DIR, layout.GENAI_QUANTIZED_DIR)

    # ---- which certified runtime serves: timed here, on this machine (stages.lm.decode_timing)
    metrics["decode_ms"] = time_serving(model, tokenizer, out, ecfg, metrics)
    metrics["serve"] = choose_served(ecfg, metrics["decode_ms"])
    write_meta(model, out, graphs, ecfg, external, serve=metrics["serve"])
    tracker.log_metrics({f"export.decode_ms.{name}": ms for name, ms in metrics["decode_ms"].items()})

    if ecfg.quantize:
        graphs["int8"] = quantize_int8(out, external)
        write_meta(model, out, graphs, ecfg, external, serve=metrics["serve"])
        metrics["int8"] = {**heldout_loss_change(out, tokenizer, ecfg, conversations), "heldout": heldout_source}
    metrics.update(
        export_seconds=round(export_seconds, 3),
        external_data=external,
        opset=ecfg.opset,
        source=ecfg.source,
        file_bytes=file_sizes(out),
        parameters=model.num_params(non_embedding=False),
    )
    metrics["certificate"] = certificate_rows(metrics)
    (out / layout.CERTIFICATE_FILE).write_text(certificate_markdown(metrics["certificate"]), encoding="utf-8")
    tracker.log_artifact(out / layout.CERTIFICATE_FILE)
    tracker.log_metrics(
        {"export.max_abs_diff": metrics["max_abs_diff"], "export.generation_matches": metrics["generation_matches"]}
    )
    log.info(
        "export: %d graphs, max |dlogits| %.2e, generation %d/%d identical",
        len(graphs),
        metrics["max_abs_diff"],
        metrics["generation_matches"],
        metrics["generation_prompts"],
    )
    return metrics


def _inputs(cfg: Sections) -> tuple[str, ...]:
    return ("tokenizer", cfg.export.source)


def _problems(cfg: Sections) -> list[str]:
    ecfg, problems = cfg.export, []
    makers = registry.model_stages()
    if ecfg.source not in makers:
        problems.append(
            f"export.source = {ecfg.source!r}: not a stage that makes a model; use one of {', '.join(makers)}"
        )
    # a pinned runtime the recipe does not build would fail only after the whole export: say it now
    if ecfg.serve in ("genai", "quantized") and not ecfg.genai:
        problems.append(f"export.serve = {ecfg.serve!r} needs export.genai=true; or use export.serve=fastest")
    if ecfg.serve == "quantized" and ecfg.quantized == "none":
        problems.append("export.serve = 'quantized' needs export.quantized=int4 (or int8); or use export.serve=fastest")
    return problems


STAGE = Stage(
    name="export",
    summary="ONNX graphs behind a parity gate against PyTorch",
    sections=("export",),
    inputs=("tokenizer", "finetune"),
    outputs=(
        Output(layout.LOGITS_GRAPH, "logits for input ids; batch and sequence axes dynamic"),
        Output(layout.KV_GRAPH, "input ids + past keys/values -> logits + present keys/values"),
        Output(layout.ARCHITECTURE_GRAPH, "the logits graph drawn as embedding -> Block x N -> head"),
        Output(layout.SVG_FILE, "a static picture of the architecture"),
        Output(PT2_FILE, "torch.export program of the logits model (export.pt2)"),
        Output(INT8_FILE, "dynamic int8 copy of the logits graph (export.quantize; measured, not gated)"),
        Output(layout.TOKENIZER_DIR, "the tokenizer artifact's files, so the export runs on its own"),
        Output(layout.META_FILE, "shapes, tensor names and graph files"),
        Output(layout.HF_DIR, "a Hugging Face LlamaForCausalLM checkpoint (export.hf; gated too)"),
        Output(layout.GGUF_FILE, "model and tokenizer as one f32 GGUF file for llama.cpp (export.gguf; gated too)"),
        Output(layout.GENAI_DIR, "an onnxruntime-genai model folder built from hf/ (export.genai; gated too)"),
        Output(
            layout.GENAI_QUANTIZED_DIR,
            "its weight-only quantized twin (export.quantized; kept if its quality gate passes)",
        ),
        Output(layout.CERTIFICATE_FILE, "the equivalence certificate: one row per format, the served runtime marked"),
    ),
    run=run,
    headline=("max_abs_diff", "generation_matches"),
    choose_inputs=_inputs,
    check=_problems,
)
