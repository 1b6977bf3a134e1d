"""Is the default recipe's result robust? 3 seeds x 2 CPU kernel families, one table.

    .venv/bin/python benchmarks/recipe_spread.py                       # configs/tiny.yaml, seeds 1337 1 2
    .venv/bin/python benchmarks/recipe_spread.py --seeds 7 8 --set finetune.max_steps=400
    .venv/bin/python benchmarks/recipe_spread.py --root /tmp/spread    # keep the stores (a rerun reuses stages)

Each combination runs the stages tokenizer -> data -> pretrain -> finetune -> evaluate of the
recipe in a fresh subprocess, through ``stages.executor.run_stage`` (what ``gptpipe run`` calls for
each stage, minus Prefect and MLflow), with ``pretrain.seed`` and ``finetune.seed`` both set to
the seed and its own artifact store, so nothing is shared between runs. The kernel setting is
environment, so it must be set before torch loads, hence the subprocess:

* ``default``: whatever PyTorch, MKL and oneDNN pick on this CPU (AVX-512/AMX where present);
* ``avx2``:    ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``.

On a CPU without AVX-512 both settings may use the same kernels. So before the runs, a probe
(``--probe`` alone: nothing else) trains a random model of the tiny shape for two steps under each
setting and prints torch's capability and a hash of the resulting logits: equal hashes mean the
two settings compute bit for bit the same on this CPU, different ones that the runs exercise two
kernel families. Exact match is the fine-tuned model's
score on the held-out items; ``time`` is the five stages' wall time (the machine's load included:
compare the times of one table with each other, not with another day's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
KERNELS = {"default": {}, "avx2": AVX2}
GOAL = 0.9  # the exact match every run of the default recipe should reach


def probe_child() -> dict:
    """Two AdamW steps of a seeded tiny-shape GPT on seeded ids; a hash of the logits after them."""
    import hashlib

    import torch

    from stages.lm.model import GPT, GPTConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, n_layer=4, n_head=4, n_embd=256, block_size=256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 2048, (4, 256), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(ids).reshape(-1, 2048), ids.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        logits = model(ids).numpy()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest()[:16],
    }


def probe(kernels: list[str]) -> dict[str, dict]:
    out = {}
    for name in kernels:
        env = {**os.environ, **KERNELS[name], "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, __file__, "--probe-child"], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run_child(config: str, overrides: list[str], store: str) -> dict:
    """In this process: the five stages into ``store``; returns what the table needs."""
    import logging

    import torch

    from stages import registry
    from stages.core.config import load_config
    from stages.executor import run_stage
    from stages.storage.stores import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    cfg = load_config(config, [*overrides, f"artifacts.store={store}"])
    opened = open_store(store)
    refs: dict = {}
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability(), "stages": {}}
    started = time.perf_counter()
    for name in registry.ORDER[: registry.ORDER.index("export")]:  # up to evaluate
        result = run_stage(name, cfg, refs, opened)
        refs[name] = result.ref
        out["stages"][name] = {
            "seconds": result.wall_time_s,
            "reused": result.reused,
            "metrics": result.manifest.metrics,
        }
    out["seconds"] = time.perf_counter() - started
    return out


def one(config: str, overrides: list[str], seed: int, kernels: str, root: Path) -> dict:
    """One combination in a fresh subprocess with the kernel environment; its summary row."""
    store = root / f"seed{seed}-{kernels}"
    sets = [*overrides, f"pretrain.seed={seed}", f"finetune.seed={seed}"]
    env = {**os.environ, **KERNELS[kernels], "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", "--config", config, "--store", str(store)]
    for item in sets:
        cmd += ["--set", item]
    log = root / f"seed{seed}-{kernels}.log"  # the stages' own log lines and progress, one file per run
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=handle, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8").strip().splitlines()[-5:]
        raise SystemExit(
            f"seed {seed}, kernels {kernels}: the run failed (exit {proc.returncode}), see {log}:\n" + "\n".join(tail)
        )
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = data["stages"]
    evaluation, finetune, pretrain = (
        stages["evaluate"]["metrics"],
        stages["finetune"]["metrics"],
        stages["pretrain"]["metrics"],
    )
    return {
        "seed": seed,
        "kernels": kernels,
        "capability": data["capability"],
        "exact_match": evaluation["sft_accuracy"],
        "base_exact_match": evaluation["base_accuracy"],
        "pretrain_val_loss": pretrain["final_val_loss"],
        "finetune_val_loss": finetune["final_val_loss"],
        "seconds": sum(s["seconds"] for s in stages.values()),
        "process_seconds": wall,
        "reused": [n for n, s in stages.items() if s["reused"]],
        "stage_seconds": {n: round(s["seconds"], 1) for n, s in stages.items()},
    }


def table(rows: list[dict]) -> str:
    head = (
        f"{'seed':>6} {'kernels':<8} {'cpu':<7} {'exact match':>11} {'base':>6} {'pretrain val':>12} "
        f"{'finetune val':>12} {'time':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        reused = f"  (reused: {', '.join(r['reused'])})" if r["reused"] else ""
        lines.append(
            f"{r['seed']:>6} {r['kernels']:<8} {r['capability']:<7} {r['exact_match']:>11.1%} "
            f"{r['base_exact_match']:>6.1%} {r['pretrain_val_loss']:>12.4f} {r['finetune_val_loss']:>12.4f} "
            f"{r['seconds']:>7.1f}s{reused}"
        )
    lines.append("-" * len(head))
    for label, pick in (("min", min), ("median", statistics.median), ("max", max)):
        lines.append(
            f"{label:>15} {'':<7} {pick(r['exact_match'] for r in rows):>11.1%} {'':>6} "
            f"{pick(r['pretrain_val_loss'] for r in rows):>12.4f} {pick(r['finetune_val_loss'] for r in rows):>12.4f} "
            f"{pick(r['seconds'] for r in rows):>7.1f}s"
        )
    good = sum(r["exact_match"] >= GOAL for r in rows)
    lines.append(f"runs at >= {GOAL:.0%} exact match: {good} of {len(rows)}")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from stages.core.config import add_override_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="recipe YAML")
    add_override_argument(parser, help="recipe override for every run (repeatable)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1337, 1, 2], help="pretrain.seed = finetune.seed values"
    )
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--root", default=None, help="directory of the per-run stores (default: a fresh temporary one)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--probe", action="store_true", help="only compare the kernel settings bit for bit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.config, args.overrides, args.store)))
        return 0
    if args.probe_child:
        print(json.dumps(probe_child()))
        return 0

    probes = probe(args.kernels)
    for name, found in probes.items():
        print(f"kernel probe {name:<8} capability {found['capability']:<8} logits sha256 {found['logits_sha256']}")
    hashes = {p["logits_sha256"] for p in probes.values()}
    if len(probes) > 1:
        print(
            "  -> the kernel settings compute "
            + ("the same bits on this CPU" if len(hashes) == 1 else "different bits on this CPU: two kernel families"),
            flush=True,
        )
    if args.probe:
        return 0

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="recipe-spread-"))
    print(f"recipe {args.config} {' '.join('--set ' + o for o in args.overrides)}; stores under {root}", flush=True)
    rows = []
    for seed in args.seeds:
        for kernels in args.kernels:
            row = one(args.config, args.overrides, seed, kernels, root)
            rows.append(row)
            print(
                f"  seed {seed} {kernels}: exact match {row['exact_match']:.1%}, finetune val loss "
                f"{row['finetune_val_loss']:.4f}, {row['seconds']:.1f}s {row['stage_seconds']}",
                flush=True,
            )
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
