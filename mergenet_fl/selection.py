"""Which layers of a model take part in knowledge transfer, and their matrix view.

A transferred weight is always handled as a matrix ``W: (m, n)``:

- ``nn.Linear(in, out).weight`` is ``(out, in)`` as it is;
- ``nn.Conv2d(c, o, (kh, kw)).weight`` is ``(o, c, kh, kw)``, viewed as ``(o, c*kh*kw)``.

Hugging Face BERT / DistilBERT attention projections are ``nn.Linear`` and need nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

SUPPORTED_KINDS = ("linear", "conv2d")


class SelectionError(ValueError):
    """A layer spec selects nothing, or selects a module that cannot take part."""


def layer_kind(module: nn.Module, name: str) -> str:
    """The transfer kind of ``module``; raise :class:`SelectionError` if it has none."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise SelectionError(
                f"layer {name!r} is a grouped/depthwise Conv2d (groups={module.groups}); "
                f"supported kinds: {', '.join(SUPPORTED_KINDS)} (Conv2d with groups=1)"
            )
        return "conv2d"
    raise SelectionError(
        f"layer {name!r} is a {type(module).__name__}; supported kinds: "
        f"{', '.join(SUPPORTED_KINDS)} (nn.Linear, nn.Conv2d with groups=1)"
    )


def _matches(name: str, pattern: str) -> bool:
    """Exact name, dotted suffix (``"fc"`` matches ``"head.fc"``), or a full regex match."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


@dataclass(frozen=True)
class LayerSpec:
    """What a client selects: ``targets`` and ``exclude`` are names, dotted suffixes or regexes."""

    targets: tuple[str, ...]
    exclude: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) or isinstance(self.exclude, str):
            raise SelectionError("LayerSpec.targets and .exclude are sequences of patterns")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.targets:
            raise SelectionError("LayerSpec.targets is empty: name at least one layer")


@dataclass(frozen=True)
class SelectedLayer:
    """One selected module: its name, kind and the shape of its weight."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)`` of the matrix view."""
        m = self.weight_shape[0]
        n = 1
        for d in self.weight_shape[1:]:
            n *= d
        return m, n


def select_layers(model: nn.Module, spec: LayerSpec) -> list[SelectedLayer]:
    """Resolve ``spec`` on ``model``; the result is in module order.

    Raises :class:`SelectionError` when nothing matches (quoting the spec and candidate names)
    or when a matched module is of an unsupported kind.
    """
    selected: list[SelectedLayer] = []
    for name, module in model.named_modules():
        if not name or not any(_matches(name, p) for p in spec.targets):
            continue
        if any(_matches(name, p) for p in spec.exclude):
            continue
        kind = layer_kind(module, name)
        selected.append(SelectedLayer(name, kind, tuple(module.weight.shape)))
    if not selected:
        raise SelectionError(
            f"layer spec targets={list(spec.targets)} exclude={list(spec.exclude)} "
            f"matches no module; candidates: {candidate_names(model)}"
        )
    return selected


def candidate_names(model: nn.Module, limit: int = 8) -> list[str]:
    """A few names of modules that could take part (for error messages)."""
    names = [n for n, m in model.named_modules() if _is_supported(m)]
    return names[:limit] + (["..."] if len(names) > limit else [])


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def describe_selection(model: nn.Module, spec: LayerSpec) -> str:
    """A human-readable table of what ``spec`` selects on ``model``."""
    rows = [f"{'layer':<48} {'kind':<7} {'weight':<18} matrix"]
    for layer in select_layers(model, spec):
        m, n = layer.matrix_shape
        rows.append(f"{layer.name:<48} {layer.kind:<7} {str(layer.weight_shape):<18} {m}x{n}")
    return "\n".join(rows)


def get_matrix(model: nn.Module, layer: SelectedLayer) -> torch.Tensor:
    """A copy of a selected layer's weight as a float32 matrix ``(m, n)``."""
    weight = model.get_submodule(layer.name).weight
    return weight.detach().reshape(layer.matrix_shape).to(torch.float32, copy=True)


def set_matrix(model: nn.Module, layer: SelectedLayer, matrix: torch.Tensor) -> None:
    """Write ``matrix: (m, n)`` back into the layer's weight, reshaped to its own shape."""
    weight = model.get_submodule(layer.name).weight
    if tuple(matrix.shape) != layer.matrix_shape:
        raise SelectionError(
            f"layer {layer.name!r}: matrix of shape {tuple(matrix.shape)} does not fit "
            f"weight view {layer.matrix_shape}"
        )
    with torch.no_grad():
        weight.copy_(matrix.reshape(weight.shape).to(weight.dtype))


def layers_by_name(layers: Iterable[SelectedLayer]) -> dict[str, SelectedLayer]:
    """Index selected layers by name."""
    return {layer.name: layer for layer in layers}


def as_spec(targets: Sequence[str] | str, exclude: Sequence[str] | str = ()) -> LayerSpec:
    """Build a :class:`LayerSpec` from strings or sequences (a comma-separated string is split)."""

    def split(value: Sequence[str] | str) -> tuple[str, ...]:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return tuple(value)

    return LayerSpec(split(targets), split(exclude))
