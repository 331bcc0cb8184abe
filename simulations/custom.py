"""Bring your own model and data: a client group's ``arch`` or ``dataset`` may be a Hydra
``_target_`` (any importable callable, with its keyword arguments) instead of a registry name.

- A model target is instantiated as ``fn(**kwargs, num_classes=C)`` (``num_classes`` only when
  the kwargs do not give it) and must return an ``nn.Module``; the group names its ``head``
  (the ``nn.Linear`` whose input is the features) and its ``layers``.
- A dataset target returns a ``datasets.Dataset`` (then cut into train and test rows, 80/20,
  seeded), a ``datasets.DatasetDict`` with ``train`` and ``test`` splits, or a ``(train,
  test)`` pair. Its rows have an input column (``image``: ``[H, W, 3]`` pixels 0..255 as
  arrays, lists or PIL images, of one size; ``text``: strings) and an integer ``label``
  column, under the names the group's ``columns`` give. The flwr-datasets partitioners split
  it as they split the built-in datasets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from simulations.cache import KeyedCache

log = logging.getLogger(__name__)

TARGET = "_target_"
COLUMNS = {"image": "image", "text": "text", "label": "label"}  # the defaults of `columns`
INPUT_COLUMN = {"image_classification": "image", "text_classification": "text"}
TEST_FRACTION = 0.2  # of a dataset given as one split, held out as its test rows


class TargetError(ValueError):
    """A ``_target_`` cannot be imported, called, or gives something unusable."""


@dataclass(frozen=True)
class CustomData:
    """A dataset target's rows: ``inputs`` are uint8 images ``[N, H, W, 3]`` or ``N`` texts."""

    train_inputs: np.ndarray | list[str]
    train_labels: np.ndarray  # int64 [N]
    test_inputs: np.ndarray | list[str]
    test_labels: np.ndarray  # int64 [M]
    num_classes: int


_LOADED: KeyedCache[CustomData] = KeyedCache("custom-data", max_items=4)  # memory only: a
# user's callable may return other rows for the same arguments, so nothing goes to disk


def is_target(value: object) -> bool:
    """Whether a config value names a callable (a mapping with ``_target_``)."""
    return isinstance(value, Mapping) and TARGET in value


def label(spec: Mapping[str, Any]) -> str:
    """A readable name for a target: ``pkg.fn(k=v, ...)``."""
    args = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != TARGET)
    return f"{spec[TARGET]}({args})"


def _call(spec: Mapping[str, Any], **defaults: Any) -> Any:
    """Instantiate ``spec`` with ``defaults`` for the keyword arguments it does not give."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    kwargs = {k: v for k, v in defaults.items() if k not in spec}
    try:
        return instantiate(dict(spec), _convert_="all", **kwargs)
    except InstantiationException as exc:  # Hydra's wrapper: name what the call raised
        cause = exc.__cause__ or exc
        raise TargetError(f"{spec[TARGET]}: {type(cause).__name__}: {cause}") from exc


def build_model(spec: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The model of a model target, for ``num_classes`` classes."""
    model = _call(spec, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise TargetError(f"{spec[TARGET]} returned {type(model).__name__}, not an nn.Module")
    return model


def load_data(spec: Mapping[str, Any], task: str, columns: Mapping[str, str]) -> CustomData:
    """The rows of a dataset target for ``task``, once per process and arguments."""
    parts = {"spec": dict(spec), "task": task, "columns": dict(columns)}
    return _LOADED.get(parts, lambda: _load(spec, task, {**COLUMNS, **columns}))


def _load(spec: Mapping[str, Any], task: str, columns: dict[str, str]) -> CustomData:
    if task not in INPUT_COLUMN:
        raise TargetError(f"a dataset target serves {sorted(INPUT_COLUMN)}, not {task!r}")
    train, test = _splits(_call(spec), spec[TARGET])
    wanted = {"input": columns[INPUT_COLUMN[task]], "label": columns["label"]}
    for name, split in (("train", train), ("test", test)):
        missing = [c for c in wanted.values() if c not in split.column_names]
        if missing:
            raise TargetError(
                f"{spec[TARGET]}: its {name} rows lack the columns {missing} (has "
                f"{split.column_names}); name them in the group's `columns`"
            )
    inputs = _images if task == "image_classification" else _texts
    train_labels = _labels(train, wanted["label"], spec[TARGET])
    test_labels = _labels(test, wanted["label"], spec[TARGET])
    feature = train.features[wanted["label"]]
    num_classes = getattr(feature, "num_classes", None) or int(
        max(train_labels.max(initial=0), test_labels.max(initial=0)) + 1
    )
    data = CustomData(
        inputs(train, wanted["input"], spec[TARGET]),
        train_labels,
        inputs(test, wanted["input"], spec[TARGET]),
        test_labels,
        int(num_classes),
    )
    log.info(
        "%s: %d train and %d test rows, %d classes",
        label(spec),
        len(train_labels),
        len(test_labels),
        data.num_classes,
    )
    return data


def _splits(value: Any, where: str) -> tuple[Any, Any]:
    """(train, test) ``datasets.Dataset`` of what a dataset target returned."""
    from datasets import Dataset, DatasetDict

    if isinstance(value, Dataset):
        cut = value.train_test_split(test_size=TEST_FRACTION, seed=0)
        return cut["train"], cut["test"]
    if isinstance(value, DatasetDict) and {"train", "test"} <= set(value):
        return value["train"], value["test"]
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, Dataset) for v in value):
        return value
    raise TargetError(
        f"{where} returned {type(value).__name__}; a dataset target returns a datasets.Dataset, "
        "a DatasetDict with 'train' and 'test', or a (train, test) pair of them"
    )


def _labels(split: Any, column: str, where: str) -> np.ndarray:
    labels = np.asarray(split[column])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise TargetError(
            f"{where}: column {column!r} must hold integer class labels >= 0, got "
            f"{labels.dtype} of shape {labels.shape}"
        )
    return labels.astype(np.int64)


def _images(split: Any, column: str, where: str) -> np.ndarray:
    images = [np.asarray(image) for image in split[column]]  # PIL images or nested lists
    shapes = {image.shape for image in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise TargetError(
            f"{where}: column {column!r} must hold RGB images of one size [H, W, 3], got "
            f"shapes {sorted(shapes)[:3]}"
        )
    stacked = np.stack(images)
    integer = np.issubdtype(stacked.dtype, np.integer)
    if not integer or stacked.min(initial=0) < 0 or stacked.max(initial=0) > 255:
        raise TargetError(
            f"{where}: column {column!r} must hold pixels in 0..255 (uint8), got {stacked.dtype}"
        )
    return stacked.astype(np.uint8)  # lists of ints arrive as int64


def _texts(split: Any, column: str, where: str) -> list[str]:
    texts = list(split[column])
    if not all(isinstance(text, str) for text in texts):
        raise TargetError(f"{where}: column {column!r} must hold strings")
    return texts
