"""Model zoo for mergenet-fl, built offline (random init or local weights only).

Every architecture is registered in :data:`ARCHITECTURES` with the task kind it solves
(see :mod:`simulations.tasks`) and the names of its knowledge-transfer layers, as given
by ``model.named_modules()``:

- ``cnn4``: head ``fc`` (512→C); HtFLlib's 4-layer CNN (conv 5×5 ×2, ``fc1`` 1600→512).
- ``resnet18``: head ``fc`` (512→C).
- ``resnet8``: head ``fc`` (64→C).
- ``mobilenet_v2``: head ``classifier.1`` (1280→C).
- ``mobilenet_v2_small``: head ``classifier.1`` (1280→C; the last conv keeps 1280
  channels for ``width_mult < 1``).
- ``bert_tiny``: head ``classifier`` (128→C); value projections
  ``bert.encoder.layer.{0,1}.attention.self.value`` (128→128).
- ``resnet8_f512``, ``convnet5``, ``convnet6``: head ``fc`` (512→C) after ``fc1`` (→512):
  HtFLlib-style image models that share one head shape (the benchmark's ``htfe4``).
- ``fasttext``, ``textcnn``: head ``fc`` (128→C) after ``fc1`` (→128): cheap text models
  that share one head shape (the benchmark's ``htfe_text``).
- ``bert_small``: head ``classifier`` (256→C); value projections
  ``bert.encoder.layer.{0,1,2,3}.attention.self.value`` (256→256).
- ``distilbert_tiny_qa``: head ``qa_outputs`` (128→2); value projections
  ``distilbert.transformer.layer.{0,1}.attention.v_lin`` (128→128).

All of them are ``nn.Linear`` (names checked against torchvision 0.29 and transformers
5.23).

Image models take float ``[B, 3, 32, 32]`` and return logits ``[B, C]``. Transformer
models take ``input_ids`` / ``attention_mask`` (int64 ``[B, L]``) and return a
``transformers`` ``ModelOutput`` with ``logits [B, C]`` (classification) or
``start_logits`` / ``end_logits [B, L]`` (QA); ``fasttext`` and ``textcnn`` take the same and
return :class:`TextLogits`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock

from simulations import custom

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "CifarResNet",
    "arch_spec",
    "build_model",
    "custom_arch",
]

_BERT_VOCAB_SIZE = 30522


@dataclass(frozen=True)
class ArchSpec:
    """Static description of a registered architecture.

    Attributes
    ----------
    name : str
        Registry key.
    task : str
        Task kind in :mod:`simulations.tasks` (``image_classification``,
        ``text_classification`` or ``extractive_qa``).
    head : str
        Module name of the output ``nn.Linear``.
    value_layers : tuple[str, ...]
        Module names of the attention value projections (``nn.Linear``), in layer
        order; empty for CNNs.
    is_transformers : bool
        Whether the model is a ``transformers.PreTrainedModel`` (weights load with
        ``from_pretrained(<dir>)``) rather than a torchvision-style ``nn.Module``
        (weights load from a ``state_dict`` file).
    builder : Callable[[int], nn.Module]
        ``builder(num_classes)`` returns a randomly initialised model.
    lr : float, optional
        The model's learning rate where its task's default does not suit it (None: the
        task's).
    """

    name: str
    task: str
    head: str
    value_layers: tuple[str, ...]
    is_transformers: bool
    builder: Callable[[int], nn.Module]
    lr: float | None = None

    @property
    def transfer_layers(self) -> tuple[str, ...]:
        """Head followed by the value projections."""
        return (self.head, *self.value_layers)


# --------------------------------------------------------------------------------------
# CNNs
# --------------------------------------------------------------------------------------


def _init_cnn(module: nn.Module) -> None:
    """torchvision's ResNet initialisation (Kaiming fan-out convs, unit BatchNorm)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stem and three stages of torchvision ``BasicBlock``.

    With ``blocks_per_stage=1`` this is ResNet-8 (1 + 3·2 conv layers + ``fc``).

    Parameters
    ----------
    num_classes : int
        Output size of ``fc``.
    widths : tuple[int, int, int]
        Channels of the three stages; stages 2 and 3 halve the resolution.
    blocks_per_stage : int
        ``BasicBlock`` count per stage.
    feature_dim : int, optional
        Project the pooled features to this width (``fc1`` + ReLU) before the head.

    Shapes: input float ``[B, 3, H, W]``, output logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(blocks_per_stage):
                s = stride if b == 0 else 1
                downsample = None
                if s != 1 or in_planes != planes:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_planes, planes, kernel_size=1, stride=s, bias=False),
                        nn.BatchNorm2d(planes),
                    )
                blocks.append(BasicBlock(in_planes, planes, stride=s, downsample=downsample))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # HtFLlib's backbones end in one feature width: a projection, then the head
        self.fc1 = nn.Linear(widths[2], feature_dim) if feature_dim else None
        self.fc = nn.Linear(feature_dim or widths[2], num_classes)
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, 3, H, W]`` to logits ``[B, num_classes]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x if self.fc1 is None else torch.relu(self.fc1(x)))


class Cnn4(nn.Module):
    """The 4-layer CNN of HtFLlib's model families (two 5×5 conv + pool stages, a 512-wide
    hidden layer ``fc1``, head ``fc``), with BatchNorm after each convolution.

    Shapes: input float ``[B, 3, 32, 32]``, output logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 5 * 5, 512)
        self.fc = nn.Linear(512, num_classes)
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, 3, 32, 32]`` to logits ``[B, num_classes]``."""
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.relu(self.fc1(torch.flatten(x, 1))))


class ConvNet(nn.Module):
    """A plain VGG-style CNN for 32×32 inputs: stages of 3×3 conv, BatchNorm, ReLU and 2×2
    max-pooling (``widths``: channels per stage), global average pooling, a
    ``fc1: widths[-1] → feature_dim`` layer with ReLU, and the head ``fc``. With
    ``feature_dim=512`` it fits HtFLlib's model families (one feature width, one head shape).

    Shapes: input float ``[B, 3, 32, 32]``, output logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...], feature_dim: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc1 = nn.Linear(channels, feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)
        _init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, 3, 32, 32]`` to logits ``[B, num_classes]``."""
        return self.fc(torch.relu(self.fc1(self.features(x))))


def _build_cnn4(num_classes: int) -> nn.Module:
    return Cnn4(num_classes)


def _build_resnet18(num_classes: int) -> nn.Module:
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _build_resnet8(num_classes: int) -> nn.Module:
    return CifarResNet(num_classes, widths=(16, 32, 64), blocks_per_stage=1)


def _build_resnet8_f512(num_classes: int) -> nn.Module:
    return CifarResNet(num_classes, widths=(16, 32, 64), blocks_per_stage=1, feature_dim=512)


def _build_convnet5(num_classes: int) -> nn.Module:
    return ConvNet(num_classes, widths=(16, 32, 64))


def _build_convnet6(num_classes: int) -> nn.Module:
    return ConvNet(num_classes, widths=(32, 64, 128, 256))


def _mobilenet_v2_cifar(num_classes: int, width_mult: float) -> nn.Module:
    """torchvision MobileNetV2 with the first two stride-2 stages set to stride 1.

    The stem conv (``features.0.0``) and the depthwise conv of the first stride-2
    inverted residual (``features.2.conv.1.0``) get stride 1, so a 32×32 input ends at
    4×4 instead of 1×1.
    """
    model = mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    model.features[0][0].stride = (1, 1)
    first = next(b for b in model.features if isinstance(b, InvertedResidual) and b.stride == 2)
    for m in first.modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)
    first.stride = 1  # use_res_connect stays False: its in/out channels differ
    return model


def _build_mobilenet_v2(num_classes: int) -> nn.Module:
    return _mobilenet_v2_cifar(num_classes, width_mult=1.0)


def _build_mobilenet_v2_small(num_classes: int) -> nn.Module:
    return _mobilenet_v2_cifar(num_classes, width_mult=0.35)


# --------------------------------------------------------------------------------------
# Cheap text models (HtFLlib's text families have fastText and TextCNN)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextLogits:
    """What a text classifier returns, as a ``transformers`` one does: ``logits (B, C)``."""

    logits: torch.Tensor


class _TextClassifier(nn.Module):
    """Token embeddings ``(V, embed)`` → :meth:`encode` → ``fc1`` (→ ``feature_dim``, ReLU) →
    head ``fc``. Input ``input_ids``, ``attention_mask`` int64 ``(B, L)``."""

    def __init__(self, num_classes: int, width: int, embed: int, feature_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(_BERT_VOCAB_SIZE, embed, padding_idx=0)
        self.fc1 = nn.Linear(width, feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L, embed)``, ``(B, L, 1)`` -> ``(B, width)``."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextLogits:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = self.encode(self.embedding(input_ids), mask)
        return TextLogits(self.fc(torch.relu(self.fc1(pooled))))


class FastText(_TextClassifier):
    """fastText (Joulin et al., 2017): the mean of the token embeddings."""

    def __init__(self, num_classes: int, embed: int = 64, feature_dim: int = 128) -> None:
        super().__init__(num_classes, embed, embed, feature_dim)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TextCNN(_TextClassifier):
    """TextCNN (Kim, 2014): 1-D convolutions of widths 3, 4, 5 (``filters`` each), ReLU, max
    over the attended positions."""

    def __init__(
        self, num_classes: int, embed: int = 64, filters: int = 64, feature_dim: int = 128
    ) -> None:
        super().__init__(num_classes, 3 * filters, embed, feature_dim)
        self.convs = nn.ModuleList(
            nn.Conv1d(embed, filters, kernel_size=k, padding=k // 2) for k in (3, 4, 5)
        )

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, length = (tokens * mask).transpose(1, 2), tokens.shape[1]
        blocked = (1.0 - mask.transpose(1, 2)) * -1e4  # padding never wins the max
        return torch.cat(
            [(torch.relu(conv(x))[..., :length] + blocked).amax(-1) for conv in self.convs], 1
        )


def _build_fasttext(num_classes: int) -> nn.Module:
    return FastText(num_classes)


def _build_textcnn(num_classes: int) -> nn.Module:
    return TextCNN(num_classes)


# --------------------------------------------------------------------------------------
# Transformers
# --------------------------------------------------------------------------------------


def _bert_classifier(num_classes: int, hidden: int, layers: int, heads: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=_BERT_VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        num_labels=num_classes,
    )
    return BertForSequenceClassification(config)


def _build_bert_tiny(num_classes: int) -> nn.Module:
    return _bert_classifier(num_classes, hidden=128, layers=2, heads=2)


def _build_bert_small(num_classes: int) -> nn.Module:
    return _bert_classifier(num_classes, hidden=256, layers=4, heads=4)


def _build_distilbert_tiny_qa(num_classes: int) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForQuestionAnswering

    if num_classes != 2:
        raise ValueError(
            f"num_classes must be 2 for extractive QA (start/end logits), got {num_classes}"
        )
    config = DistilBertConfig(
        vocab_size=_BERT_VOCAB_SIZE, dim=128, n_layers=2, n_heads=2, hidden_dim=512
    )
    return DistilBertForQuestionAnswering(config)


def _value_layers(template: str, n: int) -> tuple[str, ...]:
    return tuple(template.format(i=i) for i in range(n))


ARCHITECTURES: MappingProxyType[str, ArchSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ArchSpec("cnn4", "image_classification", "fc", (), False, _build_cnn4),
            ArchSpec("resnet18", "image_classification", "fc", (), False, _build_resnet18),
            ArchSpec("resnet8", "image_classification", "fc", (), False, _build_resnet8),
            # HtFLlib-style: 512-d features and one head shape, cheap on a CPU (benchmark)
            ArchSpec("resnet8_f512", "image_classification", "fc", (), False, _build_resnet8_f512),
            ArchSpec("convnet5", "image_classification", "fc", (), False, _build_convnet5),
            ArchSpec("convnet6", "image_classification", "fc", (), False, _build_convnet6),
            ArchSpec(
                "mobilenet_v2",
                "image_classification",
                "classifier.1",
                (),
                False,
                _build_mobilenet_v2,
            ),
            ArchSpec(
                "mobilenet_v2_small",
                "image_classification",
                "classifier.1",
                (),
                False,
                _build_mobilenet_v2_small,
            ),
            ArchSpec(
                "bert_tiny",
                "text_classification",
                "classifier",
                _value_layers("bert.encoder.layer.{i}.attention.self.value", 2),
                True,
                _build_bert_tiny,
            ),
            # shallow models from scratch: AdamW at 5e-3, not the transformers' 5e-4
            ArchSpec("fasttext", "text_classification", "fc", (), False, _build_fasttext, 5e-3),
            ArchSpec("textcnn", "text_classification", "fc", (), False, _build_textcnn, 5e-3),
            ArchSpec(
                "bert_small",
                "text_classification",
                "classifier",
                _value_layers("bert.encoder.layer.{i}.attention.self.value", 4),
                True,
                _build_bert_small,
            ),
            ArchSpec(
                "distilbert_tiny_qa",
                "extractive_qa",
                "qa_outputs",
                _value_layers("distilbert.transformer.layer.{i}.attention.v_lin", 2),
                True,
                _build_distilbert_tiny_qa,
            ),
        )
    }
)


def custom_arch(spec: Mapping[str, Any], task: str, head: str) -> ArchSpec:
    """The :class:`ArchSpec` of a model given as a ``_target_`` (:mod:`simulations.custom`),
    solving ``task`` with the ``nn.Linear`` named ``head``."""
    builder = functools.partial(custom.build_model, dict(spec))
    return ArchSpec(custom.label(spec), task, head, (), False, builder)


def arch_spec(arch: str | ArchSpec) -> ArchSpec:
    """Return the :class:`ArchSpec` of ``arch`` (a registry key; an ArchSpec is returned as
    it is).

    Raises
    ------
    ValueError
        If ``arch`` is unknown; the message lists the known names.
    """
    if isinstance(arch, ArchSpec):
        return arch
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(
            f"unknown arch {arch!r}; known architectures: {sorted(ARCHITECTURES)}"
        ) from None


def _load_weights(model: nn.Module, spec: ArchSpec, path: Path, num_classes: int) -> nn.Module:
    if not path.exists():
        raise FileNotFoundError(
            f"pretrained_path {path} for arch {spec.name!r} does not exist (weights are "
            "never downloaded; provide a local "
            f"{'from_pretrained directory' if spec.is_transformers else 'state_dict file'})"
        )
    if spec.is_transformers:
        if not path.is_dir():
            raise ValueError(
                f"pretrained_path {path} for arch {spec.name!r} must be a directory "
                "written by save_pretrained()"
            )
        kwargs = {} if spec.task == "extractive_qa" else {"num_labels": num_classes}
        loaded = type(model).from_pretrained(str(path), local_files_only=True, **kwargs)
        logger.info("loaded %s weights from %s", spec.name, path)
        return loaded
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"pretrained_path {path} does not hold a state_dict (a dict)")
    model.load_state_dict(state, strict=True)
    logger.info("loaded %s weights from %s", spec.name, path)
    return model


def build_model(
    arch: str | ArchSpec,
    num_classes: int,
    *,
    pretrained_path: str | os.PathLike[str] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build a registered architecture, offline.

    Parameters
    ----------
    arch : str or ArchSpec
        A key of :data:`ARCHITECTURES`, or the spec of a model target (:func:`custom_arch`).
    num_classes : int
        Output classes; must be 2 for ``distilbert_tiny_qa`` (start/end logits).
    pretrained_path : str or os.PathLike, optional
        Local weights: a ``state_dict`` file (``torch.save``) for torchvision-style
        models, a ``save_pretrained`` directory for transformers models. Never downloads.
    seed : int, optional
        If given, the random initialisation uses ``torch.manual_seed(seed)`` inside a
        forked RNG state, leaving the global RNG untouched.

    Returns
    -------
    nn.Module
        The model in train mode, on CPU.

    Raises
    ------
    ValueError
        Unknown ``arch`` (the message lists known names) or invalid ``num_classes``.
    FileNotFoundError
        ``pretrained_path`` does not exist.
    """
    spec = arch_spec(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if seed is None:
        model = spec.builder(num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.builder(num_classes)
    if pretrained_path is not None:
        model = _load_weights(model, spec, Path(pretrained_path).expanduser(), num_classes)
    logger.debug("built %s: %d parameters", spec.name, sum(p.numel() for p in model.parameters()))
    return model.train()
