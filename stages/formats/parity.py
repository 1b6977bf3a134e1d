"""The comparisons behind the export's parity gates, in one place so every gate checks alike.

The export stage checks what it writes against the live PyTorch model: the ONNX graphs and the
torch.export program (``stages.formats.onnx.gate``) and the Hugging Face checkpoint
(``stages.formats.llama.hf_gate``). Each gate runs its candidate through the same checks:

* logits — ``logits_parity``: the largest |candidate - PyTorch| on random ids of the gate's shapes
  (``gate_inputs``), scaled by the reference's largest magnitude when that exceeds 1;
* greedy generation — ``generation_parity``: the candidate's new token ids equal PyTorch's, token
  for token, on the gate's prompts (``parity_prompts``);
* ids — ``agreement``: a candidate tokenizer or chat template gives the reference's ids per item.

Each returns a typed result and raises nothing: what fails, and the ``ParityError`` naming the
file and the setting to change, is the gate's to say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.lm.chat import ChatTemplate, Message
from stages.lm.tokenizer import Tokenizer


def gate_inputs(count: int, block_size: int, vocab_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random int64 ids at (1, 1) and (2, block_size) — the edges — and ``count`` random (batch, length) shapes."""
    shapes = [(1, 1), (2, block_size)]
    shapes += [(int(rng.integers(1, 5)), int(rng.integers(2, block_size + 1))) for _ in range(count)]
    return [rng.integers(0, vocab_size, size=shape, dtype=np.int64) for shape in shapes]


def parity_prompts(
    tokenizer: Tokenizer, conversations: list[list[Message]], count: int, block_size: int, new_tokens: int, seed: int
) -> list[list[int]]:
    """Held-out chat prompts, plus one random prompt that runs past block_size (the crop path)."""
    template = ChatTemplate(tokenizer)
    chats = conversations[: max(count - 1, 1)]
    # Everything before the last assistant turn, ending with <|assistant|>: what a user would send.
    prompts = [
        template.render_prompt(messages[:-1] if len(messages) > 1 else messages)[-block_size:] for messages in chats
    ]
    if count > 1:
        rng = np.random.default_rng(seed)
        length = max(1, block_size - new_tokens // 2)
        prompts.append([int(t) for t in rng.integers(0, tokenizer.vocab_size, size=length)])
    return prompts


# ---------------------------------------------------------------------------- logits


def _numpy(value: Any) -> np.ndarray:
    # PyTorch and transformers give tensors, ONNX Runtime numpy arrays: compare both as numpy.
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def scaled_max_diff(ours: Sequence[Any], ref: Sequence[Any]) -> float:
    """Largest |candidate - reference| over paired tensors, each scaled by the reference's largest
    magnitude when that exceeds 1; NaN anywhere gives NaN, which no tolerance accepts.

    fp32 rounding grows with the values: a fine-tuned model's logits reach tens, where two
    correct kernels differ by ~1e-4. Scaling keeps the gate at 1e-4 for unit-sized values and
    relative beyond, so it still catches a changed weight (errors of 1e-2 and up) without
    failing a faithful export on rounding.
    """
    diffs = []
    for a, b in zip(ours, ref, strict=True):
        a, b = _numpy(a), _numpy(b)
        diffs.append(float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b)))))
    return float(np.max(diffs))  # np.max, unlike max(), keeps a NaN wherever it is


@dataclass(frozen=True)
class LogitsParity:
    """``scaled_max_diff`` of one candidate against the reference, per input shape ("2x64")."""

    by_shape: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.by_shape.values(), default=0.0)

    def above(self, tolerance: float) -> dict[str, float]:
        """The shapes whose difference exceeds ``tolerance`` (NaN included)."""
        return {shape: diff for shape, diff in self.by_shape.items() if not diff <= tolerance}


def logits_parity(
    candidate: Callable[[np.ndarray], Sequence[Any]],
    reference: Callable[[np.ndarray], Sequence[Any]],
    inputs: list[np.ndarray],
) -> LogitsParity:
    """Run both on each id matrix of ``inputs``; each returns the tensors to compare, in the same order."""
    return LogitsParity(
        {f"{ids.shape[0]}x{ids.shape[1]}": scaled_max_diff(candidate(ids), reference(ids)) for ids in inputs}
    )


# ---------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Divergence:
    """Where one prompt's generations part: the first differing new token, ``None`` where one ended."""

    prompt: int  # index in the prompt list
    prompt_length: int
    at: int
    got: int | None
    want: int | None


@dataclass(frozen=True)
class GenerationParity:
    prompts: int
    divergences: tuple[Divergence, ...]

    @property
    def matches(self) -> int:
        return self.prompts - len(self.divergences)


def generation_parity(
    candidate: Callable[[list[int]], list[int]],
    reference: Callable[[list[int]], list[int]],
    prompts: list[list[int]],
) -> GenerationParity:
    """Compare the new ids each gives after every prompt: greedy decoding must agree token for token."""
    divergences = []
    for number, prompt in enumerate(prompts):
        ours, ref = candidate(prompt), reference(prompt)
        if ours != ref:
            at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            got = ours[at] if at < len(ours) else None
            want = ref[at] if at < len(ref) else None
            divergences.append(Divergence(number, len(prompt), at, got, want))
    return GenerationParity(len(prompts), tuple(divergences))


# ---------------------------------------------------------------------------- ids


@dataclass(frozen=True)
class Agreement:
    """Of ``total`` items, the indices where candidate and reference give different results."""

    total: int
    differ: tuple[int, ...]

    @property
    def matches(self) -> int:
        return self.total - len(self.differ)


def agreement(candidate: Callable[[Any], Any], reference: Callable[[Any], Any], items: Sequence[Any]) -> Agreement:
    return Agreement(len(items), tuple(i for i, item in enumerate(items) if candidate(item) != reference(item)))
