"""``gptpipe plan``: its byte counts are the built model's tensors, its activation estimate is near a
measurement of what autograd saves, and the command answers on the tiny and 8-GPU recipes with a fit line."""

from __future__ import annotations

import contextlib
import io
import time

import pytest
import torch

from flows.cli.main import main
from stages.core.config import load_config
from stages.lm.shape import GPTConfig
from stages.pretrain import build_model
from stages.training.checkpoint_format import find_gpt
from stages.training.footprint import FP32, Workload, activation_bytes
from stages.training.loss import token_loss_sum
from stages.training.optimizer import build_optimizer
from stages.training.plan import Target, stage_plan

TINY, EIGHT_GPUS, MICRO = "configs/tiny.yaml", "configs/gpt2-small-8gpu.yaml", "configs/micro.yaml"
HERE = Target("the test's CPU", on_cuda=False, peak_flops=1e11, peak_source="test", memory_bytes=2**34)


def _shape(recipe) -> GPTConfig:
    return GPTConfig(vocab_size=recipe.tokenizer.vocab_size, **recipe.pretrain.model.model_dump())


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab: int) -> None:
    """A real optimizer step on a short batch: gradients and AdamW's state come into being."""
    ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    token_loss_sum(model, ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()


def _held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) as the tensors hold them; tied weights once."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return _bytes(params), _bytes(p.grad for p in params if p.grad is not None), _bytes(state)


def test_weights_gradients_and_optimizer_state_are_the_built_models_tensors():
    recipe = load_config(TINY)
    plan = stage_plan("pretrain", recipe.pretrain, _shape(recipe), HERE)
    model = build_model(recipe.sections("pretrain"), recipe.tokenizer.vocab_size)
    optimizer = build_optimizer(model, recipe.pretrain)
    _one_step(model, optimizer, recipe.tokenizer.vocab_size)
    planned = plan.options[0].bytes
    assert (planned.weights, planned.gradients, planned.optimizer) == _held_bytes(model, optimizer)
    assert plan.n_params == model.num_params(non_embedding=False) == plan.trainable
    assert plan.flops_per_token == model.flops_per_token()  # the MFU's numerator, counted the same way


def test_lora_trains_only_the_adapters_and_the_plan_counts_them():
    from stages.finetune import apply_lora

    recipe = load_config(MICRO, ["finetune.method=lora", "finetune.lora_r=4"])
    plan = stage_plan("finetune", recipe.finetune, _shape(recipe), HERE)
    peft_model = apply_lora(build_model(recipe.sections("pretrain"), recipe.tokenizer.vocab_size), recipe.finetune)
    optimizer = build_optimizer(peft_model, recipe.finetune)
    _one_step(peft_model, optimizer, recipe.tokenizer.vocab_size)
    planned = plan.options[0].bytes
    assert (planned.weights, planned.gradients, planned.optimizer) == _held_bytes(peft_model, optimizer)
    assert plan.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert plan.flops_per_token == find_gpt(peft_model).flops_per_token()


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one forward and loss: each saved tensor's storage once,
    parameters and buffers left out (they are the weights, counted apart)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_loss_sum(model, x, y)
    return sum(saved.values())


def test_the_activation_estimate_is_within_30_percent_of_what_autograd_saves_for_the_tiny_recipe():
    recipe = load_config(TINY)
    shape, batch = _shape(recipe), recipe.pretrain.batch_size
    model = build_model(recipe.sections("pretrain"), shape.vocab_size)
    ids = torch.randint(0, shape.vocab_size, (batch, shape.block_size + 1), generator=torch.Generator().manual_seed(1))
    measured = saved_activation_bytes(model, ids[:, :-1], ids[:, 1:])
    estimate = activation_bytes(Workload(shape, batch, FP32, on_cuda=False), checkpointing=False)
    assert estimate == stage_plan("pretrain", recipe.pretrain, shape, HERE).options[0].bytes.activations
    assert abs(estimate - measured) <= 0.3 * measured, (estimate, measured)


def _plan(*args: str) -> tuple[int, str]:
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        code = main(["plan", *args])
    return code, shown.getvalue()


@pytest.mark.parametrize("recipe", [TINY, EIGHT_GPUS])
def test_gptpipe_plan_sizes_each_training_stage_and_says_whether_it_fits(recipe):
    started = time.perf_counter()
    code, text = _plan("--config", recipe)
    assert code == 0 and time.perf_counter() - started < 5, text  # seconds, not a model build
    for stage in ("pretrain", "finetune"):
        assert f"fit: {stage} FITS" in text, text
    assert "tokens per step" in text and "FLOPs" in text and "at MFU 40%" in text
    if recipe == EIGHT_GPUS:  # device cuda, no --gpu: planned on the default H100, 8 processes, FSDP offered
        assert "8 process(es) on 1 node(s), one H100 each, bf16" in text and "FSDP + activation checkpointing" in text
    else:  # device auto, no --gpu: this machine's CPU, at the peak the training loop's MFU uses
        assert "on this machine's CPU" in text and "peak         hardware:" in text


def test_a_recipe_that_does_not_fit_says_so_and_what_would():
    code, text = _plan("--config", EIGHT_GPUS, "--gpu", "T4")
    assert code == 0
    assert (
        "fit: pretrain DOES NOT FIT one T4 (16 GiB)" in text and "--set pretrain.activation_checkpointing=true" in text
    )
    assert "fit: finetune DOES NOT FIT" in text and "lower finetune.batch_size and raise finetune.grad_accum" in text


def test_an_unknown_gpu_is_one_line_naming_the_known_ones(capsys):
    assert main(["plan", "--config", TINY, "--gpu", "X900"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--gpu 'X900'" in error and "H100" in error
