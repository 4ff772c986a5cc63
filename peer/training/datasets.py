"""Image-classification data sets as normalized tensors, read from local files only.

Every node of a run loads the same Dataset and then keeps only its partition (partitions.py), so
loading must be deterministic and seed-free. Nothing here touches the network: `digits` ships
inside scikit-learn, and the others are read from a directory the user names with --data-dir,
because the machines crossgrad runs on may have no internet. Benchmarks and tests that want a
real data set without being told where look in data_home (CROSSGRAD_DATA).

Each data file may be stored plain (NAME), gzipped (NAME.gz) or as gzip pieces NAME.gz.part00,
NAME.gz.part01, ... (how the offline copies keep files under 4 MiB). When several variants exist
the first of plain, .gz, parts wins. Pieces are concatenated in numeric order and decompressed as
one stream, which accepts both separate gzip members per piece and one gzip file cut into bytes.

Pixels are turned into float32 once, in place (MNIST train: 47 MB uint8 -> 188 MB float32), with
the same float32 arithmetic as torchvision's ToTensor + Normalize: (x / 255 - mean) / std.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crossgrad.errors import DataError, UnknownNameError


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split, already normalized, shared read-only by every node of a run.

    eq=False: tensors have no truth value, so equality is identity; compare fields explicitly.
    """

    name: str
    train_x: torch.Tensor  # (N, C, H, W) float32, normalized
    train_y: torch.Tensor  # (N,) int64 in 0..num_classes-1
    test_x: torch.Tensor  # (M, C, H, W) float32, normalized with the train statistics
    test_y: torch.Tensor  # (M,) int64
    num_classes: int
    classes: tuple[str, ...]  # class names, index = label

    def __post_init__(self) -> None:
        # Catch a loader bug here rather than as a shape error deep inside a training round.
        splits = (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y))
        for part, x, y in splits:
            if x.dtype != torch.float32 or x.dim() != 4:
                raise DataError(f"{self.name} {part}_x: expected float32 (N, C, H, W), "
                                f"got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DataError(f"{self.name} {part}_y: expected int64 ({x.shape[0]},), "
                                f"got {y.dtype} {tuple(y.shape)}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(f"{self.name}: train images {tuple(self.train_x.shape[1:])} and test "
                            f"images {tuple(self.test_x.shape[1:])} differ in shape")
        if len(self.classes) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.classes)} class names for "
                            f"{self.num_classes} classes")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image: what a model's first layer must accept."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


Loader = Callable[[Path | None], Dataset]

_PART_RE = re.compile(r"\.gz\.part(\d+)$")
_VARIANTS = "each may be NAME, NAME.gz, or gzip parts NAME.gz.part00, NAME.gz.part01, ..."


def locate(directory: Path, name: str) -> list[Path] | None:
    """The files holding NAME in directory (plain, .gz, or .gz parts in order); None if absent."""
    plain, gz = directory / name, directory / f"{name}.gz"
    if plain.is_file():
        return [plain]
    if gz.is_file():
        return [gz]
    numbered = []
    for path in directory.glob(f"{name}.gz.part*"):
        match = _PART_RE.search(path.name)
        if match and path.name[: match.start()] == name and path.is_file():
            numbered.append((int(match.group(1)), path))
    if not numbered:
        return None
    numbered.sort()
    numbers = [n for n, _ in numbered]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise DataError(f"{directory / name}.gz.part*: parts {numbers} found, part(s) {missing} "
                        f"missing; parts must be numbered 00, 01, ... without gaps")
    return [p for _, p in numbered]


def describe(paths: Sequence[Path]) -> str:
    """A short name for error messages: the file, or first..last part."""
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0]}..{paths[-1].name.rsplit('.', 1)[-1]}"


def read_bytes(paths: Sequence[Path]) -> bytes:
    """The decompressed contents of a located file (see locate)."""
    source = describe(paths)
    try:
        raw = b"".join(p.read_bytes() for p in paths)
    except OSError as exc:
        raise DataError(f"{source}: cannot read ({exc})") from exc
    if not (paths[0].name.endswith(".gz") or _PART_RE.search(paths[0].name)):
        return raw  # the plain variant
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: not valid gzip data ({exc})") from exc


def parse_idx(raw: bytes, source: str, magic: int) -> np.ndarray:
    """An IDX ubyte array (big-endian header: magic, then one uint32 per dimension)."""
    ndim = magic & 0xFF  # 2049 = 0x801 -> 1 dim (labels); 2051 = 0x803 -> 3 dims (images)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: {len(raw)} bytes, shorter than the {header}-byte IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = {2049: "labels", 2051: "images"}.get(magic, "IDX")
        raise DataError(f"{source}: magic number {found}, expected {magic} (IDX {kind}); "
                        f"is this the right file?")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "trailing bytes"
        raise DataError(f"{source}: header says shape {dims} = {expected} bytes, file has "
                        f"{len(raw)} ({what}); re-download or re-assemble it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _require_dir(dataset: str, data_dir: Path | None, expected: Sequence[str]) -> Path:
    names = ", ".join(expected)
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} is read from files: pass --data-dir DIR, a directory "
                        f"holding {names} ({_VARIANTS})")
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} for dataset {dataset!r} does not exist or is "
                        f"not a directory; pass --data-dir DIR holding {names}")
    return data_dir


def _missing_error(dataset: str, directory: Path, expected: Sequence[str],
                   missing: Sequence[str]) -> DataError:
    present = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") or "nothing"
    return DataError(f"dataset {dataset!r}: missing {', '.join(missing)} in {directory}; expected "
                     f"files: {', '.join(expected)} ({_VARIANTS}); the directory holds: {shown}; "
                     f"pass --data-dir DIR pointing at the right directory")


def _normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean_c) / std_c, one copy, then in place."""
    x = pixels.astype(np.float32)  # (N, C, H, W), the only full-size copy
    shape = (1, len(mean), 1, 1)
    x /= np.float32(255)
    x -= np.asarray(mean, dtype=np.float32).reshape(shape)
    x /= np.asarray(std, dtype=np.float32).reshape(shape)
    return torch.from_numpy(x)


def _labels(values: np.ndarray, source: str, num_classes: int) -> torch.Tensor:
    if values.size and int(values.max()) >= num_classes:
        bad = int(np.argmax(values >= num_classes))
        raise DataError(f"{source}: label {int(values[bad])} at index {bad}, expected "
                        f"0..{num_classes - 1}")
    return torch.from_numpy(values.astype(np.int64))  # (N,)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _load_idx(name: str, data_dir: Path | None, mean: float, std: float,
              classes: tuple[str, ...]) -> Dataset:
    """MNIST-format data: four IDX files, 28x28 grayscale, labels 0..9."""
    directory = _require_dir(name, data_dir, _IDX_FILES)
    located = {f: locate(directory, f) for f in _IDX_FILES}
    missing = [f for f, paths in located.items() if paths is None]
    if missing:
        raise _missing_error(name, directory, _IDX_FILES, missing)
    splits: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images_file, labels_file in (_IDX_FILES[:2], _IDX_FILES[2:]):
        image_paths, label_paths = located[images_file], located[labels_file]
        assert image_paths is not None and label_paths is not None
        image_src, label_src = describe(image_paths), describe(label_paths)
        images = parse_idx(read_bytes(image_paths), image_src, 2051)  # (N, H, W) uint8
        labels = parse_idx(read_bytes(label_paths), label_src, 2049)  # (N,) uint8
        if images.shape[1:] != (28, 28):
            raise DataError(f"{image_src}: images are {images.shape[1]}x{images.shape[2]}, "
                            f"{name} needs 28x28")
        if len(images) != len(labels):
            raise DataError(f"{image_src} holds {len(images)} images but {label_src} holds "
                            f"{len(labels)} labels; the counts must be equal")
        x = _normalize(images[:, None], (mean,), (std,))  # (N, 1, 28, 28)
        splits.append((x, _labels(labels, label_src, len(classes))))
    (train_x, train_y), (test_x, test_y) = splits
    return Dataset(name, train_x, train_y, test_x, test_y, len(classes), classes)


_CIFAR_ROW = 1 + 3 * 32 * 32  # label byte + R, G, B planes of 32x32 (CHW)
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                  "dog", "frog", "horse", "ship", "truck")


def parse_cifar(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary rows -> (pixels (N, 3, 32, 32) uint8, labels (N,) uint8)."""
    if not raw or len(raw) % _CIFAR_ROW:
        raise DataError(f"{source}: {len(raw)} bytes is not a positive multiple of the "
                        f"{_CIFAR_ROW}-byte CIFAR-10 row (1 label + 3072 pixels); truncated?")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_ROW)  # (N, 3073)
    labels = rows[:, 0]  # (N,)
    if int(labels.max()) >= len(_CIFAR_CLASSES):
        bad = int(np.argmax(labels >= len(_CIFAR_CLASSES)))
        raise DataError(f"{source}: label {int(labels[bad])} in row {bad}, expected 0..9; "
                        f"is this the CIFAR-10 binary version (not CIFAR-100)?")
    return rows[:, 1:].reshape(-1, 3, 32, 32), labels  # (N, 3, 32, 32)


def _load_cifar10(data_dir: Path | None) -> Dataset:
    """CIFAR-10 binary version: any of data_batch_1..5.bin (at least one) and test_batch.bin."""
    expected = (*_CIFAR_TRAIN, _CIFAR_TEST)
    directory = _require_dir("cifar10", data_dir, expected)
    train_located = [p for p in (locate(directory, f) for f in _CIFAR_TRAIN) if p is not None]
    test_located = locate(directory, _CIFAR_TEST)
    missing = ([] if train_located else ["any of " + "/".join(_CIFAR_TRAIN)]) + (
        [_CIFAR_TEST] if test_located is None else [])
    if missing or test_located is None:
        raise _missing_error("cifar10", directory, expected, missing)
    train = [parse_cifar(read_bytes(p), describe(p)) for p in train_located]
    test_pixels, test_labels = parse_cifar(read_bytes(test_located), describe(test_located))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    train_x = _normalize(np.concatenate([x for x, _ in train]), mean, std)  # (N, 3, 32, 32)
    train_y = torch.from_numpy(np.concatenate([y for _, y in train]).astype(np.int64))  # (N,)
    test_x = _normalize(test_pixels, mean, std)  # (M, 3, 32, 32)
    test_y = torch.from_numpy(test_labels.astype(np.int64))  # (M,)
    return Dataset("cifar10", train_x, train_y, test_x, test_y, 10, _CIFAR_CLASSES)


def _load_digits(data_dir: Path | None) -> Dataset:
    """scikit-learn's embedded 8x8 digits (1797 images), for tests and quick runs offline.

    Split, independent of any seed: for each class, the first 80% of its samples in the original
    order (floor(4 n_c / 5)) are train, the rest test; both keep the original order. Pixels 0..16
    are scaled to [0, 1], then standardized with the train set's scalar mean and std.
    data_dir is ignored.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import costs ~1 s

    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8) / 16.0  # (1797,1,8,8)
    labels = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    is_train = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        is_train[members[: (4 * len(members)) // 5]] = True
    mean, std = pixels[is_train].mean(), pixels[is_train].std()
    x = torch.from_numpy(((pixels - mean) / std).astype(np.float32))  # (1797, 1, 8, 8)
    y = torch.from_numpy(labels)
    train, test = torch.from_numpy(is_train), torch.from_numpy(~is_train)
    classes = tuple(str(c) for c in range(10))
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, classes)


_MNIST_CLASSES = tuple(str(c) for c in range(10))
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

DATASETS: dict[str, Loader] = {
    "digits": _load_digits,
    "mnist": lambda d: _load_idx("mnist", d, 0.1307, 0.3081, _MNIST_CLASSES),
    "fashion-mnist": lambda d: _load_idx("fashion-mnist", d, 0.2860, 0.3530, _FASHION_CLASSES),
    "cifar10": _load_cifar10,
}


DATA_ENV = "CROSSGRAD_DATA"


def data_home(name: str) -> Path:
    """Where benchmarks and tests look for data set `name` when not given a directory:
    $CROSSGRAD_DATA/NAME (a directory holding one folder per data set), else data/NAME under the
    working directory, as the configs in examples/ say. A run itself reads only --data-dir."""
    return Path(os.environ.get(DATA_ENV) or "data") / name


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a registered data set; data_dir is the directory holding its files (not digits)."""
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, DATASETS)
    return DATASETS[name](None if data_dir is None else Path(data_dir))
