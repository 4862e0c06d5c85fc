"""Link-prediction data: HGCN's 85/5/10 edge split (undirected pairs once, seeded), no held-out edge in the
message-passing graph, fixed negatives that are non-edges, seeded training negatives, Disease-LP and Cora from
the shared files, and clear errors for bad graphs and settings."""

import random

import numpy as np
import pytest
import scipy.sparse
import torch
from conftest import SHARED_DATA
from torch_geometric.utils import to_undirected

from lr_lightning.data import LinkDataModule
from lr_lightning.data.links import airport_features, sample_negatives, split_edges


def _pairs(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    """The undirected pairs ``{i, j}`` of the columns, as ``(min, max)``."""
    return {(min(a, b), max(a, b)) for a, b in edge_index.T.tolist()}


def _directed(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, edge_index.T.tolist()))


def test_the_split_is_85_5_10_of_the_undirected_edges_each_counted_once():
    data = LinkDataModule(tree_nodes=500)
    data.setup()
    graph = data.graph
    m = 499  # a tree: one edge per node but the root, listed in both directions in the source
    assert (graph.val_pos.shape[1], graph.test_pos.shape[1], graph.train_pos.shape[1]) == (24, 49, 426)
    parts = [graph.train_pos, graph.val_pos, graph.test_pos]
    for part in parts:
        assert bool((part[0] < part[1]).all())
        assert len(_directed(part)) == part.shape[1]  # no pair twice
    union = set().union(*(_directed(p) for p in parts))
    assert len(union) == m  # disjoint parts covering every undirected edge once
    source = data.read()[1]
    assert union == _pairs(source)


def test_held_out_edges_are_absent_from_the_message_passing_graph_in_both_directions():
    data = LinkDataModule()
    data.setup()
    graph = data.graph
    passing = _directed(graph.edge_index)
    for part in (graph.val_pos, graph.test_pos):
        for i, j in part.T.tolist():
            assert (i, j) not in passing and (j, i) not in passing
    non_loops = graph.edge_index[:, graph.edge_index[0] != graph.edge_index[1]]
    assert _directed(non_loops) == _directed(to_undirected(graph.train_pos))  # exactly the training edges
    assert int((graph.edge_index[0] == graph.edge_index[1]).sum()) == graph.num_nodes  # GCN's self-loops


def test_fixed_negatives_are_distinct_non_edges_and_repeat_with_the_seed():
    first, second, other = LinkDataModule(seed=7), LinkDataModule(seed=7), LinkDataModule(seed=8)
    for data in (first, second, other):
        data.setup()
    edges = _pairs(first.read()[1])
    graph = first.graph
    for positives, negatives in ((graph.val_pos, graph.val_neg), (graph.test_pos, graph.test_neg)):
        assert negatives.shape == positives.shape
        assert bool((negatives[0] < negatives[1]).all())  # no self-pairs, each pair once
        assert len(_directed(negatives)) == negatives.shape[1]
        assert not _pairs(negatives) & edges
    assert not _directed(graph.val_neg) & _directed(graph.test_neg)
    for name in ("train_pos", "val_pos", "val_neg", "test_pos", "test_neg"):
        assert torch.equal(getattr(graph, name), getattr(second.graph, name))
    assert not torch.equal(graph.test_neg, other.graph.test_neg)
    assert not torch.equal(graph.test_pos, other.graph.test_pos)


def test_training_negatives_avoid_training_edges_repeat_with_the_seed_and_leave_random_alone():
    data = LinkDataModule()
    data.setup()
    graph = data.graph
    random.seed(3)
    expected_next = random.random()
    random.seed(3)
    drawn = sample_negatives(graph.edge_index, graph.num_nodes, 300, seed=11)
    assert random.random() == expected_next  # the global Python RNG is as it was
    assert torch.equal(drawn, sample_negatives(graph.edge_index, graph.num_nodes, 300, seed=11))
    assert not torch.equal(drawn, sample_negatives(graph.edge_index, graph.num_nodes, 300, seed=12))
    assert drawn.shape == (2, 300)
    assert bool((drawn[0] != drawn[1]).all())
    assert not _directed(drawn) & _directed(graph.edge_index)


def test_airport_degree_features_count_training_edges_only():
    x = torch.full((4, 4), 0.25)
    train_pos = torch.tensor([[0, 0], [1, 2]])  # node 0 has degree 2, nodes 1 and 2 degree 1, node 3 none
    features = airport_features(x, train_pos)
    assert features.shape == (4, 4 + 6 + 1)
    assert features[:, 4:10].argmax(1).tolist() == [2, 1, 1, 0]
    assert torch.equal(features[:, -1], torch.ones(4))


def test_disease_lp_and_cora_load_from_the_shared_files(tmp_path):
    disease = LinkDataModule(dataset="disease_lp", root=str(SHARED_DATA / "hgcn"), normalize_features=False)
    disease.setup()
    graph = disease.graph
    assert (graph.num_nodes, disease.num_features) == (2665, 11)
    assert (graph.val_pos.shape[1], graph.test_pos.shape[1], graph.train_pos.shape[1]) == (133, 266, 2265)
    features = scipy.sparse.load_npz(SHARED_DATA / "hgcn" / "disease_lp" / "disease_lp.feats.npz").toarray()
    torch.testing.assert_close(graph.x, torch.tensor(features, dtype=torch.float32))  # not normalized
    cora = LinkDataModule(dataset="cora", root=str(SHARED_DATA / "planetoid"), cache_dir=str(tmp_path))
    cora.prepare_data()
    cora.setup()
    assert (cora.graph.num_nodes, cora.num_features) == (2708, 1433)
    assert (cora.graph.val_pos.shape[1], cora.graph.test_pos.shape[1]) == (263, 527)  # HGCN's counts of 5,278 edges


def test_disease_lp_numbers_nodes_in_order_of_appearance(tmp_path):
    folder = tmp_path / "disease_lp"
    folder.mkdir()
    names = ["7", "3", "9", "1", "5", "2", "8", "4", "6", "0", "11", "10"]
    lines = [f"{names[0]},{name}" for name in names[1:]] + [f"{names[1]},{names[2]}"]
    (folder / "disease_lp.edges.csv").write_text("\n".join(lines) + "\n")
    scipy.sparse.save_npz(folder / "disease_lp.feats.npz", scipy.sparse.csr_matrix(np.eye(12)))
    data = LinkDataModule(dataset="disease_lp", root=str(tmp_path), normalize_features=False, val_fraction=0.1,
                          test_fraction=0.2)
    x, edge_index = data.read()
    assert torch.equal(x, torch.eye(12))
    assert _pairs(edge_index) == {(0, j) for j in range(1, 12)} | {(1, 2)}


@pytest.mark.parametrize("edge_index, message", [
    (torch.tensor([[0, 1, 2], [1, 2, 3]]), "edge_index must be undirected"),
    (torch.empty(2, 0, dtype=torch.long), "the graph has no edges"),
    (torch.tensor([[0, 0], [0, 0]]), "the graph has no edges"),
    (to_undirected(torch.tensor([[0, 1, 2], [1, 2, 3]])), "leaves no test edges"),
])
def test_bad_graphs_are_refused_with_a_clear_error(edge_index, message):
    with pytest.raises(ValueError, match=message):
        split_edges(edge_index, num_nodes=4)


def test_too_few_non_edges_for_the_fixed_negatives_are_refused():
    complete = to_undirected(torch.combinations(torch.arange(12)).T)  # 66 edges, no non-edge
    with pytest.raises(ValueError, match="0 non-edges, fewer than the 9 fixed negatives"):
        split_edges(complete, num_nodes=12)


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
    ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\), got 1.0"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be < 1"),
    ({"dataset": "disease"}, "dataset must be one of"),
    ({"features": "onehot"}, "features must be one of"),
    ({"dataset": "cora"}, "dataset 'cora' needs root"),
])
def test_bad_settings_are_refused_before_any_data_is_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinkDataModule(**kwargs)


def test_a_missing_disease_lp_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="disease_lp.feats.npz.*features='identity'"):
        LinkDataModule(dataset="disease_lp", root=str(tmp_path))
