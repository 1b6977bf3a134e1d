"""Stage ``export``: the trained GPT in every export format the recipe turns on, each behind its gate.

Each format is one declaration in ``stages/formats/`` (``stages.formats.registry`` lists them: the
ONNX graphs, ``model.pt2``, the architecture view, the int8 ONNX copy, ``hf/``, ``model.gguf``,
``genai/`` and its quantized twin); its files and their descriptions are this stage's outputs. For
each enabled format ``run`` writes, gates (one ``GateInputs`` built once, one ``GateResult`` back) and
logs; then it times the formats that can serve on this machine, records the fastest (or
``export.serving.runtime``) in ``export.json`` and writes the equivalence certificate: one row per
format from the gates' results.

A gate that finds a format wrong raises ``ParityError``, so the executor publishes nothing. Every gate
compares with ``stages.formats.parity``. The module imports no torch, onnx or onnxruntime: validating a
recipe imports every stage module; ``run`` imports what it uses.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stages import registry
from stages.core.errors import ConfigError
from stages.core.sections import ExportConfig
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.formats import layout
from stages.formats import registry as formats

log = logging.getLogger("gptpipe.export")


def file_sizes(out: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in sorted(out.iterdir())
        if p.is_file() and p.suffix in (".onnx", ".pt2", ".data", ".gguf")
    }


def open_job(ecfg: ExportConfig, inputs: dict[str, Path], out: Path):
    """The model and tokenizer loaded, the tokenizer copied into the export, the gate inputs built once."""
    from stages.formats.job import ExportJob, gate_inputs
    from stages.formats.onnx.exporter import PROTOBUF_LIMIT, weight_bytes
    from stages.lm.tokenizer import Tokenizer
    from stages.training.checkpoint_format import load_model, model_directory
    from stages.training.perf import set_threads

    if ecfg.source not in inputs:
        raise ConfigError(
            f"export.source = {ecfg.source!r}: no '{ecfg.source}' input artifact was given; "
            f"pass --input {ecfg.source}=<artifact dir> or set export.source to a stage that ran"
        )
    set_threads(ecfg.threads)
    model = load_model(model_directory(inputs[ecfg.source]), "cpu").float().eval()
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    external = ecfg.onnx.external_data or weight_bytes(model) > PROTOBUF_LIMIT
    job = ExportJob(model, tokenizer, out, ecfg, external)
    return job, gate_inputs(model, tokenizer, ecfg, inputs[ecfg.source])


def record(metrics: dict, fmt, result, seconds: dict[str, float]) -> None:
    """A format's figures (at the top for the graphs' headline ones) and its seconds, in the metrics."""
    if fmt.figures_at_top:
        metrics.update(result.figures)
    else:
        metrics[fmt.name] = result.figures
    metrics["seconds"][fmt.name] = {step: round(s, 3) for step, s in seconds.items()}


def verdict(result) -> str:
    """How a format came out, for its progress line."""
    return "written and gated" if result.kept else "written, then dropped by its quality gate"


def log_result(tracker: Tracker, out: Path, fmt, result, step: str, seconds: float) -> None:
    """The format's artifact and metrics to the tracker, and its progress line (``step``: "export 2/6: onnx")."""
    if fmt.artifact and result.kept:
        tracker.log_artifact(out / fmt.files[0].name, fmt.artifact)
    if result.logged:
        tracker.log_metrics(result.logged)
    log.info("%s %s in %.1fs", step, verdict(result), seconds)


def run(cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    from stages.formats.certificate import certificate_markdown, certificate_rows
    from stages.formats.job import copy_tokenizer
    from stages.formats.onnx.exporter import write_meta
    from stages.formats.serving_choice import choose_served, time_serving

    job, gate_inputs = open_job(cfg.export, inputs, out)
    chosen = [f for f in formats.FORMATS if f.enabled(job.cfg)]
    for fmt in chosen:
        if fmt.require:  # what would fail after minutes of work fails now (a tokenizer GGUF cannot hold)
            fmt.require(job)
    copy_tokenizer(inputs["tokenizer"], out)
    metrics, results = {"seconds": {}}, {}
    try:
        for done, fmt in enumerate(chosen, 1):  # ---- write, gate, log: the same steps for every format
            started = time.perf_counter()
            fmt.write(job)
            written = time.perf_counter()
            results[fmt.name] = result = fmt.gate(job, gate_inputs)
            seconds = {"write": written - started, "gate": time.perf_counter() - written}
            record(metrics, fmt, result, seconds)
            log_result(tracker, out, fmt, result, f"export {done}/{len(chosen)}: {fmt.name}", sum(seconds.values()))
        started = time.perf_counter()  # ---- which certified runtime serves: timed here, on this machine
        serving = [f for f in chosen if f.serving and results[f.name].kept]
        metrics["decode_ms"] = time_serving(job, serving)
        metrics["seconds"]["timing"] = round(time.perf_counter() - started, 3)
    finally:
        job.close()
    metrics["serve"] = choose_served(job.cfg, metrics["decode_ms"], tuple(chosen))
    write_meta(job.model, out, job.graphs, job.cfg, job.external, serve=metrics["serve"])
    tracker.log_metrics({f"export.decode_ms.{name}": ms for name, ms in metrics["decode_ms"].items()})
    prompts = len(gate_inputs.prompts)
    metrics["certificate"] = certificate_rows(list(results.values()), metrics["decode_ms"], metrics["serve"], prompts)
    (out / layout.CERTIFICATE_FILE).write_text(certificate_markdown(metrics["certificate"]), encoding="utf-8")
    tracker.log_artifact(out / layout.CERTIFICATE_FILE)
    return finish(metrics, job)


def finish(metrics: dict, job) -> dict:
    """The export-wide figures beside the formats' own, and the log line."""
    metrics.update(
        external_data=job.external,
        opset=job.cfg.onnx.opset,
        source=job.cfg.source,
        file_bytes=file_sizes(job.out),
        parameters=job.model.num_params(non_embedding=False),
    )
    log.info(
        "export: %s; max |dlogits| %.2e, generation %d/%d identical, serving %s",
        ", ".join(name for name in metrics["seconds"] if name != "timing"),
        metrics["max_abs_diff"],
        metrics["generation_matches"],
        metrics["generation_prompts"],
        metrics["serve"],
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
    runtime = ecfg.serving.runtime
    if runtime in ("genai", "quantized") and not ecfg.genai.enabled:
        problems.append(
            f"export.serving.runtime = {runtime!r} needs export.genai.enabled=true; "
            "or use export.serving.runtime=fastest"
        )
    if runtime == "quantized" and not ecfg.quantized.enabled:
        problems.append(
            "export.serving.runtime = 'quantized' needs export.quantized.enabled=true; "
            "or use export.serving.runtime=fastest"
        )
    return problems


STAGE = Stage(
    name="export",
    summary="every export format behind its gate against PyTorch",
    sections=("export",),
    inputs=("tokenizer", "finetune"),
    outputs=(
        *(output for fmt in formats.FORMATS for output in fmt.files),
        Output(layout.TOKENIZER_DIR, "the tokenizer artifact's files, so the export runs on its own"),
        Output(layout.META_FILE, "shapes, tensor names and graph files"),
        Output(layout.CERTIFICATE_FILE, "the equivalence certificate: one row per format, the served runtime marked"),
    ),
    run=run,
    headline=("max_abs_diff", "generation_matches"),
    choose_inputs=_inputs,
    check=_problems,
)
