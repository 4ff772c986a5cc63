"""Data loading: IDX and CIFAR readers on files written here, digits, and the real MNIST copy."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from crossgrad.errors import DataError, UnknownNameError
from peer.training.datasets import DATASETS, Dataset, data_home, load_dataset, parse_idx

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX ubyte file: magic 0x08 << 8 | ndim, one big-endian uint32 per dim, then the data."""
    magic = (0x08 << 8) | array.ndim
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))
    return header + array.astype(np.uint8).tobytes()


def write(directory: Path, name: str, raw: bytes, variant: str) -> None:
    """Store raw as NAME, NAME.gz, NAME.gz.partNN (one gzip member per part) or cut gzip bytes."""
    if variant == "plain":
        (directory / name).write_bytes(raw)
    elif variant == "gz":
        (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
    elif variant == "parts":  # as offline copies store MNIST train images: a gzip member per part
        cuts = [0, 16, (16 + len(raw)) // 2, len(raw)]  # part00 = header (+ a little)
        for i in range(3):
            member = gzip.compress(raw[cuts[i] : cuts[i + 1]], mtime=0)
            (directory / f"{name}.gz.part{i:02d}").write_bytes(member)
    elif variant == "cut":  # one gzip stream cut into byte ranges, as `split -b` would
        packed = gzip.compress(raw)
        half = len(packed) // 2
        (directory / f"{name}.gz.part00").write_bytes(packed[:half])
        (directory / f"{name}.gz.part01").write_bytes(packed[half:])
    else:
        raise AssertionError(variant)


def make_mnist(directory: Path, variant: str = "plain", n_train: int = 30, n_test: int = 10
               ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: np.arange(n_train, dtype=np.uint8) % 10,
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    arrays[IDX_FILES[0]][0, 0, :2] = (0, 255)
    for name, array in arrays.items():
        write(directory, name, idx_bytes(array), variant)
    return arrays


@pytest.mark.parametrize("variant", ["plain", "gz", "parts", "cut"])
def test_mnist_reads_every_file_variant(tmp_path: Path, variant: str) -> None:
    arrays = make_mnist(tmp_path, variant)
    data = load_dataset("mnist", str(tmp_path))
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (10, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10 and len(data.classes) == 10
    np.testing.assert_array_equal(data.train_y.numpy(), arrays[IDX_FILES[1]])
    np.testing.assert_array_equal(data.test_y.numpy(), arrays[IDX_FILES[3]])
    expected = (arrays[IDX_FILES[2]].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(data.test_x[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert data.train_x[0, 0, 0, 0].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert data.train_x[0, 0, 0, 1].item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)


def test_fashion_mnist_uses_its_own_statistics_and_names(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path, "gz")
    data = load_dataset("fashion-mnist", tmp_path)
    expected = (arrays[IDX_FILES[0]].astype(np.float32) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(data.train_x[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


def test_missing_files_name_directory_every_file_and_flag(tmp_path: Path) -> None:
    write(tmp_path, IDX_FILES[1], idx_bytes(np.zeros(3, np.uint8)), "gz")
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "--data-dir" in message
    assert all(name in message for name in IDX_FILES)
    assert ".gz.part00" in message and "NAME.gz" in message
    assert "missing train-images-idx3-ubyte, t10k-images-idx3-ubyte, t10k-labels" in message


def test_no_data_dir_or_absent_dir_asks_for_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match=r"does not exist.*--data-dir"):
        load_dataset("cifar10", tmp_path / "nowhere")


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        load_dataset("imagenet")
    assert "imagenet" in str(err.value)
    for name in ("cifar10", "digits", "fashion-mnist", "mnist"):
        assert name in str(err.value)
    assert set(DATASETS) == {"digits", "mnist", "fashion-mnist", "cifar10"}


def test_parse_idx_reads_any_shape_and_rejects_bad_magic_and_truncation() -> None:
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    np.testing.assert_array_equal(parse_idx(idx_bytes(array), "x", 2051), array)
    with pytest.raises(DataError, match=r"x: magic number 2051, expected 2049 \(IDX labels\)"):
        parse_idx(idx_bytes(array), "x", 2049)
    with pytest.raises(DataError, match="truncated"):
        parse_idx(idx_bytes(array)[:-1], "x", 2051)
    with pytest.raises(DataError, match="trailing"):
        parse_idx(idx_bytes(array) + b"\0", "x", 2051)
    with pytest.raises(DataError, match="shorter than the 16-byte IDX header"):
        parse_idx(b"\0\0\x08", "x", 2051)


@pytest.mark.parametrize(("file", "corrupt", "expected"), [
    (IDX_FILES[0], lambda raw: b"\0\0\x08\x01" + raw[4:], "magic number 2049, expected 2051"),
    (IDX_FILES[3], lambda raw: raw[:-3], "truncated"),
    (IDX_FILES[1], lambda raw: idx_bytes(np.zeros(29, np.uint8)), "30 images but .* 29 labels"),
    (IDX_FILES[3], lambda raw: raw[:-1] + b"\x0a", "label 10 at index 9, expected 0..9"),
    (IDX_FILES[2], lambda raw: idx_bytes(np.zeros((10, 28, 27), np.uint8)), "28x27, mnist needs"),
])
def test_malformed_mnist_file_is_named(tmp_path: Path, file: str,
                                       corrupt: Callable[[bytes], bytes], expected: str) -> None:
    make_mnist(tmp_path)
    path = tmp_path / file
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError, match=expected) as err:
        load_dataset("mnist", tmp_path)
    assert file in str(err.value)


def test_bad_gzip_and_gaps_between_parts_are_data_errors(tmp_path: Path) -> None:
    make_mnist(tmp_path, "parts")
    (tmp_path / f"{IDX_FILES[0]}.gz.part01").unlink()
    with pytest.raises(DataError, match=r"parts \[0, 2\] found, part\(s\) \[1\] missing"):
        load_dataset("mnist", tmp_path)
    (tmp_path / f"{IDX_FILES[0]}.gz.part01").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"part00\.\.part02: not valid gzip data"):
        load_dataset("mnist", tmp_path)


CIFAR_ROW = 3073


def cifar_rows(labels: list[int], fill: int = 0) -> bytes:
    rows = np.full((len(labels), CIFAR_ROW), fill, dtype=np.uint8)
    rows[:, 0] = labels
    rows[:, 1 : 1 + 1024] = 255  # red plane saturated, green and blue = fill
    return rows.tobytes()


def test_cifar10_reads_existing_batches_and_normalizes_per_channel(tmp_path: Path) -> None:
    write(tmp_path, "data_batch_1.bin", cifar_rows([6, 9, 9]), "plain")
    write(tmp_path, "data_batch_3.bin", cifar_rows([4, 1]), "gz")
    write(tmp_path, "test_batch.bin", cifar_rows([3, 8, 0, 2], fill=128), "parts")
    data = load_dataset("cifar10", tmp_path)
    assert data.train_x.shape == (5, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.input_shape == (3, 32, 32) and data.classes[0] == "airplane"
    assert data.train_y.tolist() == [6, 9, 9, 4, 1] and data.test_y.tolist() == [3, 8, 0, 2]
    assert torch.allclose(data.train_x[:, 0], torch.tensor((1 - 0.4914) / 0.2470))
    assert torch.allclose(data.train_x[:, 1], torch.tensor(-0.4822 / 0.2435))
    assert torch.allclose(data.test_x[:, 2], torch.tensor((128 / 255 - 0.4465) / 0.2616))


def test_cifar10_malformed_and_missing(tmp_path: Path) -> None:
    write(tmp_path, "data_batch_2.bin", cifar_rows([1, 2])[:-5], "plain")
    write(tmp_path, "test_batch.bin", cifar_rows([1]), "plain")
    with pytest.raises(DataError, match=r"data_batch_2\.bin: 6141 bytes is not a positive"):
        load_dataset("cifar10", tmp_path)
    write(tmp_path, "data_batch_2.bin", cifar_rows([1, 12]), "plain")
    with pytest.raises(DataError, match=r"label 12 in row 1, expected 0\.\.9"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    assert "missing test_batch.bin" in str(err.value) and "data_batch_5.bin" in str(err.value)


def test_digits_split_is_first_80_percent_of_each_class() -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    data = load_dataset("digits", "/ignored")
    assert data.train_x.shape == (1433, 1, 8, 8) and data.test_x.shape == (364, 1, 8, 8)
    assert data.input_shape == (1, 8, 8) and data.classes == tuple("0123456789")
    is_train = np.zeros(len(target), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(target == c)
        is_train[members[: 4 * len(members) // 5]] = True
    np.testing.assert_array_equal(data.train_y.numpy(), target[is_train])
    np.testing.assert_array_equal(data.test_y.numpy(), target[~is_train])
    assert abs(data.train_x.mean().item()) < 1e-5 and data.train_x.std().item() == pytest.approx(
        1.0, abs=1e-3)
    again = load_dataset("digits")
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_x, data.test_x)


def test_dataset_rejects_inconsistent_tensors() -> None:
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(DataError, match="expected int64"):
        Dataset("t", x, y[:3], x, y, 10, tuple("0123456789"))
    with pytest.raises(DataError, match="2 class names for 10 classes"):
        Dataset("t", x, y, x, y, 10, ("a", "b"))
    assert "train=4" in repr(Dataset("t", x, y, x, y, 1, ("a",)))




def test_real_mnist_loads_with_readme_class_counts() -> None:
    directory = data_home("mnist")
    if not directory.is_dir():
        pytest.skip(f"real MNIST not found at {directory}; set CROSSGRAD_DATA")
    data = load_dataset("mnist", directory)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [5923, 6742, 5958, 6131, 5842,
                                                     5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(data.test_y).tolist() == [980, 1135, 1032, 1010, 982,
                                                    892, 958, 1028, 974, 1009]
    mean_pixel = (data.train_x.double().mean().item() * 0.3081 + 0.1307) * 255
    assert mean_pixel == pytest.approx(33.3184, abs=1e-3)  # the README's mean train pixel


def test_real_fashion_mnist_copy_lacks_images() -> None:
    directory = data_home("fashion-mnist")
    if not directory.is_dir():
        pytest.skip(f"shared fashion-mnist labels not found at {directory}")
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte, t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", directory)
