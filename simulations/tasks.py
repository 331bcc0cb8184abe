"""Local training and evaluation loops, one per task kind.

Every task kind implements the :class:`Task` protocol and is selected by name with
:func:`get_task`:

- ``image_classification``: models from :mod:`simulations.models` mapping float
  ``[B, 3, H, W]`` to logits ``[B, C]``; datasets yield ``(image, label)`` (e.g.
  :class:`simulations.data.ImageDataset`). SGD, momentum 0.9, weight decay 5e-4.
- ``text_classification``: ``transformers`` sequence classifiers; datasets yield dicts
  with ``input_ids``, ``attention_mask`` ``[L]`` and ``labels`` (e.g.
  :class:`simulations.data.TextClassificationDataset`). AdamW.
- ``extractive_qa``: ``transformers`` QA models returning ``start_logits`` /
  ``end_logits``; the dataset must be a :class:`simulations.data.QADataset` (or a
  ``torch.utils.data.Subset`` of one). AdamW.

Every loop takes a :class:`~simulations.numerics.Numerics`: the forward passes run under its
autocast (bf16 or fp32) and convolutional models in its layout; losses are computed in fp32.

A round trains for a number of batches (``steps``, the paper's time unit) or whole
``epochs``. A :class:`TrainState` carries a client's place in its shuffled data (and, where
the caller keeps it, its optimiser state) from one round to the next, so 4-batch rounds still
walk through the whole partition, epoch after epoch, as one continuous training run would.

Training is deterministic for a given ``seed`` on CPU: epoch ``e`` visits the rows in a
permutation seeded with ``(data_seed, e)``, and the loop runs under
``torch.random.fork_rng`` with ``torch.manual_seed(seed)`` (augmentation, dropout), leaving
the caller's global RNG state untouched.
"""

from __future__ import annotations

import logging
import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from copy import deepcopy
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mergenet_fl.flower.extension import ClientExtension
from simulations.data import QADataset
from simulations.numerics import Numerics

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_TRAIN_CONFIG",
    "TASKS",
    "TRANSFORMER_TRAIN_CONFIG",
    "calibrated_batchnorm",
    "ExtractiveQATask",
    "ImageClassificationTask",
    "Task",
    "TextClassificationTask",
    "TrainConfig",
    "TrainState",
    "decode_best_span",
    "get_task",
    "plan_batches",
    "resolve_device",
    "squad_exact_match",
    "squad_f1",
    "squad_normalize",
]

Device = str | torch.device
FP32 = Numerics()  # fp32 in PyTorch's default layout


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of a task.

    Attributes
    ----------
    optimizer : {"sgd", "adamw"}
        SGD (with ``momentum``) or AdamW.
    lr : float
        Default learning rate, used when ``train(..., lr=None)``.
    momentum : float
        SGD momentum (ignored by AdamW).
    weight_decay : float
        L2 penalty (SGD) or decoupled weight decay (AdamW).
    max_grad_norm : float or None
        Clip the global gradient norm to this value; ``None`` disables clipping.
    num_workers : int
        DataLoader worker processes for training.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_grad_norm: float | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(
                f"TrainConfig.optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"TrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}"
            )
        if self.num_workers < 0:
            raise ValueError(f"TrainConfig.num_workers must be >= 0, got {self.num_workers}")


#: CNNs from scratch: SGD lr 0.05, momentum 0.9, weight decay 5e-4.
IMAGE_TRAIN_CONFIG = TrainConfig()
#: Small randomly initialised transformers: AdamW lr 5e-4, weight decay 0.01, clip 1.0.
TRANSFORMER_TRAIN_CONFIG = TrainConfig(
    optimizer="adamw", lr=5e-4, weight_decay=0.01, max_grad_norm=1.0
)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else the CPU; ``"cpu"``; ``"cuda"`` (refused without one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda, but torch sees no CUDA device here (use auto or cpu)")
    return torch.device(name)


@dataclass
class TrainState:
    """What a client carries from one round's training to the next.

    ``epoch`` and ``batch`` are its place in its shuffled data (the next batch to visit);
    ``optimizer`` is the optimiser's ``state_dict()`` (momentum, Adam moments), or None
    before the first round.
    """

    epoch: int = 0
    batch: int = 0
    optimizer: dict[str, Any] | None = None


def plan_batches(
    num_examples: int, batch_size: int, steps: int, state: TrainState, data_seed: int
) -> list[list[int]]:
    """The row indices of the next ``steps`` batches, advancing ``state``'s place.

    Epoch ``e`` visits the rows in ``torch.randperm`` order seeded with
    ``data_seed * 1_000_003 + e``, cut into batches of ``batch_size`` (the last may be
    smaller); after the last batch of an epoch the next epoch begins.
    """
    per_epoch = math.ceil(num_examples / batch_size)
    batches: list[list[int]] = []
    order: list[int] = []
    order_epoch = -1
    for _ in range(steps):
        if state.batch >= per_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        if order_epoch != state.epoch:
            gen = torch.Generator().manual_seed(data_seed * 1_000_003 + state.epoch)
            order, order_epoch = torch.randperm(num_examples, generator=gen).tolist(), state.epoch
        start = state.batch * batch_size
        batches.append(order[start : start + batch_size])
        state.batch += 1
    return batches


@runtime_checkable
class Task(Protocol):
    """Train/evaluate loops of one task kind."""

    name: str
    config: TrainConfig

    def train(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        steps: int | None = None,
        epochs: int | None = None,
        state: TrainState | None = None,
        data_seed: int | None = None,
        lr: float | None = None,
        device: Device = "cpu",
        extension: ClientExtension | None = None,
        head: str | None = None,
        numerics: Numerics = FP32,
        installed: Collection[nn.Parameter] = (),
    ) -> dict[str, float]:
        """Train ``model`` in place; return ``train_loss``, ``train_seconds``, ``num_examples``."""
        ...

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        device: Device = "cpu",
        calibrate_on: Dataset | None = None,
        numerics: Numerics = FP32,
    ) -> dict[str, float]:
        """Evaluate ``model``; return ``loss``, task metrics, ``chance``, ``top_share``,
        ``eval_seconds`` and ``num_examples``."""
        ...


# --------------------------------------------------------------------------------------
# Shared loop
# --------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with ``torch.manual_seed(seed)`` and restore the caller's RNG state after."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


HEAD_INPUT = "_mergenet_head_input"  # where head_inputs() leaves the last batch's features


@contextmanager
def head_inputs(model: nn.Module, head: str | None) -> Iterator[None]:
    """Keep the input of module ``head`` (the features, ``(B, d)``) of every forward pass on
    ``model`` as ``getattr(model, HEAD_INPUT)``, until the block ends."""
    if head is None:
        yield
        return

    def keep(module: nn.Module, args: tuple) -> None:
        setattr(model, HEAD_INPUT, args[0].float())  # a method's loss terms stay in fp32

    handle = model.get_submodule(head).register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()
        if hasattr(model, HEAD_INPUT):
            delattr(model, HEAD_INPUT)


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _trim_padding(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the sequence dimension of a padded batch to its longest attended length."""
    length = int(batch["attention_mask"].sum(dim=1).max().item())
    length = max(length, 1)
    full = batch["attention_mask"].shape[1]
    return {k: v[:, :length] if v.ndim >= 2 and v.shape[1] == full else v for k, v in batch.items()}


class _SupervisedTask:
    """Generic seeded training loop; subclasses define the per-batch loss."""

    name: str = ""

    def __init__(self, config: TrainConfig | None = None) -> None:
        self.config = config if config is not None else self.default_config()

    @staticmethod
    def default_config() -> TrainConfig:
        return IMAGE_TRAIN_CONFIG

    def _batch_loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """Return the mean loss of ``batch`` and its size."""
        raise NotImplementedError

    def _extended_loss(
        self, model: nn.Module, batch: Any, device: torch.device, extension: ClientExtension
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The task's loss, the loss with ``extension``'s term added, and the batch size.
        Only classification tasks take extensions (they see logits and labels)."""
        raise ValueError(f"{self.name} takes no client extension")

    def _optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=lr, momentum=self.config.momentum, weight_decay=self.config.weight_decay
            )
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)

    def _loader(
        self, dataset: Dataset, batches: list[list[int]], device: torch.device
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.config.num_workers,
            pin_memory=device.type == "cuda",
        )

    def train(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        steps: int | None = None,
        epochs: int | None = None,
        state: TrainState | None = None,
        data_seed: int | None = None,
        lr: float | None = None,
        device: Device = "cpu",
        extension: ClientExtension | None = None,
        head: str | None = None,
        numerics: Numerics = FP32,
        installed: Collection[nn.Parameter] = (),
        after_step: Callable[[nn.Module, int], None] | None = None,
    ) -> dict[str, float]:
        """Train ``model`` in place on ``dataset`` for ``steps`` batches or ``epochs`` passes.

        Parameters
        ----------
        model : nn.Module
            Moved to ``device`` and left in train mode.
        dataset : Dataset
            Training examples.
        batch_size : int
            Examples per step; the last batch of an epoch may be smaller.
        seed : int
            Seeds augmentation and dropout of this call.
        steps, epochs : int
            Exactly one: batches to train (continuing from ``state``), or whole passes
            (``epochs × ceil(len(dataset) / batch_size)`` batches).
        state : TrainState, optional
            Place in the data and optimiser state; updated in place. Default: a fresh one.
        data_seed : int, optional
            Seeds the shuffle order of every epoch (default: ``seed``); keep it fixed across
            rounds so that the epochs continue.
        lr : float, optional
            Learning rate; defaults to ``self.config.lr``.
        device : str or torch.device
            Where to train.
        extension : ClientExtension, optional
            A method's client side: its
            :meth:`~mergenet_fl.flower.extension.ClientExtension.loss` is added to every
            batch's loss (``head``: the module whose input are the features), and its
            :meth:`~mergenet_fl.flower.extension.ClientExtension.modules` train with the model
            (one optimiser, whose state ``state`` carries).
        numerics : Numerics
            Precision of the forward passes and layout of convolutional models.
        installed : collection of nn.Parameter
            Parameters whose values came from elsewhere since ``state`` was saved (the server
            installed them): their optimiser state is dropped, so that no stale momentum
            drags them back along the client's old trajectory.
        after_step : callable, optional
            ``after_step(model, steps)`` after each optimiser step, ``steps`` done in this call
            (MergeNet's ``delta_steps``: the gradient pieces after the first ``k``).

        Returns
        -------
        dict[str, float]
            ``train_loss`` (mean per-example task loss over this call's batches, without the
            extension's term), ``train_steps``,
            ``train_seconds`` (wall clock) and ``num_examples`` (``len(dataset)``). An empty
            dataset trains nothing and returns zeros.
        """
        if (steps is None) == (epochs is None):
            raise ValueError(f"give exactly one of steps and epochs, got {steps} and {epochs}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lr = self.config.lr if lr is None else lr
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        num_examples = len(dataset)
        if num_examples == 0:
            logger.warning("%s.train: empty dataset, nothing to train", self.name)
            return {"train_loss": 0.0, "train_steps": 0, "train_seconds": 0.0, "num_examples": 0}

        state = TrainState() if state is None else state
        if steps is None:
            steps = epochs * math.ceil(num_examples / batch_size)
        batches = plan_batches(
            num_examples, batch_size, steps, state, seed if data_seed is None else data_seed
        )
        dev = torch.device(device)
        modules = [model, *(extension.modules().values() if extension is not None else ())]
        start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        with ExitStack() as stack:
            for module in modules:
                stack.enter_context(numerics.layout(module.to(dev)))
            params = [p for m in modules for p in m.train().parameters() if p.requires_grad]
            optimizer = self._optimizer(params, lr)
            if state.optimizer is not None:
                optimizer.load_state_dict(state.optimizer)
                for param in installed:
                    optimizer.state.pop(param, None)
            stack.enter_context(_seeded(seed, dev))
            if extension is not None:
                stack.enter_context(head_inputs(model, head))
            for done, batch in enumerate(self._loader(dataset, batches, dev), start=1):
                with numerics.autocast(dev):
                    if extension is None:
                        loss, size = self._batch_loss(model, batch, dev)
                        total = loss
                    else:
                        loss, total, size = self._extended_loss(model, batch, dev, extension)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if self.config.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
                optimizer.step()
                loss_sum += loss.item() * size
                seen += size
                if after_step is not None:
                    after_step(model, done)
        seconds = time.perf_counter() - start
        state.optimizer = optimizer.state_dict()
        train_loss = loss_sum / seen
        if not math.isfinite(train_loss):
            logger.warning("%s.train: non-finite training loss %s", self.name, train_loss)
        return {
            "train_loss": train_loss,
            "train_steps": len(batches),
            "train_seconds": seconds,
            "num_examples": num_examples,
        }

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        device: Device = "cpu",
        calibrate_on: Dataset | None = None,
        numerics: Numerics = FP32,
    ) -> dict[str, float]:
        """Evaluate ``model`` (left in eval mode on ``device``); see subclasses."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


BN_CALIBRATION_ROWS = 1280


def calibrated_batchnorm(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    numerics: Numerics = FP32,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``dataset`` (its
    first :data:`BN_CALIBRATION_ROWS` rows, in batches of ``batch_size``); ``model`` itself if
    it has none.

    A few local steps leave the running statistics (momentum 0.1) behind the weights, and
    eval-mode accuracy near chance; evaluation scores a calibrated copy ("precise BN"), so
    training itself spends nothing on it and the model's own statistics are untouched.
    """
    if len(dataset) == 0 or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return model
    rows = list(range(min(len(dataset), BN_CALIBRATION_ROWS)))
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size)
    copy = deepcopy(model).to(device)
    # seeded: the augmentation draws
    with _seeded(0, device), numerics.layout(copy), numerics.autocast(device):
        torch.optim.swa_utils.update_bn(loader, copy, device=device)
    return copy


_EMPTY_EVALUATION = MappingProxyType(
    {"loss": 0.0, "chance": 0.0, "top_share": 0.0, "eval_seconds": 0.0, "num_examples": 0}
)


class _ClassificationTask(_SupervisedTask):
    def _logits_and_labels(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return logits ``[B, C]`` and labels ``[B]``."""
        raise NotImplementedError

    def _batch_loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        logits, labels = self._logits_and_labels(model, batch, device)
        return F.cross_entropy(logits, labels), labels.shape[0]

    def _extended_loss(
        self, model: nn.Module, batch: Any, device: torch.device, extension: ClientExtension
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        logits, labels = self._logits_and_labels(model, batch, device)
        loss = F.cross_entropy(logits, labels)
        features = getattr(model, HEAD_INPUT, None)

        def forward(other: nn.Module, head: str) -> tuple[torch.Tensor, torch.Tensor]:
            with head_inputs(other, head):
                other_logits, _ = self._logits_and_labels(other, batch, device)
                return getattr(other, HEAD_INPUT), other_logits

        extra = extension.loss(features, logits, labels, forward)
        return loss, loss if extra is None else loss + extra, labels.shape[0]

    @torch.no_grad()  # not inference mode: class means of these become targets of a loss
    def embed(
        self,
        model: nn.Module,
        dataset: Dataset,
        head: str,
        *,
        batch_size: int,
        device: Device,
        numerics: Numerics = FP32,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(features: (B, d), logits: (B, C), labels: (B,))`` of ``dataset`` under ``model``
        in eval mode, in fp32; the features are the input of the module ``head``. A training
        set's augmentation draws are seeded, so that the same model gives the same
        embedding."""
        dev = torch.device(device)
        was_training = model.training
        model.to(dev).eval()
        try:
            # seeded: a training set's augmentation draws are reproducible
            with head_inputs(model, head), _seeded(0, dev), numerics.layout(model):
                for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                    with numerics.autocast(dev):
                        logits, labels = self._logits_and_labels(model, batch, dev)
                    yield getattr(model, HEAD_INPUT), logits, labels
        finally:
            model.train(was_training)

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        device: Device = "cpu",
        calibrate_on: Dataset | None = None,
        numerics: Numerics = FP32,
    ) -> dict[str, float]:
        """Evaluate a classifier.

        Returns
        -------
        dict[str, float]
            ``loss`` (mean cross-entropy), ``accuracy`` (fraction in [0, 1]), ``chance`` (the
            accuracy of always predicting the most frequent label), ``top_share`` (the share
            of predictions that fall in the most predicted class: near 1, the model predicts
            one class for everything), ``eval_seconds`` and ``num_examples``; zeros for an
            empty dataset.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        start = time.perf_counter()
        dev = torch.device(device)
        if calibrate_on is not None:
            model = calibrated_batchnorm(model, calibrate_on, batch_size, dev, numerics)
        model.to(dev).eval()  # before inference mode: parameters moved there could not train
        loss_sum, correct, seen = 0.0, 0, 0
        labels_seen: Counter[int] = Counter()
        predicted: Counter[int] = Counter()
        with numerics.layout(model), torch.inference_mode():
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                with numerics.autocast(dev):
                    logits, labels = self._logits_and_labels(model, batch, dev)
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                predictions = logits.argmax(dim=1)
                correct += int((predictions == labels).sum().item())
                seen += labels.shape[0]
                labels_seen.update(labels.tolist())
                predicted.update(predictions.tolist())
        if seen == 0:
            return _EMPTY_EVALUATION | {"accuracy": 0.0}
        return {
            "loss": loss_sum / seen,
            "accuracy": correct / seen,
            "chance": max(labels_seen.values()) / seen,
            "top_share": max(predicted.values()) / seen,
            "eval_seconds": time.perf_counter() - start,
            "num_examples": seen,
        }


class ImageClassificationTask(_ClassificationTask):
    """Image classification: batches ``(images [B, 3, H, W], labels [B])``, SGD."""

    name = "image_classification"

    @staticmethod
    def default_config() -> TrainConfig:
        return IMAGE_TRAIN_CONFIG

    def _logits_and_labels(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        images = images.to(device, non_blocking=True)
        return model(images).float(), labels.to(device, non_blocking=True)


class TextClassificationTask(_ClassificationTask):
    """Text classification with a ``transformers`` sequence classifier, AdamW.

    Batches are dicts with ``input_ids``, ``attention_mask`` (``[B, L]``, padding trimmed
    per batch) and ``labels`` (``[B]``); the model's ``logits`` are scored with
    cross-entropy here, independently of the model's ``problem_type``.
    """

    name = "text_classification"

    @staticmethod
    def default_config() -> TrainConfig:
        return TRANSFORMER_TRAIN_CONFIG

    def _logits_and_labels(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _to_device(_trim_padding(batch), device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float(), batch["labels"]


# --------------------------------------------------------------------------------------
# Extractive QA
# --------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop punctuation, articles, extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _gold_or_empty(gold_answers: Sequence[str]) -> Sequence[str]:
    # An impossible question has no gold answers; the correct prediction is "".
    return gold_answers if len(gold_answers) > 0 else ("",)


def squad_exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0.

    ``gold_answers`` empty means unanswerable: only the empty prediction scores 1.0.
    """
    pred = squad_normalize(prediction)
    return float(any(pred == squad_normalize(g) for g in _gold_or_empty(gold_answers)))


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens = squad_normalize(prediction).split()
    gold_tokens = squad_normalize(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Max token-overlap F1 of ``prediction`` against the gold answers (SQuAD 2.0 rules)."""
    return max(_token_f1(prediction, g) for g in _gold_or_empty(gold_answers))


def decode_best_span(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor,
    max_answer_length: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the best answer span per row, or the CLS "no answer" span.

    A span ``(s, e)`` is valid when both tokens are context tokens, ``s <= e`` and
    ``e - s + 1 <= max_answer_length``; its score is ``start_logits[s] + end_logits[e]``.
    The null score is ``start_logits[0] + end_logits[0]`` (CLS); the null span wins ties
    and rows without context tokens.

    Parameters
    ----------
    start_logits, end_logits : torch.Tensor
        float, shape ``[B, L]``.
    context_mask : torch.Tensor
        bool, shape ``[B, L]``, True on context tokens.
    max_answer_length : int
        Longest span in tokens.

    Returns
    -------
    starts, ends : torch.Tensor
        int64, shape ``[B]``; ``(0, 0)`` means no answer.
    """
    if start_logits.shape != end_logits.shape or start_logits.shape != context_mask.shape:
        raise ValueError(
            f"shapes differ: start {tuple(start_logits.shape)}, end {tuple(end_logits.shape)}, "
            f"context_mask {tuple(context_mask.shape)}"
        )
    if max_answer_length < 1:
        raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}")
    length = start_logits.shape[1]
    start_logits, end_logits = start_logits.float(), end_logits.float()
    scores = start_logits[:, :, None] + end_logits[:, None, :]  # [B, L(start), L(end)]
    pos = torch.arange(length, device=start_logits.device)
    span_len = pos[None, :] - pos[:, None]  # [L, L]: end - start
    valid = (span_len >= 0) & (span_len < max_answer_length)
    mask = context_mask.bool()
    valid = valid[None] & mask[:, :, None] & mask[:, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    best_score, best = scores.flatten(1).max(dim=1)
    starts, ends = best // length, best % length
    null = (start_logits[:, 0] + end_logits[:, 0]) >= best_score
    starts = starts.masked_fill(null, 0)
    ends = ends.masked_fill(null, 0)
    return starts, ends


def _base_qa_dataset(dataset: Dataset) -> QADataset:
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    if not isinstance(base, QADataset):
        raise TypeError(
            f"extractive_qa needs a QADataset (or a Subset of one), got {type(dataset).__name__}"
        )
    return base


class ExtractiveQATask(_SupervisedTask):
    """Extractive QA with a ``transformers`` QA model (start/end logits), AdamW.

    Loss: mean of the start and end cross-entropies (as in ``transformers``). Metrics:
    SQuAD 2.0 exact match and F1 (fractions in [0, 1]) of the best span decoded by
    :func:`decode_best_span` against all gold answers; an unanswerable question counts
    as correct when the CLS span is predicted.
    """

    name = "extractive_qa"

    def __init__(self, config: TrainConfig | None = None, max_answer_length: int = 30) -> None:
        super().__init__(config)
        if max_answer_length < 1:
            raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}")
        self.max_answer_length = max_answer_length

    @staticmethod
    def default_config() -> TrainConfig:
        return TRANSFORMER_TRAIN_CONFIG

    @staticmethod
    def _forward(
        model: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device
    ) -> tuple[dict[str, torch.Tensor], Any, torch.Tensor]:
        batch = _to_device(_trim_padding(batch), device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.start_logits, out.end_logits = out.start_logits.float(), out.end_logits.float()
        loss = 0.5 * (
            F.cross_entropy(out.start_logits, batch["start_positions"])
            + F.cross_entropy(out.end_logits, batch["end_positions"])
        )
        return batch, out, loss

    def _batch_loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        _, _, loss = self._forward(model, batch, device)
        return loss, batch["input_ids"].shape[0]

    def evaluate(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int,
        device: Device = "cpu",
        calibrate_on: Dataset | None = None,
        numerics: Numerics = FP32,
    ) -> dict[str, float]:
        """Evaluate a QA model.

        Returns
        -------
        dict[str, float]
            ``loss``, ``em``, ``f1`` (means over questions, fractions in [0, 1]),
            ``chance`` (the score of answering "no answer" to everything: the share of
            unanswerable questions), ``top_share`` (the share of "no answer" predictions),
            ``eval_seconds`` and ``num_examples``; zeros for an empty dataset.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        start_time = time.perf_counter()
        base = _base_qa_dataset(dataset)
        dev = torch.device(device)
        model.to(dev).eval()  # before inference mode: parameters moved there could not train
        loss_sum, em_sum, f1_sum, seen, impossible, abstained = 0.0, 0.0, 0.0, 0, 0, 0
        with torch.inference_mode():
            for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                with numerics.autocast(dev):
                    on_dev, out, loss = self._forward(model, batch, dev)
                size = on_dev["input_ids"].shape[0]
                starts, ends = decode_best_span(
                    out.start_logits, out.end_logits, on_dev["context_mask"], self.max_answer_length
                )
                offsets = batch["offsets"]
                for row, (s, e, idx) in enumerate(
                    zip(
                        starts.tolist(), ends.tolist(), batch["example_index"].tolist(), strict=True
                    )
                ):
                    example = base.examples[idx]
                    pred = (
                        ""
                        if s == 0
                        else example.context[int(offsets[row, s, 0]) : int(offsets[row, e, 1])]
                    )
                    impossible += not example.answer_texts
                    abstained += s == 0
                    em_sum += squad_exact_match(pred, example.answer_texts)
                    f1_sum += squad_f1(pred, example.answer_texts)
                loss_sum += loss.item() * size
                seen += size
        if seen == 0:
            return _EMPTY_EVALUATION | {"em": 0.0, "f1": 0.0}
        return {
            "loss": loss_sum / seen,
            "em": em_sum / seen,
            "f1": f1_sum / seen,
            "chance": impossible / seen,
            "top_share": abstained / seen,
            "eval_seconds": time.perf_counter() - start_time,
            "num_examples": seen,
        }


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

TASKS: MappingProxyType[str, type[_SupervisedTask]] = MappingProxyType(
    {
        ImageClassificationTask.name: ImageClassificationTask,
        TextClassificationTask.name: TextClassificationTask,
        ExtractiveQATask.name: ExtractiveQATask,
    }
)


def get_task(name: str, config: TrainConfig | None = None) -> Task:
    """Return a fresh task of kind ``name`` (a key of :data:`TASKS`).

    Parameters
    ----------
    name : str
        ``image_classification``, ``text_classification`` or ``extractive_qa``.
    config : TrainConfig, optional
        Optimiser settings; defaults to :data:`IMAGE_TRAIN_CONFIG` for images and
        :data:`TRANSFORMER_TRAIN_CONFIG` otherwise.
    """
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
    return cls(config)
