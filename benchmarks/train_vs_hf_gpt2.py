"""Training throughput: gptpipe's pretraining step vs Hugging Face ``GPT2LMHeadModel``, on the CPU.

    .venv/bin/python benchmarks/train_vs_hf_gpt2.py                 # tiny shape, 2 threads
    .venv/bin/python benchmarks/train_vs_hf_gpt2.py --steps 20 --switches compile fused ac bf16

Both models are built here from configs (no hub download) with the same width, depth, heads,
context, batch and vocabulary (the ``tiny`` recipe: d 256, 4 layers, 4 heads, context 256,
vocab 2048, batch 8), fp32, dropout 0, and run through the *same* step code — gptpipe's own
``stages.training.loop`` micro-step (forward, fp32 cross-entropy, backward), global-norm clipping and
an AdamW step — so only the models differ. GPT-2 has learned positions, LayerNorm with biases and
a 4x GELU MLP; gptpipe has RoPE, RMSNorm and a SwiGLU MLP of 8/3 width; their parameter counts
come out within 1 % (printed). After warm-up the two alternate step by step (so drift in a
shared machine's load hits both alike); figures are medians of per-step tokens/s.

The second table turns gptpipe's performance switches on one at a time (``--switches``) against
the fp32 eager baseline, measured the same alternating way, and says whether each pays off here. On a shared machine the
load of other jobs moves every figure; the script prints the load average with the ratio, and
the per-round paired ratio (their step time / ours, each pair back to back) is the steadier one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from types import SimpleNamespace

from stages.core.config import TrainConfig
from stages.lm.model import GPT, GPTConfig
from stages.training import perf
from stages.training.distributed import DistInfo
from stages.training.loop import _grad_norm, _micro_steps, build_optimizer

SHAPE = dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=256, block_size=256)


class HFLogits(nn.Module):
    """GPT2LMHeadModel behind gptpipe's ``model(ids) -> logits`` interface (loss computed outside)."""

    def __init__(self, shape: dict, attn: str):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=shape["vocab_size"],
            n_positions=shape["block_size"],
            n_embd=shape["n_embd"],
            n_layer=shape["n_layer"],
            n_head=shape["n_head"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
        )
        config._attn_implementation = attn
        self.hf = GPT2LMHeadModel(config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits


class RandomTokens:
    """Fixed random batches: token values do not change the cost of a step."""

    def __init__(self, vocab: int, batch: int, length: int):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (batch, length), generator=gen)
        self.y = torch.randint(0, vocab, (batch, length), generator=gen)

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class Runner:
    """One model + optimizer + switches, stepping through gptpipe's training step code."""

    def __init__(self, name: str, model: nn.Module, cfg: TrainConfig, batches: RandomTokens):
        self.name, self.model, self.cfg, self.batches = name, model, cfg, batches
        self.settings = perf.runtime_settings(cfg, torch.device("cpu"))
        if self.settings.activation_checkpointing:
            perf.enable_activation_checkpointing(model)
        self.compile_s = 0.0
        if self.settings.compile:
            perf.compile_blocks(model) if isinstance(model, GPT) else model.compile()
        self.optimizer = build_optimizer(model, cfg, fused=self.settings.fused_optimizer)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # What the loop's _micro_steps reads of its run (model, data, precision, one process).
        self.run = SimpleNamespace(
            net=model,
            batches=batches,
            cfg=cfg,
            device=torch.device("cpu"),
            settings=self.settings,
            scaler=self.scaler,
            info=DistInfo(),
        )
        self.times: list[float] = []

    def step(self, record: bool = True) -> None:
        started = time.perf_counter()
        with self.settings.autocast():
            _micro_steps(self.run, 0)
        _grad_norm(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if record:
            self.times.append(elapsed)
        return elapsed

    def tokens_per_s(self, tokens: int) -> float:
        return tokens / statistics.median(self.times)


def alternate(runners: list[Runner], warmup: int, steps: int) -> None:
    """Warm each up, then step them in turn, reversing the order every round (ABBA...), so
    neither always runs right after the other and slow drift in the machine's load cancels."""
    for runner in runners:
        started = time.perf_counter()
        for _ in range(warmup):
            runner.step(record=False)
        if runner.settings.compile:
            runner.compile_s = time.perf_counter() - started
    for round_ in range(steps):
        for runner in runners if round_ % 2 == 0 else runners[::-1]:
            runner.step()


def paired_ratio(ours: Runner, theirs: Runner) -> float:
    """Median over rounds of (their step time / our step time): each pair ran back to back."""
    return statistics.median(t / o for o, t in zip(ours.times, theirs.times))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gptpipe(cfg: TrainConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SHAPE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15, help="measured steps per model (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--switches",
        nargs="*",
        default=["fused", "ac", "compile"],
        choices=["fused", "ac", "compile", "bf16", "hf-compile"],
        help="table 2 rows; bf16 is ~20x slower on most CPUs, so off by default",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.batch * SHAPE["block_size"]
    batches = RandomTokens(SHAPE["vocab_size"], args.batch, SHAPE["block_size"])
    base = TrainConfig(
        device="cpu", batch_size=args.batch, lr=3e-4, compile="off", precision="fp32", fused_optimizer="off"
    )

    ours = Runner("gptpipe GPT", gptpipe(base), base, batches)
    theirs = Runner("HF GPT2LMHeadModel", HFLogits(SHAPE, "sdpa"), base, batches)
    n_ours, n_theirs = params(ours.model), params(theirs.model)
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {SHAPE['block_size']} tokens, "
        f"d {SHAPE['n_embd']}, {SHAPE['n_layer']} layers, {SHAPE['n_head']} heads, vocab {SHAPE['vocab_size']}"
    )
    print(f"parameters: gptpipe {n_ours:,}  HF GPT-2 {n_theirs:,}  (difference {100 * (n_ours / n_theirs - 1):+.2f} %)")
    alternate([ours, theirs], args.warmup, args.steps)
    a, b = ours.tokens_per_s(tokens), theirs.tokens_per_s(tokens)
    print("\n| model | params | tokens/s (median) |\n|---|---:|---:|")
    print(
        f"| gptpipe GPT (fp32 eager) | {n_ours:,} | {a:,.0f} |\n| HF GPT2LMHeadModel (fp32 eager, sdpa) | {n_theirs:,} | {b:,.0f} |"
    )
    print(
        f"\ngptpipe / HF = {a / b:.2f}x (ratio of medians); paired per-round median {paired_ratio(ours, theirs):.2f}x; "
        f"best steps {min(theirs.times) / min(ours.times):.2f}x; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )

    if args.switches:  # each row printed when measured: compile rows take minutes on a small CPU
        print("\n| switch (CPU) | without, tokens/s | with, tokens/s | speed-up | pays off here? |")
        print("|---|---:|---:|---:|---|", flush=True)
    for switch in args.switches:
        if switch == "hf-compile":
            other = Runner("HF + compile", HFLogits(SHAPE, "sdpa"), base.model_copy(update={"compile": "on"}), batches)
            reference = Runner("HF eager", HFLogits(SHAPE, "sdpa"), base, batches)
        else:
            change = {
                "fused": {"fused_optimizer": "on"},
                "ac": {"activation_checkpointing": True},
                "compile": {"compile": "on"},
                "bf16": {"precision": "bf16"},
            }[switch]
            cfg = base.model_copy(update=change)
            other = Runner(f"gptpipe + {switch}", gptpipe(cfg), cfg, batches)
            reference = Runner("gptpipe eager", gptpipe(base), base, batches)
        alternate([reference, other], 1 if switch == "bf16" else args.warmup, 3 if switch == "bf16" else args.steps)
        without, with_ = reference.tokens_per_s(tokens), other.tokens_per_s(tokens)
        ratio = with_ / without
        verdict = "yes" if ratio > 1.05 else ("no (memory saver: recomputes activations)" if switch == "ac" else "no")
        extra = f" (+{other.compile_s:.0f} s compile)" if other.compile_s else ""
        print(f"| {switch}{extra} | {without:,.0f} | {with_:,.0f} | {ratio:.2f}x | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
