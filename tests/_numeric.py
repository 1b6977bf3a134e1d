"""Float comparisons that hold on any CPU: tolerances scale with the values' magnitude and dtype.

Two computations that are equal in exact arithmetic (cached vs uncached attention, one batch vs
two accumulated halves, DDP vs one process) differ in rounding, and how much depends on which
kernels the CPU picked: AVX-512/AMX and AVX2 builds of the same matmul round differently. A
fixed ``atol=1e-4`` on logits of magnitude 20 asks for 5e-6 relative precision, a few ulps of
fp32 after several layers, and fails on one machine while passing on another. So every check
here allows ``ULPS`` units of the dtype's epsilon, relative to each value and to the largest
magnitude compared (``scale``): loose enough for any kernel family, still orders of magnitude
tighter than what a real bug (a wrong cache position, a lost micro-batch) produces.
"""

from __future__ import annotations

import pytest
import torch

ULPS = 256  # fp32: 3.1e-5 relative; bf16: 2.0 (so low-precision checks pass `ulps` explicitly)


def rtol_for(dtype: torch.dtype, ulps: int = ULPS) -> float:
    return ulps * torch.finfo(dtype).eps


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, ulps: int = ULPS, scale: float | None = None, msg: str = ""
) -> None:
    """``|actual - expected| <= r·|expected| + r·scale`` elementwise, with r = ulps·eps(dtype).

    ``scale`` defaults to the largest |expected| (at least 1, so values near zero are not held to
    an absolute precision no computation has).
    """
    actual, expected = actual.detach(), expected.detach().to(actual.dtype)
    r = rtol_for(actual.dtype, ulps)
    magnitude = float(expected.abs().max()) if expected.numel() else 0.0
    scale = max(magnitude, 1.0) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=r, atol=r * scale, msg=(lambda m: f"{msg} {m}".strip()))


def approx(expected: float, *, ulps: int = ULPS, scale: float | None = None, dtype: torch.dtype = torch.float32):
    """``pytest.approx`` for a float computed in ``dtype``: relative r = ulps·eps, absolute r·scale."""
    r = rtol_for(dtype, ulps)
    return pytest.approx(expected, rel=r, abs=r * (max(abs(expected), 1.0) if scale is None else scale))
