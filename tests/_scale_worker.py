"""A pretraining run in its own process, for the resume and distributed tests.

    python tests/_scale_worker.py --store S --tokenizer T --data D --pretrain '{"max_steps": 20}' \\
        --metrics metrics.jsonl [--block-at 7 --marker blocked] [--sigterm-at 7]

Runs stage ``pretrain`` through the real runner and store (as ``python -m stages`` does), with a
tracker that appends every logged metric to a JSONL file. ``--block-at N`` hangs the process
right after step N is logged (after writing ``--marker``) so the test can SIGKILL it at a
known step; ``--sigterm-at N`` sends SIGTERM to itself at step N, as a spot reclaim would.
Works under torchrun too: every rank runs it, rank 0 alone logs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch


class JsonlTracker:
    def __init__(self, path: Path, block_at: int | None, marker: Path | None, sigterm_at: int | None):
        self.path, self.block_at, self.marker, self.sigterm_at = path, block_at, marker, sigterm_at

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "step": step, **metrics}) + "\n")
        if "train_loss" not in metrics:
            return
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.block_at:
            self.marker.write_text(str(step), encoding="utf-8")
            while True:  # wait here for the test's SIGKILL
                time.sleep(0.05)

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--pretrain", default="{}", help="JSON of pretrain fields")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--block-at", type=int, default=None)
    parser.add_argument("--marker", default=None)
    parser.add_argument("--sigterm-at", type=int, default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stages.config import parse_config
    from stages.errors import GptpipeError
    from stages.runner import run_stage
    from stages.storage import LocalStore, ref_from_path

    torch.set_num_threads(1)
    section = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}, "max_steps": 20,
               "batch_size": 8, "warmup_steps": 2, "eval_interval": 10, "eval_batches": 2, "log_interval": 1,
               "device": "cpu", "threads": 1}
    section.update(json.loads(args.pretrain))
    cfg = parse_config({"name": "scale-test", "pretrain": section})
    inputs = {"tokenizer": ref_from_path(args.tokenizer), "data": ref_from_path(args.data)}
    tracker = JsonlTracker(Path(args.metrics), args.block_at, Path(args.marker) if args.marker else None,
                           args.sigterm_at)
    try:
        result = run_stage("pretrain", cfg, inputs, LocalStore(args.store), tracker)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"uri": result.ref.uri, "metrics": result.manifest.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
