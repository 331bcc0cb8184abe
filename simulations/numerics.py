"""How a client's model computes: its precision (fp32, or bf16 autocast) and memory layout.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA devices that support
it, and CPUs with AMX tiles or AVX512-BF16 dot products. A CPU without them emulates bf16: on an
AMD EPYC with AVX2 only (2026-12-03) a training step of the benchmark's CNNs took 7–17× longer
in bf16 than in fp32; on one with AVX512-BF16 (2026-12-05), 1.0–1.8× less at batch 32
(``python -m simulations.bench_train``). ``precision="auto"`` therefore checks the hardware,
never assumes it.

Channels-last (NHWC) lets oneDNN and cuDNN pick their fast convolution kernels; on the same
CPU it trained the CNNs 1.2–1.7× faster in fp32. The model is channels-last only inside a
training or evaluation call: everything else (factors, state dicts, packets) sees PyTorch's
default layout, and packets, factors and the adapter stay in fp32 whatever the precision.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "Numerics", "bf16_is_fast"]

PRECISIONS = ("fp32", "bf16", "auto")
# torch.cpu's feature probes, any of which means native bf16 arithmetic
CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: CUDA with bf16 support, or a CPU with AMX
    tiles or AVX512-BF16 instructions (checked through PyTorch's own CPU feature probes)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, name, None) for name in CPU_BF16_PROBES]
        return any(bool(probe()) for probe in probes if probe is not None)
    return False


@functools.cache  # keyed by device: once per process, not every message
def _warn_emulated(device: str) -> None:
    logger.warning(
        "precision=bf16 on %s, which has no native bf16 (no AMX / AVX512-BF16 / CUDA bf16): "
        "emulated, several times slower than fp32",
        device,
    )


@dataclass(frozen=True)
class Numerics:
    """Precision and layout of one client's training and evaluation.

    Attributes
    ----------
    precision : {"fp32", "bf16"}
        ``bf16``: forward passes under ``torch.autocast(dtype=torch.bfloat16)``; losses,
        gradients, optimiser state and weights stay fp32.
    channels_last : bool
        Convolutional models compute in channels-last layout.
    """

    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(
                f"Numerics.precision must be 'fp32' or 'bf16' (resolve 'auto' with "
                f"Numerics.resolve), got {self.precision!r}"
            )

    @classmethod
    def resolve(cls, precision: str, channels_last: bool, device: torch.device) -> Numerics:
        """``precision`` one of :data:`PRECISIONS`; ``auto`` is bf16 where
        :func:`bf16_is_fast`, else fp32. An explicit bf16 on hardware that emulates it is
        honoured, with a warning."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        fast = bf16_is_fast(device)
        if precision == "auto":
            precision = "bf16" if fast else "fp32"
        elif precision == "bf16" and not fast:
            _warn_emulated(str(device))
        return cls(precision, channels_last)  # type: ignore[arg-type]

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The forward pass's autocast context (disabled in fp32)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @contextmanager
    def layout(self, model: nn.Module) -> Iterator[None]:
        """``model`` in channels-last layout for the block, when asked and it has
        convolutions; back in the default layout after (its parameters stay the same
        objects, so an optimiser built inside the block keeps working). Inputs need no
        conversion: a convolution with a channels-last weight computes channels-last."""
        if not self.channels_last or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            yield
            return
        model.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            model.to(memory_format=torch.contiguous_format)
