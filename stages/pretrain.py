"""Stage ``pretrain``: a GPT from scratch on the data artifact's token shards.

Output artifact::

    model/              the final checkpoint: model.safetensors + model.json (what
                        ``checkpoint_format.load_model`` reads) + optimizer.pt + trainer.json
                        (what ``checkpoint_format.load_checkpoint`` reads to continue training)
    curve.json          every logged point: train loss, lr, grad norm, tokens/s, val loss

Under torchrun every rank runs this stage: each trains on its own slice of every batch, rank 0
writes the checkpoints and the outputs, and the other ranks leave once training is done
(``distributed.exit_worker``) so that only rank 0 publishes the artifact.

The vocabulary size comes from the data artifact (``shards.json``), which recorded the
tokenizer it was encoded with; the tokenizer artifact is an input only so that a new
tokenizer changes this stage's cache key.

With the lineage input ``parent`` (the recipe's ``continue_from``: an earlier pretrain output,
whose tokenizer this run shares) the model starts from the parent's weights instead of a fresh
draw, and its ``max_steps`` re-warm and re-decay the learning rate with a fresh optimizer; old
data is replayed because the grown corpus still holds it (``stages/training/continuation.py``).
The metrics then also record ``continued_from`` (the parent's content key) and ``parent_step``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.errors import DataError
from stages.core.stage import Output, Sections, Stage
from stages.storage.artifacts import CHECKPOINTS
from stages.training.checkpoint_format import CURVE, MODEL_DIR

# torch and the training library are imported inside the functions that train: declaring this stage
# (what validating a recipe does) must not load them.
if TYPE_CHECKING:
    import torch

    from stages.core.tracking import Tracker
    from stages.lm.model import GPT
    from stages.training.state import TrainResult

_WORK = CHECKPOINTS  # resumable checkpoints while training (kept by the store across attempts)


def build_model(cfg: Sections, vocab_size: int) -> GPT:
    """A freshly initialised GPT of the recipe's shape; the seed fixes the weights."""
    import torch

    from stages.lm.model import GPT, GPTConfig

    torch.manual_seed(cfg.pretrain.seed)
    return GPT(GPTConfig(vocab_size=vocab_size, **cfg.pretrain.model.model_dump()))


def _val_slice(batches: list, rank: int, world: int) -> list:
    """This rank's rows of the global validation batches (each rank scores batch_size of them).

    The windows are drawn for the global batch, so 2 ranks of batch 4 score exactly the windows
    one process of batch 8 scores, and no rank holds more than its own batch in memory.
    """
    if world == 1:
        return batches
    size = len(batches[0][0]) // world
    return [(x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]) for x, y in batches]


def _global_val_loss(model: torch.nn.Module, batches: list, world: int) -> float:
    """Mean token loss over every rank's slice (slices hold equal token counts, so the mean of means)."""
    from stages.training import distributed
    from stages.training.loss import evaluate_loss

    loss = evaluate_loss(model, batches)
    return distributed.all_reduce_sum([loss], next(model.parameters()).device)[0] / world


def run(
    cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker, checkpoint_mirror: str | None = None
) -> dict[str, Any]:
    from stages.storage.shards import TokenShards
    from stages.training import checkpoint_format as ckpt
    from stages.training import distributed
    from stages.training.batches import RandomWindows, fixed_windows
    from stages.training.checkpoint_mirror import drop_checkpoints
    from stages.training.loop import Display, train
    from stages.training.perf import set_threads

    pcfg = cfg.pretrain
    set_threads(pcfg.threads)
    train_split = TokenShards(inputs["data"], "train")
    val_split = TokenShards(inputs["data"], "val")
    vocab = train_split.vocab_size
    block = pcfg.model.block_size
    batches = RandomWindows(train_split, block, pcfg.batch_size, pcfg.seed)
    rank, world = distributed.from_env().rank, distributed.from_env().world_size
    val_batches = _val_slice(fixed_windows(val_split, block, pcfg.batch_size * world, pcfg.eval_batches), rank, world)
    if train_split.eos_id >= vocab:
        raise DataError(
            f"{inputs['data']}/shards.json: eos_id {train_split.eos_id} >= vocab_size {vocab}; rerun the data stage"
        )

    model = build_model(cfg, vocab)
    lineage = {}
    if "parent" in inputs:  # continue_from: the parent's weights (a checkpoint of this run, if any, wins later)
        from stages.training.continuation import start_from_parent

        lineage = start_from_parent(model, inputs["parent"])
    if distributed.from_env().is_main:  # under torchrun, one report per job
        tracker.log_params(
            {
                "model.vocab_size": vocab,
                "model.n_params": model.num_params(non_embedding=False),
                "model.n_params_non_embedding": model.num_params(non_embedding=True),
                "model.flops_per_token": model.flops_per_token(),
                "data.train_tokens": len(train_split),
                "data.val_tokens": len(val_split),
            }
        )

    result = train(
        model,
        batches,
        pcfg,
        tracker,
        checkpoint_dir=out / _WORK,
        evaluate=lambda m: {"val_loss": _global_val_loss(m, val_batches, world)},
        display=Display("pretrain"),
        checkpoint_mirror=checkpoint_mirror,
    )
    if not distributed.current().is_main:
        distributed.exit_worker()  # rank 0 wrote the checkpoint; it alone writes and publishes the rest
    distributed.teardown()

    # The last resumable checkpoint is the model: no second copy of the weights.
    final = ckpt.latest_checkpoint(out / _WORK)
    assert final is not None, "train() writes a checkpoint at the end when given a directory"
    final.rename(out / MODEL_DIR)
    drop_checkpoints(out / _WORK, checkpoint_mirror)
    (out / CURVE).write_text(json.dumps(result.curve, indent=1), encoding="utf-8")

    return {**_metrics(result, model, vocab), **lineage}


def _metrics(result: TrainResult, model: GPT, vocab: int) -> dict[str, Any]:
    """What the manifest records of a finished run (the report card shows the headline)."""
    return {
        "initial_loss": round(result.initial_loss, 4),
        "ln_vocab": round(math.log(vocab), 4),
        "final_train_loss": round(result.final_train_loss, 4),
        "final_val_loss": None if result.final_val_loss is None else round(result.final_val_loss, 4),
        "best_val_loss": None if result.best_val_loss is None else round(result.best_val_loss, 4),
        "params": model.num_params(non_embedding=False),
        "vocab_size": vocab,
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "seconds": result.seconds,
        "device": str(next(model.parameters()).device),
        # Hardware use (MFU's denominator is named by peak_source: a table entry, a probe, or the recipe).
        "mfu": round(result.mfu, 5),
        "flops_per_token": result.flops_per_token,
        "total_flops": result.total_flops,
        "peak_flops": result.peak_flops,
        "peak_source": result.peak_source,
        "peak_memory_mb": result.peak_memory_mb,
        "world_size": result.world_size,
        "precision": result.precision,
        "compiled": result.compiled,
    }


STAGE = Stage(
    name="pretrain",
    summary="GPT from scratch on the shards",
    sections=("pretrain",),
    inputs=("tokenizer", "data"),
    lineage_inputs=("parent",),  # continue_from: the parent's pretrain output, whose weights it starts from
    outputs=(
        Output(MODEL_DIR, "the final checkpoint (weights, model config, optimizer and trainer state)"),
        Output(CURVE, "every logged point: train loss, lr, grad norm, tokens/s, val loss"),
    ),
    run=run,
    headline=("initial_loss", "final_val_loss", "tokens_per_s", "mfu"),
    makes_model=True,
    trains=True,
    torchrun=True,
)
