"""Tests of simulations.data: checksums, loaders, tokenizer, partitions, torch datasets."""

from __future__ import annotations

import io
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from harness import needs_real_data
from simulations import data as D
from simulations.config import compose
from simulations.federation import build_workload

REAL_DATA = D.default_data_dir()


# --------------------------------------------------------------------------------------
# Locations and checksums
# --------------------------------------------------------------------------------------


def test_default_data_dir_env_and_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MERGENET_DATA_DIR", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    monkeypatch.delenv("MERGENET_DATA_DIR")
    project_root = Path(D.__file__).resolve().parent.parent
    assert D.default_data_dir() == project_root.parent / "shared" / "data"


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MERGENET_CACHE_DIR", str(tmp_path))
    assert D.default_cache_dir() == tmp_path
    monkeypatch.delenv("MERGENET_CACHE_DIR")
    assert D.default_cache_dir() == Path.home() / ".cache" / "mergenet-fl"


@needs_real_data
def test_known_files_match_sha256sums():
    listed = {}
    for line in (REAL_DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    assert dict(D.KNOWN_FILES) == listed


@needs_real_data
def test_verify_returns_digest_of_good_file():
    assert D.verify(REAL_DATA / "agnews" / "classes.txt") == D.KNOWN_FILES["agnews/classes.txt"]


@needs_real_data
def test_checksum_mismatch_names_file_and_both_digests(tmp_path: Path):
    (tmp_path / "sst2").mkdir()
    copy = tmp_path / "sst2" / "dev.tsv"
    shutil.copyfile(REAL_DATA / "sst2" / "dev.tsv", copy)
    copy.write_bytes(copy.read_bytes() + b"x\t1\n")  # altered copy, never the shared one
    with pytest.raises(D.DataFileError) as info:
        D.load_text_classification("sst2", "test", data_dir=tmp_path)
    message = str(info.value)
    assert str(copy) in message
    assert D.KNOWN_FILES["sst2/dev.tsv"] in message
    assert D._sha256(copy) in message
    assert "MERGENET_DATA_DIR" in message
    assert isinstance(info.value, ValueError)


def test_missing_file_names_path_and_remedy(tmp_path: Path):
    with pytest.raises(D.DataFileError) as info:
        D.load_squad2("train", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "squad2" / "dev-v2.0.cs224n.json") in message
    assert "MERGENET_DATA_DIR" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_file_uses_env_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("MERGENET_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        D.build_tokenizer()


def test_verify_rejects_unknown_file(tmp_path: Path):
    path = tmp_path / "unknown.bin"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="no known sha256"):
        D.verify(path)
    # An explicit expected digest works for any file.
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert D.verify(path, digest) == digest


# --------------------------------------------------------------------------------------
# Tokenizer and text loaders
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    if not (REAL_DATA / "bert-base-uncased" / "vocab.txt").is_file():
        pytest.skip(f"vocab.txt not found under {REAL_DATA}")
    return D.build_tokenizer()


def test_tokenizer_ids_for_hello_world(tokenizer):
    assert tokenizer("Hello world!")["input_ids"] == [101, 7592, 2088, 999, 102]
    assert len(tokenizer) == 30522


@needs_real_data
def test_sst2_splits():
    train = D.load_text_classification("sst2", "train")
    test = D.load_text_classification("sst2", "test")
    assert (len(train.texts), len(test.texts)) == (67349, 872)
    assert train.num_classes == test.num_classes == 2
    assert set(test.labels) == {0, 1}
    assert train.texts[0] == "hide new secretions from the parental units"
    texts, labels, num_classes = test  # unpacks as a 3-tuple
    assert len(texts) == len(labels) and num_classes == 2


@needs_real_data
def test_imdb_test_split_strips_html_breaks():
    texts, labels, num_classes = D.load_text_classification("imdb", "test")
    assert len(texts) == len(labels) == 24999
    assert num_classes == 2 and set(labels) == {0, 1}
    assert not any("<br />" in t for t in texts)


@needs_real_data
def test_agnews_labels_follow_classes_txt():
    train = D.load_text_classification("agnews", "train")
    test = D.load_text_classification("agnews", "test")
    assert (len(train.texts), len(test.texts)) == (10001, 7600)
    assert train.num_classes == test.num_classes == 4
    assert set(train.labels) == set(test.labels) == {0, 1, 2, 3}
    # First train row is labelled Sci/Tech (4th class); first test row has class "3".
    assert train.labels[0] == 3 and train.texts[0].startswith("p2pnet.net News:")
    assert test.labels[0] == 2
    assert test.texts[0].startswith("Fears for T N pension after talks Unions representing")


def test_text_loader_rejects_unknown_name_and_split():
    with pytest.raises(ValueError, match="sst2"):
        D.load_text_classification("mnli", "train")
    with pytest.raises(ValueError, match="split"):
        D.load_text_classification("sst2", "validation")


# --------------------------------------------------------------------------------------
# SQuAD 2.0
# --------------------------------------------------------------------------------------


@needs_real_data
def test_squad2_split_by_article_is_disjoint_and_deterministic():
    train = D.load_squad2("train", seed=0)
    test = D.load_squad2("test", seed=0)
    assert len(train) + len(test) == 6078
    assert not {e.context for e in train} & {e.context for e in test}
    assert not {e.id for e in train} & {e.id for e in test}
    assert [e.id for e in D.load_squad2("test", seed=0)] == [e.id for e in test]
    assert {e.id for e in D.load_squad2("test", seed=1)} != {e.id for e in test}
    for e in train:
        if e.is_impossible:
            assert e.answer_texts == [] and e.answer_starts == []
        else:
            start = e.answer_starts[0]
            assert e.context[start : start + len(e.answer_texts[0])] == e.answer_texts[0]


def test_squad2_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_squad2("train", test_fraction=1.0)


# --------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------


def _decode_raw(npz_path: Path, indices: list[int]) -> np.ndarray:
    with np.load(npz_path) as z:
        jpeg, offsets = z["jpeg"], z["offsets"]
        return np.stack(
            [
                np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())))
                for i in indices
            ]
        )


@needs_real_data
def test_cifar10_cache_round_trip_equals_fresh_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    images, labels = D.load_cifar10("test", cache_dir=tmp_path)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    sha = D.KNOWN_FILES["cifar10_jpeg/cifar10_test_jpeg.npz"]
    assert [p.name for p in tmp_path.iterdir()] == [f"cifar10_test_{sha[:16]}.npz"]

    picks = [0, 1, 4321, 9999]
    raw = _decode_raw(REAL_DATA / "cifar10_jpeg" / "cifar10_test_jpeg.npz", picks)
    np.testing.assert_array_equal(images[picks], raw)

    def no_decoding(*args, **kwargs):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(D, "_decode_jpegs", no_decoding)
    cached_images, cached_labels = D.load_cifar10("test", cache_dir=tmp_path)
    np.testing.assert_array_equal(cached_images, images)
    np.testing.assert_array_equal(cached_labels, labels)


@needs_real_data
def test_cifar10_corrupt_cache_is_rebuilt(tmp_path: Path):
    sha = D.KNOWN_FILES["cifar10_jpeg/cifar10_test_jpeg.npz"]
    cache = tmp_path / f"cifar10_test_{sha[:16]}.npz"
    cache.write_bytes(b"not an npz")
    images, _ = D.load_cifar10("test", cache_dir=tmp_path)
    assert images.shape == (10000, 32, 32, 3)
    with np.load(cache) as z:
        np.testing.assert_array_equal(z["images"][:3], images[:3])


def _write_torchvision_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with path.open("wb") as f:
        pickle.dump({"data": data, "labels": labels, "batch_label": "x"}, f)


def test_cifar10_reads_torchvision_batches(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = D.synthetic_images(6, 3, seed=0)
    _write_torchvision_batch(folder / "test_batch", images, labels.tolist())
    got_images, got_labels = D.load_cifar10("test", data_dir=tmp_path, use_cache=False)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    with pytest.raises(D.DataFileError, match="data_batch_1"):
        D.load_cifar10("train", data_dir=tmp_path, use_cache=False)


def test_cifar10_torchvision_batch_without_keys(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"images": []}, f)
    with pytest.raises(D.DataFileError, match="'data' and 'labels'"):
        D.load_cifar10("test", data_dir=tmp_path)


# --------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover(scheme: str):
    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    parts = D.partitions(labels, 7, scheme=scheme, alpha=0.3, seed=3)
    merged = np.concatenate(parts)
    assert len(merged) == len(labels)
    np.testing.assert_array_equal(np.sort(merged), np.arange(len(labels)))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_every_client_of_the_same_partition_holds_identical_rows():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    whole = D.partitions(labels, 3, scheme="same", seed=3)
    assert all(np.array_equal(p, np.arange(500)) for p in whole)
    capped = D.partitions(labels, 3, scheme="same", seed=3, max_examples=[100, 100, 40])
    assert np.array_equal(capped[0], capped[1]) and len(capped[0]) == 100
    assert set(capped[2]) < set(capped[0]) and len(capped[2]) == 40  # one draw for all
    assert not np.array_equal(
        capped[0], D.partitions(labels, 1, "same", seed=4, max_examples=100)[0]
    )


def test_clients_of_a_same_partition_federation_train_on_identical_rows():
    cfg = compose(
        "federation=tiny_htfe federation.partition=same federation.examples_per_client=64"
    )
    first, second = (build_workload(cfg, pid).data for pid in range(2))
    assert np.array_equal(first.train_rows, second.train_rows) and len(first.train_rows) == 64
    assert torch.equal(first.train_set.images, second.train_set.images)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(20, 300),
    k=st.integers(1, 10),
    num_classes=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scheme=st.sampled_from(["iid", "dirichlet"]),
)
def test_partitions_cover_property(n: int, k: int, num_classes: int, seed: int, scheme: str):
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    parts = D.partitions(labels, k, scheme=scheme, alpha=0.5, seed=seed)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_iid_partitions_are_balanced_and_shuffled():
    labels = np.repeat(np.arange(4), 100)  # sorted by label
    parts = D.partitions(labels, 4, scheme="iid", seed=0)
    assert [len(p) for p in parts] == [100, 100, 100, 100]
    for p in parts:  # contiguous shards of sorted labels would hold one class each
        assert len(np.unique(labels[p])) == 4


def test_dirichlet_small_alpha_is_label_skewed():
    labels = np.repeat(np.arange(10), 200)
    parts = D.partitions(labels, 5, scheme="dirichlet", alpha=0.05, seed=1)
    top_share = [np.bincount(labels[p]).max() / len(p) for p in parts if len(p)]
    assert np.mean(top_share) > 0.4  # an IID split would give about 0.1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_deterministic_for_a_seed(scheme: str):
    labels = np.random.default_rng(1).integers(0, 5, size=400)
    first = D.partitions(labels, 4, scheme=scheme, alpha=0.5, seed=11)
    again = D.partitions(labels, 4, scheme=scheme, alpha=0.5, seed=11)
    other = D.partitions(labels, 4, scheme=scheme, alpha=0.5, seed=12)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2])


def test_partition_max_examples_is_a_deterministic_subset():
    labels = np.random.default_rng(2).integers(0, 3, size=300)
    full = D.partitions(labels, 2, seed=5)
    capped = D.partitions(labels, 2, seed=5, max_examples=20)
    assert [len(p) for p in capped] == [20, 20]
    assert all(set(c) <= set(f) for c, f in zip(capped, full, strict=True))
    np.testing.assert_array_equal(capped[0], D.partitions(labels, 2, seed=5, max_examples=20)[0])
    np.testing.assert_array_equal(D.partitions(labels, 2, seed=5, max_examples=10_000)[1], full[1])


def test_partition_max_examples_per_partition():
    labels = np.random.default_rng(2).integers(0, 3, size=300)
    capped = D.partitions(labels, 3, seed=5, max_examples=[10, None, 30])
    assert [len(p) for p in capped] == [10, 100, 30]
    # a partition's subsample depends on its own cap only
    np.testing.assert_array_equal(capped[0], D.partitions(labels, 3, seed=5, max_examples=10)[0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"max_examples": [5, 5]}, "max_examples has 2 values for 3 partitions"),
        ({"scheme": "shards"}, "scheme"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"max_examples": -1}, "max_examples"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict, field: str):
    args = {"labels": np.zeros(10, dtype=np.int64), "num_partitions": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        D.partitions(**args)


# --------------------------------------------------------------------------------------
# Torch datasets
# --------------------------------------------------------------------------------------


def test_image_dataset_eval_normalises_exactly():
    images, labels = D.synthetic_images(4, 2, seed=0)
    ds = D.ImageDataset(images, labels, train=False)
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y) == labels[1]
    mean = torch.tensor(D.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(3, 1, 1)
    expected = (torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)


def test_image_dataset_train_is_a_seeded_crop_or_flip():
    images, labels = D.synthetic_images(1, 1, seed=0)
    ds = D.ImageDataset(images, labels, train=True)
    raw = torch.from_numpy(images[0]).permute(2, 0, 1)
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    mean = torch.tensor(D.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(3, 1, 1)
    candidates = []
    for top in range(9):
        for left in range(9):
            crop = padded[:, top : top + 32, left : left + 32]
            for view in (crop, crop.flip(-1)):
                candidates.append((view.float() / 255 - mean) / std)
    candidates = torch.stack(candidates)
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(8)]
    for x in draws:
        assert torch.isclose(candidates, x).flatten(1).all(1).any()
    assert any(not torch.equal(draws[0], x) for x in draws[1:])
    torch.manual_seed(0)
    torch.testing.assert_close(ds[0][0], draws[0])


def test_image_dataset_rejects_bad_shapes():
    with pytest.raises(ValueError, match="images"):
        D.ImageDataset(np.zeros((2, 3, 32, 32), dtype=np.uint8), [0, 1], train=False)
    with pytest.raises(ValueError, match="labels"):
        D.ImageDataset(np.zeros((2, 32, 32, 3), dtype=np.uint8), [0], train=False)


def test_text_dataset_pretokenises(tokenizer):
    ds = D.TextClassificationDataset(["Hello world!", "a b c d e f g"], [1, 0], tokenizer, 6)
    item = ds[0]
    assert item["input_ids"].tolist() == [101, 7592, 2088, 999, 102, 0]
    assert item["attention_mask"].tolist() == [1, 1, 1, 1, 1, 0]
    assert int(item["labels"]) == 1
    assert ds[1]["input_ids"][-1] == 102  # truncated, still ends with [SEP]


def test_qa_dataset_targets_answer_tokens(tokenizer):
    examples = D.synthetic_qa_examples(30, seed=0)
    ds = D.QADataset(examples, tokenizer, max_length=64)
    assert len(ds) == 30
    for i, e in enumerate(examples):
        item = ds[i]
        s, t = int(item["start_positions"]), int(item["end_positions"])
        if e.is_impossible:
            assert (s, t) == (0, 0)
            continue
        assert 0 < s <= t and item["context_mask"][s] and item["context_mask"][t]
        span = e.context[int(item["offsets"][s, 0]) : int(item["offsets"][t, 1])]
        assert span == e.answer_texts[0]
        assert int(item["example_index"]) == i


def test_qa_dataset_truncated_answer_targets_cls(tokenizer):
    context = " ".join(["the"] * 50) + " the key is river ."
    example = D.QAExample("x", "what is the key ?", context, ["river"], [context.index("river")])
    ds = D.QADataset([example], tokenizer, max_length=24)
    assert (int(ds[0]["start_positions"]), int(ds[0]["end_positions"])) == (0, 0)
    ds_long = D.QADataset([example], tokenizer, max_length=96)
    assert int(ds_long[0]["start_positions"]) > 0


def test_qa_example_validates_answers():
    with pytest.raises(ValueError, match="answer_texts"):
        D.QAExample("x", "q", "c", ["a"], [], False)
    with pytest.raises(ValueError, match="answer_texts"):
        D.QAExample("x", "q", "c", [], [], False)


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------


def test_synthetic_data_is_deterministic_and_shaped():
    a_images, a_labels = D.synthetic_images(12, 3, seed=4)
    b_images, b_labels = D.synthetic_images(12, 3, seed=4)
    assert a_images.shape == (12, 32, 32, 3) and a_images.dtype == np.uint8
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert np.bincount(a_labels).tolist() == [4, 4, 4]

    texts, labels = D.synthetic_texts(9, 3, seed=1)
    assert (texts, labels) == D.synthetic_texts(9, 3, seed=1)
    assert len(texts) == 9 and sorted(set(labels)) == [0, 1, 2]
    custom, _ = D.synthetic_texts(4, 2, seed=0, vocab_words=["red", "blue"])
    assert all(("red" in t) != ("blue" in t) for t in custom)


def test_synthetic_images_class_signal():
    images, labels = D.synthetic_images(200, 4, seed=0)
    means = np.stack([images[labels == c].mean(axis=0) for c in range(4)])
    nearest = [
        int(np.argmin(((means - img.astype(float)) ** 2).sum(axis=(1, 2, 3)))) for img in images
    ]
    assert np.mean(np.array(nearest) == labels) > 0.95
