"""Helpers of the compiled (numba) per-token kernels that several analyses share."""

from __future__ import annotations

import llvmlite.ir
import numba
import numba.extending
import numpy as np


@numba.extending.intrinsic
def as_float32(typingctx, value):
    """value as float32; a uint16 is read as the bits of a float16 (numba has no float16 on the CPU),
    so a kernel handed `block.view(np.uint16)` converts a float16 store's values as it reads them."""

    def codegen(context, builder, signature, args):
        if signature.args[0] == numba.types.uint16:
            return builder.fpext(builder.bitcast(args[0], llvmlite.ir.HalfType()), llvmlite.ir.FloatType())
        return context.cast(builder, args[0], signature.args[0], numba.types.float32)

    return numba.types.float32(value), codegen


def decoded(value: np.number | float) -> np.number | float:
    """A kernel's read of one stored value: `as_float32` for the bits of a float16 (a uint16), any
    other number unchanged (float64 data stays float64). Compiled by its overload below."""
    return value


@numba.extending.overload(decoded)
def _decoded(value):
    if value == numba.types.uint16:
        return lambda value: as_float32(value)
    return lambda value: value


@numba.extending.intrinsic
def as_float16(typingctx, value):
    """A float32 rounded to the nearest float16 (ties to even, as numpy's float16 arithmetic rounds its
    float32 results), returned as float32."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], llvmlite.ir.HalfType()), llvmlite.ir.FloatType())

    return numba.types.float32(numba.types.float32), codegen


def stored(values: np.ndarray) -> np.ndarray:
    """values as the compiled kernels read them with `decoded`: float16 as its bits (uint16), float64 as
    it is, any other dtype in float32 (no copy when already float32)."""
    if values.dtype == np.float16:
        return values.view(np.uint16)
    return values if values.dtype == np.float64 else values.astype(np.float32, copy=False)


def stored_difference(b: np.number | float, a: np.number | float) -> np.number | float:
    """b - a of two stored values as numpy computes it in the store's dtype: for float16 bits (uint16),
    in float32 rounded to float16; any other dtype in its own precision. Compiled by its overload."""
    return b - a


@numba.extending.overload(stored_difference)
def _stored_difference(b, a):
    if b == numba.types.uint16:
        return lambda b, a: as_float16(as_float32(b) - as_float32(a))
    return lambda b, a: b - a


def assign(out: np.ndarray, values: np.ndarray) -> None:
    """out[...] = values, for 2-D arrays of any strides; float16 values into float32 at SIMD speed.

    numpy converts float16 one element at a time (7-11 ns each on this project's AVX2 machine, most
    of the cost of reading a float16 store); LLVM's conversion takes about 0.15 ns. Exact either way.
    """
    if values.dtype == np.float16 and out.dtype == np.float32 and out.ndim == values.ndim == 2:
        _assign_halves(out, values.view(np.uint16))
    else:
        out[...] = values


@numba.njit(nogil=True, cache=True)
def _assign_halves(out: np.ndarray, bits: np.ndarray) -> None:
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = as_float32(bits[i, j])


@numba.njit(nogil=True, cache=True, error_model="numpy")
def ols_t(n: int, sum_y: float, sum_y2: float, sxy: float, sxx: float) -> tuple[float, float]:
    """(slope, t statistic) of the least-squares line y = a + b x through n >= 3 points, from the sums
    of y and y^2, sxy = sum (x - mean x) y and sxx = sum (x - mean x)^2.

    With syy = sum y^2 - (sum y)^2 / n: slope sxy / sxx, standard error
    sqrt((syy - slope sxy) / (n - 2) / sxx). A trajectory flat to float rounding (common in float16
    stores), syy <= 16 n eps sum y^2, has slope 0 and t 0, as does a slope of exactly 0; an exact line
    (standard error 0) has t +-inf; NaN propagates. The trend categories' kernel and the clusters'
    late-window kernel call it; `trends._fit` is the same rule vectorised with numpy.
    """
    syy = sum_y2 - sum_y * sum_y / n
    if syy <= 16 * n * np.finfo(np.float64).eps * sum_y2:
        return 0.0, 0.0
    slope = sxy / sxx
    if slope == 0:  # t 0, also where the standard error underflows to 0 (no 0/0)
        return 0.0, 0.0
    stderr = np.sqrt(max(syy - slope * sxy, 0.0) / (n - 2) / sxx)
    return slope, slope / stderr
