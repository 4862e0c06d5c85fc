"""A GPT-style decoder-only transformer (nanoGPT layout) in plain PyTorch.

Every dense projection is an ``nn.Linear`` called as a submodule (``self.qkv(x)``, ``self.fc(x)``,
...), so a strategy can swap any of them for a factorized layer with the same call signature.
Qualified names: ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc``,
``blocks.{i}.mlp.proj`` and ``lm_head``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["gelu", "relu"]

GPT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=8, n_embd=256, block_size=256),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, activation="gelu"),
    "opt-125m": dict(n_layer=12, n_head=12, n_embd=768, block_size=2048, activation="relu"),
}


@dataclass
class GPTConfig:
    """Hyperparameters of :class:`GPT`; the MLP hidden width is ``ffn_mult * n_embd``."""

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    ffn_mult: int = 4
    dropout: float = 0.0
    bias: bool = True
    activation: Activation = "gelu"
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in get_args(Activation):
            raise ValueError(f"activation must be one of {get_args(Activation)}, got {self.activation!r}")

    @classmethod
    def from_size(cls, name: str, **overrides: Any) -> GPTConfig:
        """The preset ``GPT_SIZES[name]`` with ``overrides`` applied on top."""
        if name not in GPT_SIZES:
            raise ValueError(f"unknown GPT size {name!r}; allowed: {', '.join(GPT_SIZES)}")
        return cls(**{**GPT_SIZES[name], **overrides})


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask: ``softmax(q k^T / sqrt(d) + mask) v``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: ``proj(act(fc(x)))`` with hidden width ``ffn_mult * n_embd``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.ffn_mult * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, ``n_layer`` blocks, final LayerNorm, linear LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Normal(0, 0.02) for Linear and Embedding weights, zeros for Linear biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` for token ids ``idx`` of shape ``[B, T]``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [batch, time], got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Number of parameters; ``exclude_embeddings`` drops the lookup tables ``wpe`` and ``wte``
        (``wte`` stays counted when tied, since it then serves as the LM head)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                total -= self.wte.weight.numel()
        return total
