"""``gptpipe sweep``: run one recipe over a grid of overrides, the variants side by side.

    gptpipe sweep --config configs/tiny.yaml --grid finetune.lr=0.001,0.003 [--parallel 2]

Each variant is an ordinary ``gptpipe run`` in its own process, ``--parallel`` at a time (default
1: on one machine, parallel variants share its cores, see ``oversubscribed``) on the same store. Stages whose content key the variants share — with a
fine-tuning grid: tokenizer, data and pretraining — are computed once: the first run to claim a
key builds it, the others wait on its lease and reuse it (their report cards say ``waited``).
MLflow gets one sweep run with each variant's pipeline run nested under it; the sweep prints
one table of the variants' headline metrics and wall times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stages import registry
from stages.core.config import add_override_argument
from stages.core.errors import ConfigError


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["finetune.lr=0.001,0.003", ...]`` as ``[("finetune.lr", ["0.001", "0.003"]), ...]``."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. finetune.lr=0.001,0.003")
        grid.append((key.strip(), choices))
    return grid


def variants(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination of the grid, as ``--set`` overrides."""
    keys = [key for key, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(vs for _, vs in grid))]


def _run_command(args: argparse.Namespace, overrides: list[str], report: Path, parent: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "flows.cli.main", "run", "--config", args.config, "--report-json", str(report)]
    for item in [*args.overrides, *overrides]:
        cmd += ["--set", item]
    if parent:
        cmd += ["--parent-run-id", parent]
    if args.no_track:
        cmd.append("--no-track")
    return cmd


def oversubscribed(cfg: Any, parallel: int, cores: int | None = None) -> str | None:
    """A warning when ``parallel`` variants, each with the recipe's CPU threads, exceed the cores.

    Measured on 2 cores (tiny recipe, threads 2): two fine-tunes side by side took 372 s each
    against 73 s alone; with threads 1 each, the sweep took 196 s against 245 s in a row (README).
    """
    cores = cores or os.cpu_count() or 1
    sections = [getattr(cfg, name) for name in registry.ORDER if hasattr(cfg, name)]
    threads = [section.threads for section in sections if hasattr(section, "threads")]
    per_run = max((t or cores) for t in threads) if threads else cores
    if parallel > 1 and parallel * per_run > cores:
        return (
            f"sweep: {parallel} variants x {per_run} threads on {cores} cores: they will slow each other down; "
            "lower --parallel, or --set the stages' threads so that parallel x threads <= cores"
        )
    return None


def run_variants(args: argparse.Namespace, grid: list[list[str]], parent: str | None, workdir: Path) -> list[dict]:
    """Start the variants' runs, at most ``args.parallel`` at a time; return one record per variant."""
    pending = list(enumerate(grid))
    running: list[tuple[int, subprocess.Popen, float]] = []
    done: dict[int, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            index, overrides = pending.pop(0)
            report = workdir / f"variant-{index}.json"
            print(f"sweep: variant {index}: {' '.join(overrides)}", file=sys.stderr, flush=True)
            proc = subprocess.Popen(_run_command(args, overrides, report, parent))
            running.append((index, proc, time.perf_counter()))
        time.sleep(1.0)
        for entry in list(running):
            index, proc, started = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            report = workdir / f"variant-{index}.json"
            done[index] = {
                "overrides": grid[index],
                "exit_code": proc.returncode,
                "wall_s": round(time.perf_counter() - started, 1),
                "report": json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None,
            }
    return [done[i] for i in range(len(grid))]


def render_table(results: list[dict]) -> str:
    """One row per variant: its overrides, what its stages did, its headline metrics."""
    lines = ["variant  overrides  ran / waited / reused  wall  headline"]
    for index, result in enumerate(results):
        report = result["report"]
        if report is None:
            lines.append(f"{index}  {' '.join(result['overrides'])}  FAILED (exit {result['exit_code']})")
            continue
        stages = report["stages"]
        counts = [sum(1 for r in stages.values() if r.get("status") == s) for s in ("ran", "waited", "reused")]
        shown = []
        for name in ("finetune", "evaluate"):
            if name in stages:
                metrics = stages[name]["metrics"]
                shown += [f"{key}={metrics[key]}" for key in registry.stage(name).headline[:2] if key in metrics]
        lines.append(
            f"{index}  {' '.join(result['overrides'])}  {counts[0]} / {counts[1]} / {counts[2]}  "
            f"{result['wall_s']:.1f}s  {', '.join(shown)}"
        )
    return "\n".join(lines)


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.embedded import prepare_mlflow, prepare_prefect
    from flows.pipeline import tracking_uri
    from stages.core.config import load_config
    from stages.core.tracking import start_run

    grid = variants(parse_grid(args.grid))
    cfg = load_config(args.config, [*args.overrides, *grid[0]])  # a bad key fails before anything starts
    for overrides in grid[1:]:
        load_config(args.config, [*args.overrides, *overrides])
    if args.parallel < 1:
        raise ConfigError(f"--parallel {args.parallel}: run at least one variant at a time")
    warning = oversubscribed(cfg, min(args.parallel, len(grid)))
    if warning:
        print(warning, file=sys.stderr)
    prepare_prefect()
    parent = None
    if not args.no_track:
        uri = tracking_uri(cfg)
        artifact_root = None
        if uri.startswith("sqlite:"):
            from flows.pipeline import runs_dir

            artifact_root = runs_dir(cfg) / "mlartifacts"
        prepare_mlflow(uri, cfg.tracking.experiment, artifact_root)
        parent = start_run(uri, cfg.tracking.experiment, f"{cfg.name} sweep", {"gptpipe.sweep": "true"}, artifact_root)
        parent.log_params({"grid": " ".join(args.grid), "variants": len(grid)})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gptpipe-sweep-") as tmp:
        results = run_variants(args, grid, parent.run_id if parent else None, Path(tmp))
    wall = time.perf_counter() - started
    table = render_table(results)
    print(f"\ngptpipe sweep — recipe '{cfg.name}', {len(grid)} variants, {wall:.1f}s\n{table}")
    ok = all(r["exit_code"] == 0 for r in results)
    if parent is not None:
        parent.log_metrics({"wall_s": wall})
        parent.log_text(table + "\n", "sweep.txt")
        parent.finish(ok)
    if args.report_json:
        summary = {"wall_s": round(wall, 1), "variants": results, "run_id": parent.run_id if parent else None}
        Path(args.report_json).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if ok else 1


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="run a recipe over a grid of overrides; shared stages are computed once",
        description=__doc__.splitlines()[0],
    )
    sweep.add_argument("--config", "-c", default="configs/tiny.yaml", help="recipe YAML (default: %(default)s)")
    add_override_argument(sweep, help="an override every variant gets (repeatable)")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="values to sweep, e.g. finetune.lr=0.001,0.003 (repeatable: the product is run)",
    )
    sweep.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="variants running at once (default: %(default)s; on one machine they share its cores)",
    )
    sweep.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sweep.add_argument("--report-json", metavar="PATH", help="also write the sweep's results as JSON to PATH")
    sweep.set_defaults(func=cmd_sweep)
