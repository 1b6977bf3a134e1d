"""Stage ``pretrain``: a GPT from scratch on the data artifact's token shards.

Output artifact::

    model/              the final checkpoint: model.safetensors + model.json (what
                        ``checkpoint.load_model`` reads) + optimizer.pt + trainer.json
                        (what ``checkpoint.load_checkpoint`` reads to continue training)
    curve.json          every logged point: train loss, lr, grad norm, tokens/s, val loss

The vocabulary size comes from the data artifact (``shards.json``), which recorded the
tokenizer it was encoded with; the tokenizer artifact is an input only so that a new
tokenizer changes this stage's cache key.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from stages import checkpoint as ckpt
from stages.artifacts import CHECKPOINTS
from stages.batches import RandomWindows, fixed_windows
from stages.config import PipelineConfig
from stages.errors import DataError
from stages.model import GPT, GPTConfig
from stages.shards import TokenShards
from stages.tracking import Tracker
from stages.training import evaluate_loss, train

SECTIONS = ("pretrain",)
INPUTS = ("tokenizer", "data")

MODEL_DIR = "model"
CURVE = "curve.json"
_WORK = CHECKPOINTS  # resumable checkpoints while training (kept by the store across attempts)


def build_model(cfg: PipelineConfig, vocab_size: int) -> GPT:
    """A freshly initialised GPT of the recipe's shape; the seed fixes the weights."""
    torch.manual_seed(cfg.pretrain.seed)
    return GPT(GPTConfig(vocab_size=vocab_size, **cfg.pretrain.model.model_dump()))


def run(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict[str, Any]:
    pcfg = cfg.pretrain
    if pcfg.threads:
        torch.set_num_threads(pcfg.threads)
    train_split = TokenShards(inputs["data"], "train")
    val_split = TokenShards(inputs["data"], "val")
    vocab = train_split.vocab_size
    block = pcfg.model.block_size
    batches = RandomWindows(train_split, block, pcfg.batch_size, pcfg.seed)
    val_batches = fixed_windows(val_split, block, pcfg.batch_size, pcfg.eval_batches)
    if train_split.eos_id >= vocab:
        raise DataError(f"{inputs['data']}/shards.json: eos_id {train_split.eos_id} >= vocab_size {vocab}; rerun the data stage")

    model = build_model(cfg, vocab)
    tracker.log_params({
        "model.vocab_size": vocab,
        "model.n_params": model.num_params(non_embedding=False),
        "model.n_params_non_embedding": model.num_params(non_embedding=True),
        "model.flops_per_token": model.flops_per_token(),
        "data.train_tokens": len(train_split),
        "data.val_tokens": len(val_split),
    })

    result = train(
        model,
        batches,
        pcfg,
        tracker,
        checkpoint_dir=out / _WORK,
        evaluate=lambda m: {"val_loss": evaluate_loss(m, val_batches)},
    )

    # The last resumable checkpoint is the model: no second copy of the weights.
    final = ckpt.latest_checkpoint(out / _WORK)
    assert final is not None, "train() writes a checkpoint at the end when given a directory"
    final.rename(out / MODEL_DIR)
    shutil.rmtree(out / _WORK)
    (out / CURVE).write_text(json.dumps(result.curve, indent=1), encoding="utf-8")

    return {
        "initial_loss": round(result.initial_loss, 4),
        "ln_vocab": round(math.log(vocab), 4),
        "final_train_loss": round(result.final_loss, 4),
        "final_val_loss": None if result.final_val_loss is None else round(result.final_val_loss, 4),
        "best_val_loss": None if result.best_val_loss is None else round(result.best_val_loss, 4),
        "params": model.num_params(non_embedding=False),
        "vocab_size": vocab,
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "seconds": result.seconds,
        "device": str(next(model.parameters()).device),
    }
