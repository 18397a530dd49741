"""Where and in which precision models run: `--device auto` and `--dtype auto`.

auto picks the fastest device (cuda, then mps, then cpu) and a half precision only where the
hardware multiplies it natively; otherwise float32. On CPU the choice follows the CPU's feature
flags alone, so it is the same on every run of a machine (a timed matmul flipped it under load).
On a CPU without native bfloat16 (AVX2 has none; AVX512_BF16 and AMX do) torch emulates bfloat16
and runs it many times slower than float32, so an explicit half precision there is timed and
warned about.

The decisions are pure functions of the facts (`Hardware`), so they are tested without the
hardware; `probe()` gathers the facts of this machine. TOKENDYN_DTYPE in the environment names
what auto stands for instead (float32: the same numbers on every machine of a pool, whatever
their CPUs run natively); an explicit --dtype still wins.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokendyn.errors import TokendynError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
DEVICE_CHOICES = "auto, cpu, cuda[:N] or mps"
# /proc/cpuinfo flags of x86 CPUs that multiply bfloat16 natively (oneDNN uses them).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# aarch64 Features entry of CPUs with bfloat16 dot products (e.g. Graviton3, Apple M2+).
ARM_BF16_FLAGS = ("bf16",)
# An explicit half precision is warned about when its timed matmul is this many times slower than
# float32: emulated bfloat16 runs ~30x slower, while a busy machine can make a native one look 2x slower.
WARN_SLOWDOWN = 3.0
# Timed matmul: (n x n) @ (n x n), 0.1-0.3 ms in float32 or native bfloat16 on 2 cores, ~40 ms in
# emulated bfloat16. One such product is at the mercy of one interruption: each dtype is timed in
# PROBE_ROUNDS alternating rounds of at least PROBE_REPEATS products and PROBE_SECONDS, best kept
# (3 products once timed native bfloat16 at 0.7x of float32 on a CPU where it runs 2-3x faster).
PROBE_SIZE = 256
PROBE_REPEATS = 3
PROBE_SECONDS = 0.01
PROBE_ROUNDS = 2
AUTO_DTYPE_ENV = "TOKENDYN_DTYPE"  # what --dtype auto stands for when set (a dtype name or alias)


@dataclass(frozen=True)
class Hardware:
    """What the dtype choice depends on.

    device : the resolved device ("cpu", "cuda:0", "mps").
    cpu_capability : torch's dispatch level on CPU (`torch.backends.cpu.get_cpu_capability()`).
    cpu_flags : the CPU's feature flags (lower case).
    cuda_bf16 : whether the CUDA device runs bfloat16 (Ampere or newer).
    matmul_seconds : timed matmul per dtype name on the device (empty when not measured).
    """

    device: str
    cpu_capability: str = ""
    cpu_flags: frozenset[str] = frozenset()
    cuda_bf16: bool = False
    matmul_seconds: dict[str, float] = field(default_factory=dict)

    def native_bf16(self) -> bool:
        return any(flag in self.cpu_flags for flag in NATIVE_BF16_FLAGS + ARM_BF16_FLAGS)

    def slowdown(self, name: str) -> float | None:
        """How many times slower a matmul in dtype `name` ran than in float32 (None if not timed)."""
        if name not in self.matmul_seconds or "float32" not in self.matmul_seconds:
            return None
        return self.matmul_seconds[name] / self.matmul_seconds["float32"]


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype to run in, why, and a warning to show (empty when none)."""

    name: str
    reason: str
    warning: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def resolve_device(device: str) -> str:
    """`auto` -> cuda if available, else mps, else cpu; any other device is checked and returned."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise TokendynError(f"unknown device '{device}'; use {DEVICE_CHOICES}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise TokendynError("--device cuda requested but no CUDA GPU is available; use --device auto or cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise TokendynError("--device mps requested but MPS is not available; use --device auto or cpu")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype as `DTYPES` spells it ("float32", "bfloat16", "float16")."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def canonical_dtype(name: str) -> str:
    """`auto`, or the full name of a dtype given by name or alias (bf16, fp16, fp32)."""
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name != "auto" and name not in DTYPES:
        raise TokendynError(f"unknown dtype '{name}'; use auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return name


def decide_dtype(requested: str, hw: Hardware) -> DtypeChoice:
    """The dtype for `requested` (a canonical name or "auto") on hardware `hw`.

    auto: bfloat16 on CUDA devices that support it and on CPUs with native bfloat16 (feature
    flags); float32 otherwise (MPS included: float16 can overflow in models trained in bfloat16).
    An explicit half precision on a CPU where it was timed WARN_SLOWDOWN times slower than float32
    comes with a warning giving the slowdown.
    """
    kind = hw.device.split(":")[0]
    if requested != "auto":
        slowdown = hw.slowdown(requested) if kind == "cpu" and requested != "float32" else None
        warning = ""
        if slowdown is not None and slowdown > WARN_SLOWDOWN:
            warning = (
                f"--dtype {requested} is {slowdown:.1f}x slower than float32 on this CPU "
                f"({hw.cpu_capability or 'unknown capability'}, "
                f"{'native' if hw.native_bf16() else 'no native'} bfloat16: timed matmul); "
                "use --dtype auto or float32"
            )
        return DtypeChoice(requested, "requested", warning)
    if kind == "cuda":
        if hw.cuda_bf16:
            return DtypeChoice("bfloat16", "CUDA device with bfloat16 support")
        return DtypeChoice("float32", "CUDA device without bfloat16 (float16 can overflow in bfloat16-trained models)")
    if kind == "mps":
        return DtypeChoice("float32", "MPS: half precision is not safe for every model")
    if not hw.native_bf16():
        return DtypeChoice(
            "float32",
            f"CPU without native bfloat16 ({hw.cpu_capability or 'unknown capability'}, "
            f"none of {', '.join(NATIVE_BF16_FLAGS)}): bfloat16 would be emulated",
        )
    flags = ", ".join(sorted(f for f in hw.cpu_flags if f in NATIVE_BF16_FLAGS + ARM_BF16_FLAGS))
    return DtypeChoice("bfloat16", f"CPU with native bfloat16 ({hw.cpu_capability or 'unknown capability'}, {flags})")


def cpu_flags() -> frozenset[str]:
    """Feature flags of this CPU from /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.lower().split())
    return frozenset()


def time_matmul(
    name: str,
    device: str = "cpu",
    size: int = PROBE_SIZE,
    repeats: int = PROBE_REPEATS,
    seconds: float = PROBE_SECONDS,
) -> float:
    """Best timing (seconds) of a (size x size) matmul in dtype `name` on `device`, over at least
    `repeats` products and until `seconds` have been spent in them."""
    a = torch.randn(size, size, device=device).to(DTYPES[name])
    b = torch.randn(size, size, device=device).to(DTYPES[name])
    torch.matmul(a, b)  # warm-up: kernels, caches
    best, spent, done = float("inf"), 0.0, 0
    while done < repeats or spent < seconds:
        started = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        best, spent, done = min(best, elapsed), spent + elapsed, done + 1
    return best


@functools.cache
def probe(device: str, requested: str) -> Hardware:
    """The facts of this machine that the choice of `requested` on `device` needs (timed once per process).

    The CPU matmul is timed only for an explicit half precision (to warn when it is emulated).
    """
    kind = device.split(":")[0]
    flags = cpu_flags()
    hw = Hardware(
        device,
        torch.backends.cpu.get_cpu_capability(),
        flags,
        cuda_bf16=kind == "cuda" and torch.cuda.is_bf16_supported(),
    )
    if kind == "cpu" and requested in ("bfloat16", "float16"):
        timings: dict[str, float] = {}
        for name in ["float32", requested] * PROBE_ROUNDS:
            timings[name] = min(timings.get(name, float("inf")), time_matmul(name))
        hw = Hardware(hw.device, hw.cpu_capability, hw.cpu_flags, hw.cuda_bf16, timings)
    return hw


@functools.cache
def choose(device: str = "auto", dtype: str = "auto", verbose: bool = True) -> tuple[str, torch.dtype]:
    """Resolve `device` and `dtype` (names, aliases or auto) for this machine; returns (device, torch dtype).

    Prints auto's choice and its reason to stderr and warns when an explicit half precision is
    slow here. auto stands for $TOKENDYN_DTYPE when that is set. Cached: the timing and the
    message happen once per process.
    """
    device = resolve_device(device)
    requested = canonical_dtype(dtype)
    pinned = os.environ.get(AUTO_DTYPE_ENV, "") if requested == "auto" else ""
    if pinned:
        try:
            name = canonical_dtype(pinned)
        except TokendynError as err:
            raise TokendynError(f"{AUTO_DTYPE_ENV}={pinned}: {err}") from None
        choice = decide_dtype(name, probe(device, name))
        if name != "auto":
            choice = dataclasses.replace(choice, reason=f"{AUTO_DTYPE_ENV}={pinned}")
    else:
        choice = decide_dtype(requested, probe(device, requested))
    if choice.warning:
        warnings.warn(choice.warning, stacklevel=2)
    if verbose and requested == "auto":
        print(f"tokendyn: running on {device} in {choice.name} ({choice.reason})", file=sys.stderr)
    return device, choice.dtype
