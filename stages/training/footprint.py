"""Bytes per device of training a GPT, counted from its shape: weights, gradients, AdamW state, activations.

Plain Python, no torch (``gptpipe plan`` runs before any GPU is rented). What each term counts:

* **weights** — every parameter in fp32 (autocast keeps fp32 master weights), the tied embedding
  once; with LoRA the frozen model plus its adapters.
* **gradients** — fp32, one per trainable parameter.
* **optimizer** — AdamW's two fp32 moments per trainable parameter, and its fp32 ``step`` counter
  per parameter tensor.
* **activations** — the tensors autograd saves for backward during one micro-batch's forward
  (batch x context tokens), storages counted once: per block each RMSNorm's input, normalised
  input and output (torch's composite RMSNorm; a fused kernel would save one fewer), the qkv
  projection, the rotated q and k, attention's output, its contiguous copy and log-sum-exp (a flash
  kernel: no context x context matrix), the SwiGLU's four hidden-width tensors; at the head the
  final norm and the fp32 log-probabilities. These are the tensors the CPU's fp32 run saves. Under bf16/fp16 autocast the residual stream and norms stay fp32, the
  matmuls' inputs (cast copies) and outputs take 2 bytes. With activation checkpointing each block
  keeps only its input, and one block's activations are rebuilt at a time in backward.
* **workspace** — what is alive besides them at the loss: the logits and their gradient.
* **gathered** (FSDP) — parameters unsharded for compute: the root (embedding, final norm) for the
  whole step and two blocks at a time (the one computing, the one prefetched).
* **buckets** (DDP) — the flat gradient buffers DDP all-reduces, one more copy of the gradients.

``tests/test_plan.py`` holds the counts of weights, gradients and optimizer state to the tensors of
the built model and optimizer, and the activations to a measurement of the saved tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from stages.lm.shape import GPTConfig

FP32 = 4
INT64 = 8


@dataclass(frozen=True)
class Footprint:
    """Bytes on one device, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int
    gathered: int = 0
    buckets: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Workload:
    """One process's training step, as the recipe and the device make it."""

    shape: GPTConfig
    batch: int  # sequences per micro-batch
    compute_bytes: int  # 4 for fp32, 2 under bf16/fp16 autocast
    on_cuda: bool
    lora_r: int = 0  # 0 = every weight trains
    lora_targets: tuple[str, ...] = ()


def lora_params(shape: GPTConfig, rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(parameters, tensors) of LoRA adapters on ``targets`` in every block: A is rank x in, B out x rank."""
    if rank <= 0:
        return 0, 0
    linears = shape.linear_shapes()
    per_block = sum(rank * (linears[t][0] + linears[t][1]) for t in targets if t in linears)
    return shape.n_layer * per_block, shape.n_layer * 2 * len([t for t in targets if t in linears])


def _block_activations(work: Workload) -> int:
    """Bytes one transformer block saves for backward (see the module's docstring)."""
    cfg, tokens, low = work.shape, work.batch * work.shape.block_size, work.compute_bytes
    d, f = cfg.n_embd, cfg.mlp_hidden
    stream = tokens * (2 * 3 * d + 2) * FP32  # two RMSNorms: input, x/rms, output (times the gain), 1/rms
    casts = 0 if low == FP32 else tokens * 3 * d * low  # the norms' outputs cast for qkv, w_gate, w_up
    attention = tokens * (3 * d + 2 * d + 2 * d) * low  # qkv, rotated q and k, attention output and its copy
    attention += work.batch * cfg.n_head * cfg.block_size * FP32  # log-sum-exp
    mlp = tokens * 4 * f * low  # gate, up, silu(gate), silu(gate) * up
    lora = tokens * work.lora_r * len(work.lora_targets) * low  # each adapter's rank-r middle
    dropout = 0
    if cfg.dropout > 0:
        dropout = tokens * 2 * d * (1 if work.on_cuda else low)  # residual dropout masks
        if not work.on_cuda:  # the CPU's SDPA has no fused dropout: the math path, context^2 per head
            dropout += 3 * work.batch * cfg.n_head * cfg.block_size**2 * low
    return stream + casts + attention + mlp + lora + dropout


def _head_activations(work: Workload) -> int:
    """Bytes the embedding, final norm and loss save: ids and targets, the norm's three tensors, fp32
    log-probabilities (and the embedding's dropout mask)."""
    cfg, tokens = work.shape, work.batch * work.shape.block_size
    norm = tokens * (3 * cfg.n_embd + 1) * FP32 + (0 if work.compute_bytes == FP32 else tokens * cfg.n_embd * 2)
    dropout = tokens * cfg.n_embd * (1 if work.on_cuda else work.compute_bytes) if cfg.dropout > 0 else 0
    return 2 * tokens * INT64 + norm + tokens * cfg.vocab_size * FP32 + dropout


def activation_bytes(work: Workload, checkpointing: bool) -> int:
    """Activations saved for backward in one micro-batch, with or without activation checkpointing."""
    cfg, block = work.shape, _block_activations(work)
    if checkpointing:  # every block keeps its input; backward rebuilds one block at a time
        kept = cfg.n_layer * work.batch * cfg.block_size * cfg.n_embd * FP32
        return kept + block + _head_activations(work)
    return cfg.n_layer * block + _head_activations(work)


def footprint(work: Workload, checkpointing: bool, world: int = 1, parallel: str = "ddp") -> Footprint:
    """Bytes per device of one training process, ``world`` processes training together under ``parallel``."""
    cfg = work.shape
    adapters, adapter_tensors = lora_params(cfg, work.lora_r, work.lora_targets)
    total = cfg.n_params() + adapters
    trainable = adapters if work.lora_r else total
    tensors = adapter_tensors if work.lora_r else cfg.n_param_tensors()
    shard = world if parallel == "fsdp" else 1
    tokens = work.batch * cfg.block_size
    gathered = buckets = 0
    if world > 1 and parallel == "fsdp":
        block = cfg.n_params() - cfg.vocab_size * cfg.n_embd - cfg.n_embd
        gathered = (cfg.vocab_size * cfg.n_embd + cfg.n_embd + 2 * block // cfg.n_layer) * FP32
    elif world > 1:
        buckets = trainable * FP32
    return Footprint(
        weights=-(-total * FP32 // shard),
        gradients=-(-trainable * FP32 // shard),
        optimizer=-(-(2 * trainable * FP32) // shard) + tensors * FP32,
        activations=activation_bytes(work, checkpointing),
        workspace=tokens * cfg.vocab_size * (work.compute_bytes + FP32),
        gathered=gathered,
        buckets=buckets,
    )
