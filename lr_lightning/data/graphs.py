"""Node-classification graphs as one full batch: a generated tree, Planetoid, and HGCN's Airport and Disease.

Sources (``dataset``, with ``root`` the folder that holds the dataset's own folder):

- ``tree`` (default, no files): a random tree whose labels are the root's subtrees (hierarchical:
  every node inherits its class from its ancestor at depth 1), with non-negative features that
  carry a weak class signal, so both the features and the tree structure matter.
- ``cora``, ``citeseer``, ``pubmed``: Planetoid raw files ``<root>/<Name>/raw/ind.<name>.*``,
  processed by ``torch_geometric.datasets.Planetoid`` in a cache folder that links to them (the
  source is never written, nothing is downloaded). Paper split: the public 20-per-class split.
- ``airport``: HGCN's ``<root>/airport/airport.p`` (a pickled networkx graph; the label is the 5th
  feature binned at 1, 8/7, 9/7; features get HGCN's one-hot degree and constant columns).
- ``disease``: HGCN's ``<root>/disease_nc/disease_nc.{edges.csv,labels.npy}`` and, with
  ``features="file"``, ``disease_nc.feats.npz``; ``features="identity"`` is HGCN's ``use_feats=0``.

Splits: ``paper`` reproduces the published one (Planetoid's public split; HGCN's ``split_data``,
which for Airport puts 225 test and 246 validation nodes into training as well, and repeats
nodes); ``stratified`` draws disjoint per-class fractions. ``None`` picks ``paper`` for Planetoid
and ``stratified`` for the others.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from collections import deque
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import to_undirected
from typing_extensions import override

from lr_lightning.data.files import read_text, unreadable_error

DATASETS: tuple[str, ...] = ("tree", "cora", "citeseer", "pubmed", "airport", "disease")
PLANETOID_NAMES = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_SUFFIXES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
SPLITS: tuple[str, ...] = ("paper", "stratified")
FEATURE_MODES: tuple[str, ...] = ("file", "identity")
HGCN_FRACTIONS = {"disease": (0.10, 0.60), "airport": (0.15, 0.15)}
"""HGCN's (validation, test) proportions; also the defaults of the stratified split on these datasets."""
DEFAULT_FRACTIONS = (0.2, 0.6)
AIRPORT_LABEL_BINS = (7.0 / 7, 8.0 / 7, 9.0 / 7)
DEFAULT_CACHE_DIR = Path("~/.cache/lr_lightning/graphs")

Split = Literal["paper", "stratified"]
Features = Literal["file", "identity"]


@dataclass
class GraphSource:
    """A graph as read from its files: features, labels, undirected edges, and the published split if any."""

    x: torch.Tensor
    y: torch.Tensor
    edge_index: torch.Tensor
    paper_split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class Graph:
    """One full batch: node features, labels, ``A_hat = D^-1/2 (A + I) D^-1/2`` as edges and weights, split indices.

    The index tensors may repeat nodes or overlap (HGCN's Airport split does); the stratified split never does.
    """

    x: torch.Tensor
    y: torch.Tensor
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    train_index: torch.Tensor
    val_index: torch.Tensor
    test_index: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> Graph:
        """The same graph with every tensor on ``device`` (Lightning's batch transfer calls this)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


# --------------------------------------------------------------------------------------------- files
def required_files(dataset: str, root: Path, features: Features) -> list[Path]:
    """The files ``dataset`` is read from under ``root``."""
    if dataset in PLANETOID_NAMES:
        raw = root / PLANETOID_NAMES[dataset] / "raw"
        return [raw / f"ind.{dataset}.{suffix}" for suffix in PLANETOID_SUFFIXES]
    if dataset == "airport":
        return [root / "airport" / "airport.p"]
    if dataset == "disease":
        folder = root / "disease_nc"
        names = ["disease_nc.edges.csv", "disease_nc.labels.npy"]
        names += ["disease_nc.feats.npz"] if features == "file" else []
        return [folder / name for name in names]
    if dataset == "disease_lp":
        folder = root / "disease_lp"
        return [folder / "disease_lp.edges.csv"] + ([folder / "disease_lp.feats.npz"] if features == "file" else [])
    return []


def check_files(dataset: str, root: Path, features: Features) -> None:
    """Raise ``FileNotFoundError`` naming every missing file of ``dataset`` (and what to do about it)."""
    missing = [path for path in required_files(dataset, root, features) if not path.is_file()]
    if not missing:
        return
    hint = ""
    if any(p.name in ("disease_nc.feats.npz", "disease_lp.feats.npz") for p in missing):
        hint = " Without the feature file, pass features='identity' (HGCN's use_feats=0: one-hot node ids)."
    elif dataset in PLANETOID_NAMES:
        hint = " Nothing is downloaded: put the Planetoid raw files there (torch_geometric's layout)."
    raise FileNotFoundError(f"dataset '{dataset}' under root='{root}' is missing "
                            f"{', '.join(str(p) for p in missing)}.{hint}")


def check_source(dataset: str, root: str | None, features: Features, tree_nodes: int, tree_classes: int,
                 tree_features: int) -> None:
    """Raise ``ValueError`` for a generated tree that cannot be drawn or a dataset without ``root``, and
    ``FileNotFoundError`` naming every missing file of ``dataset`` under ``root``."""
    if tree_nodes <= tree_classes or tree_classes < 2 or tree_features < tree_classes:
        raise ValueError(f"the generated tree needs tree_classes >= 2, tree_nodes > tree_classes and "
                         f"tree_features >= tree_classes, got {tree_nodes}, {tree_classes}, {tree_features}")
    if dataset == "tree":
        return
    if root is None:
        raise ValueError(f"dataset '{dataset}' needs root, the folder that holds its files "
                         f"(e.g. ../shared/data/{'planetoid' if dataset in PLANETOID_NAMES else 'hgcn'})")
    check_files(dataset, Path(root).expanduser(), features)


# --------------------------------------------------------------------------------------------- readers
def read_planetoid(root: Path, dataset: str, cache_dir: Path) -> GraphSource:
    """Planetoid through torch_geometric, processed in ``cache_dir`` from links to the raw files under ``root``."""
    from torch_geometric.datasets import Planetoid

    name = PLANETOID_NAMES[dataset]
    source = root / name / "raw"
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    cache_root = cache_dir / f"planetoid-{digest}"
    (cache_root / name / "raw").mkdir(parents=True, exist_ok=True)
    for path in required_files(dataset, root, "file"):
        link = cache_root / name / "raw" / path.name
        if not link.exists():
            try:
                os.symlink(path.resolve(), link)
            except OSError:
                shutil.copyfile(path, link)
    data = Planetoid(str(cache_root), name, split="public")[0]
    split = tuple(mask.nonzero().flatten() for mask in (data.train_mask, data.val_mask, data.test_mask))
    return GraphSource(data.x, data.y, data.edge_index, split)


def hgcn_split(labels: np.ndarray, val_prop: float, test_prop: float, seed: int) -> tuple[list[int], ...]:
    """HGCN's ``split_data`` verbatim in effect: returns (train, val, test) index lists.

    It shuffles the nodes with ``labels != 0`` and those with ``labels != 1`` (for more than two
    classes these overlap, so a node can land in two parts or twice in one), and sizes validation and
    test from the smaller group.
    """
    rng = np.random.RandomState(seed)
    positive, negative = labels.nonzero()[0], (1.0 - labels).nonzero()[0]
    rng.shuffle(positive)
    rng.shuffle(negative)
    size = min(len(positive), len(negative))
    n_val, n_test = round(val_prop * size), round(test_prop * size)
    parts = [(ids[:n_val], ids[n_val:n_val + n_test], ids[n_val + n_test:])
             for ids in (positive.tolist(), negative.tolist())]
    val, test, train = (parts[0][i] + parts[1][i] for i in range(3))
    return train, val, test


def read_airport(root: Path, split_seed: int) -> GraphSource:
    """HGCN's Airport: 3,188 airports, 18,631 routes, 4 classes; features normalized by row sum, then HGCN's
    ``augment`` (one-hot degree clipped at 5, and a constant column)."""
    with (root / "airport" / "airport.p").open("rb") as f:
        graph = pickle.load(f)  # a networkx.Graph: unpickling needs networkx installed
    nodes = list(graph.nodes())
    index = {node: i for i, node in enumerate(nodes)}
    table = np.array([graph.nodes[node]["feat"] for node in nodes], dtype=np.float64)
    binned = np.digitize(table[:, 4], AIRPORT_LABEL_BINS)
    labels = binned - binned.min()
    edges = torch.tensor([(index[u], index[v]) for u, v in graph.edges()], dtype=torch.long).T
    edge_index = to_undirected(edges, num_nodes=len(nodes))
    features = row_normalize(torch.tensor(table[:, :4], dtype=torch.float32))
    degree = torch.bincount(edge_index[0], minlength=len(nodes)).clamp_max(5)
    features = torch.cat([features, torch.eye(6)[degree], torch.ones(len(nodes), 1)], dim=1)
    train, val, test = hgcn_split(labels, *HGCN_FRACTIONS["airport"], seed=split_seed)
    return GraphSource(features, torch.as_tensor(labels, dtype=torch.long), edge_index,
                       tuple(torch.tensor(ids, dtype=torch.long) for ids in (train, val, test)))


def load_array(path: Path) -> Any:
    """A ``.npy`` array or a scipy-sparse ``.npz`` matrix; a damaged file is a one-line ``ValueError`` naming it."""
    try:
        if path.suffix == ".npz":
            import scipy.sparse

            return scipy.sparse.load_npz(path)
        return np.load(path)
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        if "pickled" in str(error):  # NumPy's advice, to unpickle a file of unknown origin, is not ours to give
            error = ValueError("it is no NumPy array file, and loading it would mean unpickling it")
        failure = unreadable_error(path, path.suffix, error)
    raise failure


def read_disease(root: Path, features: Features, split_seed: int) -> GraphSource:
    """HGCN's Disease (node classification): an SIR-infection tree of 1,044 nodes, 2 classes."""
    folder = root / "disease_nc"
    names: dict[str, int] = {}
    pairs = []
    for line in read_text(folder / "disease_nc.edges.csv").split():
        a, b = line.split(",")
        pairs.append((names.setdefault(a, len(names)), names.setdefault(b, len(names))))
    labels = load_array(folder / "disease_nc.labels.npy")
    if features == "file":
        x = torch.tensor(load_array(folder / "disease_nc.feats.npz").toarray(), dtype=torch.float32)
    else:
        x = torch.eye(len(names))
    edge_index = to_undirected(torch.tensor(pairs, dtype=torch.long).T, num_nodes=len(names))
    train, val, test = hgcn_split(labels, *HGCN_FRACTIONS["disease"], seed=split_seed)
    return GraphSource(x, torch.as_tensor(labels, dtype=torch.long), edge_index,
                       tuple(torch.tensor(ids, dtype=torch.long) for ids in (train, val, test)))


def generate_tree(num_nodes: int, num_classes: int, num_features: int, signal: float, seed: int) -> GraphSource:
    """A random tree: the root has ``num_classes`` children, every later node 1-4; a node's class is its
    depth-1 ancestor.

    Features are ``U(0, 1)`` plus ``signal`` on the block of ``num_features / num_classes`` columns owned by the class.
    """
    rng = np.random.RandomState(seed)
    parent, label = [-1] + [0] * num_classes, [0] + list(range(num_classes))
    frontier = deque(range(1, num_classes + 1))
    while len(parent) < num_nodes:
        node = frontier.popleft()
        for _ in range(min(rng.randint(1, 5), num_nodes - len(parent))):
            parent.append(node)
            label.append(label[node])
            frontier.append(len(parent) - 1)
    labels = np.array(label)
    x = rng.rand(num_nodes, num_features)
    block = num_features // num_classes
    for c in range(num_classes):
        x[labels == c, c * block:(c + 1) * block] += signal
    edges = torch.tensor([(child, p) for child, p in enumerate(parent) if p >= 0], dtype=torch.long).T
    edge_index = to_undirected(edges, num_nodes=num_nodes)
    return GraphSource(torch.tensor(x, dtype=torch.float32), torch.tensor(labels), edge_index)


# --------------------------------------------------------------------------------------------- processing
def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x_i / sum_j x_ij`` per row (rows summing to 0 stay 0), as HGCN and GCN normalize features."""
    total = x.sum(1, keepdim=True)
    return torch.where(total != 0, x / torch.where(total != 0, total, 1), 0)


def stratified_split(labels: torch.Tensor, val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint (train, val, test) indices with ``round(f * n_c)`` validation and test nodes from every class ``c``."""
    generator = torch.Generator().manual_seed(seed)
    parts: tuple[list[torch.Tensor], ...] = ([], [], [])
    for c in labels.unique():
        ids = (labels == c).nonzero().flatten()
        ids = ids[torch.randperm(len(ids), generator=generator)]
        n_val, n_test = round(val_fraction * len(ids)), round(test_fraction * len(ids))
        parts[1].append(ids[:n_val])
        parts[2].append(ids[n_val:n_val + n_test])
        parts[0].append(ids[n_val + n_test:])
    return tuple(torch.cat(p).sort().values for p in parts)


def build_graph(source: GraphSource, split: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                normalize_features: bool) -> Graph:
    """Normalize features, add self-loops with GCN's symmetric weights, attach the split."""
    x = row_normalize(source.x) if normalize_features else source.x
    edge_index, edge_weight = gcn_norm(source.edge_index, num_nodes=source.x.shape[0], add_self_loops=True)
    return Graph(x.float(), source.y, edge_index, edge_weight.float(), *split)


class FullBatchDataModule(L.LightningDataModule):
    """One graph as the single batch of every loader; subclasses set ``dataset``, ``root`` and ``cache_dir`` in
    ``__init__`` and ``self.graph`` in ``setup``."""

    graph: Any = None

    @override
    def prepare_data(self) -> None:
        """Process Planetoid once (on one process) into the cache."""
        if self.dataset in PLANETOID_NAMES:
            read_planetoid(Path(self.root).expanduser(), self.dataset, self.cache_dir)

    @property
    def num_features(self) -> int:
        return self._loaded().x.shape[1]

    def _loaded(self) -> Any:
        if self.graph is None:
            self.setup()
        return self.graph

    def _loader(self) -> DataLoader:
        return DataLoader([self._loaded()], batch_size=None)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader()

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader()

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader()

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class GraphDataModule(FullBatchDataModule):
    """A node-classification graph served whole: every train/val/test batch is the same :class:`Graph`.

    Args:
        dataset: One of ``tree`` (generated, no files), ``cora``, ``citeseer``, ``pubmed``, ``airport``, ``disease``.
        root: Folder holding the dataset's folder (``../shared/data/planetoid`` for Cora, ``../shared/data/hgcn``
            for Airport and Disease); required unless ``dataset="tree"``.
        split: ``paper`` (the published split; HGCN's leaks on Airport), ``stratified`` (disjoint,
            per class) or ``None`` (``paper`` for Planetoid, ``stratified`` otherwise).
        val_fraction: Stratified split: fraction of each class for validation (``None``: HGCN's
            proportions on Airport 0.15 and Disease 0.10, else 0.2).
        test_fraction: Stratified split: fraction for test (``None``: Airport 0.15, Disease 0.60, else 0.6).
        features: ``file`` (the dataset's features) or ``identity`` (one-hot node ids, HGCN's ``use_feats=0``).
        normalize_features: Divide every feature row by its sum (HGCN's ``normalize_feats``).
        seed: Seed of the stratified split, of HGCN's split (1234 is HGCN's) and of the generated tree.
        tree_nodes: Nodes of the generated tree.
        tree_classes: Classes of the generated tree (children of the root).
        tree_features: Feature width of the generated tree.
        tree_signal: Class signal added to the generated features (their noise is ``U(0, 1)``).
        cache_dir: Where Planetoid's processed files go (default ``~/.cache/lr_lightning/graphs``).
    """

    def __init__(
        self,
        dataset: str = "tree",
        root: str | None = None,
        split: Split | None = None,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        features: Features = "file",
        normalize_features: bool = True,
        seed: int = 1234,
        tree_nodes: int = 500,
        tree_classes: int = 4,
        tree_features: int = 16,
        tree_signal: float = 0.3,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        if features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {FEATURE_MODES}, got {features!r}")
        if dataset == "tree" and split == "paper":
            raise ValueError("split='paper' has no meaning for the generated tree; use split='stratified' or None")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1) or None, got {value}")
        check_source(dataset, root, features, tree_nodes, tree_classes, tree_features)
        self.dataset, self.root, self.split, self.features = dataset, root, split, features
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.normalize_features, self.seed = normalize_features, seed
        self.tree = (tree_nodes, tree_classes, tree_features, tree_signal)
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        self.graph: Graph | None = None

    @property
    def split_kind(self) -> str:
        """The split in use: the given one, else ``paper`` for Planetoid and ``stratified`` otherwise."""
        return self.split or ("paper" if self.dataset in PLANETOID_NAMES else "stratified")

    def read(self) -> GraphSource:
        """The dataset's features, labels, edges and published split, as in its files."""
        root = Path(self.root).expanduser() if self.root is not None else None
        if self.dataset == "tree":
            return generate_tree(*self.tree[:3], signal=self.tree[3], seed=self.seed)
        if self.dataset in PLANETOID_NAMES:
            source = read_planetoid(root, self.dataset, self.cache_dir)
        elif self.dataset == "airport":
            source = read_airport(root, self.seed)
        else:
            source = read_disease(root, self.features, self.seed)
        if self.features == "identity":
            source.x = torch.eye(source.x.shape[0])
        return source

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.graph is not None:
            return
        source = self.read()
        if self.split_kind == "paper":
            split = source.paper_split
        else:
            default_val, default_test = HGCN_FRACTIONS.get(self.dataset, DEFAULT_FRACTIONS)
            split = stratified_split(source.y, self.val_fraction or default_val, self.test_fraction or default_test,
                                     self.seed)
        self.graph = build_graph(source, split, self.normalize_features)

    @property
    def num_classes(self) -> int:
        return int(self._loaded().y.max()) + 1
