"""The GPT's shape and what follows from it alone: parameter counts and training FLOPs per token.

Plain Python, no torch: ``gptpipe plan`` sizes a recipe's model without building it, and the model
(``stages.lm.model``) takes its config and its FLOPs formula from here, so the plan and the MFU the
training loop reports count FLOPs the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256
    mlp_ratio: float = 8 / 3
    dropout: float = 0.0
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        # Round to a multiple of 32 so matmuls stay aligned.
        return 32 * math.ceil(self.n_embd * self.mlp_ratio / 32)

    def to_dict(self) -> dict:
        return asdict(self)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each block's linear layers, by module name (what LoRA targets name)."""
        d, f = self.n_embd, self.mlp_hidden
        return {"qkv": (d, 3 * d), "proj": (d, d), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}

    def n_params(self) -> int:
        """Parameters of ``GPT(self)``, the tied embedding/head matrix once: its tensors' numel, counted."""
        d = self.n_embd
        block = 2 * d + sum(i * o for i, o in self.linear_shapes().values())  # two RMSNorm gains + linears
        return self.vocab_size * d + self.n_layer * block + d  # embedding, blocks, final norm

    def n_param_tensors(self) -> int:
        """Parameter tensors of ``GPT(self)``: embedding, per block two norms and five linears, final norm."""
        return 2 + self.n_layer * (2 + len(self.linear_shapes()))


def training_flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token (forward + backward) of a GPT with ``n_params`` parameters: 6N plus the
    attention term, 12 x layers x width x context (PaLM appendix B). Recomputation is not counted."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
