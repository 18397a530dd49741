"""Linear layers through oneDNN with weights packed once, for scoring on x86 CPUs.

On CPU `torch.nn.Linear` multiplies through MKL (float32) or oneDNN with the weight in its plain
layout, on every call. oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the kernel that
torch.compile's inductor uses for frozen CPU models) takes a weight reordered once into its own
blocked layout. Measured on SmolLM2-135M and Pythia-160M shapes (8 windows of 511, 2 threads): the
forward pass plus head ran 14-16% faster in float32 on an AVX512 CPU, 7-14% with oneDNN and MKL
limited to AVX2, and 3-5% in bfloat16; the hidden states agree to 1e-5 (docs/benchmarks.md,
"Scoring"). Only scoring uses it (`tokendyn.models.extract`): one reorder per checkpoint pays off
over thousands of positions, not over the one-token steps of generation.
"""

from __future__ import annotations

import platform

import torch

from tokendyn.models import gpu

# Weight dtypes oneDNN's linear runs natively on x86 CPUs (float16 needs AVX512-FP16).
DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(torch.nn.Module):
    """A `torch.nn.Linear` for inference whose weight oneDNN has reordered once (same products)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Plain attributes, not parameters: `model.to()` must not move an opaque oneDNN tensor.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def available() -> bool:
    """Whether this torch and CPU run oneDNN's linear: an x86 CPU (measured there only) and oneDNN built in."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def weight_copies(device: str, dtype: torch.dtype) -> int:
    """How many copies of a model's weights scoring holds in memory on `device` in `dtype`: 2 where
    `pack_linear_layers` may pack them (the packed copy beside the loaded weights), else 1."""
    return 2 if torch.device(device).type == "cpu" and dtype in DTYPES and available() else 1


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every plain `torch.nn.Linear` of a CPU model in float32 or bfloat16 by a `PackedLinear`, in
    place; returns how many were replaced (0 where oneDNN is not available or the model is elsewhere).

    Subclasses of `Linear` (quantized, adapters) keep their own forward. A tied head gets its own packed
    copy; the input embedding keeps the original weight. The packed weights are new memory, while the
    originals may stay mapped from the checkpoint's file (clean pages the kernel can reclaim): a model
    whose linear weights take more than half the available RAM is left unpacked.
    """
    if not available():
        return 0
    layers = [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        if type(child) is torch.nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in DTYPES
    ]
    weight_bytes = sum(child.weight.nbytes for _, _, child in layers)
    if 2 * weight_bytes > gpu.free_memory("cpu")[0]:
        return 0
    for module, name, child in layers:
        setattr(module, name, PackedLinear(child))
    return len(layers)
