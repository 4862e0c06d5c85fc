"""Graph data: Cora from the shared raw files with the public split, clear errors for missing files, HGCN's
Airport/Disease loaders and their (leaky) paper split vs the clean stratified split, the generated tree."""

import shutil

import pytest
import torch
from conftest import SHARED_DATA

from lr_lightning.data import GraphDataModule
from lr_lightning.data.graphs import Graph, generate_tree, stratified_split

PLANETOID = SHARED_DATA / "planetoid"
HGCN = SHARED_DATA / "hgcn"


def _indices(graph: Graph) -> tuple[set, set, set]:
    return set(graph.train_index.tolist()), set(graph.val_index.tolist()), set(graph.test_index.tolist())


def test_cora_loads_from_the_shared_raw_files_with_the_public_split(tmp_path):
    data = GraphDataModule(dataset="cora", root=str(PLANETOID), cache_dir=str(tmp_path))
    data.prepare_data()
    data.setup("fit")
    graph = data.graph
    assert (graph.num_nodes, data.num_features, data.num_classes) == (2708, 1433, 7)
    self_loops = graph.edge_index[0] == graph.edge_index[1]
    assert int(self_loops.sum()) == 2708 and int((~self_loops).sum()) == 10556
    assert (len(graph.train_index), len(graph.val_index), len(graph.test_index)) == (140, 500, 1000)
    assert torch.equal(graph.train_index, torch.arange(140))  # Planetoid's public split: the first 140 nodes
    assert torch.bincount(graph.y[graph.train_index]).tolist() == [20] * 7
    train, val, test = _indices(graph)
    assert not (train & val or train & test or val & test)
    torch.testing.assert_close(graph.x.sum(1)[graph.x.sum(1) > 0], torch.ones(int((graph.x.sum(1) > 0).sum())))
    assert not (PLANETOID / "Cora" / "processed").exists()  # the shared folder is never written


def test_edge_weights_are_the_symmetric_gcn_normalization():
    data = GraphDataModule(tree_nodes=60)
    data.setup()
    graph = data.graph
    degree = torch.bincount(graph.edge_index[1], minlength=60).float()  # self-loops included
    expected = (degree[graph.edge_index[0]] * degree[graph.edge_index[1]]).rsqrt()
    torch.testing.assert_close(graph.edge_weight, expected)


def test_incomplete_pubmed_names_the_missing_file_before_anything_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"PubMed/raw/ind\.pubmed\.allx") as error:
        GraphDataModule(dataset="pubmed", root=str(SHARED_DATA / "planetoid_incomplete"), cache_dir=str(tmp_path))
    assert "ind.pubmed.x," not in str(error.value)  # only what is missing is listed
    assert not any(tmp_path.iterdir())


def test_disease_without_its_feature_file_points_to_identity_features():
    with pytest.raises(FileNotFoundError, match=r"disease_nc\.feats\.npz.*features='identity'"):
        GraphDataModule(dataset="disease", root=str(HGCN))
    data = GraphDataModule(dataset="disease", root=str(HGCN), features="identity", split="paper")
    data.setup()
    graph = data.graph
    assert (graph.num_nodes, data.num_features, data.num_classes) == (1044, 1044, 2)
    assert torch.equal(graph.x, torch.eye(1044))
    assert int((graph.edge_index[0] != graph.edge_index[1]).sum()) == 2 * 1043  # a tree
    # HGCN's split_data(val_prop=0.10, test_prop=0.60, seed=1234), sized from the 211 positives
    assert (len(graph.train_index), len(graph.val_index), len(graph.test_index)) == (748, 42, 254)


def test_airport_paper_split_leaks_test_nodes_and_the_stratified_split_does_not():
    paper = GraphDataModule(dataset="airport", root=str(HGCN), split="paper")
    paper.setup()
    graph = paper.graph
    assert (graph.num_nodes, paper.num_features, paper.num_classes) == (3188, 11, 4)
    assert torch.bincount(graph.y).tolist() == [521, 1443, 999, 225]
    train, val, test = _indices(graph)
    assert len(graph.train_index) == 3364 and len(train) == 2691  # repeated nodes, as in HGCN
    assert (len(test & train), len(val & train)) == (225, 246)

    clean = GraphDataModule(dataset="airport", root=str(HGCN))
    clean.setup()
    train, val, test = _indices(clean.graph)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(3188))
    assert len(clean.graph.test_index) == len(set(clean.graph.test_index.tolist()))


def test_stratified_split_takes_the_fractions_from_every_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val, test = stratified_split(labels, 0.2, 0.4, seed=3)
    assert [int((labels[val] == c).sum()) for c in range(3)] == [10, 6, 4]
    assert [int((labels[test] == c).sum()) for c in range(3)] == [20, 12, 8]
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(100))
    assert torch.equal(stratified_split(labels, 0.2, 0.4, seed=3)[1], val)
    assert not torch.equal(stratified_split(labels, 0.2, 0.4, seed=4)[1], val)


def test_generated_tree_is_a_tree_with_labels_inherited_from_the_root_subtrees():
    source = generate_tree(num_nodes=300, num_classes=5, num_features=10, signal=0.3, seed=7)
    edges = source.edge_index
    assert edges.shape[1] == 2 * 299  # undirected, n - 1 edges
    reached, frontier = {0}, [0]
    while frontier:  # connected from the root
        node = frontier.pop()
        for nxt in edges[1][edges[0] == node].tolist():
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert len(reached) == 300
    assert source.y[1:6].tolist() == [0, 1, 2, 3, 4]  # the root's children found the classes
    child, parent = edges[:, edges[0] > edges[1]]
    inherited = (child > 5)  # below depth 1 every node has its parent's class
    assert torch.equal(source.y[child[inherited]], source.y[parent[inherited]])
    assert (source.x >= 0).all()
    assert torch.equal(generate_tree(300, 5, 10, 0.3, seed=7).x, source.x)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"dataset": "cora"}, ValueError, "dataset 'cora' needs root"),
    ({"dataset": "ogbn"}, ValueError, r"dataset must be one of \('tree', 'cora'"),
    ({"split": "paper"}, ValueError, "split='paper' has no meaning for the generated tree"),
    ({"split": "random"}, ValueError, r"split must be one of \('paper', 'stratified'\)"),
    ({"dataset": "cora", "root": "/no/such/folder"}, FileNotFoundError, "/no/such/folder/Cora/raw/ind.cora.x"),
    ({"val_fraction": 1.5}, ValueError, r"val_fraction must be in \(0, 1\)"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        GraphDataModule(**kwargs)


@pytest.mark.parametrize(("name", "message"), [
    ("disease_nc.edges.csv", r"disease_nc\.edges\.csv' is not UTF-8 text \(byte 0, line 1: invalid start byte\)"),
    ("disease_nc.labels.npy", r"disease_nc\.labels\.npy' is truncated or not a \.npy file \(ValueError: it is no "
                              r"NumPy array file, and loading it would mean unpickling it\)"),
])
def test_damaged_disease_file_is_one_error_naming_it(tmp_path, name, message):
    shutil.copytree(HGCN / "disease_nc", tmp_path / "disease_nc")
    (tmp_path / "disease_nc" / name).write_bytes(b"\xff\xd8\xff\xe0 a JPEG, say" + bytes(range(256)))
    data = GraphDataModule(dataset="disease", root=str(tmp_path), features="identity")
    with pytest.raises(ValueError, match=message) as error:
        data.setup()
    assert "\n" not in str(error.value)
