"""Bad recipes: ``gptpipe run`` refuses them in one line, before Prefect, MLflow or any stage starts."""

from __future__ import annotations

import pytest

from ._failure_checks import error_line, run_gptpipe_cli
from .conftest import ROOT

MICRO = str(ROOT / "configs" / "micro.yaml")


def _refuse(capsys, tmp_path, *argv: str) -> str:
    """Run ``gptpipe run`` with a store under ``tmp_path``; return its one error line after checking
    that nothing was created: no store, no MLflow database (so no run of any status)."""
    code, _, err = run_gptpipe_cli(capsys, "run", *argv, "--set", f"artifacts.store={tmp_path / 'store'}")
    line = error_line(code, err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "recipe.yaml") == [], "a refused recipe created files"
    return line


@pytest.mark.parametrize(
    "override, unknown, suggestion",
    [
        ("pretrain.max_step=5", "pretrain.max_step", "did you mean 'pretrain.max_steps'?"),
        ("pretrain.model.n_layers=2", "pretrain.model.n_layers", "did you mean 'pretrain.model.n_layer'?"),
        ("tokenizr.vocab_size=512", "tokenizr", "did you mean 'tokenizer'?"),  # the section itself is unknown
        ("finetune.lora_rank=8", "finetune.lora_rank", "did you mean 'finetune.lora_r'?"),
    ],
)
def test_misspelled_key_is_named_with_the_key_it_probably_meant(override, unknown, suggestion, capsys, tmp_path):
    line = _refuse(capsys, tmp_path, "--config", MICRO, "--set", override)
    assert f"unknown key '{unknown}'" in line and suggestion in line


def test_unknown_key_in_a_recipe_file_names_the_file(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: typo\npretrain:\n  warmup_step: 3\n", encoding="utf-8")
    line = _refuse(capsys, tmp_path, "--config", str(recipe))
    assert str(recipe) in line and "unknown key 'pretrain.warmup_step'" in line
    assert "did you mean 'pretrain.warmup_steps'?" in line


def test_a_key_nothing_resembles_gets_no_false_suggestion(capsys, tmp_path):
    line = _refuse(capsys, tmp_path, "--config", MICRO, "--set", "pretrain.zzqx=1")
    assert "unknown key 'pretrain.zzqx'" in line and "did you mean" not in line


@pytest.mark.parametrize(
    "override, shown",
    [
        ("pretrain.lr=-0.001", "pretrain.lr = -0.001"),
        ("pretrain.max_steps=0", "pretrain.max_steps = 0"),
        ("pretrain.batch_size=-8", "pretrain.batch_size = -8"),
        ("pretrain.lr=.nan", "pretrain.lr = nan"),
        ("pretrain.grad_clip=.nan", "pretrain.grad_clip = nan"),
        ("pretrain.model.dropout=.nan", "pretrain.model.dropout = nan"),
        ("tokenizer.vocab_size=0", "tokenizer.vocab_size = 0"),
        ("tokenizer.character_coverage=.inf", "tokenizer.character_coverage = inf"),
        ("finetune.lora_r=0", "finetune.lora_r = 0"),
        ("data.val_fraction=-0.1", "data.val_fraction = -0.1"),
        ("corpus.max_bytes=-1", "corpus.max_bytes = -1"),
    ],
)
def test_negative_zero_and_nan_numbers_name_field_and_value(override, shown, capsys, tmp_path):
    line = _refuse(capsys, tmp_path, "--config", MICRO, "--set", override)
    assert shown in line, line


def test_an_override_yaml_cannot_read_is_named(capsys, tmp_path):
    line = _refuse(capsys, tmp_path, "--config", MICRO, "--set", "name=2001-13-45")
    assert "--set 'name=2001-13-45'" in line and "month must be in 1..12" in line


@pytest.mark.parametrize(
    "override, shown",
    [
        ("finetune.replay_fraction=0.95", "finetune.replay_fraction = 0.95"),
        ("stages=[tokenizer, pretrain]", "stages: 'pretrain' needs data"),
    ],
)
def test_a_recipe_no_stage_could_run_is_refused_before_the_first_stage(override, shown, capsys, tmp_path):
    """Constraints across fields are the recipe's too: refused at load, not after pretraining ran."""
    line = _refuse(capsys, tmp_path, "--config", MICRO, "--set", override)
    assert shown in line, line
