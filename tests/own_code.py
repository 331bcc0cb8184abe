"""A user's own model and datasets, as a federation config names them with ``_target_``
(tests/test_own_code.py): nothing here is registered anywhere in the project."""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from torch import nn

WORDS = ("red", "blue", "green", "black")


class SmallNet(nn.Module):
    """Two convolutions, 32-d features, a ``head``: any input size (global pooling)."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def make_net(num_classes: int, width: int = 8) -> nn.Module:
    return SmallNet(num_classes, width)


def colours(n: int = 480, size: int = 16, pil: bool = True) -> Dataset:
    """One split of ``n`` RGB images whose class is the brightest channel (3 classes), in
    columns ``img`` (PIL images, or uint8 arrays) and ``y``."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    images = rng.integers(0, 120, (n, size, size, 3)).astype(np.uint8)
    images[np.arange(n), :, :, y] += 120
    if not pil:
        return Dataset.from_dict({"img": images.tolist(), "y": y})
    features = Features({"img": Image(), "y": ClassLabel(num_classes=3)})
    return Dataset.from_dict({"img": list(images), "y": y}, features=features)


def phrases(n: int = 400) -> DatasetDict:
    """Train and test sentences whose class is the colour word they repeat (4 classes), in
    columns ``text`` and ``label``."""
    rng = np.random.default_rng(1)

    def split(rows: int) -> Dataset:
        labels = rng.integers(0, len(WORDS), rows)
        texts = [" ".join([WORDS[c]] * 3 + list(rng.choice(WORDS, 2))) for c in labels]
        features = Features({"text": Value("string"), "label": Value("int64")})
        return Dataset.from_dict({"text": texts, "label": labels}, features=features)

    return DatasetDict({"train": split(n), "test": split(n // 4)})
