"""``gptpipe plan --config RECIPE [--gpu NAME]``: what the recipe's training stages need, before launch.

Per training stage: processes and devices, parameters, bytes per device (weights, gradients, AdamW
state, activations, the loss's workspace; as the recipe sets it and with activation checkpointing and
FSDP toggled), tokens, FLOPs, hours at a stated MFU, and one line saying whether it fits. The figures
come from ``stages.training.plan``; nothing here imports torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from stages.core.errors import GptpipeError
from stages.lm.shape import GPTConfig
from stages.training.plan import DEFAULT_GPU, StagePlan, stage_plan, target_for

TRAINING_STAGES = ("pretrain", "finetune")
DEFAULT_MFU = 0.4
COLUMNS = ("weights", "gradients", "optimizer", "activations", "workspace", "gathered", "buckets")


def _size(n: float, unit: int) -> str:
    return f"{n / unit:,.2f}" if unit == 2**30 else f"{n / unit:,.1f}"


def _fit_line(plan: StagePlan) -> str:
    """One line: fits or not, by how much, and what would fit instead."""
    gib, recipe = 2**30, plan.options[0]
    where = (
        f"one {plan.target.name} ({plan.target.memory_bytes / gib:g} GiB)"
        if plan.target.on_cuda
        else f"this machine's memory ({plan.target.memory_bytes / gib:.1f} GiB, shared by {plan.processes} process(es))"
    )
    usable = f"{plan.usable / gib:.2f} GiB usable (90 %)"
    if plan.fits:
        return f"fit: {plan.stage} FITS {where}: {recipe.needs / gib:.2f} GiB of {usable}"
    better = next((o for o in plan.options[1:] if o.needs <= plan.usable), None)
    if better is None:
        hint = (
            f"none of the options above fits: lower {plan.stage}.batch_size and raise {plan.stage}.grad_accum "
            f"(same {plan.tokens_per_step:,} tokens per step), or name a larger GPU"
        )
    else:
        sets = [f"--set {plan.stage}.activation_checkpointing={str(better.checkpointing).lower()}"]
        if better.parallel != recipe.parallel:
            sets.insert(0, f"--set {plan.stage}.parallel={better.parallel}")
        hint = f"{better.label} needs {better.needs / gib:.2f} GiB: {' '.join(sets)}"
    return f"fit: {plan.stage} DOES NOT FIT {where}: needs {recipe.needs / gib:.2f} GiB, {usable}; {hint}"


def _memory_table(plan: StagePlan) -> list[str]:
    """Bytes per device, one row per option; columns that are zero in every row are left out."""
    unit = 2**30 if max(o.bytes.total for o in plan.options) >= 2**30 else 2**20
    per = "per GPU" if plan.target.on_cuda else "per process"
    columns = [c for c in COLUMNS if any(getattr(o.bytes, c) for o in plan.options)]
    width = max(len(o.label) for o in plan.options)
    lines = [f"  memory {per}, {'GiB' if unit == 2**30 else 'MiB'}:"]
    lines.append("    " + " " * width + "".join(f"{c:>12}" for c in (*columns, "total")))
    for option in plan.options:
        cells = [getattr(option.bytes, c) for c in columns] + [option.bytes.total]
        lines.append(f"    {option.label:<{width}}" + "".join(f"{_size(v, unit):>12}" for v in cells))
    return lines


def _duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def render(plan: StagePlan, mfu: float) -> str:
    """The stage's plan as text (the memory table has one row per option, the recipe's first)."""
    target = plan.target
    devices = (
        f"{plan.processes} process(es) on {plan.nnodes} node(s), one {target.name} each"
        if target.on_cuda
        else f"{plan.processes} process(es) on {target.name}"
    )
    per_step = plan.tokens_per_step
    lines = [
        f"{plan.stage}: {devices}, {plan.precision}",
        f"  parameters   {plan.n_params:,} ({plan.trainable:,} trained)",
        f"  tokens       {plan.tokens:,} ({plan.tokens // per_step:,} steps x {per_step:,} tokens per step)",
        f"  FLOPs        {plan.flops:.3g} ({plan.flops_per_token:.4g} per token: 6 x parameters + attention)",
        f"  time         {_duration(plan.hours(mfu))} at MFU {mfu:.0%} (--mfu) of the peak",
        f"  peak         {target.peak_source}",
        *_memory_table(plan),
        "  " + _fit_line(plan),
    ]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from stages.core.config import load_config

    if not 0 < args.mfu <= 1:
        raise GptpipeError(f"--mfu {args.mfu}: give the share of the peak to assume, between 0 and 1 (e.g. 0.4)")
    cfg = load_config(args.config, args.overrides)
    shape = GPTConfig(vocab_size=cfg.tokenizer.vocab_size, **cfg.pretrain.model.model_dump())
    stages = [s for s in TRAINING_STAGES if s in cfg.stages]
    print(
        f"plan for {args.config} ({cfg.name}): a {shape.n_layer}-layer GPT, width {shape.n_embd}, "
        f"context {shape.block_size}, vocabulary {shape.vocab_size} (tokenizer.vocab_size)"
    )
    on_cuda = [s for s in stages if getattr(cfg, s).device.startswith("cuda")]
    if on_cuda and not args.gpu:
        print(f"no --gpu named: {' and '.join(on_cuda)} (device cuda) planned on {DEFAULT_GPU}s")
    for name in stages:
        section = getattr(cfg, name)
        plan = stage_plan(name, section, shape, target_for(section, args.gpu, args.gpu_memory))
        print()
        print(render(plan, args.mfu))
    return 0


def add_plan_command(sub: argparse._SubParsersAction, recipe_args: Callable[[argparse.ArgumentParser], None]) -> None:
    plan = sub.add_parser(
        "plan",
        help="what the recipe's training stages need (memory per GPU, tokens, FLOPs, hours) and whether it fits",
        description="Sizes each training stage of the recipe on a named GPU (or this machine's CPU) without "
        "running anything: processes, parameters, bytes per device with and without activation checkpointing "
        "and FSDP, tokens, FLOPs, hours at a stated MFU, and whether it fits.",
    )
    recipe_args(plan)
    plan.add_argument(
        "--gpu",
        help="GPU to plan for: H100, H200, A100, L4, L40S, A10G, T4, … (default: this machine's CPU for "
        "device auto/cpu, H100 for device cuda)",
    )
    plan.add_argument(
        "--gpu-memory", type=float, default=0.0, metavar="GIB", help="the GPU's memory, when not the table's"
    )
    plan.add_argument(
        "--mfu", type=float, default=DEFAULT_MFU, help="share of the peak assumed for hours (default: %(default)s)"
    )
    plan.set_defaults(func=cmd_plan)
