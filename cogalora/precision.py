"""Where and how a model computes: its device (:func:`resolve_device`) and its numeric precision,
``int8``, ``float32``, ``bfloat16``, ``float16`` or ``auto``.

- ``int8``: every linear product of the encoder and of the adapters runs on int8 codes with exact
  int32 sums (``cogalora.int8``); activations between the products stay float32. A row's result is
  the same bits alone and in any batch *by construction*: no floating-point sum whose rounding
  order depends on the batch. The fastest choice on CPUs with VNNI or AMX, and on GPUs.
- ``float32``: the reference. ``bfloat16`` / ``float16``: half precision. Their matrix products
  round a row's sums in an order the kernel picks from the batch's row count, so a row's scores can
  move in the last bits (float32: ~1e-7; half precision: ~1e-3) with its batch-mates.

``auto`` is ``int8`` wherever torch has integer matrix products (CPU, CUDA), else float32.
Routers always decide in float32 (see :meth:`cogalora.CoGaLoRAModel.set_precision`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """How a model computes: the activations' dtype, and whether linear products are exact integers."""

    name: str
    activations: torch.dtype
    """Dtype of hidden states, LayerNorm and attention (float32 for ``int8``)."""
    integer_products: bool = False
    """Linear products on int8 codes with exact int32 sums: bitwise batch invariant."""

    @property
    def half(self) -> bool:
        return self.activations in (torch.bfloat16, torch.float16)

    def __str__(self) -> str:
        return self.name


PRECISIONS: dict[str, Precision] = {
    "int8": Precision("int8", torch.float32, integer_products=True),
    "float32": Precision("float32", torch.float32),
    "bfloat16": Precision("bfloat16", torch.bfloat16),
    "float16": Precision("float16", torch.float16),
}
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
"""Every name a user can ask for (settings, command lines)."""


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device ``name`` means: ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


#: Devices where ``torch._int_mm`` runs.
_INTEGER_DEVICES = ("cpu", "cuda")


def resolve_precision(name: str | Precision, device: torch.device | str = "cpu") -> Precision:
    """The :class:`Precision` for a name; ``auto`` picks the device's fastest batch-invariant one."""
    if isinstance(name, Precision):
        return name
    if name == "auto":
        return PRECISIONS["int8" if torch.device(device).type in _INTEGER_DEVICES else "float32"]
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose from {list(PRECISION_CHOICES)}") from None
