"""Prefill and decode latency of every runtime gptpipe exports to, on the same weights and threads.

    .venv/bin/python benchmarks/decode.py                                  # tiny and GPT-2-small, 2 threads
    .venv/bin/python benchmarks/decode.py --shapes tiny --rounds 3
    .venv/bin/python benchmarks/decode.py --precisions fp32                # no int4 rows

For each shape, one random-weight GPT is written with the export's own library functions into a
temporary directory — ``model_kv.onnx`` + ``export.json`` (``stages.lm.onnx_export``), ``hf/``
(``stages.lm.hf_checkpoint``) and the onnxruntime-genai folder built from it
(``stages.lm.genai_package``; ``-p int4`` too unless ``--precisions fp32``) — and each runtime
generates greedily from the same 32-token prompt, in one process, alternately, ``--rounds`` times:

* PyTorch eager + KV cache: ``stages.lm.generate.generate_ids``;
* gptpipe's served runtime: ``stages.lm.onnx_runtime.OnnxGenerator`` on ``model_kv.onnx``;
* onnxruntime-genai: ``og.Model``/``og.Generator`` on the builder's folder (fp32, and int4 labelled).

Each runtime runs through its own generation loop, so its per-step overhead counts. A round times
one new token (the prefill: the prompt's forward pass and the first pick) and ``--new-tokens``
new tokens; decode ms/token is (T(new) - T(1)) / (new - 1). Figures are medians over rounds. No
stop id ends a run early (onnxruntime-genai's min_length is set to its max_length). The tokenizer
is a small stand-in (the runtimes are fed ids; only the builder needs tokenizer files). Weights
do not change the cost, so random weights measure what a trained model would.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.config import ExportConfig, TokenizerConfig
from stages.lm import genai_package, hf_checkpoint
from stages.lm.export_layout import GENAI_DIR, HF_DIR
from stages.lm.generate import generate_ids
from stages.lm.model import GPT, GPTConfig
from stages.lm.onnx_export import export_graphs, quiet_exporter, write_meta
from stages.lm.onnx_runtime import OnnxGenerator
from stages.lm.tasks import make_items
from stages.lm.tokenizer import Tokenizer
from stages.lm.tokenizer_training import train_model

SHAPES = {
    # configs/tiny.yaml's model
    "tiny": GPTConfig(vocab_size=2048, n_layer=4, n_head=4, n_embd=256, block_size=256),
    # GPT-2 small's width, depth and heads with GPT-2's padded vocabulary
    "gpt2-small": GPTConfig(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=1024),
}

Runner = Callable[[list[int], int], list[int]]


def stand_in_tokenizer() -> Tokenizer:
    """A 300-piece BPE tokenizer (about a second to train): the builder copies tokenizer files, the runs feed ids."""
    docs = [f"{item.prompt}\n{item.answer}" for item in make_items(3000, "train", 0)]
    return Tokenizer(train_model(docs, TokenizerConfig(vocab_size=300, threads=1)))


def write_artifacts(model: GPT, tokenizer: Tokenizer, out: Path, precisions: list[str]) -> dict[str, Path]:
    """The KV graph with export.json, hf/, and one onnxruntime-genai folder per precision."""
    with torch.no_grad(), quiet_exporter():
        graphs = export_graphs(model, out, ExportConfig().opset, False, False)
    write_meta(model, out, graphs, ExportConfig(), False)
    hf_dir = hf_checkpoint.write_checkpoint(model, tokenizer, out / HF_DIR)
    return {p: genai_package.build_package(hf_dir, out / f"{GENAI_DIR}-{p}", p) for p in precisions}


def genai_runner(folder: Path, threads: int) -> Runner:
    import onnxruntime_genai as og

    model = genai_package.open_model(folder, threads)

    def run(prompt: list[int], new_tokens: int) -> list[int]:
        params = og.GeneratorParams(model)
        length = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        ids = []
        while len(ids) < new_tokens:
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
        return ids

    return run


def timed(run: Runner, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = run(prompt, new_tokens)
    return time.perf_counter() - start, ids


def bench_shape(name: str, args: argparse.Namespace, tokenizer: Tokenizer) -> list[dict]:
    cfg = SHAPES[name]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, size=args.prompt)]
    with tempfile.TemporaryDirectory(prefix=f"decode-{name}-") as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        folders = write_artifacts(model, tokenizer, out, args.precisions)
        print(f"[{name}] artifacts written in {time.perf_counter() - started:.1f} s", flush=True)
        served = OnnxGenerator(out, threads=args.threads)
        runners: dict[str, Runner] = {
            "PyTorch eager + KV (generate_ids)": lambda p, n: generate_ids(model, p, n),
            "gptpipe served (OnnxGenerator, model_kv.onnx)": lambda p, n: served.generate_ids(p, n),
        }
        for precision, folder in folders.items():
            runners[f"onnxruntime-genai {precision} (builder -p {precision})"] = genai_runner(folder, args.threads)
        times: dict[str, dict[str, list[float]]] = {label: {"one": [], "all": []} for label in runners}
        ids: dict[str, list[int]] = {}
        with torch.inference_mode():
            for run in runners.values():  # warm-up: first-call allocations and graph setup
                run(prompt, 2)
            for _ in range(args.rounds):
                for label, run in runners.items():
                    one, _ = timed(run, prompt, 1)
                    total, ids[label] = timed(run, prompt, args.new_tokens)
                    times[label]["one"].append(one)
                    times[label]["all"].append(total)
    reference = ids[next(iter(runners))]
    rows = []
    for label in runners:
        one, total = statistics.median(times[label]["one"]), statistics.median(times[label]["all"])
        same = sum(a == b for a, b in zip(ids[label], reference))
        rows.append(
            {
                "shape": name,
                "runtime": label,
                "prefill_ms": 1000 * one,
                "decode_ms": 1000 * (total - one) / (args.new_tokens - 1),
                "ids_same": f"{same}/{len(reference)}",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2-small", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; figures are medians")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy new tokens (decode)")
    parser.add_argument(
        "--precisions", default="fp32,int4", help="onnxruntime-genai builder precisions (fp32, int4, int8)"
    )
    args = parser.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    torch.set_num_threads(args.threads)
    tokenizer = stand_in_tokenizer()
    rows = [row for name in shapes for row in bench_shape(name, args, tokenizer)]

    print(
        f"\n{args.threads} threads, prompt {args.prompt} tokens, {args.new_tokens} greedy tokens, "
        f"median of {args.rounds} alternating rounds; ids same = greedy ids equal to PyTorch's"
    )
    print("| shape | runtime | prefill ms | decode ms/token | ids same |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['shape']} | {row['runtime']} | {row['prefill_ms']:.2f} | {row['decode_ms']:.3f} | {row['ids_same']} |"
        )
    for name in shapes:
        by_label = {row["runtime"]: row for row in rows if row["shape"] == name}
        served = by_label["gptpipe served (OnnxGenerator, model_kv.onnx)"]["decode_ms"]
        for label, row in by_label.items():
            if label.startswith("onnxruntime-genai"):
                print(f"{name}: served / {label.split(' (')[0]} decode = {served / row['decode_ms']:.2f}x")


if __name__ == "__main__":
    main()
