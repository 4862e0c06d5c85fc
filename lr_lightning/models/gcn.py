"""Euclidean graph convolutional network (Kipf & Welling, ICLR 2017), the baseline of the hyperbolic GNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def propagate(x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
    """``(A x)_i = sum_j a_ij x_j`` over the edges ``j -> i`` of ``edge_index`` (row 0 source, row 1 target)."""
    source, target = edge_index
    messages = x.index_select(0, source) * edge_weight.to(x.dtype).unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, target, messages)


class GraphConvolution(nn.Module):
    """``H' = A_hat dropout(H) W^T + b``: one GCN layer; ``linear`` holds ``W`` (what a strategy converts).

    Args:
        in_features: Input width.
        out_features: Output width.
        dropout: Dropout on the input features.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return propagate(self.linear(self.dropout(x)), edge_index, edge_weight)


class GCN(nn.Module):
    """``logits = A_hat relu(... relu(A_hat X W_1) ...) W_out``: hidden ``GraphConvolution`` layers, then a
    propagation and a dense ``classifier`` (``A (H W) = (A H) W``, so this is a GCN layer whose matrix
    is named like an output head and stays dense under ``target_modules=None``).

    Args:
        in_features: Node feature width.
        hidden_dim: Width of the hidden layers.
        num_classes: Output classes.
        num_layers: Graph convolutions in all, the output one included (>= 1).
        dropout: Dropout on the input of every layer.
    """

    def __init__(self, in_features: int, hidden_dim: int, num_classes: int, num_layers: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        widths = [in_features] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(GraphConvolution(a, b, dropout) for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x, edge_index, edge_weight))
        return self.classifier(propagate(self.dropout(x), edge_index, edge_weight))
