"""Weight-only float8 for the language model's linear layers (``LLAVA_WEIGHT_DTYPE=fp8``).

Each weight matrix ``w`` [N, K] becomes float8 e4m3 bytes ``q`` [N, K] and one float32
scale per output channel (row): ``scale[n] = max_k |w[n, k]| / 448``, ``q = w / scale``
rounded to nearest. Activations stay in the model's dtype (weight-only): a product is
``y[:, n] = scale[n] * sum_k x[:, k] * q[n, k]``, the float8 values converted exactly to
the activations' dtype before the multiply. Decode reads half the bytes of bf16.

On a GPU with the fused kernels the products run in ``kernels.gemv`` (one row) and
``kernels.fp8_matmul`` (more rows); elsewhere :func:`linear` below converts the float8
matrix to the activations' dtype and multiplies (the reference the kernels are tested
against, and the CPU's path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["FP8_MAX", "WEIGHT_DTYPES", "Fp8Weight", "Weight", "linear", "quantize_fp8", "weight_dtype"]

FP8_MAX = 448.0  # the largest finite torch.float8_e4m3fn value

WEIGHT_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def weight_dtype(name: str) -> torch.dtype | None:
    """The dtype a ``weight_dtype`` setting names for the linear layers (None: the model's)."""
    key = (name or "auto").strip().lower()
    if key not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, not {name!r}")
    return WEIGHT_DTYPES[key]


@dataclass
class Fp8Weight:
    """A linear layer's weight [N, K] as float8 e4m3 with a float32 scale per output row."""

    q: torch.Tensor  # [N, K] torch.float8_e4m3fn, unit column stride
    scale: torch.Tensor  # [N] float32

    @property
    def shape(self) -> torch.Size:
        """The weight's shape [N, K]."""
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the float8 values and scales stand for, in ``dtype``."""
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def nbytes(self) -> int:
        """Bytes on the device (values and scales)."""
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


Weight = torch.Tensor | Fp8Weight


def quantize_fp8(w: torch.Tensor) -> Fp8Weight:
    """``w`` [N, K] as :class:`Fp8Weight`: per-row scale ``amax / 448`` (1 for an all-zero
    row, such as the LM head's padding), values rounded to nearest, on ``w``'s device."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, not {tuple(w.shape)}")
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
    return Fp8Weight(q=q, scale=scale.contiguous())


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for either kind of weight; a float8 one through its conversion to
    ``x``'s dtype (exact) and the per-row scale applied to the product in float32."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = (F.linear(x, w.q.to(x.dtype)).to(torch.float32) * w.scale).to(x.dtype)
    return y if bias is None else y + bias
