"""The GPU check: what gptpipe has never run on a GPU, in one call that fits a 10-minute window.

    .venv/bin/python benchmarks/gpu_check.py --out "$OUT"              # a machine with a CUDA GPU
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check   # the same steps on the CPU

Steps, each a subprocess with a time limit of its own, so that one that hangs or fails leaves the
others' figures; each is recorded in ``OUT/gpu_check.json`` (passed or not, its seconds, its figures)
and its whole output in ``OUT/<step>.log``:

1. ``environment``  torch and CUDA versions, the devices, bf16 support, ``nvidia-smi -L``;
2. ``mfu``          ``benchmarks/gpu_train_mfu.py`` on the 124M recipe (bf16, ``torch.compile``): its table;
3. ``pipeline``     ``gptpipe run`` of the micro recipe with pretraining, fine-tuning and evaluation on
                    CUDA in bf16 with compile, and every export format through its gate;
4. ``torchrun``     the micro recipe's pretraining under a 2-process torchrun: NCCL on two GPUs, or,
                    on a one-GPU machine, both processes on it over gloo (two NCCL ranks cannot share a GPU).

``--dry-run`` runs the same four steps on the CPU at the smoke sizes (fp32, no compile, gloo), which
is how the script itself is tested (``tests/test_gpu_check.py``) on machines without a GPU. The
README's GPU figures come from a run of this script; until one has run, it says they are unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

ENVIRONMENT = """
import json, shutil, subprocess, torch
cuda = torch.cuda.is_available()
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
       "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
       "memory_gib": [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                      for i in range(torch.cuda.device_count())] if cuda else [],
       "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
       "cpu_capability": torch.backends.cpu.get_cpu_capability()}
smi = shutil.which("nvidia-smi")
out["nvidia_smi"] = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else None
print(json.dumps(out))
"""


def steps(out: Path, dry_run: bool, gpus: int) -> dict[str, tuple[list[str], int]]:
    """Each step's command line and its time limit in seconds."""
    device = "cpu" if dry_run else "cuda"
    fast = ["compile=off", "precision=fp32"] if dry_run else ["compile=on", "precision=bf16"]
    train_sets = [f"{stage}.{item}" for stage in ("pretrain", "finetune") for item in (f"device={device}", *fast)]
    pipeline = [str(BIN / "gptpipe"), "run", "--config", "configs/micro.yaml", "--no-track"]
    pipeline += ["--report-json", str(out / "pipeline.json")]
    for item in [f"artifacts.store={out / 'store'}", *train_sets, f"evaluate.device={device}"]:
        pipeline += ["--set", item]
    mfu = [sys.executable, "benchmarks/gpu_train_mfu.py", "--steps", "3" if dry_run else "20"]
    if dry_run:
        mfu.append("--smoke")
    # Two processes: NCCL needs a GPU each; on one GPU (or the CPU) they share it over gloo. The flow
    # launches pretraining under torchrun; tokenizer and data are the pipeline step's, reused by key.
    ranks_device = "cuda" if gpus >= 2 and not dry_run else device
    torchrun = [str(BIN / "gptpipe"), "run", "--config", "configs/micro.yaml", "--no-track"]
    torchrun += ["--report-json", str(out / "torchrun.json")]
    for item in [
        f"artifacts.store={out / 'store'}",
        "stages=[tokenizer,data,pretrain]",
        "pretrain.nproc_per_node=2",
        f"pretrain.device={ranks_device}",
        *[f"pretrain.{item}" for item in fast],
    ]:
        torchrun += ["--set", item]
    return {
        "environment": ([sys.executable, "-c", ENVIRONMENT], 60),
        "mfu": (mfu, 240),
        "pipeline": (pipeline, 300),
        "torchrun": (torchrun, 240),
    }


def figures(name: str, text: str, out: Path) -> dict:
    """What a step's output says, for the summary: the environment's JSON, the MFU table's row, the
    pipeline's per-stage times and gate figures."""
    if name == "environment":
        return json.loads(text.strip().splitlines()[-1])
    if name == "mfu":
        rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| device")]
        peak = re.search(r"^MFU peak: (.*)$", text, re.M)
        return {"table_row": rows[-1] if rows else None, "peak": peak.group(1) if peak else None}
    if name in ("pipeline", "torchrun") and (out / f"{name}.json").is_file():
        report = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        return {
            stage: {"seconds": round(r["wall_time_s"], 1), **{k: r["metrics"].get(k) for k in KEPT.get(stage, ())}}
            for stage, r in report["stages"].items()
        }
    return {}


# The figures the summary keeps per pipeline stage (the rest stay in pipeline.json).
KEPT = {
    "pretrain": (
        "device",
        "world_size",
        "precision",
        "compiled",
        "tokens_per_s",
        "mfu",
        "peak_source",
        "final_val_loss",
    ),
    "finetune": ("device", "tokens_per_s", "final_val_loss"),
    "evaluate": ("sft_accuracy", "sft_bits_per_byte"),
    "export": ("max_abs_diff", "generation_matches", "serve"),
}


def run_step(name: str, command: list[str], limit: int, out: Path) -> dict:
    started = time.perf_counter()
    log = out / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(out / "prefect-home")}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status, text = ("passed" if done.returncode == 0 else f"failed (exit {done.returncode})"), done.stdout
        log.write_text(done.stdout + done.stderr, encoding="utf-8")
    except subprocess.TimeoutExpired as exc:
        status, text = f"timed out after {limit} s", ""
        log.write_text(str(exc.stdout or "") + str(exc.stderr or ""), encoding="utf-8")
    result = {"status": status, "seconds": round(time.perf_counter() - started, 1), "log": str(log)}
    if status == "passed":
        try:
            result["figures"] = figures(name, text, out)
        except (ValueError, KeyError) as exc:
            result["status"] = f"passed, but its output did not parse ({exc})"
    print(f"{name}: {result['status']} in {result['seconds']} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu_check.json and the logs go")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at smoke sizes")
    parser.add_argument("--only", action="append", default=[], help="run only this step (repeatable)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = 0
    if not args.dry_run:
        probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
        gpus = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() or 0)
        if gpus == 0:
            print("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
            return 2
    summary = {"dry_run": args.dry_run, "gpus": gpus, "steps": {}}
    for name, (command, limit) in steps(args.out, args.dry_run, gpus).items():
        if args.only and name not in args.only:
            continue
        summary["steps"][name] = run_step(name, command, limit, args.out)
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    failed = [name for name, step in summary["steps"].items() if step["status"] != "passed"]
    print(f"gpu_check: {args.out / 'gpu_check.json'}" + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
