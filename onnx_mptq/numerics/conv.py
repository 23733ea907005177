"""Convolution as a matrix product (numpy only).

For a 2-D convolution of group 1 with kernel ``(kh, kw)``, strides, pads ``(top, left, bottom,
right)`` and dilations::

    conv(x, W)[s, o, i, j] == patches(x)[(s, i, j)] @ W.reshape(O, -1)[o]

where a patch is the ``(C, kh, kw)`` window at output position ``(i, j)`` (dilated taps),
flattened in that order. :func:`im2col` gives the patches as rows, by
:func:`numpy.lib.stride_tricks.sliding_window_view` (a view; the one copy is the final reshape).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs of a 2-D Conv besides its kernel size."""

    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)


def im2col(x: np.ndarray, kernel: tuple[int, int], g: ConvGeometry = ConvGeometry()) -> np.ndarray:
    """Patches of ``x`` (S, C, H, W) as rows (S * OH * OW, C * kh * kw), flattened in (C, kh, kw)
    order, rows in (s, i, j) order; the dtype of ``x``. ValueError where the kernel does not fit."""
    x = np.asarray(x)
    t, l, b, r = g.pads
    if any(g.pads):
        x = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    s, c = x.shape[:2]
    kh, kw = kernel
    (sh, sw), (dh, dw) = g.strides, g.dilations
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1  # dilated extent of the kernel
    if x.shape[2] < eh or x.shape[3] < ew:
        raise ValueError(f"conv kernel {tuple(kernel)} (dilations {g.dilations}) does not fit images of shape {x.shape}")
    win = sliding_window_view(x, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]  # (S, C, OH, OW, kh, kw)
    oh, ow = win.shape[2:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(s * oh * ow, c * kh * kw)  # (S*OH*OW, C*kh*kw)
