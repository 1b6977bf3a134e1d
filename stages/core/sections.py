"""The recipe sections the stages own: corpus, tokenizer, data, pretrain, finetune, evaluate, export, publish.

Each stage declares which of these it reads (``STAGE.sections``); the executor hands it exactly
those, and they, with its inputs and code, make its content key. Every model forbids unknown keys,
so a typo such as ``pretrain.max_step`` fails before any work starts, with the field named.

This module imports nothing of gptpipe but the error types: stages and the library below them
import their sections from here, and ``stages.core.config`` composes them into a recipe.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEVICE = re.compile(r"auto|cpu(:\d+)?|cuda(:\d+)?")  # what stages.training.perf.resolve_device accepts


def _switch_word(value: object) -> object:
    """YAML reads a bare ``on``/``off`` (``--set pretrain.compile=off``) as a boolean: take it back as the word."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def _device_name(value: str) -> str:
    if not DEVICE.fullmatch(value):
        raise ValueError("not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return value


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class CorpusConfig(Section):
    """Where the pretraining text comes from (read by ``stages/storage/corpus.py``)."""

    source: str = Field(
        "python-stdlib",
        description="'python-stdlib' (the interpreter's own library .py sources), a file, a directory, "
        "a glob, a .jsonl/.parquet file, or s3://bucket/prefix (streamed). Files are read in sorted order.",
    )
    text_field: str = Field("text", description="Field holding the text in JSONL/Parquet records.")
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".py", ".rst", ".jsonl", ".parquet"],
        description="File suffixes read when the source is a directory or glob (.jsonl/.parquet are read as records).",
    )
    max_bytes: int | None = Field(
        None,
        gt=0,
        description="Optional cap: stop after this many bytes of text, in source order (null = the whole source; "
        "the demo recipes set one to stay small).",
    )
    max_doc_bytes: int = Field(
        200_000, gt=0, description="Documents longer than this are truncated to this many bytes."
    )

    @field_validator("source", "text_field")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not v.startswith(".") or len(v) < 2]
        if bad:
            raise ValueError(f"suffixes must start with a dot, e.g. '.txt' (got {bad})")
        if not values:
            raise ValueError("list at least one suffix, e.g. ['.txt']")
        return values


class TokenizerConfig(Section):
    """SentencePiece training (``stages/tokenizer.py``). Text round-trips exactly, newlines included."""

    model_type: Literal["bpe", "unigram"] = Field("bpe", description="SentencePiece algorithm.")
    vocab_size: int = Field(
        2048,
        ge=300,
        le=1_000_000,
        description="Vocabulary size, special tokens included (byte_fallback takes 256 ids, specials 9).",
    )
    byte_fallback: bool = Field(True, description="Encode unknown characters as UTF-8 bytes (costs 256 ids).")
    split_digits: bool = Field(True, description="Every digit is its own token.")
    character_coverage: float = Field(0.9995, gt=0.0, le=1.0, description="Share of characters covered by pieces.")
    train_bytes: int = Field(
        4_000_000,
        gt=0,
        description="Bytes of text the tokenizer trains on: an even sample (by content hash) of the whole corpus.",
    )
    heldout_fraction: float = Field(
        0.02,
        ge=0.0,
        lt=0.5,
        description="Share of documents held out to measure compression (0 = measure on training text).",
    )
    threads: int = Field(2, ge=1, description="SentencePiece trainer threads.")


class DataConfig(Section):
    """Corpus -> token shards (``stages/data.py``)."""

    val_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of documents in the validation split (at least one)."
    )
    shard_tokens: int = Field(50_000_000, gt=0, description="Maximum tokens per shard file (uint16/uint32 memmap).")
    workers: int = Field(
        0, ge=0, description="Processes tokenizing work units (0 = all cores, 1 = in the stage's own process)."
    )
    seed: int = Field(1234, description="Seed of the deterministic train/val document split.")
    unit_bytes: int = Field(
        4_000_000,
        ge=1000,
        description="Average source bytes per work unit (files, JSONL byte ranges or Parquet row groups, cut where "
        "their contents say, at most twice this); each is tokenized, written, resumed and reused by later runs on "
        "its own. Output never depends on workers.",
    )
    executor: Literal["processes", "dask"] = Field(
        "processes", description="Where units run: a local process pool, or a Dask cluster (data.dask_scheduler)."
    )
    dask_scheduler: str | None = Field(
        None, description="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (default: DASK_SCHEDULER_ADDRESS)."
    )


class ModelConfig(Section):
    """GPT shape. The vocabulary size comes from the tokenizer artifact."""

    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_embd: int = Field(256, ge=8, description="Model width; must be divisible by n_head.")
    block_size: int = Field(256, ge=8, description="Context length in tokens.")
    mlp_ratio: float = Field(8 / 3, gt=0, description="SwiGLU hidden width as a multiple of n_embd.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention and residual paths.")
    rope_theta: float = Field(10_000.0, gt=0, description="RoPE base frequency.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"n_head: n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads of even width (RoPE)"
            )
        return self


class TrainConfig(Section):
    """The one training loop's knobs, shared by pretraining and fine-tuning."""

    max_steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of lr (cosine).")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices (not on norms/biases).")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    eval_interval: int = Field(100, gt=0, description="Steps between validation-loss evaluations.")
    eval_batches: int = Field(8, gt=0, description="Micro-batches per validation-loss estimate.")
    log_interval: int = Field(10, gt=0, description="Steps between metric log lines.")
    checkpoint_interval: int = Field(0, ge=0, description="Steps between resumable checkpoints (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept on disk; older ones are deleted.")
    seed: int = Field(1337, description="Seed for weights and batch order.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = leave torch's default).")
    # --- performance switches (stages/training/perf.py); 'auto' = what pays off on the device ---
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the model: 'auto' = on for CUDA, off on the CPU (no gain there)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast dtype: 'auto' = bf16 on CUDA (fp16 + grad scaler where bf16 is missing), fp32 on the CPU.",
    )
    fused_optimizer: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused AdamW kernel: 'auto' = on for CUDA, off on the CPU."
    )
    tf32: bool = Field(True, description="Allow TF32 matmuls/convolutions on Ampere+ GPUs (no effect on the CPU).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward: less memory, ~30% more compute."
    )
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms (bitwise-repeatable runs; slower on GPUs)."
    )
    peak_flops: float = Field(
        0.0,
        ge=0,
        description="Peak FLOP/s per device for MFU (0 = the GPU table; on the CPU cores x vector width x FMA units x "
        "clock from /proc/cpuinfo; a short matmul probe where neither knows the device).",
    )
    # --- distributed (stages/training/distributed.py); launched by torchrun ---
    nproc_per_node: int = Field(
        1, ge=1, description="Processes (GPUs) per node; > 1 makes the flow launch the stage under torchrun."
    )
    nnodes: int = Field(
        1, ge=1, description="Nodes for torchrun; > 1 needs GPTPIPE_RDZV_ENDPOINT=host:port on every node."
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: 'ddp' (replicated weights) or 'fsdp' (FSDP2 fully_shard)."
    )

    _device = field_validator("device")(_device_name)
    _switches = field_validator("compile", "fused_optimizer", mode="before")(_switch_word)


class PretrainConfig(TrainConfig):
    """GPT pretraining from scratch on the token shards."""

    model: ModelConfig = Field(default_factory=ModelConfig)


class FinetuneConfig(TrainConfig):
    """Supervised fine-tuning on chat data (assistant tokens only).

    Batches are rows of block_size tokens packed with whole conversations, so the defaults
    below (8 rows x 200 steps) cost about as much compute as 2 minutes on 2 CPU cores.
    """

    max_steps: int = Field(200, gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Packed rows (block_size tokens each) per micro-batch.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    eval_interval: int = Field(50, gt=0, description="Steps between held-out loss evaluations.")
    eval_batches: int = Field(4, gt=0, description="Micro-batches of held-out conversations per loss estimate.")
    method: Literal["full", "lora"] = Field(
        "full", description="Train every weight, or LoRA adapters merged at the end."
    )
    data: str = Field("synthetic", description="'synthetic' (built-in verifiable tasks) or a chat JSONL file.")
    heldout_data: str | None = Field(None, description="Held-out chat JSONL (defaults to a split of `data`).")
    train_items: int = Field(20_000, gt=0, description="Synthetic training conversations.")
    heldout_items: int = Field(300, gt=0, description="Held-out conversations (synthetic or split).")
    tasks: list[str] = Field(
        default_factory=lambda: ["last", "last_plus"],
        description="Synthetic task mix (see stages/lm/tasks.py): last, last_plus, last_minus (learnable in minutes "
        "on a CPU), reverse, sort, repeat, add (need longer training).",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Fail if more than this share of JSONL lines is malformed."
    )
    replay_fraction: float = Field(
        0.125,
        ge=0,
        lt=1,
        description="Share of each micro-batch's rows that are pretraining text (the data stage's train split, "
        "all tokens trained), so fine-tuning does not erase what pretraining learned; 0 = off.",
    )
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["qkv", "proj", "w_gate", "w_up", "w_down"],
        description="Names of nn.Linear modules that receive LoRA adapters.",
    )


class EvaluateConfig(Section):
    """Held-out evaluation of the base and fine-tuned models."""

    task_items: int = Field(300, gt=0, description="Held-out task items scored by exact match.")
    max_new_tokens: int = Field(32, gt=0, description="Generation limit per answer.")
    val_batches: int = Field(10, gt=0, description="Validation micro-batches for loss / bits per byte.")
    samples: int = Field(8, ge=0, description="Sample generations saved in the report.")
    batch_size: int = Field(8, gt=0, description="Sequences per validation micro-batch (block_size tokens each).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = leave torch's default).")
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on both models (needs lm-eval). gptpipe_heldout and "
        "gptpipe_bpb are local tasks written from the held-out items and validation text; public tasks need "
        "their datasets reachable.",
    )

    _device = field_validator("device")(_device_name)


class OnnxConfig(Section):
    """The ONNX graphs (model.onnx, model_kv.onnx, architecture.onnx): always written, always gated."""

    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the exported graphs.")
    external_data: bool = Field(
        False, description="Always write weights to side .onnx.data files (done automatically above 2 GB)."
    )


class Pt2Config(Section):
    """The torch.export program of the logits model."""

    enabled: bool = Field(True, description="Save the model as a torch.export program (model.pt2), gated on logits.")


class Int8Config(Section):
    """The int8 ONNX copy of model.onnx: measured, not gated (not the quantized onnxruntime-genai twin)."""

    enabled: bool = Field(
        False,
        description="Write model.int8.onnx (dynamic int8 of model.onnx) and measure its held-out loss change "
        "(not gated).",
    )


class HfConfig(Section):
    """The Hugging Face checkpoint hf/."""

    enabled: bool = Field(
        True,
        description="Write hf/, a Hugging Face LlamaForCausalLM checkpoint (weights, tokenizer, chat template), "
        "gated like the graphs: logits, greedy ids and tokenization checked with transformers.",
    )


class GgufConfig(Section):
    """The GGUF file for llama.cpp and ollama."""

    enabled: bool = Field(
        True,
        description="Write model.gguf (f32, llama architecture, gptpipe's tokenizer with the chat markers as "
        "user-defined tokens), gated like hf/: logits, greedy ids, tokenization and chat template checked through "
        "transformers' GGUF loader. Needs a BPE tokenizer.",
    )


class GenaiConfig(Section):
    """The onnxruntime-genai model folder genai/ (fp32)."""

    enabled: bool = Field(
        True,
        description="Write genai/, an onnxruntime-genai model folder built by its model builder (fp32, CPU) from "
        "the Hugging Face checkpoint, gated like hf/: logits after each gate prompt, greedy ids and og.Tokenizer ids "
        "checked with og.Model. Needs onnxruntime-genai installed.",
    )


class QuantizedConfig(Section):
    """genai-quantized/, the weight-only quantized twin of genai/, gated by quality rather than bits."""

    enabled: bool = Field(
        True,
        description="Build genai-quantized/ (onnxruntime-genai's MatMulNBits, block 32), gated by held-out exact "
        "match and bits per byte against fp32 PyTorch and identical tokenizer ids; a twin that fails is recorded in "
        "the certificate and not kept. Needs export.genai.enabled.",
    )
    precision: Literal["int4", "int8"] = Field("int4", description="Weight precision of the quantized twin.")
    items: int = Field(200, ge=1, description="Held-out conversations the twin's quality gate scores.")
    exact_match_drop: float = Field(
        0.04,
        ge=0,
        description="Largest held-out exact-match drop (absolute) the twin may show against fp32 PyTorch: about "
        "two standard errors of a difference of two ~96% rates on 200 items.",
    )
    bpb_rise: float = Field(
        0.05,
        ge=0,
        description="Largest rise (absolute, in bits per byte) of the reference answers' negative log-likelihood "
        "the twin may show against fp32 PyTorch.",
    )


class ServingConfig(Section):
    """Which certified runtime serves the export, and how the export times the candidates."""

    runtime: Literal["fastest", "onnx", "genai", "quantized"] = Field(
        "fastest",
        description="Which certified runtime `gptpipe generate --onnx` and the registry's MLflow model run: the one "
        "with the lowest decode ms/token measured at export (fastest), or a fixed one (onnx = model_kv.onnx with "
        "ONNX Runtime; genai; quantized = genai-quantized/ when it passed its gate).",
    )
    timing_rounds: int = Field(3, ge=1, description="Alternating rounds timing each serving runtime (median).")
    timing_tokens: int = Field(16, ge=2, description="New tokens per timing run.")


class ExportConfig(Section):
    """The trained model in every export format, each behind its gate; the shared gate settings at the top,
    one section per format below (``stages/formats/``)."""

    source: str = Field(
        "finetune", description="Which stage's checkpoint to export: a stage that makes a model (finetune or pretrain)."
    )
    tolerance: float = Field(
        1e-4,
        gt=0,
        description="Max |runtime - PyTorch| on logits and KV outputs (fp32), divided by the largest |value| when "
        "that exceeds 1: what every bit-parity gate allows.",
    )
    parity_shapes: int = Field(
        4,
        ge=1,
        description="Random (batch, length) shapes checked by the gates; (1, 1) and (2, block_size) always included.",
    )
    generation_prompts: int = Field(
        4, ge=1, description="Prompts whose greedy generation must equal PyTorch's token for token, in every gate."
    )
    generation_tokens: int = Field(24, ge=1, description="New tokens generated per parity prompt.")
    seed: int = Field(0, description="Seed of the parity shapes, ids and prompts.")
    heldout_items: int = Field(
        32, ge=1, description="Held-out chat items the tokenizer checks and the int8 loss change read."
    )
    threads: int = Field(0, ge=0, description="CPU threads for torch and every runtime (0 = their defaults).")
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    pt2: Pt2Config = Field(default_factory=Pt2Config)
    int8: Int8Config = Field(default_factory=Int8Config)
    hf: HfConfig = Field(default_factory=HfConfig)
    gguf: GgufConfig = Field(default_factory=GgufConfig)
    genai: GenaiConfig = Field(default_factory=GenaiConfig)
    quantized: QuantizedConfig = Field(default_factory=QuantizedConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)


# Export keys of the flat section (before formats got sections of their own) -> where they live now.
# A recipe still using one fails in one line naming the new key (``stages.core.config``).
MOVED_KEYS = {
    "export.opset": "export.onnx.opset",
    "export.external_data": "export.onnx.external_data",
    "export.pt2": "export.pt2.enabled",
    "export.quantize": "export.int8.enabled",
    "export.hf": "export.hf.enabled",
    "export.gguf": "export.gguf.enabled",
    "export.genai": "export.genai.enabled",
    "export.quantized": "export.quantized.precision, or export.quantized.enabled=false where it was none",
    "export.quantized_items": "export.quantized.items",
    "export.quantized_exact_match_drop": "export.quantized.exact_match_drop",
    "export.quantized_bpb_rise": "export.quantized.bpb_rise",
    "export.serve": "export.serving.runtime",
    "export.timing_rounds": "export.serving.timing_rounds",
    "export.timing_tokens": "export.serving.timing_tokens",
}


class PublishConfig(Section):
    """Netron viewer bundle of the exported graphs."""

    enabled: bool = Field(True, description="Build the Netron bundle.")
    graphs: list[str] | None = Field(
        None,
        description="Export files shown in the bundle (default: every graph the export stage declares: "
        "architecture, logits, KV step, torch.export program, int8 copy, GGUF file); those it did not write are skipped.",
    )
