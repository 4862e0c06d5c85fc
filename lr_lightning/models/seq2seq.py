"""Encoder-decoder transformer from fairseq2's building blocks, with projections the strategies can convert.

fairseq2 0.8's builders (``create_nllb_model``) make every attention and FFN projection a
``ColumnShardedLinear`` / ``RowShardedLinear``, even on one process. With a tensor-parallel gang of
size 1 each computes ``x W^T + b`` exactly as ``nn.Linear``, so :func:`plain_projections_` swaps
them for ``nn.Linear`` modules holding the *same* parameters; the low-rank strategies then convert
them like any other linear layer. The output projection is tied to the shared embedding and stays dense.
Imports fairseq2: used by the translation task only.
"""

from __future__ import annotations

from fairseq2.models.nllb import NllbConfig, create_nllb_model
from fairseq2.models.transformer import TransformerModel
from fairseq2.nn import Projection, TiedProjection
from torch import nn


def plain_projection(projection: Projection) -> nn.Linear:
    """An ``nn.Linear`` sharing ``projection``'s weight and bias (no copy)."""
    if getattr(projection, "sharded", False):
        raise ValueError(f"{type(projection).__name__} is sharded over a tensor-parallel gang of size > 1; "
                         f"lr_lightning converts unsharded projections only")
    out_features, in_features = projection.weight.shape
    linear = nn.Linear(in_features, out_features, bias=projection.bias is not None,
                       device="meta", dtype=projection.weight.dtype)
    linear.weight = projection.weight
    linear.bias = projection.bias
    return linear


def plain_projections_(model: nn.Module) -> int:
    """Replace every untied fairseq2 ``Projection`` with a 2-D weight by :func:`plain_projection`; return the count."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, Projection) and not isinstance(module, TiedProjection)
             and getattr(module, "weight", None) is not None and module.weight.dim() == 2]
    for name, module in found:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain_projection(module))
    return len(found)


def build_transformer(
    vocab_size: int,
    model_dim: int = 256,
    num_layers: int = 3,
    num_heads: int = 4,
    ffn_dim: int = 1024,
    dropout: float = 0.1,
    max_seq_len: int = 256,
    pad_idx: int = 0,
) -> TransformerModel:
    """A pre-norm transformer (fairseq2's NLLB builder) with a shared, tied embedding and plain projections."""
    config = NllbConfig(model_dim=model_dim, max_seq_len=max_seq_len, vocab_size=vocab_size, pad_idx=pad_idx,
                        num_encoder_layers=num_layers, num_decoder_layers=num_layers,
                        num_encoder_attn_heads=num_heads, num_decoder_attn_heads=num_heads,
                        ffn_inner_dim=ffn_dim, dropout_p=dropout)
    model = create_nllb_model(config)
    plain_projections_(model)
    return model
