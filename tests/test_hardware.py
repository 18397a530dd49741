"""--device auto / --dtype auto: the decision logic on injected facts, and the probe on this machine."""

import pytest
import torch

from tokendyn.errors import TokendynError
from tokendyn.models import hardware
from tokendyn.models.hardware import Hardware, canonical_dtype, decide_dtype

AVX2 = frozenset({"avx", "avx2", "fma"})
SAPPHIRE = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16"}


def test_aliases():
    assert [canonical_dtype(n) for n in ("bf16", "FP16", "fp32", "auto", "bfloat16")] == [
        "bfloat16",
        "float16",
        "float32",
        "auto",
        "bfloat16",
    ]
    with pytest.raises(TokendynError, match="unknown dtype 'float8'"):
        canonical_dtype("float8")


def test_auto_on_cpu_without_native_bf16_is_float32_without_timing():
    choice = decide_dtype("auto", Hardware("cpu", "AVX2", AVX2))
    assert choice.name == "float32" and "AVX2" in choice.reason and "emulated" in choice.reason
    assert not choice.warning


@pytest.mark.parametrize("bf16_seconds", [None, 0.5, 0.95, 3.0])
def test_auto_on_native_bf16_cpu_is_bfloat16_whatever_a_timing_says(bf16_seconds):
    timed = {} if bf16_seconds is None else {"float32": 1.0, "bfloat16": bf16_seconds}
    choice = decide_dtype("auto", Hardware("cpu", "AVX512", SAPPHIRE, matmul_seconds=timed))
    assert choice.name == "bfloat16" and "amx_bf16, avx512_bf16" in choice.reason and not choice.warning


def test_arm_bf16_feature_counts_as_native():
    assert decide_dtype("auto", Hardware("cpu", "DEFAULT", frozenset({"fp", "asimd", "bf16"}))).name == "bfloat16"


def test_explicit_bf16_on_emulating_cpu_warns_with_the_slowdown():
    hw = Hardware("cpu", "AVX2", AVX2, matmul_seconds={"float32": 0.01, "bfloat16": 0.32})
    choice = decide_dtype("bfloat16", hw)
    assert choice.name == "bfloat16" and choice.reason == "requested"
    assert "32.0x slower than float32" in choice.warning and "AVX2" in choice.warning
    fast = Hardware("cpu", "AVX512", SAPPHIRE, matmul_seconds={"float32": 0.01, "bfloat16": 0.005})
    busy = Hardware("cpu", "AVX512", SAPPHIRE, matmul_seconds={"float32": 0.01, "bfloat16": 0.02})
    assert not decide_dtype("bfloat16", fast).warning and not decide_dtype("bfloat16", busy).warning
    assert not decide_dtype("float32", hw).warning


@pytest.mark.parametrize(
    "hw, expected",
    [
        (Hardware("cuda:0", cuda_bf16=True), "bfloat16"),
        (Hardware("cuda", cuda_bf16=False), "float32"),
        (Hardware("mps"), "float32"),
    ],
)
def test_auto_on_accelerators(hw, expected):
    assert decide_dtype("auto", hw).name == expected


def test_devices():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert hardware.resolve_device("auto") == expected
    assert hardware.resolve_device("cpu") == "cpu"
    with pytest.raises(TokendynError, match="unknown device 'tpu'"):
        hardware.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TokendynError, match="no CUDA GPU"):
            hardware.resolve_device("cuda:1")


@pytest.fixture
def fresh_choice(monkeypatch):
    """`choose` without the tests' TOKENDYN_DTYPE (conftest.py), its cache cleared before and after."""
    monkeypatch.delenv("TOKENDYN_DTYPE")
    hardware.choose.cache_clear()
    yield monkeypatch
    hardware.choose.cache_clear()


def test_choose_on_this_machine_prints_the_reason(capsys, fresh_choice):
    device, dtype = hardware.choose("cpu", "auto")
    err = capsys.readouterr().err
    assert device == "cpu" and f"in {str(dtype).removeprefix('torch.')} (" in err
    hw = hardware.probe("cpu", "auto")
    assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert (dtype is torch.bfloat16) == decide_dtype("auto", hw).name.startswith("bf")


def test_tokendyn_dtype_names_what_auto_stands_for(capsys, fresh_choice):
    fresh_choice.setenv("TOKENDYN_DTYPE", "bf16")
    assert hardware.choose("cpu", "auto") == ("cpu", torch.bfloat16)
    assert "running on cpu in bfloat16 (TOKENDYN_DTYPE=bf16)" in capsys.readouterr().err
    assert hardware.choose("cpu", "float32") == ("cpu", torch.float32)  # an explicit dtype wins
    hardware.choose.cache_clear()
    fresh_choice.setenv("TOKENDYN_DTYPE", "double")
    with pytest.raises(TokendynError, match="TOKENDYN_DTYPE=double: unknown dtype 'double'"):
        hardware.choose("cpu", "auto")


def test_time_matmul_measures_positive_seconds():
    assert 0 < hardware.time_matmul("float32", size=32, repeats=2) < 1


def test_time_matmul_keeps_the_best_of_many_products(monkeypatch):
    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: calls.append(1) or real(a, b))
    hardware.time_matmul("float32", size=8, repeats=2, seconds=0)
    assert len(calls) == 3  # a warm-up, then `repeats` timed products
    calls.clear()
    hardware.time_matmul("float32", size=8, repeats=2, seconds=0.02)
    assert len(calls) > 10  # products of microseconds, repeated until 20 ms were spent in them


def test_probe_times_the_dtypes_in_alternating_rounds(monkeypatch):
    timed = []
    seconds = iter([4.0, 3.0, 1.0, 2.0])  # float32, bfloat16, float32, bfloat16
    monkeypatch.setattr(hardware, "time_matmul", lambda name: timed.append(name) or next(seconds))
    hardware.probe.cache_clear()
    try:
        assert hardware.probe("cpu", "auto").matmul_seconds == {}  # auto follows the flags: nothing timed
        hw = hardware.probe("cpu", "bfloat16")
    finally:
        hardware.probe.cache_clear()
    assert timed == ["float32", "bfloat16"] * hardware.PROBE_ROUNDS
    assert hw.matmul_seconds == {"float32": 1.0, "bfloat16": 2.0}  # the best round of each
