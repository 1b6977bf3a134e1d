"""Recipes: every shipped recipe loads; mistakes fail early and name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.config import PipelineConfig, load_config
from stages.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "micro.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe: Path):
    cfg = load_config(recipe)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.pretrain.model.n_embd % cfg.pretrain.model.n_head == 0


def test_override_applies_and_parses_yaml_types():
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["pretrain.max_steps=50", "finetune.method=lora", "pretrain.lr=1e-3", "corpus.extensions=[.txt]"],
    )
    assert cfg.pretrain.max_steps == 50
    assert cfg.finetune.method == "lora"
    assert cfg.pretrain.lr == pytest.approx(1e-3)
    assert cfg.corpus.extensions == [".txt"]


def test_typo_names_the_field():
    with pytest.raises(ConfigError, match=r"unknown key 'pretrain\.max_step'"):
        load_config(ROOT / "configs/tiny.yaml", ["pretrain.max_step=5"])


def test_typo_in_yaml_file_names_file_and_field(tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("tokenizer:\n  vocab_sise: 512\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert "bad.yaml" in str(err.value) and "tokenizer.vocab_sise" in str(err.value)


@pytest.mark.parametrize(
    "override, field",
    [
        ("pretrain.max_steps=0", "pretrain.max_steps"),
        ("pretrain.lr=-1", "pretrain.lr"),
        ("pretrain.lr=.nan", "pretrain.lr"),
        ("finetune.method=qlora", "finetune.method"),
        ("pretrain.model.n_head=3", "n_head (3)"),
        ("tokenizer.model_type=wordpiece", "tokenizer.model_type"),
        ("stages=[tokenizer, trian]", "stages"),
    ],
)
def test_bad_values_name_field_and_value(override: str, field: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert field in message
    assert "\n" not in message


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["pretrain.max_steps"])


def test_missing_recipe_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["stages=[tokenizer, pretrain]"], "stages: 'pretrain' needs data"),
        (["stages=[tokenizer, data, pretrain, export]", "export.source=finetune"], "stages: 'export' needs finetune"),
        (["finetune.replay_fraction=0.95"], "finetune.replay_fraction = 0.95"),
        (["finetune.nproc_per_node=2", "finetune.parallel=fsdp"], "finetune.parallel = 'fsdp'"),
        (["finetune.tasks=[last, nope]"], "finetune.tasks = ['last', 'nope']"),
        (["finetune.method=lora", "finetune.lora_targets=[]"], "finetune.lora_targets = []"),
        (["pretrain.device=tpu"], "pretrain.device = 'tpu'"),
        (["evaluate.device=cuda:x"], "evaluate.device = 'cuda:x'"),
        (["execution.mode=containers"], "artifacts.store='runs/store'"),  # a store the containers cannot see
    ],
)
def test_constraints_across_fields_fail_when_the_recipe_loads(overrides: list[str], field: str):
    """What depends only on the recipe is refused by the config, before any stage could start."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert field in message and "\n" not in message, message
    assert "Value error" not in message and "{" not in message, message  # no pydantic wording, no section dump


def test_what_the_registry_allows_still_loads():
    cfg = load_config(
        None,
        [
            "pretrain.nproc_per_node=2",
            "pretrain.nnodes=2",
            "stages=[tokenizer, data, pretrain, export]",
            "export.source=pretrain",
            "finetune.data=chats.jsonl",
            "finetune.tasks=[]",
            "evaluate.device=cuda:1",
            "execution.mode=containers",
            "artifacts.store=s3://bucket/store",
        ],
    )
    assert cfg.pretrain.nproc_per_node == 2 and cfg.stages[-1] == "export"


def test_on_off_switches_take_the_words_yaml_reads_as_booleans():
    """`--set pretrain.compile=off` is YAML's false: it must mean the switch's 'off', not an error."""
    cfg = load_config(None, ["pretrain.compile=off", "finetune.compile=on", "pretrain.fused_optimizer=off"])
    assert (cfg.pretrain.compile, cfg.finetune.compile, cfg.pretrain.fused_optimizer) == ("off", "on", "off")
    with pytest.raises(ConfigError, match="pretrain.compile"):
        load_config(None, ["pretrain.compile=maybe"])
