"""The GPT module and the checkpoint format: initial loss, KV cache, save/load round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.core.errors import ArtifactError
from stages.training import checkpoint_format as ckpt
from stages.training.loop import build_optimizer
from tests._numeric import assert_close
from tests._training_fixtures import VOCAB, micro_config, micro_model


def test_initial_loss_is_near_ln_vocab():
    model = micro_model().eval()
    x = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)).item()
    assert abs(loss - math.log(VOCAB)) < 0.1 * math.log(VOCAB)


def test_kv_cache_prefill_then_token_by_token_matches_full_forward():
    model = micro_model(block=32).eval()
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        logits, past = model.forward_with_cache(idx[:, :12])
        steps = [logits]
        for t in range(12, 20):
            logits, past = model.forward_with_cache(idx[:, t : t + 1], past)
            steps.append(logits)
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    assert_close(cached, full)
    assert past[0][0].shape[2] == 20  # every position is in the cache


def test_save_model_then_load_model_gives_identical_logits(tmp_path):
    model = micro_model(seed=5).eval()
    with torch.no_grad():  # make the tied matrix differ from init so a mix-up would show
        model.wte.weight.add_(0.01)
    ckpt.save_model(tmp_path / "m", model)
    loaded = ckpt.load_model(tmp_path / "m")
    assert json.loads((tmp_path / "m" / ckpt.CONFIG).read_text()) == model.cfg.to_dict()
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied after loading
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert not loaded.training


def test_save_model_replaces_an_existing_directory_atomically(tmp_path):
    first, second = micro_model(seed=1), micro_model(seed=2)
    ckpt.save_model(tmp_path / "m", first)
    ckpt.save_model(tmp_path / "m", second)
    loaded = ckpt.load_model(tmp_path / "m")
    assert torch.equal(loaded.wte.weight, second.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary siblings left


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(ArtifactError, match="model.json"):
        ckpt.load_model(tmp_path)
    ckpt.save_model(tmp_path / "m", micro_model())
    config = json.loads((tmp_path / "m" / ckpt.CONFIG).read_text())
    config["n_embd"] = 32  # weights no longer fit the declared shape
    (tmp_path / "m" / ckpt.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        ckpt.load_model(tmp_path / "m")


def test_checkpoint_round_trip_restores_optimizer_and_state(tmp_path):
    model = micro_model()
    optimizer = build_optimizer(model, micro_config())
    x = torch.randint(0, VOCAB, (2, 16))
    model(x).sum().backward()
    optimizer.step()
    ckpt.save_checkpoint(tmp_path / ckpt.step_dirname(1), model, optimizer, {"step": 1, "rng": ckpt.rng_state()})

    fresh = micro_model(seed=9)
    fresh_opt = build_optimizer(fresh, micro_config())
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state["step"] == 1
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    saved, restored = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k]["exp_avg_sq"], restored[k]["exp_avg_sq"]) for k in saved)


def test_rng_state_round_trips_through_json():
    torch.manual_seed(0)
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = torch.rand(3)
    torch.manual_seed(123)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_latest_checkpoint_and_pruning(tmp_path):
    model = micro_model()
    optimizer = build_optimizer(model, micro_config())
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (5, 10, 15):
        ckpt.save_checkpoint(tmp_path / ckpt.step_dirname(step), model, optimizer, {"step": step})
    (tmp_path / ".tmp-step_00000020-crashed").mkdir()  # a write that never finished
    assert ckpt.latest_checkpoint(tmp_path).name == ckpt.step_dirname(15)
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.step_dirname(10), ckpt.step_dirname(15)]
