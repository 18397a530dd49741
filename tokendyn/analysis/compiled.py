"""Helpers of the compiled (numba) per-token kernels that several analyses share."""

from __future__ import annotations

import llvmlite.ir
import numba
import numba.extending


@numba.extending.intrinsic
def as_float32(typingctx, value):
    """value as float32; a uint16 is read as the bits of a float16 (numba has no float16 on the CPU),
    so a kernel handed `block.view(np.uint16)` converts a float16 store's values as it reads them."""

    def codegen(context, builder, signature, args):
        if signature.args[0] == numba.types.uint16:
            return builder.fpext(builder.bitcast(args[0], llvmlite.ir.HalfType()), llvmlite.ir.FloatType())
        return context.cast(builder, args[0], signature.args[0], numba.types.float32)

    return numba.types.float32(value), codegen


def decoded(value):
    """A kernel's read of one stored value: `as_float32` for the bits of a float16 (a uint16), any
    other number unchanged (float64 data stays float64). Compiled by its overload below."""
    return value


@numba.extending.overload(decoded)
def _decoded(value):
    if value == numba.types.uint16:
        return lambda value: as_float32(value)
    return lambda value: value
