"""Image data: the embedded MNIST digits and their seeded stratified split, tiny generated MNIST / Fashion-MNIST /
CIFAR-10 / CIFAR-100 folders read through torchvision's own readers, an ImageFolder tree, errors naming the
missing files, and augmentation of training images only."""

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lr_lightning.data import ImageDataModule
from lr_lightning.data.images import NORMALIZATION, embedded_mnist, stratified_split


def _pixels(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """Undo the normalization: pixel values 0..255 (as float, rounded)."""
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in NORMALIZATION[dataset])
    return ((x * std + mean) * 255).round()


def _split_sets(data: ImageDataModule) -> list[set[int]]:
    return [set(data.datasets[split].indices.tolist()) for split in ("train", "val", "test")]


# --------------------------------------------------------------------------------------------- generators
def write_cifar(root: Path, dataset: str, train_labels: list[int], test_labels: list[int], seed: int = 0) -> dict:
    """torchvision's pickled layout: ``data`` uint8 [n, 3072] (channel-major), ``labels`` (``fine_labels`` for
    CIFAR-100), and the meta file; CIFAR-10's training images spread over the five ``data_batch_*``."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (len(train_labels), 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (len(test_labels), 3072), dtype=np.uint8)
    if dataset == "cifar10":
        folder, key, meta = root / "cifar-10-batches-py", "labels", ("batches.meta", "label_names", 10)
        chunks = np.array_split(np.arange(len(train_labels)), 5)
        batches = {f"data_batch_{i + 1}": chunk for i, chunk in enumerate(chunks)}
        test_name = "test_batch"
    else:
        folder, key, meta = root / "cifar-100-python", "fine_labels", ("meta", "fine_label_names", 100)
        batches, test_name = {"train": np.arange(len(train_labels))}, "test"
    folder.mkdir(parents=True)
    for name, ids in batches.items():
        entry = {"data": train[ids], key: [train_labels[i] for i in ids]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / test_name).write_bytes(pickle.dumps({"data": test, key: test_labels}))
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"class{i}" for i in range(meta[2])]}))
    return {"train": train, "test": test}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file: magic ``0x0000 08 ndim`` (unsigned bytes), the dimensions as big-endian uint32, the data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train: int, n_test: int) -> dict:
    rng = np.random.default_rng(1)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        data[split] = (images, labels)
    return data


@pytest.fixture
def cifar10_root(tmp_path) -> tuple[Path, dict]:
    written = write_cifar(tmp_path, "cifar10", [i % 10 for i in range(20)], [3, 1, 4, 1, 5, 9])
    return tmp_path, written


# --------------------------------------------------------------------------------------------- embedded
def test_embedded_mnist_default_is_5000_real_digits_in_a_seeded_stratified_split():
    data = ImageDataModule()
    data.setup("fit")
    assert (data.num_classes, data.in_channels, data.image_size, data.labels_found) == (10, 1, 28, 10)
    train, val, test = _split_sets(data)
    assert (len(train), len(val), len(test)) == (4000, 500, 500)
    assert not (train & val or train & test or val & test) and len(train | val | test) == 5000
    images, labels = embedded_mnist()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    assert np.bincount(labels[sorted(val)]).tolist() == [50] * 10  # stratified: exactly 10% of every class
    x, y = data.datasets["test"][0]
    index = int(data.datasets["test"].indices[0])
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[index]
    assert torch.equal(_pixels(x, "mnist")[0], torch.tensor(images[index], dtype=torch.float32))
    assert ImageDataModule(seed=0).datasets == {}  # nothing is read before setup
    again, other = ImageDataModule(seed=0), ImageDataModule(seed=1)
    again.setup()
    other.setup()
    assert _split_sets(again) == [train, val, test]
    assert _split_sets(other)[1] != val
    batch_x, batch_y = next(iter(ImageDataModule(batch_size=8).train_dataloader()))
    assert batch_x.shape == (8, 1, 28, 28) and batch_y.dtype == torch.long
    loaders = ImageDataModule(batch_size=64)
    assert len(loaders.train_dataloader()) == math.ceil(4000 / 64)  # every training image, the last batch partial
    assert [len(y) for _, y in loaders.val_dataloader()] == [64] * 7 + [500 - 7 * 64]


def test_digits_are_never_augmented():
    data = ImageDataModule(augment=True)
    data.setup()
    x1, _ = data.datasets["train"][0]
    x2, _ = data.datasets["train"][0]
    assert torch.equal(x1, x2)


def test_stratified_split_sizes_and_small_pools():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    rest, val, test = stratified_split(labels, (0.1, 0.1), seed=0)
    assert (len(rest), len(val), len(test)) == (8, 1, 1)  # at least one item per held-out part
    assert sorted(torch.cat([rest, val, test]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="too few"):
        stratified_split(torch.tensor([0, 1]), (0.1, 0.1), seed=0)


# --------------------------------------------------------------------------------------------- torchvision formats
def test_generated_cifar10_folder_loads_through_torchvisions_reader(cifar10_root):
    root, written = cifar10_root
    data = ImageDataModule("cifar10", root=str(root), batch_size=4, val_fraction=0.25, augment=False)
    data.setup("fit")
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    train, val, test = _split_sets(data)
    assert (len(train), len(val), len(test)) == (15, 5, 6) and not train & val
    assert [data.datasets["test"][i][1] for i in range(6)] == [3, 1, 4, 1, 5, 9]
    x, _ = data.datasets["test"][2]
    expected = torch.tensor(written["test"][2].reshape(3, 32, 32), dtype=torch.float32)
    assert x.shape == (3, 32, 32) and torch.equal(_pixels(x, "cifar10"), expected)
    index = int(data.datasets["train"].indices[0])
    x, y = data.datasets["train"][0]
    expected = torch.tensor(written["train"][index].reshape(3, 32, 32), dtype=torch.float32)
    assert y == index % 10 and torch.equal(_pixels(x, "cifar10"), expected)
    assert data.labels_found == max(index % 10 for index in train) + 1
    batch_x, batch_y = next(iter(data.test_dataloader()))
    assert batch_x.shape == (4, 3, 32, 32) and batch_y.tolist() == [3, 1, 4, 1]


def test_generated_cifar100_folder_loads_fine_labels(tmp_path):
    write_cifar(tmp_path, "cifar100", [99, 5, 42, 7, 0, 13, 64, 88, 21, 30], [99, 0, 50])
    data = ImageDataModule("cifar100", root=str(tmp_path), val_fraction=0.2)
    assert (data.num_classes, data.in_channels, data.image_size) == (100, 3, 32)
    assert [data.datasets["test"][i][1] for i in range(3)] == [99, 0, 50]
    assert len(data.datasets["train"]) == 8 and len(data.datasets["val"]) == 2


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_generated_idx_files_load_through_torchvisions_reader(tmp_path, dataset, folder):
    written = write_mnist(tmp_path, folder, n_train=10, n_test=5)
    assert not (tmp_path / folder / "processed").exists()  # torchvision reads raw/ directly
    data = ImageDataModule(dataset, root=str(tmp_path), val_fraction=0.2, batch_size=5)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert (len(data.datasets["train"]), len(data.datasets["val"]), len(data.datasets["test"])) == (8, 2, 5)
    images, labels = written["t10k"]
    for i in range(5):
        x, y = data.datasets["test"][i]
        assert y == labels[i] and torch.equal(_pixels(x, dataset)[0], torch.tensor(images[i], dtype=torch.float32))
    index = int(data.datasets["train"].indices[3])
    x, y = data.datasets["train"][3]
    assert y == written["train"][1][index]
    assert torch.equal(_pixels(x, dataset)[0], torch.tensor(written["train"][0][index], dtype=torch.float32))


def test_image_folder_tree_loads_resized_to_the_first_images_size(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cat")):
        (tmp_path / name).mkdir()
        for i in range(4):
            size = (16, 10) if (c, i) == (2, 3) else (12, 12)  # one image of another size and aspect ratio
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = ImageDataModule("folder", root=str(tmp_path), val_fraction=0.2, batch_size=12)
    assert (data.num_classes, data.in_channels, data.image_size, data.labels_found) == (3, 3, 12, 3)
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert all(x.shape == (3, 12, 12) for split in data.datasets.values() for x, _ in split)
    labels = sorted(y for split in data.datasets.values() for _, y in split)
    assert labels == [0] * 4 + [1] * 4 + [2] * 4


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("dataset", "expected"), [
    ("mnist", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]),
    ("fashion_mnist", ["FashionMNIST/raw/train-images-idx3-ubyte", "FashionMNIST/raw/t10k-images-idx3-ubyte"]),
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/data_batch_5",
                 "cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"]),
    ("cifar100", ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"]),
])
def test_missing_files_raise_before_training_naming_root_and_files(tmp_path, dataset, expected):
    with pytest.raises(FileNotFoundError) as info:
        ImageDataModule(dataset, root=str(tmp_path / "data"))
    message = str(info.value)
    assert f"root={str(tmp_path / 'data')!r}" in message and "download" in message
    for name in expected:
        assert name in message


def test_incomplete_cifar10_folder_names_only_the_missing_files(cifar10_root):
    root, _ = cifar10_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as info:
        ImageDataModule("cifar10", root=str(root))
    assert "data_batch_2" not in str(info.value)


def test_damaged_cifar_file_is_a_value_error_naming_the_dataset(cifar10_root):
    root, _ = cifar10_root
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    data = ImageDataModule("cifar10", root=str(root))
    with pytest.raises(ValueError, match="dataset 'cifar10' under root=.* cannot be read"):
        data.setup()


def test_missing_image_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="<root>/<class>/<image>"):
        ImageDataModule("folder", root=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dataset": "imagenet"}, r"dataset must be one of \('embedded_mnist', 'mnist'"),
    ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
    ({"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\)"),
    ({"val_fraction": 0.5}, r"val_fraction must be in \(0, 0.5\)"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"dataset": "cifar10"}, "root is required for dataset 'cifar10'"),
    ({"dataset": "folder"}, "root is required for dataset 'folder'"),
])
def test_bad_arguments_raise_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(**kwargs)


# --------------------------------------------------------------------------------------------- augmentation
def test_augmentation_changes_training_images_only(cifar10_root):
    root, _ = cifar10_root
    torch.manual_seed(0)
    data = ImageDataModule("cifar10", root=str(root), val_fraction=0.25, augment=True)
    data.setup()
    train = data.datasets["train"]
    plain = train.base[int(train.indices[0])][0]
    reference = data.datasets["val"].transform(plain)
    draws = [train[0][0] for _ in range(5)]
    assert all(x.shape == (3, 32, 32) for x in draws)
    assert any(not torch.equal(x, reference) for x in draws)
    for split in ("val", "test"):
        dataset = data.datasets[split]
        assert torch.equal(dataset[0][0], dataset[0][0])
        assert torch.equal(dataset[0][0], dataset.transform(dataset.base[int(dataset.indices[0])][0]))
    unaugmented = ImageDataModule("cifar10", root=str(root), val_fraction=0.25, augment=False)
    unaugmented.setup()
    assert torch.equal(unaugmented.datasets["train"][0][0], reference)
