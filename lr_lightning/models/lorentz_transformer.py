"""HyboNet's fully hyperbolic Transformer (Chen et al., ACL 2022) on the Lorentz model, as a fairseq2 ``Seq2SeqModel``.

Every representation is a point ``x = (x_0, x_s)`` of the hyperboloid ``<x, x>_L = -k``. Every learned
map is a :class:`LorentzProjection` (a ``LorentzLinear``: its matrix is the ``nn.Linear`` named ``linear``,
which a low-rank strategy converts; the re-projection onto the hyperboloid stays as it is). Attention
weights are softmaxed negative squared Lorentzian distances, the context is the Lorentzian centroid of
the values, and the residual "add & norm" is a Lorentz linear map of the context plus the input point.
Token embeddings and the output's token points are ``geoopt.ManifoldParameter`` points (train them
with ``RiemannianAdamW``); the logit of token ``c`` is ``2k + 2<x, p_c>_L + b_c = -||x - p_c||_L^2 + b_c``,
minus the squared Lorentzian distance.

The model follows fairseq2 0.8's ``Seq2SeqModel`` interface, so ``BeamSearchSeq2SeqGenerator`` drives
it: with an ``IncrementalStateBag`` (evaluation only) the encoder output, every self-attention's keys and
values and every cross-attention's projected memory are cached, and each step runs the new tokens only.
Imports fairseq2: used by the translation task only.
"""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F
from fairseq2.models.seq2seq import Seq2SeqModel
from fairseq2.nn import BatchLayout, IncrementalState, IncrementalStateBag
from torch import nn
from typing_extensions import override

from lr_lightning.models.hyperbolic import LorentzLinear, lorentz_inner, lorentz_normalize, onto_hyperboloid


def lorentz_centroid(weights: torch.Tensor, points: torch.Tensor, k: float) -> torch.Tensor:
    """``sqrt(k) m / sqrt(|<m, m>_L|)`` with ``m = weights @ points``: the weighted Lorentzian centroid."""
    return lorentz_normalize(weights @ points, k)


def random_points(num: int, dim: int, manifold: geoopt.Lorentz) -> torch.Tensor:
    """``expmap0((0, u))``, ``u`` uniform on the unit sphere of ``R^(dim-1)``: points at distance 1 from the origin."""
    u = torch.randn(num, dim - 1)
    return manifold.expmap0(F.pad(u / u.norm(dim=-1, keepdim=True), (1, 0)))


class LorentzProjection(LorentzLinear):
    """``y = W dropout(x) + r``, split into ``out_heads`` groups, each put on the hyperboloid (``onto_hyperboloid``).

    HyboNet's Lorentz linear layer with its two transformer extras: an optional residual ``r`` added
    before the re-projection (the transformer's "add & norm": the result is a point again), and head
    handling: an input of ``in_heads`` points ``(..., in_heads, in/in_heads)`` is flattened first, and
    the output can be ``out_heads`` points of ``out/out_heads`` coordinates each.

    Args:
        in_features: Ambient width of the input (all heads together).
        out_features: Ambient width of the output (all heads together).
        in_heads: Points the input holds (its last two axes), 1 for one point.
        out_heads: Points to return, 1 for one point ``(..., out_features)``.
        bias: Whether ``linear`` has a bias.
        dropout: Dropout on the input coordinates.
        activate_input: ReLU on the input coordinates first (the FFN's second map).
        curvature: ``k`` of the hyperboloid.
    """

    in_heads: int = 1

    def __init__(self, in_features: int, out_features: int, in_heads: int = 1, out_heads: int = 1, bias: bool = True,
                 dropout: float = 0.0, activate_input: bool = False, curvature: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias=bias, dropout=dropout, activate_input=activate_input,
                         curvature=curvature)
        for name, heads, width in (("in_heads", in_heads, in_features), ("out_heads", out_heads, out_features)):
            if heads < 1 or width % heads or width // heads < 2:
                raise ValueError(f"{name}={heads} must divide the width {width} into points of >= 2 coordinates")
        self.in_heads, self.out_heads = in_heads, out_heads
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HyboNet's transformer init: ``W ~ U(-0.02, 0.02)``, zero on every input point's time column, ``b = 0``."""
        nn.init.uniform_(self.linear.weight, -0.02, 0.02)
        self.linear.weight[:, :: self.in_features // self.in_heads] = 0
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.in_heads > 1:
            x = x.flatten(-2)
        if self.activate_input:
            x = F.relu(x)
        y = self.linear(self.dropout(x))
        if residual is not None:
            y = y + residual
        if self.out_heads > 1:
            y = y.unflatten(-1, (self.out_heads, -1))
        return onto_hyperboloid(y, self.log_scale, self.curvature)


class KeyValueState(IncrementalState):
    """Cached keys and values ``(N, H, S, d_h)`` of one attention module during incremental decoding."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)

    @override
    def reorder(self, new_order: torch.Tensor) -> None:
        self.keys, self.values = self.keys.index_select(0, new_order), self.values.index_select(0, new_order)

    @override
    def size_bytes(self) -> int:
        return self.capacity_bytes()

    @override
    def capacity_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.itemsize


class EncoderOutputState(IncrementalState):
    """The encoder output and its key padding mask, computed once per beam search."""

    def __init__(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> None:
        self.memory, self.memory_mask = memory, memory_mask

    @override
    def reorder(self, new_order: torch.Tensor) -> None:
        self.memory, self.memory_mask = self.memory.index_select(0, new_order), self.memory_mask.index_select(
            0, new_order)

    @override
    def size_bytes(self) -> int:
        return self.capacity_bytes()

    @override
    def capacity_bytes(self) -> int:
        return self.memory.numel() * self.memory.itemsize


class LorentzMultiheadAttention(nn.Module):
    """``a_ij = softmax_j((2k + 2 <q_i, k_j>_L) / s + b)``, ``out_i = centroid_j(a_ij, v_j)`` per head.

    ``2k + 2<q, k>_L = -||q - k||_L^2``: the negative squared Lorentzian distance, with a learned
    temperature ``s`` (init ``sqrt(d)``) and offset ``b``. Queries, keys and values are
    :class:`LorentzProjection` s into ``num_heads`` points each; the output is ``num_heads`` points
    ``(N, T, H, d/H)`` that the layer's residual projection merges.

    Args:
        model_dim: Ambient width ``d`` of the input points.
        num_heads: Heads ``H``; each head's points have ``d/H >= 2`` coordinates.
        dropout: Dropout on the projections' inputs.
        curvature: ``k`` of the hyperboloid.
    """

    def __init__(self, model_dim: int, num_heads: int, dropout: float = 0.0, curvature: float = 1.0) -> None:
        super().__init__()
        self.num_heads, self.curvature = num_heads, curvature
        self.q_proj, self.k_proj, self.v_proj = (
            LorentzProjection(model_dim, model_dim, out_heads=num_heads, dropout=dropout, curvature=curvature)
            for _ in range(3))
        self.temperature = nn.Parameter(torch.tensor(math.sqrt(model_dim)))
        self.offset = nn.Parameter(torch.zeros(()))

    def project(self, x: torch.Tensor, proj: LorentzProjection) -> torch.Tensor:
        """``(N, S, d)`` points as ``(N, H, S, d/H)`` head points."""
        return proj(x).transpose(1, 2)

    def forward(self, query: torch.Tensor, memory: torch.Tensor | None, key_mask: torch.Tensor,
                causal: bool = False, state_bag: IncrementalStateBag | None = None) -> torch.Tensor:
        """``memory=None``: self-attention over ``query`` (and the cached prefix); otherwise cross-attention.

        ``key_mask`` ``(N, S)`` is true at real keys (the whole key sequence, cache included).
        """
        state = state_bag.maybe_get_state(self, KeyValueState) if state_bag is not None else None
        q = self.project(query, self.q_proj)
        if memory is None:
            keys, values = self.project(query, self.k_proj), self.project(query, self.v_proj)
            if state is not None:
                state.append(keys, values)
                keys, values = state.keys, state.values
            elif state_bag is not None:
                state_bag.set_state(self, KeyValueState(keys, values))
        elif state is not None:
            keys, values = state.keys, state.values
        else:
            keys, values = self.project(memory, self.k_proj), self.project(memory, self.v_proj)
            if state_bag is not None:
                state_bag.set_state(self, KeyValueState(keys, values))
        scores = (2 * self.curvature + 2 * lorentz_inner(q, keys)) / self.temperature + self.offset
        allowed = key_mask[:, None, None, :]
        if causal:
            offset = keys.size(2) - q.size(2)
            positions = torch.arange(keys.size(2), device=q.device)
            allowed = allowed & (positions[None, :] <= positions[offset:, None])
        weights = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
        return lorentz_centroid(weights, values, self.curvature).transpose(1, 2)


class LorentzFeedForward(nn.Module):
    """``FFN(x) = outer(inner(x), residual=x)``: a Lorentz map to ``ffn_dim``, then ReLU and a map back plus ``x``.

    Args:
        model_dim: Ambient width of the points.
        ffn_dim: Ambient width of the inner points.
        dropout: Dropout on both maps' inputs.
        curvature: ``k`` of the hyperboloid.
    """

    def __init__(self, model_dim: int, ffn_dim: int, dropout: float = 0.0, curvature: float = 1.0) -> None:
        super().__init__()
        self.inner = LorentzProjection(model_dim, ffn_dim, dropout=dropout, curvature=curvature)
        self.outer = LorentzProjection(ffn_dim, model_dim, dropout=dropout, activate_input=True, curvature=curvature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(x), residual=x)


class LorentzEncoderLayer(nn.Module):
    """``h = merge(SelfAttn(x), residual=x)``, ``out = FFN(h)`` (HyboNet's encoder layer; ``merge`` has no bias).

    Args:
        model_dim: Ambient width of the points.
        num_heads: Attention heads.
        ffn_dim: FFN inner width.
        dropout: Dropout on every projection's input.
        curvature: ``k`` of the hyperboloid.
    """

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 curvature: float = 1.0) -> None:
        super().__init__()
        self.self_attn = LorentzMultiheadAttention(model_dim, num_heads, dropout, curvature)
        self.self_attn_merge = LorentzProjection(model_dim, model_dim, in_heads=num_heads, bias=False,
                                                 dropout=dropout, curvature=curvature)
        self.ffn = LorentzFeedForward(model_dim, ffn_dim, dropout, curvature)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn_merge(self.self_attn(x, None, mask), residual=x))


class LorentzDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, FFN; each attention merged with a residual.

    Args:
        model_dim: Ambient width of the points.
        num_heads: Attention heads.
        ffn_dim: FFN inner width.
        dropout: Dropout on every projection's input.
        curvature: ``k`` of the hyperboloid.
    """

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 curvature: float = 1.0) -> None:
        super().__init__()
        merge = dict(in_heads=num_heads, bias=False, dropout=dropout, curvature=curvature)
        self.self_attn = LorentzMultiheadAttention(model_dim, num_heads, dropout, curvature)
        self.self_attn_merge = LorentzProjection(model_dim, model_dim, **merge)
        self.cross_attn = LorentzMultiheadAttention(model_dim, num_heads, dropout, curvature)
        self.cross_attn_merge = LorentzProjection(model_dim, model_dim, **merge)
        self.ffn = LorentzFeedForward(model_dim, ffn_dim, dropout, curvature)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                state_bag: IncrementalStateBag | None = None) -> torch.Tensor:
        h = self.self_attn_merge(self.self_attn(x, None, self_mask, causal=True, state_bag=state_bag), residual=x)
        h = self.cross_attn_merge(self.cross_attn(h, memory, memory_mask, state_bag=state_bag), residual=h)
        return self.ffn(h)


class LorentzPositions(nn.Module):
    """``x_t = LorentzProjection(e_t, residual=P_t)``: a token point mapped with its learned position vector added.

    Args:
        model_dim: Ambient width of the points.
        max_seq_len: Positions ``P`` (``(max_seq_len, d)``, init ``N(0, 0.02^2)``).
        dropout: Dropout on the token points' coordinates.
        curvature: ``k`` of the hyperboloid.
    """

    def __init__(self, model_dim: int, max_seq_len: int, dropout: float = 0.0, curvature: float = 1.0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_seq_len, model_dim) * 0.02)
        self.proj = LorentzProjection(model_dim, model_dim, dropout=dropout, curvature=curvature)

    def forward(self, points: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.proj(points, residual=self.table[start: start + points.size(1)])


class LorentzTransformer(Seq2SeqModel):
    """HyboNet's Transformer: shared token points, Lorentz encoder and decoder, ``logit_c = 2k + 2<x, p_c>_L + b_c``.

    Module names: ``encoder.layers.<i>.self_attn.{q,k,v}_proj.linear``, ``encoder.layers.<i>.self_attn_merge.linear``,
    ``encoder.layers.<i>.ffn.{inner,outer}.linear``, the decoder's likewise plus ``cross_attn`` and
    ``cross_attn_merge``, and ``{encoder,decoder}_positions.proj.linear``: the ``nn.Linear`` matrices a
    strategy converts. ``embed_tokens`` and ``output_points`` are ``ManifoldParameter`` points (the token
    table, shared by both sides, and the output's token points, initialised as a copy of it, as HyboNet does).

    Args:
        vocab_size: Token points.
        model_dim: Ambient width ``d`` of every point (``H^(d-1)``).
        num_layers: Encoder layers and decoder layers (each).
        num_heads: Attention heads (``d / num_heads >= 2``).
        ffn_dim: FFN inner width.
        dropout: Dropout on every projection's input.
        max_seq_len: Longest source or target sequence (learned positions).
        curvature: ``k`` of the hyperboloid ``<x, x>_L = -k``.
    """

    def __init__(self, vocab_size: int, model_dim: int = 128, num_layers: int = 3, num_heads: int = 4,
                 ffn_dim: int = 512, dropout: float = 0.0, max_seq_len: int = 256, curvature: float = 1.0) -> None:
        super().__init__(max_seq_len, max_seq_len)
        if curvature <= 0:
            raise ValueError(f"curvature must be > 0 (the k of <x, x>_L = -k), got {curvature}")
        if model_dim % num_heads or model_dim // num_heads < 2:
            raise ValueError(f"model_dim ({model_dim}) must be num_heads ({num_heads}) times a width >= 2")
        self.model_dim, self.curvature = model_dim, curvature
        self.manifold = geoopt.Lorentz(k=curvature)
        points = random_points(vocab_size, model_dim, self.manifold)
        self.embed_tokens = geoopt.ManifoldParameter(points.clone(), manifold=self.manifold)
        self.output_points = geoopt.ManifoldParameter(points.clone(), manifold=self.manifold)
        self.output_bias = nn.Parameter(torch.zeros(vocab_size))
        self.encoder_positions = LorentzPositions(model_dim, max_seq_len, dropout, curvature)
        self.decoder_positions = LorentzPositions(model_dim, max_seq_len, dropout, curvature)
        layer_args = (model_dim, num_heads, ffn_dim, dropout, curvature)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(LorentzEncoderLayer(*layer_args) for _ in range(num_layers))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(LorentzDecoderLayer(*layer_args) for _ in range(num_layers))

    def encode(self, source: torch.Tensor, source_layout: BatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's points ``(N, S, d)`` and the source mask ``(N, S)`` (true at real tokens)."""
        mask = source_layout.position_indices >= 0
        x = self.encoder_positions(self.embed_tokens[source])
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x, mask

    def decode(self, target: torch.Tensor, target_layout: BatchLayout, memory: torch.Tensor,
               memory_mask: torch.Tensor, state_bag: IncrementalStateBag | None = None) -> torch.Tensor:
        """The decoder's points ``(N, T, d)``; with ``state_bag``, ``target`` continues the cached prefix."""
        start = state_bag.step_nr if state_bag is not None else 0
        mask = target_layout.position_indices >= 0
        if start:
            mask = torch.cat([mask.new_ones(mask.size(0), start), mask], dim=1)
        x = self.decoder_positions(self.embed_tokens[target], start)
        for layer in self.decoder.layers:
            x = layer(x, mask, memory, memory_mask, state_bag)
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``logit_c(x) = 2k + 2 <x, p_c>_L + b_c = -||x - p_c||_L^2 + b_c``."""
        return 2 * self.curvature + 2 * lorentz_inner(x, self.output_points) + self.output_bias

    @override
    def forward(self, source_seqs: torch.Tensor, source_seqs_layout: BatchLayout, target_seqs: torch.Tensor,
                target_seqs_layout: BatchLayout, targets: torch.Tensor | None = None, *,
                state_bag: IncrementalStateBag | None = None, **loss_args: object) -> torch.Tensor:
        """Next-token logits ``(N, T, V)``; incremental (cached) when a ``state_bag`` is given in eval mode."""
        if targets is not None or loss_args:
            raise ValueError("LorentzTransformer returns logits only; compute the loss from them")
        if self.training:
            state_bag = None
        state = state_bag.maybe_get_state(self, EncoderOutputState) if state_bag is not None else None
        if state is None:
            state = EncoderOutputState(*self.encode(source_seqs, source_seqs_layout))
            if state_bag is not None:
                state_bag.set_state(self, state)
        return self.project(self.decode(target_seqs, target_seqs_layout, state.memory, state.memory_mask, state_bag))
