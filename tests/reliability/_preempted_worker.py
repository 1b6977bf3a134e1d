"""A pretraining run that a signal interrupts at a chosen point, for the preemption tests.

    python tests/reliability/_preempted_worker.py --store S --tokenizer T --data D --metrics M.jsonl \\
        [--sigkill-at N | --sigkill-in-checkpoint N | --sigterm-at N]

Runs stage ``pretrain`` through the real runner and local store, like ``python -m stages``.
The process signals *itself*, so the point is exact and the test needs no timing:

* ``--sigkill-at N``: SIGKILL right after step N is logged (a machine that vanished);
* ``--sigkill-in-checkpoint N``: SIGKILL halfway through writing the checkpoint of step N,
  after its weights file is on disk and before its optimizer state is (the worst moment);
* ``--sigterm-at N``: SIGTERM after step N (a spot reclaim: the trainer checkpoints and exits 2).

Every logged metric is appended to ``--metrics`` with this process's pid.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

# Tiny and deterministic: a resumed run must reproduce an uninterrupted one bit for bit, and
# dropout makes the RNG state part of what a checkpoint has to carry.
PRETRAIN = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.1},
            "max_steps": 16, "checkpoint_interval": 4, "keep_checkpoints": 2, "batch_size": 4, "warmup_steps": 2,
            "eval_interval": 8, "eval_batches": 1, "log_interval": 1, "device": "cpu", "threads": 1,
            "deterministic": True}


class SignallingTracker:
    def __init__(self, path: Path, kill_at: int | None, term_at: int | None):
        self.path, self.kill_at, self.term_at = path, kill_at, term_at

    def log_metrics(self, metrics, step=None):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "step": step, **metrics}) + "\n")
        if "train_loss" in metrics and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if "train_loss" in metrics and step == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass


def die_inside_checkpoint(step: int) -> None:
    """SIGKILL when the checkpoint of ``step`` has its weights written but not its optimizer state."""
    import torch

    from stages import checkpoint as ckpt

    real_save = torch.save
    marker = f".tmp-{ckpt.step_dirname(step)}-"

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if Path(path).parent.name.startswith(marker):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--store", "--tokenizer", "--data", "--metrics"):
        parser.add_argument(name, required=True)
    for name in ("--sigkill-at", "--sigkill-in-checkpoint", "--sigterm-at"):
        parser.add_argument(name, type=int, default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    from stages.config import parse_config
    from stages.errors import GptpipeError
    from stages.runner import run_stage
    from stages.storage import LocalStore, ref_from_path

    torch.set_num_threads(1)
    if args.sigkill_in_checkpoint is not None:
        die_inside_checkpoint(args.sigkill_in_checkpoint)
    cfg = parse_config({"name": "preempted", "pretrain": PRETRAIN})
    inputs = {"tokenizer": ref_from_path(args.tokenizer), "data": ref_from_path(args.data)}
    tracker = SignallingTracker(Path(args.metrics), args.sigkill_at, args.sigterm_at)
    try:
        result = run_stage("pretrain", cfg, inputs, LocalStore(args.store), tracker)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"uri": result.ref.uri, "metrics": result.manifest.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
