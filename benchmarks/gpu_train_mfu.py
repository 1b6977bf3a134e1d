"""Training tokens/s and MFU of the 124M recipe on whatever GPU this machine has.

    .venv/bin/python benchmarks/gpu_train_mfu.py                        # configs/gpt2-small-1gpu.yaml
    .venv/bin/python benchmarks/gpu_train_mfu.py --set compile=off --set precision=fp32
    .venv/bin/python benchmarks/gpu_train_mfu.py --smoke                 # tiny shape on the CPU: checks the script

Runs gptpipe's own ``train()`` (so every recipe switch applies: compile, bf16, fused AdamW, TF32,
activation checkpointing) on random tokens — token values do not change the cost — for
``--steps`` steps of warm-up (compilation happens here) and then ``--steps`` measured ones, and
prints the measured window's tokens/s and MFU, the peak it was divided by and where that peak came from
(the GPU table in ``stages/training/perf.py``, or a probe for GPUs not in it), and peak memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_vs_hf_gpt2 import RandomTokens

from stages.core.config import load_config
from stages.core.tracking import MemoryTracker
from stages.lm.model import GPT, GPTConfig
from stages.training.loop import Display, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/gpt2-small-1gpu.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a pretrain field, e.g. compile=off (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=20, help="warm-up steps, and then measured steps")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the script itself")
    args = parser.parse_args()

    overrides = [f"pretrain.{item}" for item in args.overrides]
    if args.smoke:
        overrides += [
            "pretrain.device=cpu",
            "pretrain.model.n_layer=2",
            "pretrain.model.n_embd=64",
            "pretrain.model.n_head=2",
            "pretrain.model.block_size=64",
            "pretrain.batch_size=4",
            "tokenizer.vocab_size=512",
            "pretrain.threads=2",
        ]
    recipe = load_config(args.recipe, overrides)
    # Two log windows of --steps each: the first absorbs compilation, the second is the figure.
    cfg = recipe.pretrain.model_copy(
        update={
            "max_steps": 2 * args.steps,
            "grad_accum": 1,
            "warmup_steps": 1,
            "log_interval": args.steps,
            "eval_interval": 2 * args.steps + 1,
            "checkpoint_interval": 0,
            "nproc_per_node": 1,
        }
    )
    vocab = recipe.tokenizer.vocab_size
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, **cfg.model.model_dump()))
    tracker = MemoryTracker()
    result = train(
        model, RandomTokens(vocab, cfg.batch_size, cfg.model.block_size), cfg, tracker, display=Display(progress=False)
    )
    window = result.curve[-1]  # the last logged window: after compilation and warm-up

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU"
    print("| device | params | batch x context | precision | compile | tokens/s | MFU | peak memory |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    print(
        f"| {device} | {model.num_params(non_embedding=False) / 1e6:.1f}M | {cfg.batch_size} x {cfg.model.block_size} "
        f"| {result.precision} | {result.compiled} | {window['tokens_per_s']:,.0f} | {100 * window['mfu']:.1f} % "
        f"| {window['peak_memory_mb']:,.0f} MiB |"
    )
    print(f"\nMFU peak: {result.peak_source}")
    print(f"model FLOPs per token: {result.flops_per_token / 1e9:.3f} GFLOP (6N + attention)")


if __name__ == "__main__":
    main()
