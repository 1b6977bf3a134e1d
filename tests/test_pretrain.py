"""Stage ``pretrain`` through the executor, on hand-made token shards (no tokenizer stage needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.core.config import parse_config
from stages.core.errors import ConfigError, DataError
from stages.core.tracking import MemoryTracker
from stages.executor import run_stage
from stages.storage.stores import LocalStore
from stages.training import checkpoint_format as ckpt
from stages.training.state import TrainResult
from tests._training_fixtures import VOCAB, fake_artifact, repetitive_stream, write_shards


def _recipe(**pretrain):
    section = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        "max_steps": 20,
        "batch_size": 8,
        "warmup_steps": 2,
        "eval_interval": 10,
        "eval_batches": 2,
        "log_interval": 5,
        "device": "cpu",
        "threads": 1,
    }
    section.update(pretrain)
    return parse_config({"name": "test", "pretrain": section})


def _inputs(store, train_tokens, val_tokens):
    tokenizer = fake_artifact(store, "tokenizer", lambda d: (d / "tokenizer.model").write_bytes(b"unused"))
    data = fake_artifact(store, "data", lambda d: write_shards(d, {"train": train_tokens, "val": val_tokens}))
    return {"tokenizer": tokenizer, "data": data}


def test_pretrain_stage_trains_writes_a_loadable_model_and_is_reused(tmp_path):
    store = LocalStore(tmp_path / "store")
    stream = repetitive_stream(length=6000)
    inputs = _inputs(store, stream[:5000], stream[5000:])
    tracker = MemoryTracker()

    result = run_stage("pretrain", _recipe(), inputs, store, tracker)
    metrics = result.manifest.metrics
    out = tmp_path / "store" / "pretrain" / result.manifest.key
    assert not result.reused and result.ref.uri == str(out)
    assert metrics["steps"] == 20 and metrics["ln_vocab"] == pytest.approx(math.log(VOCAB), abs=1e-3)
    assert abs(metrics["initial_loss"] - metrics["ln_vocab"]) < 0.1 * metrics["ln_vocab"]
    assert metrics["final_val_loss"] < 0.5 * metrics["initial_loss"]
    assert metrics["final_train_loss"] < 0.5 * metrics["initial_loss"]
    assert metrics["tokens_per_s"] > 0 and metrics["params"] > 0
    # One name per fact: what the stage reports of its training is named as TrainResult (finetune's summary()) names it.
    assert set(metrics) - {"ln_vocab", "params", "vocab_size", "device"} <= TrainResult.__dataclass_fields__.keys()

    # Layout: model/ is both a model and a resumable checkpoint; curve.json; nothing else.
    assert sorted(result.manifest.files) == [
        "curve.json",
        "model/model.json",
        "model/model.safetensors",
        "model/optimizer.pt",
        "model/trainer.json",
    ]
    model = ckpt.load_model(out / "model")
    assert model.cfg.vocab_size == VOCAB and model.cfg.block_size == 32
    assert model.num_params(non_embedding=False) == metrics["params"]
    curve = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in curve if "val_loss" in p] == [0, 10, 20]
    assert tracker.params["model.n_params"] == str(metrics["params"])
    assert [s for s, _ in tracker.metrics["val_loss"]] == [0, 10, 20]

    # Loaded weights reproduce the recorded final validation loss (same fixed val windows).
    from stages.storage.shards import TokenShards
    from stages.training.batches import fixed_windows
    from stages.training.loss import evaluate_loss

    val = fixed_windows(TokenShards(inputs["data"].uri, "val"), 32, 8, 2)
    assert evaluate_loss(model, val) == pytest.approx(metrics["final_val_loss"], abs=1e-3)

    again = run_stage("pretrain", _recipe(), inputs, store, MemoryTracker())
    assert again.reused and again.ref == result.ref


def test_pretrain_is_deterministic_given_the_seed(tmp_path):
    stream = repetitive_stream(length=3000)
    weights = []
    for name in ("a", "b"):
        store = LocalStore(tmp_path / name)
        result = run_stage("pretrain", _recipe(max_steps=4), _inputs(store, stream[:2500], stream[2500:]), store)
        weights.append(ckpt.load_model(result.ref.uri + "/model").state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_val_split_shorter_than_a_window_is_a_clear_data_error(tmp_path):
    store = LocalStore(tmp_path / "store")
    stream = repetitive_stream(length=3000)
    inputs = _inputs(store, stream[:2980], stream[2980:])  # 20 val tokens < block_size + 1
    with pytest.raises(DataError, match=r"val split holds 20 tokens.*pretrain\.model\.block_size=16"):
        run_stage("pretrain", _recipe(), inputs, store, MemoryTracker())
    assert list((tmp_path / "store" / "pretrain").iterdir()) == []  # the executor discarded the scratch output


def test_pretraining_from_a_parent_starts_from_its_weights_and_says_so(tmp_path):
    """continue_from: the parent's weights, a fresh schedule of max_steps, and the lineage in the metrics."""
    store = LocalStore(tmp_path / "store")
    stream = repetitive_stream(length=6000)
    inputs = _inputs(store, stream[:5000], stream[5000:])
    parent = run_stage("pretrain", _recipe(), inputs, store, MemoryTracker())
    parent_metrics = parent.manifest.metrics

    recipe = _recipe(max_steps=6, log_interval=1)
    child = run_stage("pretrain", recipe, {**inputs, "parent": parent.ref}, store, MemoryTracker())
    metrics = child.manifest.metrics
    assert child.manifest.inputs["parent"] == parent.ref.to_dict()  # the parent is in the content key
    assert metrics["continued_from"] == parent.manifest.key and metrics["parent_step"] == 20
    assert metrics["steps"] == 6  # its own steps, counted from 0 with its own warmup and cosine decay
    # It starts where the parent ended, far below the ln(vocab) of a freshly drawn model.
    assert metrics["initial_loss"] < 0.5 * metrics["ln_vocab"]
    assert metrics["initial_loss"] < parent_metrics["initial_loss"] / 2
    curve = json.loads((tmp_path / "store" / "pretrain" / child.manifest.key / "curve.json").read_text())
    lrs = [point["lr"] for point in curve if "lr" in point]
    assert lrs[0] < lrs[1] == max(lrs) and lrs[-1] < lrs[1]  # re-warmed to the peak, then decayed again


def test_a_killed_continued_run_resumes_from_its_own_checkpoint_not_the_parent(tmp_path):
    """On a retry the continued run's checkpoint wins over the parent's weights: same result as no kill."""

    class CrashAfter(MemoryTracker):
        def log_metrics(self, metrics, step=None):
            super().log_metrics(metrics, step)
            if "train_loss" in metrics and step == 6:
                raise RuntimeError("the machine went away")

    stream = repetitive_stream(length=3000)
    recipe = _recipe(max_steps=8, checkpoint_interval=4, log_interval=2)
    finals = []
    for name, trackers in (("killed", [CrashAfter(), MemoryTracker()]), ("whole", [MemoryTracker()])):
        store = LocalStore(tmp_path / name)
        inputs = _inputs(store, stream[:2500], stream[2500:])
        inputs["parent"] = run_stage("pretrain", _recipe(max_steps=4), inputs, store, MemoryTracker()).ref
        for tracker in trackers[:-1]:
            with pytest.raises(RuntimeError, match="went away"):
                run_stage("pretrain", recipe, inputs, store, tracker)
        result = run_stage("pretrain", recipe, inputs, store, trackers[-1])
        assert result.manifest.metrics["steps"] == 8 and result.manifest.metrics["parent_step"] == 4
        finals.append(ckpt.load_model(result.ref.uri + "/model").state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_a_parent_of_another_shape_is_one_line_naming_each_differing_key(tmp_path):
    store = LocalStore(tmp_path / "store")
    stream = repetitive_stream(length=3000)
    inputs = _inputs(store, stream[:2500], stream[2500:])
    parent = run_stage("pretrain", _recipe(max_steps=2), inputs, store, MemoryTracker())
    wider = _recipe(max_steps=2, model={"n_layer": 3, "n_head": 2, "n_embd": 128, "block_size": 32})
    with pytest.raises(ConfigError) as failure:
        run_stage("pretrain", wider, {**inputs, "parent": parent.ref}, store, MemoryTracker())
    assert str(failure.value) == (
        "continue_from: pretrain.model.n_layer = 3 but the parent has 2; pretrain.model.n_embd = 128 but the "
        "parent has 64; a continued model keeps its parent's shape (set these to the parent's values, or use "
        "continue_from=none to train a new model)"
    )
