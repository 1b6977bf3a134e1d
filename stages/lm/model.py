"""A decoder-only GPT: token embeddings, RoPE, RMSNorm, SDPA attention, SwiGLU, tied head.

Only ``nn.Module``s live here (their config, ``GPTConfig``, is torch-free in ``stages.lm.shape``):
no I/O, no devices, no training.
The KV cache is functional — ``forward_with_cache`` takes the past keys/values as
tensors and returns the new ones — so the same code serves PyTorch generation and an
ONNX graph with ``past``/``present`` inputs and outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stages.lm.shape import GPTConfig, training_flops_per_token

# One layer's cache: keys and values, each (batch, heads, past_len, head_dim).
LayerCache = tuple[torch.Tensor, torch.Tensor]


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, each (length, head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerCache | None
    ) -> tuple[torch.Tensor, LayerCache]:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
            # With a past, queries sit at positions past_len..past_len+length-1: is_causal's
            # top-left alignment would be wrong, so build the mask explicitly.
            total = k.shape[2]
            query_pos = torch.arange(total - length, total, device=x.device).unsqueeze(1)
            mask = torch.arange(total, device=x.device).unsqueeze(0) <= query_pos
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            drop = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.proj(y), (k, v)


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.w_up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.norm_mlp = nn.RMSNorm(cfg.n_embd)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: LayerCache | None
    ) -> tuple[torch.Tensor, LayerCache]:
        attended, present = self.attn(self.norm_attn(x), cos, sin, past)
        x = x + self.drop(attended)
        x = x + self.drop(self.mlp(self.norm_mlp(x)))
        return x, present


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: shrink residual-path projections with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.w_down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.wte.weight.numel() if non_embedding else total

    def forward_with_cache(
        self, idx: torch.Tensor, past: list[LayerCache] | None = None
    ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Logits (batch, length, vocab) for ``idx`` following ``past``, and the extended cache."""
        past_len = 0 if past is None else past[0][0].shape[2]
        length = idx.shape[1]
        cos = self.rope_cos[past_len : past_len + length]
        sin = self.rope_sin[past_len : past_len + length]
        x = self.drop(self.wte(idx))
        presents: list[LayerCache] = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, cos, sin, None if past is None else past[i])
            presents.append(present)
        return self.lm_head(self.norm_out(x)), presents

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, length, vocab); the training path, with no cache kept."""
        return self.forward_with_cache(idx)[0]

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6N plus the attention term (PaLM appendix B)."""
        return training_flops_per_token(self.cfg, self.num_params(non_embedding=False))
