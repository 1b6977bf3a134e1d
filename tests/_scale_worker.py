"""A pretraining (or fine-tuning) run in its own process, for the distributed and preemption tests.

    python tests/_scale_worker.py --store S --tokenizer T --data D --pretrain '{"max_steps": 20}' \\
        --metrics metrics.jsonl [--sigkill-at N | --sigkill-in-checkpoint N | --sigterm-at N]
    python tests/_scale_worker.py ... --model P --finetune '{"max_steps": 12}'   # stage finetune

Runs stage ``pretrain`` through the real runner and store (as ``python -m stages`` does), with a
tracker that appends every logged metric, with this process's pid, to a JSONL file. With
``--finetune`` it runs stage ``finetune`` instead, on the micro recipe (configs/micro.yaml) with
those finetune fields, from the pretrain artifact ``--model``. The process signals *itself*, so
the point of interruption is exact and the test needs no timing:

* ``--sigkill-at N``: SIGKILL right after step N is logged (a machine that vanished);
* ``--sigkill-in-checkpoint N``: SIGKILL halfway through writing the checkpoint of step N,
  after its weights file is on disk and before its optimizer state is (the worst moment);
* ``--sigterm-at N``: SIGTERM after step N (a spot reclaim: the trainer checkpoints and exits 2);
* ``--sigstop-at N``: SIGSTOP after step N (a machine that hangs: alive, but its lease's heartbeat
  stops, so after ``--lease-s`` another run takes the key over).

``--step-pause S`` makes every training step last S seconds longer (a sleep after it is logged),
so a test that signals from outside (the signal matrix in tests/reliability/test_preemption.py) can land
its signal mid-run; the weights do not change.

Works under torchrun too: every rank runs it, rank 0 alone logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch


class SignallingTracker:
    """Appends metrics to a JSONL file; signals this process after a chosen training step."""

    def __init__(
        self, path: Path, kill_at: int | None, term_at: int | None, stop_at: int | None = None, pause_s: float = 0.0
    ):
        self.path, self.kill_at, self.term_at, self.stop_at = path, kill_at, term_at, stop_at
        self.pause_s = pause_s

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "step": step, **metrics}) + "\n")
        trained = any(name.rsplit("/", 1)[-1] == "train_loss" for name in metrics)  # finetune/train_loss too
        if trained and step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if trained and step == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if trained and step == self.stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        if trained and self.pause_s:
            time.sleep(self.pause_s)

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass


def die_inside_checkpoint(step: int) -> None:
    """SIGKILL when the checkpoint of ``step`` has its weights written but not its optimizer state."""
    from stages.training import checkpoint_format as ckpt

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
    parser.add_argument("--pretrain", default="{}", help="JSON of pretrain fields")
    parser.add_argument("--finetune", default=None, help="JSON of finetune fields: run stage finetune instead")
    parser.add_argument("--model", default=None, help="the pretrain artifact (with --finetune)")
    for name in ("--sigkill-at", "--sigkill-in-checkpoint", "--sigterm-at", "--sigstop-at"):
        parser.add_argument(name, type=int, default=None)
    parser.add_argument("--lease-s", type=float, default=None, help="artifacts.lease_s of the run")
    parser.add_argument("--step-pause", type=float, default=0.0, help="seconds each training step sleeps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stages.core.config import load_config, parse_config
    from stages.core.errors import GptpipeError
    from stages.executor import run_stage
    from stages.storage.stores import open_store, ref_from_path

    torch.set_num_threads(1)
    if args.sigkill_in_checkpoint is not None:
        die_inside_checkpoint(args.sigkill_in_checkpoint)
    section = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        "max_steps": 20,
        "batch_size": 8,
        "warmup_steps": 2,
        "eval_interval": 10,
        "eval_batches": 2,
        "log_interval": 1,
        "device": "cpu",
        "threads": 1,
    }
    section.update(json.loads(args.pretrain))
    artifacts = {"lease_s": args.lease_s} if args.lease_s else {}
    stage, cfg = "pretrain", parse_config({"name": "scale-test", "pretrain": section, "artifacts": artifacts})
    inputs = {"tokenizer": ref_from_path(args.tokenizer), "data": ref_from_path(args.data)}
    if args.finetune is not None:
        fields = [f"finetune.{key}={json.dumps(value)}" for key, value in json.loads(args.finetune).items()]
        recipe = Path(__file__).resolve().parents[1] / "configs" / "micro.yaml"
        stage, cfg = "finetune", load_config(recipe, ["tokenizer.threads=1", "pretrain.threads=1", *fields])
        inputs["pretrain"] = ref_from_path(args.model)
    tracker = SignallingTracker(Path(args.metrics), args.sigkill_at, args.sigterm_at, args.sigstop_at, args.step_pause)
    try:
        result = run_stage(stage, cfg, inputs, open_store(args.store), tracker)
    except GptpipeError as exc:
        print(f"gptpipe: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"uri": result.ref.uri, "digest": result.ref.digest, "metrics": result.manifest.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
