"""THE checkpoint format, shared by pretraining, fine-tuning, evaluation and export.

A checkpoint is a directory::

    model.safetensors   weights (the tied embedding / head matrix is stored once)
    model.json          GPTConfig as a dict: enough to rebuild the module with no recipe
    optimizer.pt        resumable only: torch.save of optimizer.state_dict() (tensors, no code)
    trainer.json        resumable only: step, RNG states, data cursor, schedule, curve so far

``load_model`` needs only the first two files, so a resumable checkpoint is also a model.
Under FSDP2 the full weights and optimizer state are gathered to rank 0 (``gather_full_state``)
and written in the same format — the optimizer's state keyed by parameter name rather than
index, as recorded in trainer.json — so a checkpoint from 1 process, DDP or FSDP resumes in any
of them, and loading scatters it back into each rank's shard.
Every write is atomic: the directory is built under a hidden temporary sibling and renamed
into place, so a crash leaves either the old checkpoint or the new one, never half of one.
Resumable checkpoints of one run live under a root as ``step_00000100/`` directories.
When a run writes one, which it keeps and how it resumes is ``checkpoint_policy.py``'s part.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core.errors import ArtifactError

# torch, safetensors and the GPT are imported where a function needs them: the stages read this
# module's file names when they are declared, and validating a recipe must not load torch.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from stages.lm.model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
MODEL_DIR = "model"  # where a pretrain or finetune artifact keeps its model
HELDOUT = "heldout.jsonl"  # a finetune artifact's held-out conversations (evaluate and export score them)
CURVE = "curve.json"  # and its training curve: every logged point (loss, lr, grad norm, tokens/s, val loss)
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def model_directory(artifact: str | Path) -> Path:
    """The model in a pretrain/finetune artifact (its ``model/``), or ``artifact`` itself when it is a
    bare model directory (as ``gptpipe generate --model DIR`` accepts)."""
    artifact = Path(artifact)
    for candidate in (artifact / MODEL_DIR, artifact):
        if (candidate / CONFIG).is_file():
            return candidate
    raise ArtifactError(
        f"{artifact}: no {CONFIG} in it or in {MODEL_DIR}/; pass the output of stage 'pretrain' or 'finetune'"
    )


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomically(directory: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a fresh sibling directory, then swap it in for ``directory``."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; checkpoints are ordinary readable outputs
        build(tmp)
        if directory.exists():
            # A directory cannot be os.replace()d over a non-empty one: move the old one aside
            # first, so a reader sees either the old or the new checkpoint at this name.
            old = parent / f".old-{directory.name}-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _DISK_FULL:  # the user must act; the checkpoint already at `directory` is untouched
            raise ArtifactError(
                f"{directory}: cannot write checkpoint: {os.strerror(exc.errno)}; free space on {parent}, then rerun "
                "to resume from the last complete checkpoint"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def find_gpt(model: nn.Module) -> GPT | None:
    """The GPT inside ``model`` (itself, or wrapped e.g. by peft), for its config."""
    from stages.lm.model import GPT

    for module in model.modules():
        if isinstance(module, GPT):
            return module
    return None


def _write_model_files(tmp: Path, model: nn.Module) -> None:
    import safetensors.torch

    # save_model (not save_file) drops the duplicate name of the tied embedding/head tensor;
    # safetensors refuses shared storage otherwise.
    safetensors.torch.save_model(model, str(tmp / WEIGHTS))
    gpt = find_gpt(model)
    if gpt is not None:
        (tmp / CONFIG).write_text(json.dumps(gpt.cfg.to_dict(), indent=2, sort_keys=True), encoding="utf-8")


def save_model(directory: str | Path, model: nn.Module) -> Path:
    """Write weights + config (what ``load_model`` reads). Replaces an existing directory atomically."""
    return _write_atomically(Path(directory), lambda tmp: _write_model_files(tmp, model))


def read_config(directory: str | Path) -> GPTConfig:
    """The GPTConfig stored beside the weights; a clear ArtifactError when absent or foreign."""
    from stages.lm.model import GPTConfig

    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing; {directory} is not a gptpipe model directory (expected {CONFIG} + {WEIGHTS})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return GPTConfig(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{path}: not a GPTConfig ({exc}); rerun the stage that wrote this model") from None


def load_weights(directory: str | Path, model: nn.Module, device: str | torch.device = "cpu") -> None:
    """Load ``model.safetensors`` into an existing module (strict: every name must match)."""
    import safetensors.torch

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the checkpoint is incomplete — rerun the stage that wrote it")
    try:
        safetensors.torch.load_model(model, str(path), strict=True, device=str(device))
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise ArtifactError(
            f"{path}: weights do not fit this model ({' '.join(s.strip() for s in first[:3])}); "
            "was it written for another model shape?"
        ) from None


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT from ``model.json`` and load its weights, in eval mode, on ``device``."""
    from stages.lm.model import GPT

    model = GPT(read_config(directory))
    load_weights(directory, model)
    return model.to(device).eval()


# --- RNG states as JSON (no pickle in trainer.json) -------------------------------------------


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """Every RNG training may touch (dropout uses torch's), JSON-serializable."""
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(_unb64(state["torch"]))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [_unb64(s) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --- resumable checkpoints --------------------------------------------------------------------


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a resumable checkpoint: model files, optimizer state and ``state`` as trainer.json.

    ``optimizer_state`` replaces ``optimizer.state_dict()`` when the caller gathered it itself
    (FSDP: see ``gather_full_state``); its key style is recorded so any run can load it back.
    """
    saved_optimizer = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    state = {**state, "optimizer_keys": "fqn" if _keyed_by_name(saved_optimizer) else "index"}
    try:
        trainer_text = json.dumps(state, indent=1, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trainer state must be JSON-serializable: {exc}") from None

    def build(tmp: Path) -> None:
        import torch

        _write_model_files(tmp, model)
        torch.save(saved_optimizer, tmp / OPTIMIZER)
        (tmp / TRAINER).write_text(trainer_text, encoding="utf-8")  # written last: marks completeness

    return _write_atomically(Path(directory), build)


def load_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load weights (and optimizer state when given) in place; return the trainer state.

    ``model`` may be a plain module, a DDP-unwrapped one, or an FSDP2-sharded one (then every
    rank calls this and keeps its own shard of the full weights read from disk).
    """
    import torch

    directory = Path(directory)
    trainer = directory / TRAINER
    if not trainer.is_file():
        raise ArtifactError(f"{trainer}: missing; {directory} is not a resumable checkpoint (delete it to start over)")
    sharded = is_fsdp(model)
    device = next(model.parameters()).device
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, _full_model_state(directory, model), options=StateDictOptions(full_state_dict=True))
    else:
        load_weights(directory, model, device)
    if optimizer is not None:
        path = directory / OPTIMIZER
        if not path.is_file():
            raise ArtifactError(
                f"{path}: missing; the checkpoint is incomplete — delete {directory} to resume from an older one"
            )
        # weights_only: the file holds tensors and plain containers only, never code to run.
        try:
            saved = torch.load(path, map_location="cpu" if sharded else device, weights_only=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or ["unreadable"])[0]
            raise ArtifactError(
                f"{path}: refusing to load: not a plain tensor file ({first[:160]}); "
                f"delete {directory} and rerun to resume from an older checkpoint"
            ) from None
        names = _names_in_optimizer_order(model, optimizer)
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            saved = saved if _keyed_by_name(saved) else _index_to_names(saved, names)
            set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(_names_to_index(saved, names) if _keyed_by_name(saved) else saved)
    return json.loads(trainer.read_text(encoding="utf-8"))


# --- FSDP2: gather full state on rank 0, scatter it back on load -------------------------------


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP2-sharded (its parameters are DTensors). Here rather than in
    ``distributed`` so that reading a checkpoint (evaluate, export) needs no training modules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


def _keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    return any(isinstance(k, str) for k in optimizer_state.get("state", {})) or any(
        isinstance(p, str) for g in optimizer_state.get("param_groups", []) for p in g.get("params", [])
    )


def _names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``optimizer.state_dict()`` numbers them."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _index_to_names(saved: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {
        "state": {names[int(i)]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
    }


def _names_to_index(saved: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {name: i for i, name in enumerate(names)}
    try:
        return {
            "state": {index[n]: s for n, s in saved["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]],
        }
    except KeyError as exc:
        raise ArtifactError(
            f"optimizer state names parameter {exc} that this model does not train; "
            "was the checkpoint written for another model or fine-tuning method?"
        ) from None


def _full_model_state(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as a full CPU state dict under every name (tied ones included)."""
    import torch

    from stages.lm.model import GPT

    gpt = find_gpt(model)
    if gpt is None:
        raise ArtifactError("FSDP checkpoints are supported for gptpipe GPT models only")
    with torch.device("meta"):
        shadow = GPT(gpt.cfg)
    shadow.to_empty(device="cpu")
    shadow.lm_head.weight = shadow.wte.weight  # to_empty gives each name its own tensor: tie again
    load_weights(directory, shadow)
    return shadow.state_dict()


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """(a plain CPU module with the full weights, the full optimizer state) for saving.

    Collective under FSDP2: every rank must call it; rank 0 gets the result, the others None.
    Without FSDP it is free: the module itself and ``optimizer.state_dict()``.
    """
    if not is_fsdp(model):
        return model, optimizer.state_dict()
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from stages.lm.model import GPT

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    gpt = find_gpt(model)
    with torch.device("meta"):
        shadow = GPT(gpt.cfg)  # meta: no memory, and no draw from the RNG that resume restores
    shadow.load_state_dict(weights, assign=True)
    shadow.lm_head.weight = shadow.wte.weight
    return shadow, optim_state


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete resumable checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint with the highest step under ``root``, or None to start from scratch."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (and leftovers of crashed writes)."""
    root = Path(root)
    removed = [path for _, path in list_checkpoints(root)[: -keep_last or None]] if keep_last > 0 else []
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
