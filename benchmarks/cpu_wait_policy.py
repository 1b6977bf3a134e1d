"""What OpenMP's wait policy does to CPU training on a shared machine (``stages/core/cpu_threads.py``).

    .venv/bin/python benchmarks/cpu_wait_policy.py [--steps 10] [--rounds 3]

Each trainer is a process training the default recipe's model shape (4 layers, 256 wide, 2,048
ids, 8 x 256 tokens a step, random tokens) on as many threads as the machine has cores. For each
setting (libgomp's default, which spins a while before sleeping; ``OMP_WAIT_POLICY=PASSIVE``, what
gptpipe sets; a shorter spin) it measures one trainer alone and two trainers side by side, the way
two ``make run`` or a run beside the test suite share the machine. The rounds alternate the
settings; the medians and their ratios to the default are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {  # environment of the trainers: no variable is libgomp's default
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}


def train(steps: int) -> None:
    """The child: warm up, then print tokens per second over ``steps`` optimiser steps."""
    import torch
    import torch.nn.functional as F

    from stages.lm.model import GPT, GPTConfig

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = GPT(GPTConfig(vocab_size=2048, n_layer=4, n_head=4, n_embd=256, block_size=256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 2048, (8, 256)), torch.randint(0, 2048, (8, 256))

    def step() -> None:
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    print(steps * x.numel() / (time.perf_counter() - started))


def trainers(count: int, setting: str, steps: int) -> list[float]:
    """Tokens per second of ``count`` trainers started together under ``setting``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env = {**env, **SETTINGS[setting], "PYTHONPATH": os.getcwd()}
    command = [sys.executable, __file__, "--child", "--steps", str(steps)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a trainer under {setting} exited {proc.returncode}")
        rates.append(float(out.strip().splitlines()[-1]))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per trainer")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per policy")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        train(args.steps)
        return 0
    alone: dict[str, list[float]] = {name: [] for name in SETTINGS}
    paired: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds):
        for name in SETTINGS:
            alone[name] += trainers(1, name, args.steps)
            paired[name].append(sum(trainers(2, name, args.steps)))
            print(
                f"round {round_ + 1} {name}: alone {alone[name][-1]:.0f} tok/s, "
                f"two side by side {paired[name][-1]:.0f} tok/s together",
                flush=True,
            )
    one = {name: statistics.median(rates) for name, rates in alone.items()}
    two = {name: statistics.median(rates) for name, rates in paired.items()}
    print(f"\ncores: {os.cpu_count()}; tokens/s, median of {args.rounds}; (x): ratio to the default")
    print("| setting | one trainer alone | two side by side, together |")
    print("|---|---:|---:|")
    for name in SETTINGS:
        print(
            f"| {name} | {one[name]:.0f} ({one[name] / one['default']:.2f}x) "
            f"| {two[name]:.0f} ({two[name] / two['default']:.2f}x) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
