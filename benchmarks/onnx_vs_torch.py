"""Per-generated-token latency: ONNX Runtime + KV graph vs PyTorch eager + KV cache, on the CPU.

    .venv/bin/python benchmarks/onnx_vs_torch.py            # tiny shape, 2 threads
    .venv/bin/python benchmarks/onnx_vs_torch.py --opsets 18 23 --repeats 7

Both runtimes run in this one process, alternately, on the same random-weight model of the
``tiny`` recipe's shape (d 256, 4 layers, 4 heads, block 256, vocab 2048): weights do not change
the cost. A measurement is one greedy decode of ``--new-tokens`` tokens after a ``--prompt``
token prefill; the prefill is timed apart, so "per token" is the steady cached step. Each
figure is the median over ``--repeats`` of the mean step time. The ORT variants cover what the
runtime lets one tune: graph optimisation level, intra-op threads, and the opset (23 emits
fused Attention / RMSNormalization ops).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.config import ExportConfig
from stages.formats.onnx import exporter as onnx_export
from stages.formats.onnx.runtime import OnnxGenerator
from stages.lm.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=2048, n_layer=4, n_head=4, n_embd=256, block_size=256)


def torch_decode(model: GPT, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, mean seconds per cached step, generated ids) with PyTorch eager."""
    with torch.inference_mode():
        start = time.perf_counter()
        logits, past = model.forward_with_cache(torch.from_numpy(prompt))
        token = int(torch.argmax(logits[0, -1]))
        prefill = time.perf_counter() - start
        ids = [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits, past = model.forward_with_cache(torch.tensor([[token]]), past)
            token = int(torch.argmax(logits[0, -1]))
            ids.append(token)
        step = (time.perf_counter() - start) / (new_tokens - 1)
    return prefill, step, ids


def ort_decode(gen: OnnxGenerator, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
    """The same loop through the exported KV graph."""
    start = time.perf_counter()
    logits, past = gen.step(prompt, gen.empty_past())
    token = int(np.argmax(logits[0, -1]))
    prefill = time.perf_counter() - start
    ids = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, past = gen.step(np.array([[token]], dtype=np.int64), past)
        token = int(np.argmax(logits[0, -1]))
        ids.append(token)
    step = (time.perf_counter() - start) / (new_tokens - 1)
    return prefill, step, ids


def export_to(model: GPT, directory: Path, opset: int) -> Path:
    directory.mkdir(parents=True)
    with torch.no_grad(), onnx_export.quiet_exporter():
        program = onnx_export.trace_logits(model)
        graphs = onnx_export.export_graphs(model, directory, opset, external=False, program=program)
    cfg = ExportConfig.model_validate({"onnx": {"opset": opset}})
    onnx_export.write_meta(model, directory, graphs, cfg, external=False)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--opsets", type=int, nargs="+", default=[18, 23], help="ONNX opsets to export and time")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per variant (median reported)")
    args = parser.parse_args(argv)
    if args.prompt + args.new_tokens > TINY.block_size:
        parser.error(f"--prompt + --new-tokens must fit in block_size {TINY.block_size}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(1, args.prompt), dtype=np.int64)

    def torch_with(threads: int):
        def run():
            torch.set_num_threads(threads)
            try:
                return torch_decode(model, prompt, args.new_tokens)
            finally:
                torch.set_num_threads(args.threads)

        return run

    # The baseline is torch on --threads; torch on one thread is shown too, since a small decode
    # step often runs faster single-threaded (and ORT gets the same choice below).
    runners = {"torch eager + KV": torch_with(args.threads)}
    if args.threads != 1:
        runners["torch eager + KV threads=1"] = torch_with(1)
    with tempfile.TemporaryDirectory() as tmp:
        for opset in args.opsets:
            started = time.perf_counter()
            directory = export_to(model, Path(tmp) / f"opset{opset}", opset)
            print(f"exported opset {opset} in {time.perf_counter() - started:.1f}s", flush=True)
            for level in ("all", "basic"):
                for threads in sorted({args.threads, 1}):
                    gen = OnnxGenerator(directory, threads=threads, level=level)
                    name = f"ORT opset {opset} opt={level} threads={threads}"
                    runners[name] = lambda gen=gen: ort_decode(gen, prompt, args.new_tokens)

        reference = None
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for name, run in runners.items():  # warm-up, and every variant must generate the same ids
            ids = run()[2]
            reference = reference or ids
            if ids != reference:
                print(f"warning: {name} generated different ids than torch", file=sys.stderr)
        for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
            for name, run in runners.items():
                prefill, step, _ = run()
                results[name].append((prefill, step))

    base_step = statistics.median(s for _, s in results["torch eager + KV"])
    print(
        f"\nshape d{TINY.n_embd} L{TINY.n_layer} H{TINY.n_head} block {TINY.block_size} vocab {TINY.vocab_size}; "
        f"prompt {args.prompt}, {args.new_tokens} new tokens, torch threads {args.threads}, "
        f"median of {args.repeats}\n"
    )
    print(f"{'variant':44s} {'prefill ms':>10s} {'ms/token':>9s} {'speed-up':>9s}")
    for name, values in results.items():
        prefill = statistics.median(p for p, _ in values)
        step = statistics.median(s for _, s in values)
        print(f"{name:44s} {prefill * 1e3:10.2f} {step * 1e3:9.3f} {base_step / step:8.2f}x")

    def best(prefix: str) -> tuple[str, float]:
        name = min(
            (n for n in results if n.startswith(prefix)), key=lambda n: statistics.median(s for _, s in results[n])
        )
        return name, statistics.median(s for _, s in results[name])

    ort_name, ort_step = best("ORT")
    torch_name, torch_step = best("torch")
    same = f"ORT opset {args.opsets[0]} opt=all threads={args.threads}"
    same_ratio = base_step / statistics.median(s for _, s in results[same])
    ratio = torch_step / ort_step
    print(f"\nsame threads ({args.threads}): {same} is {same_ratio:.2f}x torch eager per generated token")
    print(
        f"best vs best: {ort_name} is {ratio:.2f}x {torch_name} "
        f"({'meets' if min(ratio, same_ratio) >= 1.5 else 'misses'} the 1.5x goal)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
