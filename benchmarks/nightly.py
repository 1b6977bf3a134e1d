"""The nightly scenario of docs/scheduled-training.md, measured: three nights of a recipe in one store and
one MLflow registry, as a scheduled deployment would run them.

    .venv/bin/python benchmarks/nightly.py                                  # configs/tiny.yaml, ~40 min on 2 cores
    .venv/bin/python benchmarks/nightly.py --config configs/micro.yaml --grow-to 330000   # a 3-minute rehearsal
    .venv/bin/python benchmarks/nightly.py --root /tmp/nightly              # keep store, registry and logs;
                                                                            # rerun: resume after the last finished night

Every night is one ``gptpipe run`` (Prefect embedded, MLflow on a SQLite file under ``--root``):

* **night 1**  the recipe from scratch: the first version becomes champion;
* **night 2**  the corpus grows (``corpus.max_bytes`` to ``--grow-to``, +10 % by default), run twice:
  *from scratch* on the grown corpus (``registry.promote=never``, so it is registered and judged but
  leaves the alias alone) and *continued* (``--continue-from champion`` with ``--continued-steps``
  pretraining steps). Both are scored by evaluate beside the same champion (night 1) on the same
  frozen held-out text and the same task items; the gate decides on the continued one;
* **night 3**  continued again, with a broken fine-tuning setting (``--broken``, a learning rate a
  thousand times too small): the gate must hold it back.

For each run it prints each stage's wall time (or how it was reused), the data stage's units
computed and reused, the steps pretrained, the evaluate stage's challenger and champion figures,
and the gate's decision; ``--root``/nightly.json keeps them all. Times include whatever else the
machine was doing: compare the runs of one table with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.registry import ORDER as STAGES  # noqa: E402  (the stage names, in pipeline order)


def run_night(root: Path, label: str, config: str, sets: list[str], extra: list[str]) -> dict:
    """One ``gptpipe run`` into ``root``'s store and registry; its report card as JSON and its wall time."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}?timeout=60",
        "PREFECT_HOME": str(root / "prefect-home"),
        "PYTHONPATH": str(ROOT),
    }
    slug = label.replace(" ", "-")
    report = root / f"{slug}.json"
    if (root / f"{slug}.done.json").is_file():  # --root kept it: a rerun resumes after the last finished night
        print(f"{label}: finished before, kept ({root / slug}.done.json)", file=sys.stderr)
        return json.loads((root / f"{slug}.done.json").read_text(encoding="utf-8"))
    cmd = [
        str(Path(sys.executable).parent / "gptpipe"),
        "run",
        "--config",
        config,
        "--report-json",
        str(report),
        *extra,
    ]
    for item in [f"artifacts.store={root / 'store'}", *sets]:
        cmd += ["--set", item]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: gptpipe {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(root / f"{slug}.log", "w", encoding="utf-8") as log:
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (root / f"{slug}.log").read_text(encoding="utf-8").splitlines()[-8:]
        raise SystemExit(f"{label}: gptpipe run exited {done.returncode} (see {root / slug}.log):\n" + "\n".join(tail))
    night = {"label": label, "wall_s": round(wall, 1), "report": json.loads(report.read_text(encoding="utf-8"))}
    (root / f"{slug}.done.json").write_text(json.dumps(night), encoding="utf-8")
    return night


def summary(night: dict) -> dict:
    """What the docs table shows for one run."""
    stages = night["report"]["stages"]

    def status(name: str) -> str:
        result = stages.get(name)
        if result is None:
            return "-"
        shown = result.get("status") or ("reused" if result["reused"] else "ran")
        return f"{result['wall_time_s']:.0f} s" if shown == "ran" else shown

    data, pretrain = stages["data"]["metrics"], stages["pretrain"]["metrics"]
    evaluation = stages["evaluate"]["metrics"]
    promotion = night["report"].get("promotion") or {}
    return {
        "run": night["label"],
        "wall_s": night["wall_s"],
        "stages": {name: status(name) for name in STAGES},
        "units_computed": data.get("units_computed"),
        "units_reused": data.get("units_reused"),
        "pretrain_steps": pretrain.get("steps"),
        "pretrain_initial_loss": pretrain.get("initial_loss"),
        "pretrain_final_val_loss": pretrain.get("final_val_loss"),
        **{k: evaluation.get(k) for k in sorted(evaluation) if k.startswith(("challenger_", "champion_"))},
        "exact_match": evaluation.get("sft_accuracy"),
        "version": promotion.get("version"),
        "compared_with": promotion.get("compared_with"),
        "decision": promotion.get("decision"),
        "reasons": promotion.get("reasons"),
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """Runs as columns, one figure per row."""
    labels = [r["run"] for r in rows]
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(rows) + 1) + "|"]
    lines.append("| pipeline wall time | " + " | ".join(f"{r['wall_s']:.0f} s" for r in rows) + " |")
    for stage in STAGES:
        lines.append(f"| {stage} | " + " | ".join(r["stages"][stage] for r in rows) + " |")
    keys = [k for k in rows[0] if k not in ("run", "wall_s", "stages", "reasons")]
    for row in rows[1:]:
        keys += [k for k in row if k not in keys and k not in ("run", "wall_s", "stages", "reasons")]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_cell(r.get(key)) for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument(
        "--grow-to", type=int, default=8_800_000, help="night 2's corpus.max_bytes (night 1: the recipe's)"
    )
    parser.add_argument("--continued-steps", type=int, default=100, help="pretrain.max_steps of a continued run")
    parser.add_argument("--broken", default="finetune.lr=0.000003", help="night 3's broken setting (KEY=VALUE)")
    parser.add_argument("--root", type=Path, help="keep everything here (default: a temporary directory)")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="gptpipe-nightly-"))
    root.mkdir(parents=True, exist_ok=True)
    grown = [f"corpus.max_bytes={args.grow_to}"]
    continued = ["continue_from=champion", f"pretrain.max_steps={args.continued_steps}"]

    nights = [run_night(root, "night 1", args.config, [], [])]
    nights.append(run_night(root, "night 2 scratch", args.config, [*grown, "registry.promote=never"], []))
    nights.append(run_night(root, "night 2 continued", args.config, [*grown, *continued], []))
    nights.append(run_night(root, "night 3 broken", args.config, [*grown, *continued, args.broken], []))

    rows = [summary(n) for n in nights]
    (root / "nightly.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(markdown(rows))
    for row in rows:
        if row["reasons"]:
            print(f"\n{row['run']}: version {row['version']} {row['decision']}")
            print("\n".join(f"  - {reason}" for reason in row["reasons"]))
    print(f"\nstore, registry, logs and nightly.json: {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
