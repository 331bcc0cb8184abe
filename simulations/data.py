"""Offline, checksummed datasets, federated partitioning and torch datasets.

Real data is never downloaded: it is read from a local data folder laid out like
``/work/shared/data`` (see its ``README.md``). The folder is, in order of precedence, the
``data_dir`` argument of each loader, the ``MERGENET_DATA_DIR`` environment variable, or
``<project root>/../shared/data``. Every file read is checked against the sha256 in
:data:`KNOWN_FILES` once per load call; a missing or altered file raises
:class:`DataFileError` naming the file and what to do about it.

Decoded CIFAR-10 arrays are cached in ``MERGENET_CACHE_DIR`` (default
``~/.cache/mergenet-fl``), keyed by the checksum of the source file.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from transformers import BertTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "KNOWN_FILES",
    "DATASET_FILES",
    "DataFileError",
    "ImageDataset",
    "QADataset",
    "QAExample",
    "TextClassificationDataset",
    "TextSplit",
    "build_tokenizer",
    "default_cache_dir",
    "check_dataset_files",
    "check_files",
    "dataset_files",
    "default_data_dir",
    "load_cifar10",
    "load_squad2",
    "load_text_classification",
    "partitions",
    "synthetic_images",
    "synthetic_qa_examples",
    "synthetic_texts",
    "tokenizer_files",
    "verify",
]

DATA_DIR_ENV = "MERGENET_DATA_DIR"
CACHE_DIR_ENV = "MERGENET_CACHE_DIR"

#: sha256 of every known data file, keyed by its path relative to the data folder
#: (copied from the data folder's ``SHA256SUMS``).
KNOWN_FILES: MappingProxyType[str, str] = MappingProxyType(
    {
        "agnews/classes.txt": "612dbfa932f07a6ed837295a7d5746ce7412e7bb4bc32ba919fdb3cda3a1b9b5",
        "agnews/readme.txt": "779c2e6bbf93dd810d9c7b318006daef7a4bfc34062002461d251dc10fb9f58c",
        "agnews/test.csv": "521465c2428ed7f02f8d6db6ffdd4b5447c1c701962353eb2c40d548c3c85699",
        "agnews_alps/train_subset_alps_dev.tsv": (
            "7a0811e0006080bf4de17752c5466450ff3db778be71bc5bcf3c4e99b5f0803d"
        ),
        "bert-base-uncased/vocab.txt": (
            "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
        ),
        "cifar10_jpeg/cifar10_test_jpeg.npz": (
            "9771b8ef217960ceb06c5a5712f6499994f275249094b1fa54dde76593310aa0"
        ),
        "cifar10_jpeg/cifar10_train_jpeg.npz": (
            "b008e9e2c91fabf83cdd0c799f2023bcac289b4265ed07a0709d8e59e30376bc"
        ),
        "imdb/imdb_test.csv.gz": "b6262e00c3ffd878608ae971c64bcba1a1a668165621e0314d54ab8407323114",
        "imdb/imdb_train.csv.gz": (
            "4711ad822f2ec80a1121c4654660d42d87990e6a671401e3f3e4a2087d19473f"
        ),
        "squad2/dev-v2.0.cs224n.json": (
            "e67e5969b6dc6c1642154740806b79263b77fc048c7c11ee60d534eb48ef81e8"
        ),
        "sst2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
        "sst2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    }
)

#: The data files each dataset reads, relative to the data folder. Text datasets also read
#: the tokenizer's vocabulary; CIFAR-10 reads torchvision's batches instead when present.
DATASET_FILES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "cifar10": ("cifar10_jpeg/cifar10_train_jpeg.npz", "cifar10_jpeg/cifar10_test_jpeg.npz"),
        "sst2": ("sst2/train.tsv", "sst2/dev.tsv", "bert-base-uncased/vocab.txt"),
        "imdb": ("imdb/imdb_train.csv.gz", "imdb/imdb_test.csv.gz", "bert-base-uncased/vocab.txt"),
        "agnews": (
            "agnews/classes.txt",
            "agnews_alps/train_subset_alps_dev.tsv",
            "agnews/test.csv",
            "bert-base-uncased/vocab.txt",
        ),
        "squad2": ("squad2/dev-v2.0.cs224n.json", "bert-base-uncased/vocab.txt"),
    }
)

#: Per-channel mean and standard deviation of the CIFAR-10 training images, in [0, 1].
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

_CHUNK_BYTES = 1 << 20
_TORCHVISION_CIFAR_DIR = "cifar-10-batches-py"
_TORCHVISION_CIFAR_FILES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    }
)

Split = Literal["train", "test"]


class DataFileError(FileNotFoundError, ValueError):
    """A data file is missing, altered or malformed.

    Subclasses both :class:`FileNotFoundError` (missing file) and :class:`ValueError`
    (checksum mismatch, bad content) so callers can catch either.
    """


# --------------------------------------------------------------------------------------
# Locations and checksums
# --------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Return the data folder: ``$MERGENET_DATA_DIR``, else ``../shared/data`` beside the
    project, else beside the working directory (``flwr run`` runs an installed copy of the
    project from elsewhere, in the working directory it was started from)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    project_root = Path(__file__).resolve().parent.parent
    candidates = [project_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def default_cache_dir() -> Path:
    """Return the cache folder: ``$MERGENET_CACHE_DIR`` or ``~/.cache/mergenet-fl``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergenet-fl"


def _data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_provide(data_root: Path) -> str:
    return (
        f"copy the shared data folder (see /work/shared/data/README.md) to {data_root}, "
        f"or set {DATA_DIR_ENV} to a folder that holds it"
    )


def _known_key(path: Path) -> str | None:
    key = f"{path.parent.name}/{path.name}"
    return key if key in KNOWN_FILES else None


def verify(path: str | os.PathLike[str], expected_sha256: str | None = None) -> str:
    """Check a data file against its known sha256 (streamed) and return the digest.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Unless ``expected_sha256`` is given, its last two path components
        (e.g. ``sst2/dev.tsv``) must be a key of :data:`KNOWN_FILES`.
    expected_sha256 : str, optional
        Override of the expected hex digest.

    Returns
    -------
    str
        The sha256 hex digest of the file (equal to the expected one).

    Raises
    ------
    DataFileError
        If the file is missing or its checksum differs; the message names the file,
        both checksums and how to provide a good copy.
    ValueError
        If no expected checksum is known for ``path``.
    """
    file = Path(path)
    key = _known_key(file)
    expected = expected_sha256 or (KNOWN_FILES[key] if key is not None else None)
    if expected is None:
        raise ValueError(f"no known sha256 for {file}; known files are {sorted(KNOWN_FILES)}")
    if not file.is_file():
        raise DataFileError(
            f"missing data file {file} ({key or file.name}): {_how_to_provide(file.parent.parent)}"
        )
    actual = _sha256(file)
    if actual != expected.lower():
        raise DataFileError(
            f"checksum mismatch for data file {file}: expected sha256 {expected}, "
            f"got {actual}. The file is altered or truncated; "
            f"{_how_to_provide(file.parent.parent)}"
        )
    return actual


def _verified(relpath: str, data_dir: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """Resolve ``relpath`` inside the data folder, verify it and return (path, sha256)."""
    path = _data_root(data_dir) / relpath
    return path, verify(path, KNOWN_FILES[relpath])


def dataset_files(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The files dataset ``name`` reads (none for synthetic data); they may not exist."""
    root = _data_root(data_dir)
    tv_folder = root / _TORCHVISION_CIFAR_DIR
    if name == "cifar10" and tv_folder.is_dir():
        return [
            tv_folder / f for split in ("train", "test") for f in _TORCHVISION_CIFAR_FILES[split]
        ]
    return [root / rel for rel in DATASET_FILES.get(name, ())]


def tokenizer_files(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The files :func:`build_tokenizer` reads (every text dataset's tokenizer)."""
    return [_data_root(data_dir) / "bert-base-uncased/vocab.txt"]


def check_dataset_files(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Every problem with the files of dataset ``name``: missing, or altered (sha256)."""
    return check_files(dataset_files(name, data_dir))


def check_files(paths: Sequence[Path]) -> list[str]:
    """Every problem with ``paths``: missing, or altered (sha256, where it is known)."""
    problems = []
    for path in paths:
        try:
            if _known_key(path) is None:  # torchvision's batches have no pinned checksum
                if not path.is_file():
                    raise DataFileError(f"missing data file {path}")
            else:
                verify(path)
        except DataFileError as exc:
            problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------


def _check_split(split: str, allowed: Sequence[str] = ("train", "test")) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}")


def _decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    n = len(offsets) - 1
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        with Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())) as img:
            images[i] = np.asarray(img.convert("RGB"))
    return images


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0o600; the cache is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached_images(path: Path, n: int) -> np.ndarray | None:
    """Decoded images ``[n, 32, 32, 3]`` from the cache, or None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring unreadable CIFAR-10 cache %s: %s", path, exc)
        return None
    if images.shape != (n, 32, 32, 3) or images.dtype != np.uint8:
        logger.warning("ignoring CIFAR-10 cache %s with unexpected shape/dtype", path)
        return None
    return images


def _load_cifar10_torchvision(folder: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in _TORCHVISION_CIFAR_FILES[split]:
        file = folder / name
        if not file.is_file():
            raise DataFileError(
                f"missing CIFAR-10 batch {file}: the torchvision layout in {folder} needs "
                f"{list(_TORCHVISION_CIFAR_FILES[split])}; copy the complete "
                f"'{_TORCHVISION_CIFAR_DIR}' folder or remove it to use cifar10_jpeg/"
            )
        # Local, trusted file in torchvision's documented format (a pickled dict).
        with file.open("rb") as f:
            batch = pickle.load(f, encoding="latin1")
        if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
            raise DataFileError(f"CIFAR-10 batch {file} lacks the keys 'data' and 'labels'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataFileError(f"CIFAR-10 batch {file}: 'data' has shape {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def load_cifar10(
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 images and labels in the official order.

    Reads ``data_dir/cifar-10-batches-py/`` (torchvision's pickled batches) when that
    folder exists, else the checksummed ``cifar10_jpeg/cifar10_{split}_jpeg.npz`` whose
    decoded arrays are cached in ``cache_dir`` (written atomically, keyed by the source
    sha256).

    Parameters
    ----------
    split : {"train", "test"}
        Which split.
    data_dir : str or os.PathLike, optional
        Data folder; see :func:`default_data_dir`.
    cache_dir : str or os.PathLike, optional
        Cache folder; see :func:`default_cache_dir`.
    use_cache : bool
        Read/write the decoded-array cache.

    Returns
    -------
    images : np.ndarray
        uint8, shape ``[N, 32, 32, 3]`` (RGB, HWC), N = 50,000 (train) or 10,000 (test).
    labels : np.ndarray
        int64, shape ``[N]``, values in ``[0, 10)``.
    """
    _check_split(split)
    root = _data_root(data_dir)
    tv_folder = root / _TORCHVISION_CIFAR_DIR
    if tv_folder.is_dir():
        logger.info("loading CIFAR-10 %s from torchvision batches in %s", split, tv_folder)
        return _load_cifar10_torchvision(tv_folder, split)

    source, sha = _verified(f"cifar10_jpeg/cifar10_{split}_jpeg.npz", root)
    with np.load(source, allow_pickle=False) as z:
        offsets = z["offsets"]
        labels = z["labels"].astype(np.int64, copy=False)
        n = len(labels)
        cache = (
            Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        ) / f"cifar10_{split}_{sha[:16]}.npz"
        if use_cache:
            cached = _load_cached_images(cache, n)
            if cached is not None:
                logger.debug("CIFAR-10 %s read from cache %s", split, cache)
                return cached, labels
        if len(offsets) != n + 1:
            raise DataFileError(f"{source}: {len(offsets)} offsets for {n} labels")
        start = time.perf_counter()
        images = _decode_jpegs(z["jpeg"], offsets)
    logger.info("decoded %d CIFAR-10 %s images in %.1f s", n, split, time.perf_counter() - start)
    if use_cache:
        try:
            _atomic_save_npz(cache, images=images)
            logger.debug("CIFAR-10 %s cached at %s", split, cache)
        except OSError as exc:
            logger.warning("could not write CIFAR-10 cache %s: %s", cache, exc)
    return images, labels


# --------------------------------------------------------------------------------------
# Text classification
# --------------------------------------------------------------------------------------


class TextSplit(NamedTuple):
    """One split of a text classification dataset (unpacks as a 3-tuple)."""

    texts: list[str]
    labels: list[int]
    num_classes: int


def _read_tsv_two_columns(path: Path, *, header: bool) -> list[tuple[str, str]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        if header:
            next(f)
        for lineno, line in enumerate(f, start=2 if header else 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.rsplit("\t", 1)
            if len(parts) != 2:
                raise DataFileError(f"{path}:{lineno}: expected 2 tab-separated columns")
            rows.append((parts[0], parts[1]))
    return rows


def _load_sst2(root: Path, split: Split) -> TextSplit:
    path, _ = _verified(f"sst2/{'train' if split == 'train' else 'dev'}.tsv", root)
    rows = _read_tsv_two_columns(path, header=True)
    return TextSplit([t.strip() for t, _ in rows], [int(y) for _, y in rows], 2)


def _load_imdb(root: Path, split: Split) -> TextSplit:
    path, _ = _verified(f"imdb/imdb_{split}.csv.gz", root)
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            texts.append(" ".join(row["text"].replace("<br />", " ").split()))
            labels.append(int(row["label"]))
    return TextSplit(texts, labels, 2)


def _load_agnews(root: Path, split: Split) -> TextSplit:
    classes_path, _ = _verified("agnews/classes.txt", root)
    class_names = [c.strip() for c in classes_path.read_text(encoding="utf-8").splitlines()]
    class_names = [c for c in class_names if c]
    texts, labels = [], []
    if split == "train":
        path, _ = _verified("agnews_alps/train_subset_alps_dev.tsv", root)
        index = {name: i for i, name in enumerate(class_names)}
        for text, name in _read_tsv_two_columns(path, header=False):
            if name not in index:
                raise DataFileError(f"{path}: unknown label {name!r}; classes {class_names}")
            texts.append(text.strip())
            labels.append(index[name])
    else:
        path, _ = _verified("agnews/test.csv", root)
        with path.open(encoding="utf-8", newline="") as f:
            for cls, title, description in csv.reader(f):
                texts.append(f"{title.strip()} {description.strip()}")
                labels.append(int(cls) - 1)
    return TextSplit(texts, labels, len(class_names))


_TEXT_LOADERS = MappingProxyType({"sst2": _load_sst2, "imdb": _load_imdb, "agnews": _load_agnews})


def load_text_classification(
    name: Literal["sst2", "imdb", "agnews"],
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
) -> TextSplit:
    """Load a text classification split.

    Parameters
    ----------
    name : {"sst2", "imdb", "agnews"}
        ``sst2``: GLUE SST-2, binary, "test" is the dev set (872). ``imdb``: 25k/24,999
        reviews, binary, ``<br />`` replaced by spaces. ``agnews``: 4 classes in
        ``classes.txt`` order (World, Sports, Business, Sci/Tech); "train" is the 10,001
        example subset, "test" the official 7,600 with text ``title + " " + description``.
    split : {"train", "test"}
        Which split.
    data_dir : str or os.PathLike, optional
        Data folder; see :func:`default_data_dir`.

    Returns
    -------
    TextSplit
        ``(texts, labels, num_classes)``; labels are ints in ``[0, num_classes)``.
    """
    if name not in _TEXT_LOADERS:
        raise ValueError(f"name must be one of {sorted(_TEXT_LOADERS)}, got {name!r}")
    _check_split(split)
    return _TEXT_LOADERS[name](_data_root(data_dir), split)


# --------------------------------------------------------------------------------------
# SQuAD 2.0
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QAExample:
    """One extractive QA question.

    ``answer_starts[i]`` is the character offset of ``answer_texts[i]`` in ``context``.
    Both lists are empty when ``is_impossible``.
    """

    id: str
    question: str
    context: str
    answer_texts: list[str] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)
    is_impossible: bool = False

    def __post_init__(self) -> None:
        if len(self.answer_texts) != len(self.answer_starts):
            raise ValueError(
                f"answer_texts and answer_starts differ in length for example {self.id!r}"
            )
        if not self.is_impossible and not self.answer_texts:
            raise ValueError(f"answer_texts is empty for answerable example {self.id!r}")


def load_squad2(
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[QAExample]:
    """Load the labelled SQuAD 2.0 dev set and split it by article.

    The 16 articles are permuted with ``numpy.random.default_rng(seed)`` and the first
    ``round(16 * test_fraction)`` (at least 1, at most 15) form the test split, so no
    article (hence no context) appears in both splits. Question counts per split follow
    the article sizes, not exactly ``test_fraction``.

    Parameters
    ----------
    split : {"train", "test"}
        Which side of the article split.
    data_dir : str or os.PathLike, optional
        Data folder; see :func:`default_data_dir`.
    test_fraction : float
        Fraction of articles in the test split, in ``(0, 1)``.
    seed : int
        Seed of the article permutation.

    Returns
    -------
    list[QAExample]
        Questions in file order within the chosen articles.
    """
    _check_split(split)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    path, _ = _verified("squad2/dev-v2.0.cs224n.json", data_dir)
    articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    n_test = min(max(round(len(articles) * test_fraction), 1), len(articles) - 1)
    order = np.random.default_rng(seed).permutation(len(articles))
    test_ids = set(order[:n_test].tolist())
    chosen = [a for i, a in enumerate(articles) if (i in test_ids) == (split == "test")]
    examples = []
    for article in chosen:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [] if qa["is_impossible"] else qa["answers"]
                examples.append(
                    QAExample(
                        id=qa["id"],
                        question=qa["question"],
                        context=context,
                        answer_texts=[a["text"] for a in answers],
                        answer_starts=[int(a["answer_start"]) for a in answers],
                        is_impossible=bool(qa["is_impossible"]),
                    )
                )
    logger.debug("SQuAD2 %s: %d articles, %d questions", split, len(chosen), len(examples))
    return examples


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def build_tokenizer(data_dir: str | os.PathLike[str] | None = None) -> BertTokenizer:
    """Build the bert-base-uncased WordPiece tokenizer from the local ``vocab.txt``.

    In transformers 5.x ``BertTokenizer`` is backed by the Rust ``tokenizers`` library
    (``BertTokenizerFast`` is an alias), so it supports ``return_offsets_mapping``. It
    must be built with ``vocab=<path>``: ``vocab_file=<path>`` silently yields a 5-token
    vocabulary.

    Returns
    -------
    transformers.BertTokenizer
        30,522-token uncased tokenizer; ``"Hello world!"`` encodes to
        ``[101, 7592, 2088, 999, 102]``.
    """
    from transformers import BertTokenizer

    path, _ = _verified("bert-base-uncased/vocab.txt", data_dir)
    tokenizer = BertTokenizer(vocab=str(path), do_lower_case=True)
    if len(tokenizer) != 30522:
        raise RuntimeError(f"tokenizer built from {path} has {len(tokenizer)} tokens, not 30522")
    return tokenizer


# --------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------


def partitions(
    labels: Sequence[int] | np.ndarray,
    num_partitions: int,
    scheme: Literal["iid", "dirichlet", "same"] = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    max_examples: int | Sequence[int | None] | None = None,
    min_partition_size: int = 0,
) -> list[np.ndarray]:
    """Row indices of every federated partition, computed with flwr-datasets.

    ``same``: every partition holds the same rows, all of them (the reference code's two models
    on one training set); with ``max_examples``, the first rows of one seeded permutation.
    ``iid``: the rows are shuffled with ``seed`` (``datasets.Dataset.shuffle``) and cut
    into ``num_partitions`` contiguous shards by ``IidPartitioner`` (which does not shuffle
    by itself); sizes differ by at most 1. ``dirichlet``: ``DirichletPartitioner(
    partition_by="label", alpha=alpha, min_partition_size=min_partition_size,
    self_balancing=False, shuffle=True, seed=seed)``. With the default
    ``min_partition_size=0`` it samples once and always terminates, but a partition can be
    empty for small ``alpha`` or small data; with a positive value flwr-datasets 0.6.1
    resamples up to 10 times and then raises ``ValueError``.

    Except under ``same``, the partitions are disjoint and, without ``max_examples``, cover all
    rows. The whole
    partitioning is recomputed on every call (no global cache).

    Parameters
    ----------
    labels : sequence of int or np.ndarray
        Shape ``[N]``, one label per row.
    num_partitions : int
        Number of partitions, ``1 <= num_partitions <= N``.
    scheme : {"iid", "dirichlet", "same"}
        Partitioning scheme.
    alpha : float
        Dirichlet concentration (> 0); ignored for ``iid``.
    seed : int
        Seed of the partitioning and of the ``max_examples`` subsamples.
    max_examples : int or sequence of (int or None), optional
        Keep at most this many rows of each partition (one value for all, or one per
        partition): a uniform subsample without replacement, seeded with ``seed`` and the
        partition's index.
    min_partition_size : int
        Passed to ``DirichletPartitioner``; see above.

    Returns
    -------
    list of np.ndarray
        ``num_partitions`` arrays, int64, shape ``[n_k]``, sorted ascending indices into
        ``labels``.
    """
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {label_array.shape}")
    n = len(label_array)
    if not 1 <= num_partitions <= max(n, 1):
        raise ValueError(f"num_partitions must be in [1, {n}], got {num_partitions}")
    caps = (
        list(max_examples)
        if isinstance(max_examples, Sequence)
        else [max_examples] * num_partitions
    )
    if len(caps) != num_partitions:
        raise ValueError(f"max_examples has {len(caps)} values for {num_partitions} partitions")
    if any(cap is not None and cap < 0 for cap in caps):
        raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")

    if scheme == "same":  # one draw for all: a smaller cap keeps a subset of a larger one's
        order = np.random.default_rng(seed).permutation(n)
        return [np.arange(n) if cap is None or cap >= n else np.sort(order[:cap]) for cap in caps]
    dataset = HFDataset.from_dict({"label": label_array, "index": np.arange(n, dtype=np.int64)})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = dataset.shuffle(seed=seed)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = dataset
    else:
        raise ValueError(f"scheme must be 'iid', 'dirichlet' or 'same', got {scheme!r}")

    result = []
    for partition_id, cap in enumerate(caps):
        with warnings.catch_warnings():
            # flwr-datasets warns on every Dirichlet resampling; the final outcome matters.
            warnings.simplefilter("ignore", UserWarning)
            partition = partitioner.load_partition(partition_id)
        indices = np.asarray(partition["index"], dtype=np.int64)
        if cap is not None and len(indices) > cap:
            rng = np.random.default_rng((seed, partition_id))
            indices = rng.choice(indices, size=cap, replace=False)
        indices.sort()
        result.append(indices)
    logger.debug(
        "%d partitions (%s) of %d rows: sizes %s",
        num_partitions,
        scheme,
        n,
        [len(p) for p in result],
    )
    return result


# --------------------------------------------------------------------------------------
# Torch datasets
# --------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """CIFAR-style image classification dataset.

    Training augmentation (``train=True``): zero-padding by 4, random 32x32 crop and
    horizontal flip with probability 0.5, drawn from torch's global RNG (seed it, e.g.
    ``torch.manual_seed``; DataLoader workers are seeded from it).

    Parameters
    ----------
    images : np.ndarray or torch.Tensor
        uint8, shape ``[N, 32, 32, 3]`` (HWC, RGB).
    labels : sequence of int, np.ndarray or torch.Tensor
        Shape ``[N]``.
    train : bool
        Whether to augment.

    Items are ``(image, label)``: float32 ``[3, 32, 32]`` normalised with
    :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, and an int64 scalar tensor.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        train: bool,
    ) -> None:
        image_tensor = torch.as_tensor(images)
        shape = tuple(image_tensor.shape)
        if image_tensor.dtype != torch.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {image_tensor.dtype} {shape}")
        label_tensor = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if label_tensor.shape != (image_tensor.shape[0],):
            raise ValueError(
                f"labels must have shape [{image_tensor.shape[0]}], got {tuple(label_tensor.shape)}"
            )
        self.images = image_tensor.permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8
        self.labels = label_tensor
        self.train = train
        self._mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.train:
            height, width = image.shape[1:]
            padded = F.pad(image, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, top : top + height, left : left + width]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        x = (image.float().div_(255.0) - self._mean) / self._std
        return x, self.labels[index]


class TextClassificationDataset(Dataset):
    """Pre-tokenised single-sentence classification dataset.

    Texts are tokenised once, truncated and padded to ``max_length``. Items are dicts
    with ``input_ids`` (int64 ``[L]``), ``attention_mask`` (int64 ``[L]``) and ``labels``
    (int64 scalar), ``L = max_length``.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 128,
    ) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) differ in length")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        encoded = tokenizer(
            list(texts),
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
            return_token_type_ids=False,
        )
        self.input_ids: torch.Tensor = encoded["input_ids"].to(torch.int64)
        self.attention_mask: torch.Tensor = encoded["attention_mask"].to(torch.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


class QADataset(Dataset):
    """Extractive QA dataset: one window per question, context truncated.

    Each question is tokenised as ``[CLS] question [SEP] context [SEP]`` truncated to
    ``max_length`` (context only) and padded. The first gold answer gives the target
    token span; impossible questions and answers cut off by truncation target the CLS
    token (index 0). No doc-stride windows.

    Items are dicts of tensors, ``L = max_length``: ``input_ids`` and
    ``attention_mask`` (int64 ``[L]``), ``start_positions`` and ``end_positions`` (int64
    scalars), ``context_mask`` (bool ``[L]``, True on context tokens), ``offsets``
    (int64 ``[L, 2]``, character span of each token in the context) and
    ``example_index`` (int64 scalar, index into :attr:`examples`).
    """

    def __init__(
        self,
        examples: Sequence[QAExample],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 192,
    ) -> None:
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        self.examples = list(examples)
        n = len(self.examples)
        self.input_ids = torch.zeros((n, max_length), dtype=torch.int64)
        self.attention_mask = torch.zeros((n, max_length), dtype=torch.int64)
        self.context_mask = torch.zeros((n, max_length), dtype=torch.bool)
        self.offsets = torch.zeros((n, max_length, 2), dtype=torch.int64)
        self.start_positions = torch.zeros(n, dtype=torch.int64)
        self.end_positions = torch.zeros(n, dtype=torch.int64)
        if n == 0:
            return
        encoded = tokenizer(
            [e.question for e in self.examples],
            [e.context for e in self.examples],
            truncation="only_second",
            max_length=max_length,
            padding="max_length",
            return_offsets_mapping=True,
            return_token_type_ids=False,
        )
        self.input_ids[:] = torch.as_tensor(encoded["input_ids"])
        self.attention_mask[:] = torch.as_tensor(encoded["attention_mask"])
        self.offsets[:] = torch.as_tensor(encoded["offset_mapping"])
        truncated = 0
        for i, example in enumerate(self.examples):
            is_context = np.array([s == 1 for s in encoded.sequence_ids(i)], dtype=bool)
            self.context_mask[i] = torch.from_numpy(is_context)
            if example.is_impossible:
                continue
            span = self._token_span(np.asarray(encoded["offset_mapping"][i]), is_context, example)
            if span is None:
                truncated += 1
                continue
            self.start_positions[i], self.end_positions[i] = span
        self.offsets[~self.context_mask] = 0
        if truncated:
            logger.debug("%d of %d answers truncated away (target CLS)", truncated, n)

    @staticmethod
    def _token_span(
        offsets: np.ndarray, is_context: np.ndarray, example: QAExample
    ) -> tuple[int, int] | None:
        start_char = example.answer_starts[0]
        end_char = start_char + len(example.answer_texts[0])
        ctx = np.flatnonzero(is_context)
        if len(ctx) == 0 or offsets[ctx[0], 0] > start_char or offsets[ctx[-1], 1] < end_char:
            return None
        start_tok = ctx[offsets[ctx, 0] <= start_char][-1]
        end_tok = ctx[offsets[ctx, 1] >= end_char][0]
        return int(start_tok), int(end_tok)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "start_positions": self.start_positions[index],
            "end_positions": self.end_positions[index],
            "context_mask": self.context_mask[index],
            "offsets": self.offsets[index],
            "example_index": torch.tensor(index, dtype=torch.int64),
        }


# --------------------------------------------------------------------------------------
# Synthetic data (tests, dry runs)
# --------------------------------------------------------------------------------------

_SYNTHETIC_WORDS: tuple[str, ...] = (
    "apple", "river", "music", "house", "green", "happy", "storm", "chair", "light",
    "money", "sport", "water", "dream", "table", "stone", "night", "plant", "paper",
    "metal", "cloud", "bread", "horse", "glass", "sugar", "tiger", "train", "phone",
    "beach", "dance", "earth", "field", "grass", "heart", "juice", "knife", "lemon",
    "mouse", "ocean", "piano", "queen", "radio", "snake", "tooth", "uncle", "voice",
    "wheel", "youth", "zebra", "angel", "brush",
)  # fmt: skip
_FILLER_WORDS: tuple[str, ...] = (
    "the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "with",
    "as", "at", "by", "this", "from", "or", "but",
)  # fmt: skip


def synthetic_images(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiny learnable image classification data.

    Each class has a smooth random colour pattern (4x4 upsampled to 32x32); images are
    the class pattern plus Gaussian noise (std 40 / 255).

    Returns
    -------
    images : np.ndarray
        uint8, shape ``[n, 32, 32, 3]``.
    labels : np.ndarray
        int64, shape ``[n]``, ``labels[i] = i % num_classes`` then shuffled.
    """
    if n < 0 or num_classes < 1:
        raise ValueError(f"need n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(30, 225, size=(num_classes, 4, 4, 3))
    prototypes = prototypes.repeat(8, axis=1).repeat(8, axis=2)  # [C, 32, 32, 3]
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    noise = rng.normal(0.0, 40.0, size=(n, 32, 32, 3))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def synthetic_texts(
    n: int,
    num_classes: int,
    seed: int,
    vocab_words: Sequence[str] | None = None,
) -> tuple[list[str], list[int]]:
    """Tiny learnable text classification data.

    ``vocab_words`` (default: 50 common English words, all single WordPiece tokens in
    bert-base-uncased) are dealt round-robin into ``num_classes`` keyword groups. A text
    is 4 keywords of its class mixed with 8 filler words.

    Returns
    -------
    texts : list[str]
        ``n`` texts.
    labels : list[int]
        ``n`` labels in ``[0, num_classes)``.
    """
    words = tuple(vocab_words) if vocab_words is not None else _SYNTHETIC_WORDS
    if n < 0 or num_classes < 1 or len(words) < num_classes:
        raise ValueError(
            f"need n >= 0, num_classes >= 1 and len(vocab_words) >= num_classes, got n={n}, "
            f"num_classes={num_classes}, {len(words)} words"
        )
    rng = np.random.default_rng(seed)
    groups = [words[c::num_classes] for c in range(num_classes)]
    labels = rng.permutation(np.arange(n) % num_classes).tolist()
    texts = []
    for label in labels:
        tokens = list(rng.choice(groups[label], size=4)) + list(rng.choice(_FILLER_WORDS, 8))
        rng.shuffle(tokens)
        texts.append(" ".join(tokens))
    return texts, [int(y) for y in labels]


def synthetic_qa_examples(n: int, seed: int, impossible_fraction: float = 0.25) -> list[QAExample]:
    """Tiny learnable extractive QA data.

    Contexts are filler words; answerable ones contain ``"the key is <word> ."`` at a
    random position and the answer is ``<word>``. The question is always
    ``"what is the key ?"``.
    """
    if n < 0 or not 0.0 <= impossible_fraction <= 1.0:
        raise ValueError(
            f"need n >= 0 and impossible_fraction in [0, 1], got {n}, {impossible_fraction}"
        )
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        filler = [str(w) for w in rng.choice(_FILLER_WORDS, size=int(rng.integers(6, 20)))]
        impossible = bool(rng.random() < impossible_fraction)
        if impossible:
            context = " ".join(filler)
            examples.append(QAExample(f"syn-{i}", "what is the key ?", context, [], [], True))
            continue
        answer = str(rng.choice(_SYNTHETIC_WORDS))
        cut = int(rng.integers(0, len(filler) + 1))
        prefix = " ".join(filler[:cut] + ["the", "key", "is"]) + " "
        context = prefix + answer + " . " + " ".join(filler[cut:])
        examples.append(
            QAExample(f"syn-{i}", "what is the key ?", context.strip(), [answer], [len(prefix)])
        )
    return examples
