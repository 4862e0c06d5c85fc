"""A fully hyperbolic graph network on the Lorentz model (HyboNet, Chen et al., ACL 2022), built on geoopt.

Points are ambient vectors ``x = (x_0, x_s)`` of the hyperboloid ``<x, x>_L = -x_0^2 + |x_s|^2 = -k``
(geoopt's ``Lorentz(k)``, curvature ``-1/k``). Every learned map is an ``nn.Linear`` named
``linear`` inside a :class:`LorentzLinear`, so a low-rank strategy factorizes that matrix and the
re-projection onto the hyperboloid stays as it is. Class prototypes are points, held as a
``geoopt.ManifoldParameter`` that a Riemannian optimizer keeps on the manifold.
"""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.models.gcn import propagate


def lorentz_inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``<x, y>_L = -x_0 y_0 + x_s . y_s`` for every pair of rows: an ``(n, m)`` matrix."""
    return x[..., 1:] @ y[..., 1:].transpose(-1, -2) - x[..., :1] @ y[..., :1].transpose(-1, -2)


def lorentz_residual(x: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """``<x, x>_L + k`` per row: zero on the hyperboloid of curvature ``-1/k``."""
    return (x[..., 1:] ** 2).sum(-1) - x[..., 0] ** 2 + k


def onto_hyperboloid(y: torch.Tensor, log_scale: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """``t = sqrt(k) (sigmoid(y_0) e^s + 1.1)``, ``x = (t, y_s sqrt((t^2 - k) / |y_s|^2))``: ``<x, x>_L = -k``."""
    space = y[..., 1:]
    time = math.sqrt(k) * (torch.sigmoid(y[..., :1]) * log_scale.exp() + 1.1)
    squared = (space * space).sum(-1, keepdim=True).clamp_min(1e-8)
    return torch.cat([time, space * ((time * time - k) / squared).sqrt()], dim=-1)


def lorentz_normalize(m: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """``sqrt(k) m / sqrt(|<m, m>_L|)``: a time-like vector (a weighted sum of points) scaled onto the hyperboloid."""
    return math.sqrt(k) * m / (-lorentz_residual(m, 0.0)).abs().clamp_min(1e-8).sqrt().unsqueeze(-1)


class LorentzLinear(nn.Module):
    """``y = W dropout(x) + b``, ``t = sqrt(k) (sigmoid(y_0) e^s + 1.1)``, ``x' = (t, y_s sqrt((t^2 - k) / |y_s|^2))``.

    HyboNet's Lorentz linear layer: the map acts on all ``d + 1`` ambient coordinates, the time
    coordinate is squashed into ``(1.1 sqrt(k), (1.1 + e^s) sqrt(k))`` with a learned log-scale
    ``s``, and the space part is rescaled so ``-t^2 + |x'_s|^2 = -k``: the output lies on the
    hyperboloid by construction, whatever ``W`` is (dense or factorized).

    Args:
        in_features: Ambient width of the input points (manifold dimension + 1).
        out_features: Ambient width of the output points.
        bias: Whether ``linear`` has a bias.
        dropout: Dropout on the input coordinates.
        scale: Initial ``e^s`` (HyboNet: 10), the range of the time coordinate.
        learn_scale: Train ``s`` (HyboNet's ``fixscale=False``).
        activate_input: Apply ReLU to the input coordinates first (HyboNet's ``nonlin``, every layer but the first).
        curvature: ``k`` of the hyperboloid ``<x, x>_L = -k``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dropout: float = 0.0,
                 scale: float = 10.0, learn_scale: bool = True, activate_input: bool = False,
                 curvature: float = 1.0) -> None:
        super().__init__()
        if in_features < 2 or out_features < 2:
            raise ValueError(f"in_features and out_features are ambient widths (dimension + 1) and must be >= 2, "
                             f"got {in_features} and {out_features}")
        self.in_features, self.out_features, self.curvature = in_features, out_features, curvature
        self.activate_input = activate_input
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HyboNet's init: ``W ~ U(-1/sqrt(m), 1/sqrt(m))`` with the input time column zeroed, ``b = 0``."""
        bound = 1.0 / math.sqrt(self.out_features)
        nn.init.uniform_(self.linear.weight, -bound, bound)
        self.linear.weight[:, 0] = 0
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate_input:
            x = F.relu(x)
        return onto_hyperboloid(self.linear(self.dropout(x)), self.log_scale, self.curvature)


class LorentzAggregation(nn.Module):
    """``x'_i = sqrt(k) m_i / sqrt(|<m_i, m_i>_L|)``, ``m_i = sum_j a_ij x_j``: the neighbours' Lorentzian centroid.

    Args:
        curvature: ``k`` of the hyperboloid.
    """

    def __init__(self, curvature: float = 1.0) -> None:
        super().__init__()
        self.curvature = curvature

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return lorentz_normalize(propagate(x, edge_index, edge_weight), self.curvature)


class LorentzGraphConvolution(nn.Module):
    """``X' = LorentzAggregation(LorentzLinear(X))``: HyboNet's graph convolution; the matrix is ``transform.linear``.

    Args:
        in_features: Ambient width of the input points.
        out_features: Ambient width of the output points.
        dropout: Dropout on the input coordinates.
        activate_input: ReLU on the input coordinates (every layer but the first).
        curvature: ``k`` of the hyperboloid.
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, activate_input: bool = False,
                 curvature: float = 1.0) -> None:
        super().__init__()
        self.transform = LorentzLinear(in_features, out_features, dropout=dropout, activate_input=activate_input,
                                       curvature=curvature)
        self.aggregate = LorentzAggregation(curvature)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.transform(x), edge_index, edge_weight)


class LorentzDecoder(nn.Module):
    """``logit_c(x) = 2k + 2 <x, p_c>_L + b_c = -d_L^2(x, p_c) + b_c``: squared Lorentzian distance to class prototypes.

    The prototypes ``p_c`` are a ``geoopt.ManifoldParameter`` on ``manifold``, drawn as HyboNet does
    (a normal tangent vector at the origin, std ``1/sqrt(d)``, mapped by ``expmap0``).

    Args:
        in_features: Ambient width of the points.
        num_classes: Classes (prototypes).
        manifold: The ``geoopt.Lorentz`` the prototypes live on (not registered here; the model owns it).
    """

    def __init__(self, in_features: int, num_classes: int, manifold: geoopt.Lorentz) -> None:
        super().__init__()
        points = manifold.random_normal(num_classes, in_features, std=1.0 / math.sqrt(in_features))
        self.prototypes = geoopt.ManifoldParameter(points.data, manifold=manifold)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.prototypes.manifold.k.to(x.dtype)
        return 2 * k + 2 * lorentz_inner(x, self.prototypes) + self.bias


def lorentz_squared_distance(x: torch.Tensor, y: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """``d_L^2(x_i, y_i) = |x_i - y_i|_L^2 = -2k - 2 <x_i, y_i>_L`` per row (squared Lorentzian distance)."""
    inner = (x[..., 1:] * y[..., 1:]).sum(-1) - x[..., 0] * y[..., 0]
    return -2 * k - 2 * inner


class HyboNetEncoder(nn.Module):
    """HyboNet without a decoder: ``x -> expmap0((0, x))``, then ``num_layers`` Lorentz graph convolutions.

    Module names ``layers.<i>.transform.linear`` are the matrices a strategy converts; it returns the nodes'
    points, for link prediction's distance-based decoder (and :class:`HyboNet` adds class prototypes).

    Args:
        in_features: Node feature width (the points have ``in_features + 1`` coordinates).
        hidden_dim: Ambient width of the output points (16 means points in ``H^15``).
        num_layers: Graph convolutions (HyboNet's link-prediction ``num_layers``: 2 means two).
        dropout: Dropout on the input coordinates of every layer.
        curvature: ``k`` of the hyperboloid ``<x, x>_L = -k``.
    """

    def __init__(self, in_features: int, hidden_dim: int, num_layers: int = 2, dropout: float = 0.0,
                 curvature: float = 1.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if curvature <= 0:
            raise ValueError(f"curvature must be > 0 (the k of <x, x>_L = -k), got {curvature}")
        self.manifold = geoopt.Lorentz(k=curvature)
        widths = [in_features + 1] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(
            LorentzGraphConvolution(a, b, dropout, activate_input=i > 0, curvature=curvature)
            for i, (a, b) in enumerate(zip(widths, widths[1:])))

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        """The nodes' points on the hyperboloid after the last graph convolution."""
        h = self.manifold.expmap0(F.pad(x, (1, 0)))
        for layer in self.layers:
            h = layer(h, edge_index, edge_weight)
        return h

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return self.embed(x, edge_index, edge_weight)


class HyboNet(HyboNetEncoder):
    """Fully hyperbolic GCN: features ``x -> expmap0((0, x))``, ``num_layers`` Lorentz graph convolutions, a decoder.

    Module names: ``layers.<i>.transform.linear`` are the ``nn.Linear`` matrices a strategy converts
    (the first maps ``in_features + 1 -> hidden_dim``, the others ``hidden_dim -> hidden_dim``);
    ``decoder.prototypes`` are points, not a matrix, so every strategy leaves them as they are.

    Args:
        in_features: Node feature width (the points have ``in_features + 1`` coordinates).
        hidden_dim: Ambient width of the hidden points (HyboNet's ``dim``: 16 means points in ``H^15``).
        num_classes: Output classes.
        num_layers: Graph convolutions (HyboNet's ``num_layers - 1``).
        dropout: Dropout on the input coordinates of every layer.
        curvature: ``k`` of the hyperboloid ``<x, x>_L = -k``.
    """

    def __init__(self, in_features: int, hidden_dim: int, num_classes: int, num_layers: int = 2,
                 dropout: float = 0.0, curvature: float = 1.0) -> None:
        super().__init__(in_features, hidden_dim, num_layers, dropout, curvature)
        self.decoder = LorentzDecoder(hidden_dim, num_classes, self.manifold)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embed(x, edge_index, edge_weight))


class FermiDiracDecoder(nn.Module):
    """``p(edge) = 1 / (exp((d^2 - r) / t) + 1) = sigmoid((r - d^2) / t)`` from a squared distance ``d^2``.

    Args:
        radius: ``r``, the squared distance at which ``p = 1/2`` (HGCN: 2).
        temperature: ``t``, how sharply ``p`` falls around ``r`` (HGCN: 1).
    """

    def __init__(self, radius: float = 2.0, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.radius, self.temperature = radius, temperature

    def logit(self, squared_distance: torch.Tensor) -> torch.Tensor:
        """``(r - d^2) / t``: the log-odds of an edge."""
        return (self.radius - squared_distance) / self.temperature

    def forward(self, squared_distance: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(squared_distance))
