"""The export's gate for its ONNX graphs and torch.export program: they must compute the model.

* ``check_graphs``: ``onnx.checker`` accepts every graph;
* ``check_parity``: ``model.onnx`` logits, and ``model_kv.onnx`` logits and presents (a prefill
  from an empty past, then a continuation on top of it), match PyTorch within ``export.tolerance``
  at every gate shape; greedy ORT+KV generation gives exactly PyTorch's token ids for every prompt;
* ``check_pt2``: ``model.pt2``'s logits match at one more shape;
* ``architecture_parity``: ``architecture.onnx`` has one Block per layer, its logits match at the
  gate shapes and its cache-free greedy generations match token for token.

Each raises ``ParityError`` naming every failure on one line, so the executor publishes nothing.
The comparisons are ``stages.formats.parity``'s, the ones the Hugging Face gate runs too.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch

from stages.core.errors import ParityError
from stages.formats import layout, parity
from stages.formats.gate_inputs import GateInputs
from stages.formats.layout import PT2_FILE
from stages.formats.onnx import architecture as onnx_architecture
from stages.formats.onnx import runtime as ortgen
from stages.lm.chat import ChatTemplate
from stages.lm.generate import generate_ids
from stages.lm.model import GPT
from stages.lm.tokenizer import Tokenizer


def check_graphs(out: Path, names: list[str]) -> None:
    """``onnx.checker`` on each graph, by path so external weights (and > 2 GB models) work."""
    for name in names:
        try:
            onnx.checker.check_model(str(out / name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ParityError(
                f"export parity gate: onnx.checker rejects {name}: {first} — nothing was published"
            ) from None


def _halves(ids: np.ndarray) -> list[np.ndarray]:
    # The KV graph is checked as a prefill of the first half, then the rest on top of that past.
    split = ids.shape[1] // 2
    return [part for part in (ids[:, :split], ids[:, split:]) if part.shape[1]]


def _ort_with_cache(kv: ortgen.OnnxGenerator, ids: np.ndarray) -> list[np.ndarray]:
    outputs, past = [], kv.empty_past(ids.shape[0])
    for part in _halves(ids):
        logits, past = kv.step(part, past)
        outputs += [logits, *past]
    return outputs


def _torch_with_cache(model: GPT, ids: np.ndarray) -> list[torch.Tensor]:
    outputs, past = [], None
    for part in _halves(ids):
        logits, past = model.forward_with_cache(torch.from_numpy(part), past)
        outputs += [logits, *(t for layer in past for t in layer)]
    return outputs


def _torch_logits(model: GPT, ids: np.ndarray) -> list[torch.Tensor]:
    return [model(torch.from_numpy(ids))]


def _session_logits(session, ids: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {"input_ids": ids})


@torch.no_grad()
def check_parity(model: GPT, tokenizer: Tokenizer, kv: ortgen.OnnxGenerator, inputs: GateInputs) -> dict:
    """Run the gate on model.onnx and model_kv.onnx (``kv``, opened once by the export and kept for serving);
    raise ParityError naming every failure, else return its numbers."""
    out = kv.export_dir
    session = ortgen.open_session(out / layout.LOGITS_GRAPH, inputs.threads)
    plain = parity.logits_parity(partial(_session_logits, session), partial(_torch_logits, model), inputs.ids)
    cached = parity.logits_parity(partial(_ort_with_cache, kv), partial(_torch_with_cache, model), inputs.ids)
    failures = [
        f"{graph} {shape}: {diff:.2e}"
        for graph, result in ((layout.LOGITS_GRAPH, plain), (layout.KV_GRAPH, cached))
        for shape, diff in result.above(inputs.tolerance).items()
    ]
    if failures:
        raise ParityError(
            f"export parity gate: ORT/PyTorch max |dlogits| (relative to max |logit| when above 1) above "
            f"export.tolerance={inputs.tolerance:g} for "
            f"{'; '.join(failures)}; the exported graph computes something else — nothing was published"
        )
    stop_ids = ChatTemplate(tokenizer).stop_ids
    generation = parity.generation_parity(
        lambda prompt: kv.generate_ids(prompt, inputs.new_tokens, stop_ids=stop_ids),
        lambda prompt: generate_ids(model, prompt, inputs.new_tokens, stop_ids=stop_ids),
        inputs.prompts,
    )
    if generation.divergences:
        problems = [
            f"prompt {d.prompt} ({d.prompt_length} ids) diverges at new token {d.at}: "
            f"ORT {'end' if d.got is None else d.got}, PyTorch {'end' if d.want is None else d.want}"
            for d in generation.divergences
        ]
        raise ParityError(
            f"export parity gate: greedy ORT+KV generation ({layout.KV_GRAPH}) differs from PyTorch for "
            f"{len(problems)}/{len(inputs.prompts)} prompts ({'; '.join(problems)}) — nothing was published"
        )
    return {
        "max_abs_diff": max(plain.worst, cached.worst),
        "max_abs_diff_by_shape": {
            shape: {"logits": diff, "kv": cached.by_shape[shape]} for shape, diff in plain.by_shape.items()
        },
        "tolerance": inputs.tolerance,
        "generation_prompts": generation.prompts,
        "generation_matches": generation.matches,
    }


@torch.no_grad()
def check_pt2(model: GPT, out: Path, inputs: GateInputs) -> dict:
    """model.pt2's logits match PyTorch's on one more shape (``inputs.odd_ids``)."""
    program = torch.export.load(str(out / PT2_FILE)).module()
    pt2 = parity.logits_parity(
        lambda ids: [program(torch.from_numpy(ids))], partial(_torch_logits, model), inputs.odd_ids
    )
    failures = [f"{PT2_FILE}: {diff:.2e}" for diff in pt2.above(inputs.tolerance).values()]
    if failures:
        raise ParityError(
            f"export parity gate: torch.export/PyTorch max |dlogits| (relative to max |logit| when above 1) above "
            f"export.tolerance={inputs.tolerance:g} for {'; '.join(failures)}; the saved program computes "
            f"something else — nothing was published"
        )
    return {"pt2_max_abs_diff": pt2.worst}


@torch.no_grad()
def architecture_parity(model: GPT, tokenizer: Tokenizer, out: Path, inputs: GateInputs) -> dict:
    """The gate for architecture.onnx: its Block count is n_layer, its logits match PyTorch at the
    gate's shapes, and its greedy generations (no cache) equal PyTorch's token for token."""
    name = layout.ARCHITECTURE_GRAPH
    blocks = onnx_architecture.block_count(onnx.load(str(out / name), load_external_data=False))
    if blocks != model.cfg.n_layer:
        raise ParityError(
            f"export parity gate: {name} has {blocks} Block nodes for n_layer={model.cfg.n_layer} — nothing was published"
        )
    block = model.cfg.block_size
    session = ortgen.open_session(out / name, inputs.threads)
    logits = parity.logits_parity(partial(_session_logits, session), partial(_torch_logits, model), inputs.ids)
    failures = [f"{shape}: {diff:.2e}" for shape, diff in logits.above(inputs.tolerance).items()]
    if failures:
        raise ParityError(
            f"export parity gate: {name} logits differ from PyTorch above export.tolerance={inputs.tolerance:g} "
            f"for {'; '.join(failures)} — nothing was published"
        )
    stop_ids = ChatTemplate(tokenizer).stop_ids
    generation = parity.generation_parity(
        lambda prompt: onnx_architecture.greedy_ids(session, prompt, inputs.new_tokens, block, stop_ids),
        lambda prompt: generate_ids(model, prompt, inputs.new_tokens, stop_ids=stop_ids),
        inputs.prompts,
    )
    if generation.divergences:
        raise ParityError(
            f"export parity gate: greedy generation with {name} differs from PyTorch for prompts "
            f"{[d.prompt for d in generation.divergences]} of {len(inputs.prompts)} — nothing was published"
        )
    return {
        "blocks": blocks,
        "max_abs_diff": logits.worst,
        "generation_prompts": generation.prompts,
        "generation_matches": generation.matches,
    }
