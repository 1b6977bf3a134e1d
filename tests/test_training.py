"""The one training loop: learning, schedule, exact resume, accumulation, masking, failures."""

from __future__ import annotations

import math

import pytest
import torch

from stages.core.errors import ConfigError, TrainingError
from stages.core.tracking import MemoryTracker
from stages.training import checkpoint_format as ckpt
from stages.training.loop import Display, build_optimizer, lr_at, resolve_device, train
from stages.training.loss import evaluate_loss
from tests._numeric import approx, assert_close
from tests._training_fixtures import StreamBatches, micro_config, micro_model, repetitive_stream

QUIET = Display(progress=False)  # no progress lines in the test output


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the tests share 2 cores; one thread is also bitwise-reproducible


def _val_batches(stream, n=2):
    source = StreamBatches(stream, block=32, batch=8, seed=99)
    return [source.get(i, 0) for i in range(n)]


def test_loss_falls_on_a_repetitive_stream_and_metrics_are_logged():
    stream = repetitive_stream()
    model, tracker = micro_model(), MemoryTracker()
    val = _val_batches(stream)
    result = train(
        model,
        StreamBatches(stream, 32, 8),
        micro_config(),
        tracker,
        evaluate=lambda m: {"val_loss": evaluate_loss(m, val)},
        display=QUIET,
    )
    assert result.steps == 30 and result.tokens == 30 * 8 * 32
    assert abs(result.initial_loss - math.log(500)) < 0.1 * math.log(500)
    assert result.final_train_loss < 0.5 * result.initial_loss
    assert result.final_val_loss < 0.5 * result.curve[0]["val_loss"]
    assert result.best_val_loss <= result.final_val_loss
    assert [s for s, _ in tracker.metrics["train_loss"]] == [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in tracker.metrics["val_loss"]] == [0, 10, 20, 30]
    assert {"lr", "grad_norm", "tokens_per_s"} <= tracker.metrics.keys()
    assert result.tokens_per_s > 0 and result.summary().keys() >= {"initial_loss", "final_val_loss", "tokens"}


def test_metric_prefix_names_tracker_metrics_only():
    tracker = MemoryTracker()
    result = train(
        micro_model(),
        StreamBatches(repetitive_stream(), 32, 4),
        micro_config(max_steps=5),
        tracker,
        display=Display(metric_prefix="sft/", progress=False),
    )
    assert "sft/train_loss" in tracker.metrics and "train_loss" not in tracker.metrics
    assert "train_loss" in result.curve[-1]


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = micro_config(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)  # cosine midpoint between peak and floor
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_optimizer_decays_matrices_but_not_norms_embeddings_or_frozen_weights():
    model = micro_model()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    optimizer = build_optimizer(model, micro_config(weight_decay=0.1))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.blocks[0].mlp.w_up.weight) in decay
    assert id(model.wte.weight) in plain and id(model.norm_out.weight) in plain
    assert id(model.blocks[0].attn.qkv.weight) not in decay | plain
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay) + len(plain) == trainable


class _Interrupt(Exception):
    pass


class _StopAt:
    """Batches that fail at a given step: a crash in the middle of a run."""

    def __init__(self, inner, step):
        self.inner, self.step = inner, step

    def get(self, step, micro):
        if step == self.step:
            raise _Interrupt
        return self.inner.get(step, micro)


def test_resume_from_a_mid_run_checkpoint_is_bitwise_identical(tmp_path):
    stream = repetitive_stream()
    # Dropout makes the RNG part of the state, so the test also covers restoring it.
    cfg = micro_config(max_steps=12, checkpoint_interval=4, keep_checkpoints=5, eval_interval=5)
    reference = micro_model(dropout=0.1)
    full = train(reference, StreamBatches(stream, 32, 4), cfg, MemoryTracker(), tmp_path / "a", display=QUIET)

    crashed = micro_model(dropout=0.1)
    with pytest.raises(_Interrupt):
        train(crashed, _StopAt(StreamBatches(stream, 32, 4), 10), cfg, MemoryTracker(), tmp_path / "b", display=QUIET)
    assert ckpt.latest_checkpoint(tmp_path / "b").name == ckpt.step_dirname(8)

    resumed = micro_model(dropout=0.1, seed=123)  # different init: everything must come from the checkpoint
    again = train(resumed, StreamBatches(stream, 32, 4), cfg, MemoryTracker(), tmp_path / "b", display=QUIET)
    assert again.resumed_from == 8 and again.steps == 12
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert again.final_train_loss == full.final_train_loss and again.initial_loss == full.initial_loss
    assert [p for p in again.curve if "train_loss" in p][-1]["step"] == 12
    assert [p["step"] for p in again.curve if "train_loss" in p] == [p["step"] for p in full.curve if "train_loss" in p]


def test_grad_accumulation_matches_one_big_batch():
    stream = repetitive_stream()
    x, y = StreamBatches(stream, 32, 8).get(0, 0)
    y = y.clone()
    y[:5, :20] = -100  # uneven masking across the two halves: token-weighted averaging must still agree

    class Whole:
        def get(self, step, micro):
            return x, y

    class Halves:
        def get(self, step, micro):
            return x[micro * 4 : micro * 4 + 4], y[micro * 4 : micro * 4 + 4]

    one, two = micro_model(), micro_model()
    r1 = train(one, Whole(), micro_config(max_steps=1, warmup_steps=0), MemoryTracker(), display=QUIET)
    r2 = train(
        two,
        Halves(),
        micro_config(max_steps=1, warmup_steps=0, grad_accum=2, batch_size=4),
        MemoryTracker(),
        display=QUIET,
    )
    assert r1.initial_loss == approx(r2.initial_loss)
    for a, b in zip(one.parameters(), two.parameters()):
        assert_close(a, b)
    assert r1.tokens == r2.tokens == x.numel()


def test_masked_targets_are_not_scored():
    model = micro_model().eval()
    x, y = StreamBatches(repetitive_stream(), 32, 4).get(0, 0)
    masked = y.clone()
    masked[:, :16] = -100
    with torch.no_grad():
        logits = model(x)[:, 16:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 500), y[:, 16:].reshape(-1)).item()
    assert evaluate_loss(model, [(x, masked)]) == pytest.approx(expected, rel=1e-5)


def test_nan_loss_raises_training_error_naming_the_step():
    model = micro_model()
    with torch.no_grad():
        model.norm_out.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"step 1: the training loss is nan"):
        train(
            model, StreamBatches(repetitive_stream(), 32, 4), micro_config(max_steps=3), MemoryTracker(), display=QUIET
        )


def test_device_names_are_checked():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA"):
            resolve_device("cuda")
