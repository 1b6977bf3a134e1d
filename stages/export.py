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

One KV graph serves prefill and decode: a zero-length past is a valid ONNX Runtime input,
and the model's explicit-mask path equals the causal one when the past is empty. The graph is
traced with a non-empty example past so torch.export does not specialise that axis to 0.

The gate (``check_parity``) fails the stage with ``ParityError`` — so the runner publishes
nothing — unless: ``onnx.checker`` accepts every graph; ORT logits (and KV presents) match
PyTorch within ``export.tolerance`` for every checked shape; and greedy ORT+KV generation gives
exactly PyTorch's token ids for every prompt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from stages.core.config import ExportConfig, PipelineConfig
from stages.core.errors import ConfigError, ParityError
from stages.core.tracking import Tracker
from stages.lm import hf_checkpoint, onnx_architecture
from stages.lm import onnx_runtime as ortgen
from stages.lm.chat import IGNORE, ChatTemplate, Message, read_chat_jsonl
from stages.lm.generate import generate_ids
from stages.lm.model import GPT
from stages.lm.tasks import make_items
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import MANIFEST
from stages.training.checkpoint_format import load_model, model_directory
from stages.training.perf import set_threads
from stages.viewer import architecture_svg

log = logging.getLogger("gptpipe.export")


PT2_FILE = "model.pt2"
HELDOUT_FILE = "heldout.jsonl"  # written by stage 'finetune' beside its model
INT8_FILE = "model.int8.onnx"
PROTOBUF_LIMIT = 2 * 1024**3  # one ONNX protobuf cannot exceed 2 GB: weights go to a side file


class KVGraph(nn.Module):
    """``forward_with_cache`` with the cache flattened into positional tensors (ONNX has no lists)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.model.forward_with_cache(input_ids, past)
        return (logits, *(t for layer in presents for t in layer))


def weight_bytes(model: nn.Module) -> int:
    # parameters() yields a tied tensor once, as the graph stores it once.
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _dims(block_size: int) -> tuple[torch.export.Dim, torch.export.Dim, torch.export.Dim]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=block_size)
    past = torch.export.Dim("past", min=0, max=block_size)
    return batch, seq, past


def export_graphs(model: GPT, out: Path, opset: int, external: bool, pt2: bool) -> dict[str, str]:
    """Write model.onnx, model_kv.onnx (and model.pt2); return {role: file name}."""
    cfg = model.cfg
    batch, seq, past_dim = _dims(cfg.block_size)
    # Example inputs of size >= 2 on every dynamic axis: torch.export specialises sizes 0 and 1.
    ids = torch.arange(10).reshape(2, 5) % cfg.vocab_size
    program = torch.export.export(model, (ids,), dynamic_shapes={"idx": {0: batch, 1: seq}}, strict=False)
    graphs = {"logits": ortgen.LOGITS_GRAPH, "kv": ortgen.KV_GRAPH}
    if pt2:
        torch.export.save(program, str(out / PT2_FILE))
        graphs["pt2"] = PT2_FILE
    onnx_program = torch.onnx.export(
        program,
        (ids,),
        dynamo=True,
        opset_version=opset,
        input_names=["input_ids"],
        output_names=["logits"],
        verbose=False,
    )
    # Exporting a traced program keeps torch's symbol names (s27...): name the axes for Netron.
    axes = onnx_program.model.graph.inputs[0].shape
    onnx_program.rename_axes({axes[0]: "batch", axes[1]: "seq"})
    onnx_program.save(str(out / ortgen.LOGITS_GRAPH), external_data=external)  # external: <name>.data beside it

    kv_in, kv_out = ortgen.kv_names(cfg.n_layer)
    past = [torch.zeros(2, cfg.n_head, 3, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    shapes = {"input_ids": {0: batch, 1: seq}, "past_flat": tuple({0: batch, 2: past_dim} for _ in past)}
    onnx_program = torch.onnx.export(
        KVGraph(model).eval(),
        (ids, *past),
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=shapes,
        input_names=kv_in,
        output_names=kv_out,
        verbose=False,
    )
    onnx_program.save(str(out / ortgen.KV_GRAPH), external_data=external)
    return graphs


@contextlib.contextmanager
def _quiet_exporter():
    """The ONNX exporter's optimiser logs each merged constant at INFO; keep the stage log readable."""
    # (and warns that torchvision ops are unavailable, which a GPT never uses).
    noisy = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
            yield
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)


def check_graphs(out: Path, names: list[str]) -> None:
    """``onnx.checker`` on each graph, by path so external weights (and > 2 GB models) work."""
    for name in names:
        try:
            onnx.checker.check_model(str(out / name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ParityError(
                f"export parity gate: onnx.checker rejects {name}: {first} — nothing was published"
            ) from None


def quantize_int8(out: Path, external: bool) -> str:
    """Dynamic int8 (weights int8, activations quantised per batch) of the logits graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs every node it skips on the root logger: thousands of lines at INFO.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            out / ortgen.LOGITS_GRAPH, out / INT8_FILE, weight_type=QuantType.QInt8, use_external_data_format=external
        )
    finally:
        logging.disable(logging.NOTSET)
    return INT8_FILE


def copy_tokenizer(source: Path, out: Path) -> None:
    target = out / ortgen.TOKENIZER_DIR
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.name != MANIFEST:
            shutil.copy2(path, target / path.name)


def write_meta(model: GPT, out: Path, graphs: dict[str, str], cfg: ExportConfig, external: bool) -> None:
    kv_in, kv_out = ortgen.kv_names(model.cfg.n_layer)
    shape = model.cfg
    meta = {
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "head_dim": shape.head_dim,
        "block_size": shape.block_size,
        "vocab_size": shape.vocab_size,
        "model": shape.to_dict(),
        "graphs": graphs,
        "logits_input": "input_ids",
        "kv_inputs": kv_in,
        "kv_outputs": kv_out,
        "source": cfg.source,
        "opset": cfg.opset,
        "external_data": external,
        "tokenizer": ortgen.TOKENIZER_DIR,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ortgen.ort.__version__},
    }
    (out / ortgen.META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def file_sizes(out: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in sorted(out.iterdir())
        if p.is_file() and p.suffix in (".onnx", ".pt2", ".data")
    }


# ---------------------------------------------------------------------------- parity gate


def gate_shapes(count: int, block_size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(1, 1) and (2, block_size) — the edges — plus ``count`` random (batch, length) shapes."""
    shapes = [(1, 1), (2, block_size)]
    shapes += [(int(rng.integers(1, 5)), int(rng.integers(2, block_size + 1))) for _ in range(count)]
    return shapes


def _max_diff(ours: list[np.ndarray], ref: list[torch.Tensor]) -> float:
    """Largest |ORT - PyTorch|, scaled by the reference's largest magnitude when that exceeds 1.

    fp32 rounding grows with the values: a fine-tuned model's logits reach tens, where two
    correct kernels differ by ~1e-4. Scaling keeps the gate at 1e-4 for unit-sized values and
    relative beyond, so it still catches a changed weight (errors of 1e-2 and up) without
    failing a faithful export on rounding.
    """
    return max(float(np.max(np.abs(a - b.numpy()))) / max(1.0, float(b.abs().max())) for a, b in zip(ours, ref))


@torch.no_grad()
def logits_parity(model: GPT, out: Path, shapes: list[tuple[int, int]], rng: np.random.Generator, threads: int) -> dict:
    """max |ORT - PyTorch| per shape, for model.onnx and for the KV graph run as prefill + continuation."""
    logits_session = ortgen.open_session(out / ortgen.LOGITS_GRAPH, threads)
    kv = ortgen.OnnxGenerator(out, threads=threads)
    report: dict[str, dict[str, float]] = {}
    for batch, length in shapes:
        ids = rng.integers(0, model.cfg.vocab_size, size=(batch, length), dtype=np.int64)
        ref = model(torch.from_numpy(ids))
        plain = _max_diff(logits_session.run(None, {"input_ids": ids}), [ref])
        # KV graph: the first half as prefill from an empty past, the rest on top of that past.
        split = length // 2
        ref_past, ort_past = None, kv.empty_past(batch)
        cached = 0.0
        for part in (ids[:, :split], ids[:, split:]):
            if part.shape[1] == 0:
                continue
            ref_logits, ref_past = model.forward_with_cache(torch.from_numpy(part), ref_past)
            ort_logits, ort_past = kv.step(part, ort_past)
            flat = [t for layer in ref_past for t in layer]
            cached = max(cached, _max_diff([ort_logits, *ort_past], [ref_logits, *flat]))
        report[f"{batch}x{length}"] = {"logits": plain, "kv": cached}
    return report


def heldout_conversations(model_artifact: Path, count: int, seed: int) -> tuple[list[list[Message]], str]:
    """The fine-tune's own held-out conversations when it saved them, else built-in held-out tasks."""
    path = model_artifact / HELDOUT_FILE
    if path.is_file():
        return read_chat_jsonl(path)[:count], HELDOUT_FILE
    return [item.messages() for item in make_items(count, "heldout", seed)], "synthetic tasks"


def parity_prompts(
    tokenizer: Tokenizer, conversations: list[list[Message]], count: int, block_size: int, new_tokens: int, seed: int
) -> list[list[int]]:
    """Held-out chat prompts, plus one random prompt that runs past block_size (the crop path)."""
    template = ChatTemplate(tokenizer)
    chats = conversations[: max(count - 1, 1)]
    # Everything before the last assistant turn, ending with <|assistant|>: what a user would send.
    prompts = [
        template.render_prompt(messages[:-1] if len(messages) > 1 else messages)[-block_size:] for messages in chats
    ]
    if count > 1:
        rng = np.random.default_rng(seed)
        length = max(1, block_size - new_tokens // 2)
        prompts.append([int(t) for t in rng.integers(0, tokenizer.vocab_size, size=length)])
    return prompts


def generation_parity(
    model: GPT, out: Path, prompts: list[list[int]], new_tokens: int, stop_ids, threads: int
) -> list[str]:
    """Problems (empty when every prompt gives identical greedy ids in PyTorch and ORT+KV)."""
    generator = ortgen.OnnxGenerator(out, threads=threads)
    problems = []
    for number, prompt in enumerate(prompts):
        ref = generate_ids(model, prompt, new_tokens, stop_ids=stop_ids)
        ours = generator.generate_ids(prompt, new_tokens, stop_ids=stop_ids)
        if ours != ref:
            at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            got = ours[at] if at < len(ours) else "end"
            want = ref[at] if at < len(ref) else "end"
            problems.append(
                f"prompt {number} ({len(prompt)} ids) diverges at new token {at}: ORT {got}, PyTorch {want}"
            )
    return problems


@torch.no_grad()
def pt2_parity(model: GPT, out: Path, rng: np.random.Generator) -> float:
    """Reload model.pt2 and compare its logits with the live model on one odd shape."""
    program = torch.export.load(str(out / PT2_FILE))
    ids = torch.from_numpy(rng.integers(0, model.cfg.vocab_size, size=(3, max(2, model.cfg.block_size // 3))))
    ref = model(ids)
    return float((program.module()(ids) - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def check_parity(
    model: GPT, out: Path, tokenizer: Tokenizer, cfg: ExportConfig, conversations: list[list[Message]] | None = None
) -> dict:
    """Run the gate; raise ParityError naming every failure, else return its numbers."""
    rng = np.random.default_rng(cfg.seed)
    block = model.cfg.block_size
    by_shape = logits_parity(model, out, gate_shapes(cfg.parity_shapes, block, rng), rng, cfg.threads)
    failures = [
        f"{graph} {shape}: {diff:.2e}"
        for shape, diffs in by_shape.items()
        for graph, diff in (("model.onnx", diffs["logits"]), ("model_kv.onnx", diffs["kv"]))
        if not diff <= cfg.tolerance  # NaN fails too
    ]
    pt2_diff = pt2_parity(model, out, rng) if (out / PT2_FILE).is_file() else None
    if pt2_diff is not None and not pt2_diff <= cfg.tolerance:
        failures.append(f"model.pt2: {pt2_diff:.2e}")
    if failures:
        raise ParityError(
            f"export parity gate: ORT/PyTorch max |dlogits| (relative to max |logit| when above 1) above "
            f"export.tolerance={cfg.tolerance:g} for "
            f"{'; '.join(failures)}; the exported graph computes something else — nothing was published"
        )
    if conversations is None:
        conversations = [item.messages() for item in make_items(cfg.generation_prompts, "heldout", cfg.seed)]
    prompts = parity_prompts(tokenizer, conversations, cfg.generation_prompts, block, cfg.generation_tokens, cfg.seed)
    stop_ids = ChatTemplate(tokenizer).stop_ids
    problems = generation_parity(model, out, prompts, cfg.generation_tokens, stop_ids, cfg.threads)
    if problems:
        raise ParityError(
            f"export parity gate: greedy ORT+KV generation ({ortgen.KV_GRAPH}) differs from PyTorch for "
            f"{len(problems)}/{len(prompts)} prompts ({'; '.join(problems)}) — nothing was published"
        )
    worst = max(max(d.values()) for d in by_shape.values())
    metrics = {
        "max_abs_diff": worst,
        "max_abs_diff_by_shape": by_shape,
        "tolerance": cfg.tolerance,
        "generation_prompts": len(prompts),
        "generation_matches": len(prompts) - len(problems),
    }
    if pt2_diff is not None:
        metrics["pt2_max_abs_diff"] = pt2_diff
    return metrics


def _masked_loss(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed cross-entropy over targets that are not IGNORE, and how many there were."""
    keep = targets != IGNORE
    rows = logits[keep].astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    log_probs = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(rows)), targets[keep]].sum()), int(keep.sum())


def heldout_loss_change(out: Path, tokenizer: Tokenizer, cfg: ExportConfig, conversations: list[list[Message]]) -> dict:
    """Assistant-token loss on held-out chat items: fp32 graph vs its int8 twin (reported, not gated)."""
    template = ChatTemplate(tokenizer)
    meta = ortgen.ExportMeta.read(out)
    sessions = {
        name: ortgen.open_session(out / file, cfg.threads)
        for name, file in (("fp32", ortgen.LOGITS_GRAPH), ("int8", INT8_FILE))
    }
    totals = {name: 0.0 for name in sessions}
    count = 0
    for messages in conversations[: cfg.heldout_items]:
        inputs, targets = template.render(messages).inputs_targets()
        ids = np.array([inputs[-meta.block_size :]], dtype=np.int64)
        wanted = np.array([targets[-meta.block_size :]], dtype=np.int64)
        for name, session in sessions.items():
            loss, n = _masked_loss(session.run(None, {"input_ids": ids})[0], wanted)
            totals[name] += loss
        count += n
    fp32, int8 = totals["fp32"] / max(count, 1), totals["int8"] / max(count, 1)
    return {
        "loss_fp32": round(fp32, 5),
        "loss_int8": round(int8, 5),
        "loss_delta": round(int8 - fp32, 5),
        "tokens": count,
    }


# ---------------------------------------------------------------------------- architecture view


@torch.no_grad()
def architecture_parity(
    model: GPT, out: Path, tokenizer: Tokenizer, cfg: ExportConfig, conversations: list[list[Message]]
) -> dict:
    """The gate for architecture.onnx: its Block count is n_layer, its logits match PyTorch at the
    gate's shapes, and its greedy generations (no cache) equal PyTorch's token for token."""
    name = onnx_architecture.ARCHITECTURE_GRAPH
    blocks = onnx_architecture.block_count(onnx.load(str(out / name), load_external_data=False))
    if blocks != model.cfg.n_layer:
        raise ParityError(
            f"export parity gate: {name} has {blocks} Block nodes for n_layer={model.cfg.n_layer} — nothing was published"
        )
    rng = np.random.default_rng(cfg.seed)
    session = ortgen.open_session(out / name, cfg.threads)
    diffs = {}
    for batch, length in gate_shapes(cfg.parity_shapes, model.cfg.block_size, rng):
        ids = rng.integers(0, model.cfg.vocab_size, size=(batch, length), dtype=np.int64)
        diffs[f"{batch}x{length}"] = _max_diff(session.run(None, {"input_ids": ids}), [model(torch.from_numpy(ids))])
    failures = [f"{shape}: {diff:.2e}" for shape, diff in diffs.items() if not diff <= cfg.tolerance]
    if failures:
        raise ParityError(
            f"export parity gate: {name} logits differ from PyTorch above export.tolerance={cfg.tolerance:g} "
            f"for {'; '.join(failures)} — nothing was published"
        )
    prompts = parity_prompts(
        tokenizer, conversations, cfg.generation_prompts, model.cfg.block_size, cfg.generation_tokens, cfg.seed
    )
    stop_ids = ChatTemplate(tokenizer).stop_ids
    differ = [
        number
        for number, prompt in enumerate(prompts)
        if onnx_architecture.greedy_ids(session, prompt, cfg.generation_tokens, model.cfg.block_size, stop_ids)
        != generate_ids(model, prompt, cfg.generation_tokens, stop_ids=stop_ids)
    ]
    if differ:
        raise ParityError(
            f"export parity gate: greedy generation with {name} differs from PyTorch for prompts "
            f"{differ} of {len(prompts)} — nothing was published"
        )
    return {
        "blocks": blocks,
        "max_abs_diff": max(diffs.values()),
        "generation_prompts": len(prompts),
        "generation_matches": len(prompts),
    }


def export_hf(
    model: GPT, tokenizer: Tokenizer, out: Path, cfg: ExportConfig, conversations: list[list[Message]]
) -> dict:
    """Write ``hf/`` and check it with transformers on the gate's shapes, prompts and held-out items."""
    block = model.cfg.block_size
    started = time.perf_counter()
    hf_dir = hf_checkpoint.write_checkpoint(model, tokenizer, out / hf_checkpoint.HF_DIR)
    shapes = gate_shapes(cfg.parity_shapes, block, np.random.default_rng(cfg.seed))
    prompts = parity_prompts(tokenizer, conversations, cfg.generation_prompts, block, cfg.generation_tokens, cfg.seed)
    figures, failures = hf_checkpoint.check_checkpoint(
        model, tokenizer, hf_dir, cfg.tolerance, shapes, prompts, cfg.generation_tokens, conversations, cfg.seed
    )
    if failures:
        raise ParityError(
            f"export parity gate: the Hugging Face checkpoint ({hf_checkpoint.HF_DIR}/, loaded with "
            f"transformers) differs from gptpipe: {'; '.join(failures)} — nothing was published"
        )
    return {**figures, "seconds": round(time.perf_counter() - started, 3)}


# ---------------------------------------------------------------------------- stage


def run(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    ecfg = cfg.export
    if ecfg.source not in inputs:
        raise ConfigError(
            f"export.source = {ecfg.source!r}: no '{ecfg.source}' input artifact was given; "
            f"pass --input {ecfg.source}=<artifact dir> or set export.source to a stage that ran"
        )
    set_threads(ecfg.threads)
    model = load_model(model_directory(inputs[ecfg.source]), "cpu").float().eval()
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    copy_tokenizer(inputs["tokenizer"], out)

    external = ecfg.external_data or weight_bytes(model) > PROTOBUF_LIMIT
    started = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        graphs = export_graphs(model, out, ecfg.opset, external, ecfg.pt2)
    graphs["architecture"] = onnx_architecture.save_architecture(model, out, ecfg.opset, external)  # architecture view
    architecture_svg.write_svg(out / graphs["architecture"], out / architecture_svg.SVG_FILE)
    export_seconds = time.perf_counter() - started
    write_meta(model, out, graphs, ecfg, external)
    check_graphs(out, [graphs["logits"], graphs["kv"], graphs["architecture"]])

    started = time.perf_counter()
    conversations, heldout_source = heldout_conversations(
        inputs[ecfg.source], max(ecfg.heldout_items, ecfg.generation_prompts), ecfg.seed
    )
    metrics = check_parity(model, out, tokenizer, ecfg, conversations)
    metrics["architecture"] = architecture_parity(model, out, tokenizer, ecfg, conversations)  # architecture view
    metrics["parity_seconds"] = round(time.perf_counter() - started, 3)

    if ecfg.hf:  # ---- Hugging Face checkpoint, behind its own gate (stages/lm/hf_checkpoint.py)
        metrics["hf"] = export_hf(model, tokenizer, out, ecfg, conversations)
        tracker.log_artifact(out / hf_checkpoint.HF_DIR, hf_checkpoint.HF_DIR)
        tracker.log_metrics(
            {
                "export.hf_max_abs_diff": metrics["hf"]["max_abs_diff"],
                "export.hf_tokenizer_matches": metrics["hf"]["tokenizer_matches"],
            }
        )

    if ecfg.quantize:
        graphs["int8"] = quantize_int8(out, external)
        write_meta(model, out, graphs, ecfg, external)
        metrics["int8"] = {**heldout_loss_change(out, tokenizer, ecfg, conversations), "heldout": heldout_source}
    metrics.update(
        export_seconds=round(export_seconds, 3),
        external_data=external,
        opset=ecfg.opset,
        source=ecfg.source,
        file_bytes=file_sizes(out),
        parameters=model.num_params(non_embedding=False),
    )
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
