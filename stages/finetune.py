"""Stage ``finetune``: supervised fine-tuning of the pretrained GPT on chat data.

Only assistant tokens are trained: the chat template's loss mask becomes -100 targets, which
the one training loop (``stages.training.loop.train``) skips. Conversations are packed whole into
rows of ``block_size`` + 1 tokens (never split across rows) and the tail of each row is padding
with -100 targets, so no compute is spent on a row per conversation (``stages.training.chat_batches``).

``method: lora`` wraps the GPT's linear layers with peft LoRA adapters, trains only those,
and merges them into the weights at the end (``merge_and_unload``): later stages always get one
plain checkpoint. The largest logit difference merged vs unmerged is recorded as a metric.

``replay_fraction`` of every batch's rows are windows of pretraining text (``ReplayMix``), so
the model keeps its language modelling while it learns the chat format.

Under torchrun (``nproc_per_node`` / ``nnodes`` > 1, DDP) each rank trains on its own batches
of every step and rank 0 alone merges, writes and publishes (FSDP: not yet, refused).

Outputs: ``model/`` (``checkpoint_format.save_model``), ``heldout.jsonl`` (the held-out conversations,
which ``evaluate`` scores), ``curve.json`` (the training curve) and ``data.json`` (counts).

While it trains, resumable checkpoints go to the work directory's ``checkpoints/``, which the
store keeps across attempts (as for pretraining): SIGTERM writes one, and a rerun after SIGTERM
or SIGKILL continues from the newest bit for bit — with LoRA too, since the checkpoint holds the
peft model (frozen base + adapters) and the adapters' optimizer state. They are deleted once the
model is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

from stages.core.errors import ConfigError, DataError
from stages.core.stage import Output, Sections, Stage
from stages.lm.chat import ChatTemplate, Message, Rendered, read_chat_jsonl
from stages.lm.targets import IGNORE
from stages.lm.tasks import check_tasks, make_items
from stages.lm.tokenizer import Tokenizer
from stages.storage.artifacts import CHECKPOINTS
from stages.training import checkpoint_format as checkpoint
from stages.training.replay import replay_rows

# torch, peft and the training library load inside the functions that train: validating a recipe must not.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from stages.core.sections import FinetuneConfig
    from stages.core.tracking import Tracker

log = logging.getLogger("gptpipe.finetune")

DATA_FILE = "data.json"
_WORK = CHECKPOINTS  # resumable checkpoints while training (kept by the store across attempts)


# --- data -------------------------------------------------------------------------------------


def _fingerprint(messages: list[Message]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def load_conversations(cfg: FinetuneConfig) -> tuple[list[list[Message]], list[dict]]:
    """(training conversations, held-out records ``{"messages": ..., "task"?: ...}``).

    Synthetic data comes from ``stages.lm.tasks``; a JSONL file is split by a seeded shuffle
    unless ``heldout_data`` names its own file. Either way no held-out conversation (by
    content) is left in the training set.
    """
    if cfg.data == "synthetic":
        check_tasks(cfg.tasks)
        train_items = make_items(cfg.train_items, "train", cfg.seed, cfg.tasks)
        heldout_items = make_items(cfg.heldout_items, "heldout", cfg.seed, cfg.tasks)
        return [i.messages() for i in train_items], [{"messages": i.messages(), "task": i.task} for i in heldout_items]

    conversations = read_chat_jsonl(cfg.data, cfg.max_bad_fraction)
    if cfg.heldout_data:
        heldout = read_chat_jsonl(cfg.heldout_data, cfg.max_bad_fraction)[: cfg.heldout_items]
        train_set = conversations
    else:
        if len(conversations) < 2:
            raise DataError(f"{cfg.data}: only {len(conversations)} conversation(s); need at least 2 to hold some out")
        order = list(range(len(conversations)))
        random.Random(cfg.seed).shuffle(order)
        # Hold out at most half, so a small file still leaves something to train on.
        n_held = min(cfg.heldout_items, len(conversations) // 2)
        heldout = [conversations[i] for i in order[:n_held]]
        train_set = [conversations[i] for i in order[n_held:]]
    held_keys = {_fingerprint(m) for m in heldout}
    train_set = [m for m in train_set if _fingerprint(m) not in held_keys]
    if not train_set:
        raise DataError(
            f"{cfg.data}: every training conversation also appears in the held-out set; nothing to train on"
        )
    return train_set, [{"messages": m} for m in heldout]


def render_all(
    template: ChatTemplate, conversations: list[list[Message]], block_size: int, what: str
) -> list[Rendered]:
    """Render conversations; ones longer than a row (block_size + 1 ids) are dropped and counted."""
    rendered, too_long = [], 0
    for messages in conversations:
        r = template.render(messages)
        if len(r.ids) > block_size + 1:
            too_long += 1
            continue
        rendered.append(r)
    if too_long:
        log.warning(
            "%s: dropped %d of %d conversations longer than block_size+1 = %d tokens",
            what,
            too_long,
            len(conversations),
            block_size + 1,
        )
    if not rendered:
        raise DataError(
            f"{what}: all {len(conversations)} conversations are longer than the model's context "
            f"({block_size} tokens); shorten them or pretrain with a larger pretrain.model.block_size"
        )
    return rendered


# --- LoRA -------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters on ``cfg.lora_targets``; other weights freeze."""
    import torch
    from peft import LoraConfig, get_peft_model  # imported here: full fine-tuning never needs peft

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in cfg.lora_targets if t not in names]
    if unknown or not cfg.lora_targets:
        raise ConfigError(
            f"finetune.lora_targets = {cfg.lora_targets!r}: {unknown or 'empty'} not among the model's linear layers "
            f"({', '.join(sorted(names))})"
        )
    lora = LoraConfig(
        target_modules=list(cfg.lora_targets), r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout
    )
    # The adapters' A matrices are drawn from torch's RNG: seed it, so the recipe's seed fixes them
    # (otherwise they depend on whatever drew random numbers earlier in the process).
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lora)


def merge_lora(peft_model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, float]:
    """Merge the adapters into the base weights; return (plain GPT, max |Δlogits| on ``probe``)."""
    import torch

    with torch.no_grad():
        peft_model.eval()
        before = peft_model(probe)
        merged = peft_model.merge_and_unload()
        merged.eval()
        after = merged(probe)
    return merged, float((after - before).abs().max())


# --- the stage --------------------------------------------------------------------------------


def run(
    cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker, checkpoint_mirror: str | None = None
) -> dict:
    from stages.training import distributed
    from stages.training.chat_batches import fixed_batches, pack, training_batches
    from stages.training.checkpoint_mirror import drop_checkpoints
    from stages.training.loop import Display, train
    from stages.training.loss import evaluate_loss
    from stages.training.perf import resolve_device, set_threads

    fcfg = cfg.finetune
    set_threads(fcfg.threads)
    tokenizer = Tokenizer.load(inputs["tokenizer"])
    template = ChatTemplate(tokenizer)
    model = checkpoint.load_model(checkpoint.model_directory(inputs["pretrain"]), device="cpu")
    block = model.cfg.block_size
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise DataError(
            f"{inputs['tokenizer']}: tokenizer has {tokenizer.vocab_size} ids but the pretrained model only "
            f"{model.cfg.vocab_size}; rerun pretrain with this tokenizer"
        )

    train_convs, heldout = load_conversations(fcfg)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else template.end_id
    train_rendered = render_all(template, train_convs, block, f"{fcfg.data} (training)")
    held_rendered = render_all(template, [h["messages"] for h in heldout], block, f"{fcfg.data} (held-out)")
    x, y = pack(train_rendered, block + 1, pad_id)
    hx, hy = pack(held_rendered, block + 1, pad_id)
    held_batches = fixed_batches(hx, hy, fcfg.batch_size, fcfg.eval_batches)
    if distributed.from_env().is_main:  # under torchrun, rank 0 alone writes the outputs
        with open(out / checkpoint.HELDOUT, "w", encoding="utf-8") as handle:
            for record in heldout:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    batches, n_replay = training_batches(fcfg, x, y, inputs.get("data"), block)
    trainable: nn.Module = apply_lora(model, fcfg) if fcfg.method == "lora" else model
    n_trainable = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    counts = (len(train_rendered), len(x), n_replay, fcfg.batch_size, n_trainable)
    log.info(
        "finetune (%s): %d conversations in %d rows, %d of %d rows per batch replay pretraining text, "
        "%d trainable parameters",
        fcfg.method,
        *counts,
    )
    result = train(
        trainable,
        batches,
        fcfg,
        tracker,
        checkpoint_dir=out / _WORK,
        evaluate=lambda m: {"val_loss": evaluate_loss(m, held_batches)},
        display=Display("finetune", metric_prefix="finetune/"),
        checkpoint_mirror=checkpoint_mirror,
    )
    if not distributed.current().is_main:
        distributed.exit_worker()  # rank 0 merges, writes and publishes
    distributed.teardown()

    metrics: dict = {"method": fcfg.method, "trainable_params": n_trainable, "replay_rows": n_replay}
    if fcfg.method == "lora":
        device = resolve_device(fcfg.device)
        model, delta = merge_lora(trainable, hx[:4].to(device))
        metrics["lora_merge_max_abs_dlogits"] = delta
        tracker.log_metrics({"finetune/lora_merge_max_abs_dlogits": delta})
    checkpoint.save_model(out / checkpoint.MODEL_DIR, model.to("cpu"))
    drop_checkpoints(out / _WORK, checkpoint_mirror)  # the model is written: they have done their job

    (out / checkpoint.CURVE).write_text(json.dumps(result.curve, indent=1), encoding="utf-8")
    data = {
        "source": fcfg.data,
        "train_conversations": len(train_rendered),
        "train_rows": len(x),
        "train_assistant_tokens": int((y != IGNORE).sum()),
        "heldout_conversations": len(heldout),
        "tasks": fcfg.tasks if fcfg.data == "synthetic" else None,
    }
    (out / DATA_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")
    metrics.update(result.summary())
    metrics.update({k: v for k, v in data.items() if isinstance(v, int)})
    return metrics


def _inputs(cfg: Sections) -> tuple[str, ...]:
    # Replay mixes pretraining text (the data stage's train split) into fine-tuning.
    return ("tokenizer", "pretrain", "data") if cfg.finetune.replay_fraction > 0 else ("tokenizer", "pretrain")


def _problems(cfg: Sections) -> list[str]:
    """What of the finetune section cannot run, found before any stage does."""
    ft = cfg.finetune
    problems = []
    if replay_rows(ft.replay_fraction, ft.batch_size) >= ft.batch_size:
        problems.append(
            f"finetune.replay_fraction = {ft.replay_fraction} leaves no chat rows in a batch of "
            f"{ft.batch_size}; lower it or raise finetune.batch_size"
        )
    if ft.method == "lora" and not ft.lora_targets:
        problems.append("finetune.lora_targets = []: LoRA needs at least one layer name, e.g. ['qkv', 'proj']")
    if ft.parallel == "fsdp" and ft.nproc_per_node * ft.nnodes > 1:  # its model is written from the shards
        problems.append("finetune.parallel = 'fsdp': fine-tuning under FSDP is not supported yet; use 'ddp'")
    if ft.data == "synthetic":
        try:
            check_tasks(ft.tasks)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


STAGE = Stage(
    name="finetune",
    summary="supervised fine-tuning on chat data (full or LoRA)",
    sections=("finetune",),
    inputs=("tokenizer", "pretrain"),
    outputs=(
        Output(checkpoint.MODEL_DIR, "the fine-tuned model (LoRA merged into the weights)"),
        Output(checkpoint.HELDOUT, "the held-out conversations evaluate and export score"),
        Output(checkpoint.CURVE, "the training curve"),
        Output(DATA_FILE, "conversation and token counts"),
    ),
    run=run,
    headline=("final_train_loss", "final_val_loss", "tokens_per_s"),
    headline_when_set=("lora_merge_max_abs_dlogits",),  # finetune.method = lora
    choose_inputs=_inputs,
    check=_problems,
    makes_model=True,
    trains=True,
    torchrun=True,
)
