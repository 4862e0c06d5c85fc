"""Link-prediction graphs as one full batch: HGCN's edge split of a generated tree, Disease-LP, Airport or Planetoid.

The split (HGCN's ``mask_edges`` in effect): the undirected edges, each pair ``{i, j}`` counted once, are
shuffled with ``seed`` and cut into validation (``int(m * val_fraction)``), test (``int(m * test_fraction)``)
and training positives (the rest: 85/5/10 by default). Only the training positives form the
message-passing graph, so no validation or test edge (in either direction) is seen by the encoder.
Validation and test each get as many fixed negatives, pairs that are not edges of the full graph, drawn
with ``torch_geometric.utils.negative_sampling`` under ``seed``. Training negatives are drawn anew every
step by :func:`sample_negatives` from the pairs that are not training edges (validation and test positives
among them, as HGCN does, so the sampler does not reveal them).

Sources (``dataset``, with ``root`` the folder that holds the dataset's own folder):

- ``tree`` (default, no files): :func:`lr_lightning.data.graphs.generate_tree` (features carry the subtree).
- ``disease_lp``: HGCN's ``<root>/disease_lp/disease_lp.{edges.csv,feats.npz}`` (an SIR tree, 2,665 nodes).
- ``airport``: HGCN's ``<root>/airport/airport.p``; the one-hot degree features count training edges only.
- ``cora``, ``citeseer``, ``pubmed``: Planetoid raw files ``<root>/<Name>/raw/ind.<name>.*``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import coalesce, is_undirected, negative_sampling, remove_self_loops, to_undirected
from typing_extensions import override

from lr_lightning.data.files import read_text
from lr_lightning.data.graphs import (
    DEFAULT_CACHE_DIR,
    FEATURE_MODES,
    Features,
    FullBatchDataModule,
    check_source,
    generate_tree,
    load_array,
    read_airport,
    read_planetoid,
    row_normalize,
)

DATASETS: tuple[str, ...] = ("tree", "disease_lp", "airport", "cora", "citeseer", "pubmed")
HGCN_FRACTIONS = (0.05, 0.10)
"""HGCN's (validation, test) proportions of the edges (``val-prop``, ``test-prop``)."""
AIRPORT_RAW_FEATURES = 4
"""Airport's feature columns before HGCN's augmentation (one-hot degree, constant)."""


@dataclass
class EdgeSplit:
    """Positive pairs ``(2, m)`` with ``i < j`` per split, and the fixed validation and test negatives."""

    train_pos: torch.Tensor
    val_pos: torch.Tensor
    val_neg: torch.Tensor
    test_pos: torch.Tensor
    test_neg: torch.Tensor


@dataclass
class LinkGraph:
    """One full batch: features, the training graph ``A_hat = D^-1/2 (A_train + I) D^-1/2`` as edges and weights,
    and the split's pairs (each ``(2, m)``; positives with ``i < j``)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    train_pos: torch.Tensor
    val_pos: torch.Tensor
    val_neg: torch.Tensor
    test_pos: torch.Tensor
    test_neg: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> LinkGraph:
        """The same graph with every tensor on ``device`` (Lightning's batch transfer calls this)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


# --------------------------------------------------------------------------------------------- sampling
def sample_negatives(edge_index: torch.Tensor, num_nodes: int, num_samples: int, seed: int,
                     force_undirected: bool = False) -> torch.Tensor:
    """``torch_geometric.utils.negative_sampling`` drawn from ``random.Random(seed)`` (it samples with Python's
    ``random``); the global state is left as it was. Pairs ``(i, j)``, ``i != j``, not in ``edge_index``."""
    state = random.getstate()
    random.seed(seed)
    try:
        return negative_sampling(edge_index, num_nodes=num_nodes, num_neg_samples=num_samples,
                                 force_undirected=force_undirected)
    finally:
        random.setstate(state)


def fixed_negatives(edge_index: torch.Tensor, num_nodes: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct non-edges ``{i, j}`` of the graph as ``(2, count)`` pairs with ``i < j``, in random order."""
    request = 2 * count
    while True:
        pairs = sample_negatives(edge_index, num_nodes, request, seed, force_undirected=True)
        pairs = pairs[:, pairs[0] < pairs[1]]
        if pairs.shape[1] >= count:
            break
        request *= 2  # the sampler is approximate; a larger request oversamples more
    order = torch.randperm(pairs.shape[1], generator=torch.Generator().manual_seed(seed))
    return pairs[:, order[:count]]


def split_edges(edge_index: torch.Tensor, num_nodes: int, val_fraction: float = HGCN_FRACTIONS[0],
                test_fraction: float = HGCN_FRACTIONS[1], seed: int = 1234) -> EdgeSplit:
    """HGCN's edge split of an undirected graph (self-loops dropped): see the module docstring.

    Raises ``ValueError`` for a directed or empty graph, fractions outside ``(0, 1)`` or summing to 1 or more,
    a split leaving a part without edges, or too few non-edges for the fixed negatives.
    """
    check_fractions(val_fraction, test_fraction)
    edge_index, _ = remove_self_loops(edge_index)
    if edge_index.numel() == 0:
        raise ValueError("the graph has no edges (self-loops aside): link prediction needs edges to split")
    if not is_undirected(edge_index, num_nodes=num_nodes):
        raise ValueError("edge_index must be undirected (every edge (i, j) listed with its (j, i)); "
                         "make it so with torch_geometric.utils.to_undirected")
    pairs = coalesce(edge_index[:, edge_index[0] < edge_index[1]], num_nodes=num_nodes)
    m = pairs.shape[1]
    n_val, n_test = int(m * val_fraction), int(m * test_fraction)
    for name, count in (("test", n_test), ("validation", n_val), ("training", m - n_val - n_test)):
        if count == 0:
            raise ValueError(f"the split of {m} undirected edges with val_fraction={val_fraction} and "
                             f"test_fraction={test_fraction} leaves no {name} edges: use a larger graph or fraction")
    non_edges = num_nodes * (num_nodes - 1) // 2 - m
    if non_edges < n_val + n_test:
        raise ValueError(f"the graph has {non_edges} non-edges, fewer than the {n_val + n_test} fixed negatives "
                         f"validation and test need: lower val_fraction or test_fraction")
    pairs = pairs[:, torch.randperm(m, generator=torch.Generator().manual_seed(seed))]
    negatives = fixed_negatives(edge_index, num_nodes, n_val + n_test, seed)
    return EdgeSplit(train_pos=pairs[:, n_val + n_test:], val_pos=pairs[:, :n_val], val_neg=negatives[:, :n_val],
                     test_pos=pairs[:, n_val:n_val + n_test], test_neg=negatives[:, n_val:])


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are in ``(0, 1)`` and leave training edges."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1 to leave training edges, "
                         f"got {val_fraction} + {test_fraction}")


def build_link_graph(x: torch.Tensor, split: EdgeSplit) -> LinkGraph:
    """The training positives, both directions, with self-loops and GCN's symmetric weights, and the split."""
    num_nodes = x.shape[0]
    edge_index, edge_weight = gcn_norm(to_undirected(split.train_pos, num_nodes=num_nodes), num_nodes=num_nodes,
                                       add_self_loops=True)
    return LinkGraph(x.float(), edge_index, edge_weight.float(), split.train_pos, split.val_pos, split.val_neg,
                     split.test_pos, split.test_neg)


# --------------------------------------------------------------------------------------------- readers
def read_disease_lp(root: Path, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """Disease-LP's features and undirected edges; nodes numbered in order of first appearance (as HGCN does)."""
    names: dict[str, int] = {}
    pairs = []
    for line in read_text(root / "disease_lp" / "disease_lp.edges.csv").split():
        a, b = line.split(",")
        pairs.append((names.setdefault(a, len(names)), names.setdefault(b, len(names))))
    if features == "file":
        x = torch.tensor(load_array(root / "disease_lp" / "disease_lp.feats.npz").toarray(), dtype=torch.float32)
    else:
        x = torch.eye(len(names))
    return x, to_undirected(torch.tensor(pairs, dtype=torch.long).T, num_nodes=len(names))


def airport_features(x: torch.Tensor, train_pos: torch.Tensor) -> torch.Tensor:
    """HGCN's ``augment``: the given columns, a one-hot degree clipped at 5 counted on the training edges, a 1."""
    degree = torch.bincount(train_pos.flatten(), minlength=x.shape[0]).clamp_max(5)
    return torch.cat([x, torch.eye(6)[degree], torch.ones(x.shape[0], 1)], dim=1)


class LinkDataModule(FullBatchDataModule):
    """A link-prediction graph served whole: every train/val/test batch is the same :class:`LinkGraph`.

    Args:
        dataset: One of ``tree`` (generated, no files), ``disease_lp``, ``airport``, ``cora``, ``citeseer``,
            ``pubmed``.
        root: Folder holding the dataset's folder (``../shared/data/hgcn`` for Disease-LP and Airport,
            ``../shared/data/planetoid`` for Planetoid); required unless ``dataset="tree"``.
        val_fraction: Fraction of the undirected edges held out for validation (HGCN: 0.05).
        test_fraction: Fraction held out for test (HGCN: 0.10).
        features: ``file`` (the dataset's features) or ``identity`` (one-hot node ids, HGCN's ``use_feats=0``).
        normalize_features: Divide every feature row by its sum (HGCN's ``normalize_feats``; 0 for Disease-LP).
        seed: Seed of the edge split and fixed negatives (HGCN's ``split_seed`` 1234) and of the generated tree.
        tree_nodes: Nodes of the generated tree.
        tree_classes: Subtrees under the root of the generated tree (its features carry them).
        tree_features: Feature width of the generated tree.
        tree_signal: Subtree signal added to the generated features (their noise is ``U(0, 1)``).
        cache_dir: Where Planetoid's processed files go (default ``~/.cache/lr_lightning/graphs``).
    """

    def __init__(
        self,
        dataset: str = "tree",
        root: str | None = None,
        val_fraction: float = HGCN_FRACTIONS[0],
        test_fraction: float = HGCN_FRACTIONS[1],
        features: Features = "file",
        normalize_features: bool = True,
        seed: int = 1234,
        tree_nodes: int = 500,
        tree_classes: int = 8,
        tree_features: int = 16,
        tree_signal: float = 1.0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {FEATURE_MODES}, got {features!r}")
        check_fractions(val_fraction, test_fraction)
        check_source(dataset, root, features, tree_nodes, tree_classes, tree_features)
        self.dataset, self.root, self.features = dataset, root, features
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.normalize_features, self.seed = normalize_features, seed
        self.tree = (tree_nodes, tree_classes, tree_features, tree_signal)
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        self.graph: LinkGraph | None = None

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dataset's features and undirected edges, as in its files."""
        root = Path(self.root).expanduser() if self.root is not None else None
        if self.dataset == "tree":
            source = generate_tree(*self.tree[:3], signal=self.tree[3], seed=self.seed)
            return source.x, source.edge_index
        if self.dataset == "disease_lp":
            return read_disease_lp(root, self.features)
        if self.dataset == "airport":
            source = read_airport(root, self.seed)
            source.x = source.x[:, :AIRPORT_RAW_FEATURES]  # the degree columns are recomputed on training edges
        else:
            source = read_planetoid(root, self.dataset, self.cache_dir)
        x = torch.eye(source.x.shape[0]) if self.features == "identity" else source.x
        return x, source.edge_index

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.graph is not None:
            return
        x, edge_index = self.read()
        split = split_edges(edge_index, x.shape[0], self.val_fraction, self.test_fraction, self.seed)
        x = row_normalize(x) if self.normalize_features else x
        if self.dataset == "airport" and self.features == "file":
            x = airport_features(x, split.train_pos)
        self.graph = build_link_graph(x, split)
