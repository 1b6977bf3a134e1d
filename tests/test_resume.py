"""A NaN loss stops training with a clear error and keeps the last good checkpoint; a resumed run
says where it resumed from.

The SIGKILL / SIGTERM resume tests moved to tests/reliability/test_preemption.py, which kills
real child processes at seeded random points (between steps and inside a checkpoint write).
"""

from __future__ import annotations

import pytest
import torch

from stages.core.errors import TrainingError
from stages.core.tracking import MemoryTracker
from stages.training import checkpoint_format as ckpt
from stages.training.loop import Display, train
from tests._training_fixtures import StreamBatches, micro_config, micro_model, repetitive_stream

QUIET = Display(progress=False)  # no progress lines in the test output


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.set_num_threads(1)
    model = micro_model()
    stream_batches = StreamBatches(repetitive_stream(), 32, 4)

    class PoisonAt:
        def get(self, step, micro):
            if step == 6:
                with torch.no_grad():
                    model.norm_out.weight.fill_(float("nan"))
            return stream_batches.get(step, micro)

    cfg = micro_config(max_steps=10, checkpoint_interval=4, keep_checkpoints=3)
    with pytest.raises(TrainingError, match=r"step 7: the training loss is nan.*step_00000004 is kept"):
        train(model, PoisonAt(), cfg, MemoryTracker(), tmp_path, display=QUIET)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    good = micro_model()
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), good)
    assert all(bool(torch.isfinite(p.detach()).all()) for p in good.parameters())


def test_a_resumed_pretraining_says_so_in_one_line(tmp_path, caplog):
    from stages.executor import run_stage
    from stages.storage.stores import LocalStore
    from tests.test_pretrain import _inputs, _recipe

    class CrashAfter(MemoryTracker):
        def log_metrics(self, metrics, step=None):
            super().log_metrics(metrics, step)
            if "train_loss" in metrics and step == 6:
                raise RuntimeError("the machine went away")

    store = LocalStore(tmp_path / "store")
    stream = repetitive_stream(length=3000)
    inputs, recipe = (
        _inputs(store, stream[:2500], stream[2500:]),
        _recipe(max_steps=8, checkpoint_interval=4, log_interval=2),
    )
    with pytest.raises(RuntimeError, match="went away"):
        run_stage("pretrain", recipe, inputs, store, CrashAfter())
    work = next((tmp_path / "store" / "pretrain").glob(".work-*/checkpoints"))
    assert [s for s, _ in ckpt.list_checkpoints(work)] == [4]

    with caplog.at_level("INFO", logger="gptpipe.train"):
        result = run_stage("pretrain", recipe, inputs, store, MemoryTracker())
    # One record may reach caplog's handler twice when an earlier test (a Prefect flow) left that handler on
    # the 'gptpipe' logger too: count records, not deliveries. A second announce would be a second record.
    records = {id(r): r for r in caplog.records}.values()
    resumed = [r.getMessage() for r in records if "resuming" in r.getMessage()]
    assert resumed == [f"pretrain: resuming from step 4, checkpoint {work / ckpt.step_dirname(4)}"]
    assert result.manifest.metrics["steps"] == 8


def test_the_checkpointer_decides_which_steps_to_write_and_which_to_keep(tmp_path):
    """The loop calls save() after every step; the interval, the last step, SIGTERM and pruning are the checkpointer's."""
    from stages.training.checkpoint_policy import Checkpointer
    from stages.training.optimizer import build_optimizer

    def never_built():
        raise AssertionError("the trainer state is built only for a checkpoint that is written")

    model = micro_model()
    optimizer = build_optimizer(model, micro_config())
    checkpointer = Checkpointer(tmp_path, model, optimizer, interval=3, keep=2)
    written = [
        step
        for step in range(1, 11)
        if checkpointer.save(step, lambda step=step: {"step": step}, last_step=step == 10) is not None
    ]
    assert written == [3, 6, 9, 10]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [9, 10]
    assert checkpointer.save(11, never_built) is None
    assert checkpointer.save(11, lambda: {"step": 11}, force=True) == tmp_path / ckpt.step_dirname(11)
    assert checkpointer.resume_latest().state["step"] == 11

    off = Checkpointer(None, model, optimizer, interval=1)
    assert off.save(3, never_built, force=True) is None and off.resume_latest() is None


def test_a_run_resumed_from_its_last_checkpoint_trains_and_scores_nothing_again(tmp_path):
    """The last checkpoint already holds the final evaluation: a rerun (say, killed before publishing) repeats nothing."""
    stream = repetitive_stream()
    cfg = micro_config(max_steps=4, eval_interval=2)
    scored = []

    def evaluate(model):
        scored.append(1)
        return {"val_loss": 1.0}

    first = train(micro_model(), StreamBatches(stream, 32, 4), cfg, MemoryTracker(), tmp_path, evaluate, display=QUIET)
    assert len(scored) == 3 and [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    again = train(micro_model(), StreamBatches(stream, 32, 4), cfg, MemoryTracker(), tmp_path, evaluate, display=QUIET)
    assert len(scored) == 3 and again.resumed_from == 4 and again.curve == first.curve
    assert again.final_train_loss == first.final_train_loss and again.final_val_loss == 1.0
