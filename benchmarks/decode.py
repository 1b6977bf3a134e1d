"""Prefill and decode latency of every runtime gptpipe exports to, on the same weights and threads,
and the two ratios issue 21 sets: gptpipe's served runtime against onnxruntime-genai (fp32) and
its quantized serving against the best quantized peer.

    .venv/bin/python benchmarks/decode.py                                  # tiny and GPT-2-small, 2 threads
    .venv/bin/python benchmarks/decode.py --shapes tiny --rounds 3

For each shape, one random-weight GPT is written with the export's own library functions into a
temporary directory: ``model_kv.onnx`` + ``export.json`` (``stages.formats.onnx.exporter``), ``hf/``
(``stages.formats.llama.hf_checkpoint``), ``genai/`` and ``genai-quantized/`` (int4) built from it by
onnxruntime-genai's builder (``stages.formats.genai.package``), and ``model.gguf``
(``stages.formats.llama.gguf_writer``). gptpipe's served runtime is chosen as the export chooses it
(``stages.formats.serving_choice``: the fastest certified fp32 runtime, timed here first) and opened
through ``stages.formats.served.open_served``, the call ``gptpipe generate --onnx`` and the registry's
MLflow model make; its quantized serving is ``genai-quantized/`` opened the same way.

Rows, each through its own generation loop (so per-step overhead counts), timed alternately in one
process, ``--rounds`` times, by ``stages.formats.decode_timing`` (prefill = one new token; decode ms/token
= (T(new) - T(1)) / (new - 1); medians):

* PyTorch eager + KV cache (``stages.lm.generate.generate_ids``);
* gptpipe served, fp32 and quantized (``open_served(...).generate_ids``);
* gptpipe's ONNX Runtime loop on ``model_kv.onnx`` (``OnnxGenerator``), when it is not what serves;
* onnxruntime-genai's own loop (``og.Generator``) on the fp32 and int4 folders;
* llama.cpp f32 and Q8_0 on the GGUF, when ``benchmarks/build_llama_cpp.sh`` has built it (``llama-bench``
  ``-p <prompt> -n <new> -t <threads>``, its own timing, run between the rounds above).

The tokenizer is a small stand-in (the runtimes are fed ids; only the builder needs tokenizer
files). Random weights cost what trained ones do, so they measure decode speed, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.config import ExportConfig, TokenizerConfig
from stages.formats.decode_timing import Runner, time_decode
from stages.formats.genai import package as genai_package
from stages.formats.genai.runtime import GenaiGenerator
from stages.formats.layout import GENAI_DIR, GENAI_QUANTIZED_DIR, GGUF_FILE, HF_DIR, KV_GRAPH
from stages.formats.llama import gguf_writer as gguf_export
from stages.formats.llama import hf_checkpoint
from stages.formats.onnx.exporter import export_graphs, quiet_exporter, trace_logits, write_meta
from stages.formats.onnx.runtime import OnnxGenerator
from stages.formats.served import open_served
from stages.formats.serving_choice import choose_served
from stages.lm.generate import generate_ids
from stages.lm.model import GPT, GPTConfig
from stages.lm.tasks import make_items
from stages.lm.tokenizer import Tokenizer
from stages.lm.tokenizer_training import train_model

SHAPES = {
    # configs/tiny.yaml's model
    "tiny": GPTConfig(vocab_size=2048, n_layer=4, n_head=4, n_embd=256, block_size=256),
    # GPT-2 small's width, depth and heads with GPT-2's padded vocabulary
    "gpt2-small": GPTConfig(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=1024),
}
SERVED_FP32, SERVED_QUANTIZED = "gptpipe served fp32", "gptpipe served quantized"
GENAI_FP32, GENAI_INT4 = "onnxruntime-genai fp32", "onnxruntime-genai int4"
LLAMA_F32, LLAMA_Q8 = "llama.cpp f32", "llama.cpp Q8_0"
LLAMA_BIN = Path(os.environ.get("GPTPIPE_LLAMA_CPP", Path.home() / ".cache" / "gptpipe" / "llama.cpp" / "bin"))


def stand_in_tokenizer() -> Tokenizer:
    """A 300-piece BPE tokenizer (about a second to train): the builder copies tokenizer files, the runs feed ids."""
    docs = [f"{item.prompt}\n{item.answer}" for item in make_items(3000, "train", 0)]
    return Tokenizer(train_model(docs, TokenizerConfig(vocab_size=300, threads=1)))


def write_artifacts(model: GPT, tokenizer: Tokenizer, out: Path, gguf: bool) -> dict[str, str]:
    """What the export writes for serving: the KV graph with export.json, hf/, genai/ and its int4 twin,
    and (for llama.cpp) model.gguf. Returns the graphs for ``write_meta``."""
    with torch.no_grad(), quiet_exporter():
        graphs = export_graphs(model, out, ExportConfig().onnx.opset, False, trace_logits(model))
    write_meta(model, out, graphs, ExportConfig(), False)
    hf_dir = hf_checkpoint.write_checkpoint(model, tokenizer, out / HF_DIR)
    genai_package.build_package(hf_dir, out / GENAI_DIR, "fp32")
    genai_package.build_package(hf_dir, out / GENAI_QUANTIZED_DIR, "int4")
    if gguf:
        gguf_export.write_gguf(model, padded(tokenizer, model.cfg.vocab_size), out / GGUF_FILE)
    return graphs


def padded(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """The stand-in tokenizer with unused pieces up to ``vocab_size``: llama.cpp takes the vocabulary
    size from the GGUF's token list, which must then match the embedding rows."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for index in range(len(proto.pieces), vocab_size):
        proto.pieces.add(piece=f"<unused{index}>", score=0.0, type=unused)
    return Tokenizer(proto.SerializeToString())


def genai_runner(folder: Path, threads: int) -> Runner:
    """onnxruntime-genai's own loop, as its examples write it (the peer gptpipe's serving is held to)."""
    import onnxruntime_genai as og

    model = genai_package.open_model(folder, threads)

    def run(prompt: list[int], new_tokens: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        ids = []
        while not generator.is_done():
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
        return ids

    return run


def llama_cpp_rows(gguf: Path, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """llama-bench's prefill ms and decode ms/token for the f32 GGUF and its Q8_0 quantization
    (empty when llama.cpp is not built: ``benchmarks/build_llama_cpp.sh`` builds it)."""
    bench, quantize = LLAMA_BIN / "llama-bench", LLAMA_BIN / "llama-quantize"
    if not (bench.is_file() and quantize.is_file()):
        print(f"llama.cpp rows left out: no {bench} (build it with benchmarks/build_llama_cpp.sh)", flush=True)
        return {}
    q8 = gguf.with_name("model-q8_0.gguf")
    subprocess.run([str(quantize), str(gguf), str(q8), "Q8_0"], check=True, capture_output=True)
    rows = {}
    for label, path in ((LLAMA_F32, gguf), (LLAMA_Q8, q8)):
        command = [str(bench), "-m", str(path), "-p", str(args.prompt), "-n", str(args.new_tokens)]
        command += ["-t", str(args.threads), "-r", str(args.rounds), "-o", "json"]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        tests = json.loads(done.stdout)
        prefill = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
        decode = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
        rows[label] = (1000 * prefill["n_prompt"] / prefill["avg_ts"], 1000 / decode["avg_ts"])
    return rows


def bench_shape(name: str, args: argparse.Namespace, tokenizer: Tokenizer) -> list[dict]:
    cfg = SHAPES[name]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, size=args.prompt)]
    with tempfile.TemporaryDirectory(prefix=f"decode-{name}-") as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        graphs = write_artifacts(model, tokenizer, out, gguf=not args.no_llama_cpp)
        print(f"[{name}] artifacts written in {time.perf_counter() - started:.1f} s", flush=True)

        # The export's choice of fp32 runtime, made as the export makes it (export.serving.runtime = fastest).
        kv, genai = OnnxGenerator(out, threads=args.threads), GenaiGenerator(out, GENAI_DIR, args.threads)
        candidates = {KV_GRAPH: lambda p, n: kv.generate_ids(p, n), GENAI_DIR: genai.generate_ids}
        cfg_export = ExportConfig()
        choice = time_decode(candidates, prompt, cfg_export.serving.timing_tokens, cfg_export.serving.timing_rounds)
        served_name = choose_served(cfg_export, {k: t.decode_ms for k, t in choice.items()})
        write_meta(model, out, graphs, cfg_export, False, serve=served_name)
        served = open_served(out, threads=args.threads)
        write_meta(model, out, graphs, cfg_export, False, serve=GENAI_QUANTIZED_DIR)
        served_quantized = open_served(out, threads=args.threads)
        print(f"[{name}] the export would serve fp32 from {served_name}", flush=True)

        runners: dict[str, Runner] = {
            "PyTorch eager + KV": lambda p, n: generate_ids(model, p, n),
            f"{SERVED_FP32} ({served_name})": served.generate_ids,
            f"{SERVED_QUANTIZED} ({GENAI_QUANTIZED_DIR}, int4)": served_quantized.generate_ids,
        }
        if served_name != KV_GRAPH:
            runners[f"gptpipe ONNX Runtime loop ({KV_GRAPH})"] = candidates[KV_GRAPH]
        runners[GENAI_FP32] = genai_runner(out / GENAI_DIR, args.threads)
        runners[GENAI_INT4] = genai_runner(out / GENAI_QUANTIZED_DIR, args.threads)
        with torch.inference_mode():
            timings = time_decode(runners, prompt, args.new_tokens, args.rounds)
        llama = {} if args.no_llama_cpp else llama_cpp_rows(out / GGUF_FILE, args)
    reference = timings["PyTorch eager + KV"].ids
    rows = [
        {
            "shape": name,
            "runtime": label,
            "prefill_ms": t.prefill_ms,
            "decode_ms": t.decode_ms,
            "ids_same": f"{sum(a == b for a, b in zip(t.ids, reference))}/{len(reference)}",
        }
        for label, t in timings.items()
    ]
    rows += [
        {"shape": name, "runtime": label, "prefill_ms": pre, "decode_ms": dec, "ids_same": "(llama-bench)"}
        for label, (pre, dec) in llama.items()
    ]
    return rows


def ratios(rows: list[dict], shape: str) -> list[str]:
    """The two ratios the issue sets, for one shape (a ratio below or at 1.00 meets the goal)."""
    by = {row["runtime"].split(" (")[0]: row["decode_ms"] for row in rows if row["shape"] == shape}
    lines = [f"{shape}: served fp32 / {GENAI_FP32} decode = {by[SERVED_FP32] / by[GENAI_FP32]:.2f}x"]
    peers = {label: by[label] for label in (GENAI_INT4, LLAMA_Q8) if label in by}
    best = min(peers, key=peers.get)
    lines.append(
        f"{shape}: served quantized / best quantized peer ({best}) decode = {by[SERVED_QUANTIZED] / peers[best]:.2f}x"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2-small", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="alternating rounds (every other one in reverse order); figures are medians",
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy new tokens (decode)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave out the llama.cpp rows even when built")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if shutil.which("nproc") and args.threads > os.cpu_count():
        print(f"note: --threads {args.threads} > {os.cpu_count()} CPUs", flush=True)
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
        print("\n".join(ratios(rows, name)))


if __name__ == "__main__":
    main()
