"""Linear layers through oneDNN with weights packed once, for scoring on x86 CPUs.

On CPU `torch.nn.Linear` multiplies through MKL (float32) or oneDNN with the weight in its plain
layout, on every call. oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the kernel that
torch.compile's inductor uses for frozen CPU models) takes a weight reordered once into its own
blocked layout. Measured on SmolLM2-135M and Pythia-160M shapes (8 windows of 511, 2 threads): the
forward pass plus head ran 14-16% faster in float32 on an AVX512 CPU, 6-14% with oneDNN and MKL
limited to AVX2 (float32), and 3-6% in bfloat16 on a CPU with native bfloat16; float32 hidden
states agree to 1e-5 (docs/benchmarks.md, "Scoring"). Only scoring uses it
(`tokendyn.models.extract`): one reorder per checkpoint pays off over thousands of positions, not
over the one-token steps of generation.

Packing is limited to the architectures in `MODEL_TYPES`, whose forward only calls their linear
layers: some others read a layer's `.weight` inside the forward (Mamba's `dt_proj`, Falcon's
`query_key_value`) or rescale it in place (RWKV), which a packed layer, having no `.weight`, breaks.

Where an MLP applies a GELU or ReLU straight to its first layer's output (`ACTIVATED`), oneDNN
applies it inside that layer (a post-op) instead of in a separate pass over the MLP's widest
tensor: 0-4% off the Pythia-160M forward in float32, alternating in one process (AVX512, 2 threads;
docs/benchmarks.md, "Causal attention in blocks of queries").
"""

from __future__ import annotations

import platform

import torch
from transformers import activations

from tokendyn.models import gpu

# Weight dtypes oneDNN's linear may run on x86 CPUs (float16 needs AVX512-FP16): bfloat16 only where
# the CPU has native bfloat16 (`supported`).
DTYPES = (torch.float32, torch.bfloat16)

# `config.model_type` of the architectures whose modeling code in transformers (read in 5.24) uses its
# `nn.Linear` layers only by calling them and (read in 5.25) calls the attention function that
# `config._attn_implementation` names without branching on that name (`tokendyn.models.attention`).
# Any other model, and any model whose class comes from outside transformers (--trust-remote-code),
# is scored with its own layers and transformers' own attention (`audited`).
MODEL_TYPES = frozenset(
    {
        "cohere", "gemma", "gemma2", "gemma3_text", "gpt_bigcode", "gpt_neox", "gptj", "granite", "llama",
        "mistral", "mixtral", "olmo", "olmo2", "olmoe", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
        "qwen3_moe", "smollm3", "stablelm", "starcoder2",
    }
)  # fmt: skip

# Per model_type: (class, its first linear layer, its activation) of the modules whose forward is
# `activation(linear(x))` and uses that activation nowhere else (transformers 5.25).
ACTIVATED = {
    "gpt_bigcode": ("GPTBigCodeMLP", "c_fc", "act"),
    "gpt_neox": ("GPTNeoXMLP", "dense_h_to_4h", "act"),
    "gptj": ("GPTJMLP", "fc_in", "act"),
    "opt": ("OPTDecoderLayer", "fc1", "activation_fn"),
    "phi": ("PhiMLP", "fc1", "activation_fn"),
    "starcoder2": ("Starcoder2MLP", "c_fc", "act"),
}
# transformers' activation modules -> oneDNN's post-op and its algorithm. GELUTanh (PytorchGELUTanh in
# older transformers) and NewGELU are one formula, GELU's tanh approximation; GELUActivation is the exact
# (erf) GELU in C or in Python.
POST_OPS = {
    activations.GELUActivation: ("gelu", "none"),
    getattr(activations, "GELUTanh", None) or activations.PytorchGELUTanh: ("gelu", "tanh"),
    activations.NewGELUActivation: ("gelu", "tanh"),
    torch.nn.ReLU: ("relu", ""),
}


class PackedLinear(torch.nn.Module):
    """A `torch.nn.Linear` for inference whose weight oneDNN has reordered once (same products)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Plain attributes, not parameters: `model.to()` must not move an opaque oneDNN tensor.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.post_op = ("none", "")  # an activation oneDNN applies to the output (`POST_OPS`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activation, algorithm = self.post_op
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, activation, [], algorithm)


def available() -> bool:
    """Whether this torch and CPU run oneDNN's linear: an x86 CPU (measured there only) and oneDNN built in."""
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs weights of `dtype` on this CPU: float32 wherever it is `available`;
    bfloat16 only with native bfloat16 (AVX512-BW/VL/DQ or AVX-NE-CONVERT; oneDNN refuses to pack it
    on an AVX2-only CPU)."""
    if dtype not in DTYPES or not available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def audited(model: torch.nn.Module) -> bool:
    """Whether `model`'s class is transformers' own (not remote code) for a `config.model_type` in `MODEL_TYPES`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return type(model).__module__.startswith("transformers.models.") and model_type in MODEL_TYPES


def weight_copies(device: str, dtype: torch.dtype, model_type: str) -> int:
    """How many copies of a model's weights scoring may hold in memory on `device` in `dtype`: 2 where
    `pack_linear_layers` may pack them (the packed copy beside the loaded weights; an upper bound, as
    embeddings other than a tied head are not packed), else 1."""
    packs = torch.device(device).type == "cpu" and model_type in MODEL_TYPES and supported(dtype)
    return 2 if packs else 1


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every plain `torch.nn.Linear` of a CPU model in a `supported` dtype by a `PackedLinear`, in
    place; returns how many were replaced (0 where oneDNN is not available, the model is elsewhere or
    its class is not transformers' own for a `config.model_type` in `MODEL_TYPES`).

    Subclasses of `Linear` (quantized, adapters) keep their own forward. A tied head gets its own packed
    copy; the input embedding keeps the original weight. The packed weights are new memory, while the
    originals may stay mapped from the checkpoint's file (clean pages the kernel can reclaim): a model
    whose linear weights take more than half the available RAM is left unpacked. The activations of
    `ACTIVATED` modules move into their packed layers as oneDNN post-ops.
    """
    if not available() or not audited(model):
        return 0
    layers = [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        if type(child) is torch.nn.Linear and child.weight.device.type == "cpu" and supported(child.weight.dtype)
    ]
    weight_bytes = sum(child.weight.nbytes for _, _, child in layers)
    if 2 * weight_bytes > gpu.free_memory("cpu")[0]:
        return 0
    for module, name, child in layers:
        setattr(module, name, PackedLinear(child))
    _fuse_activations(model)
    return len(layers)


def _fuse_activations(model: torch.nn.Module) -> None:
    """Move the activation of each `ACTIVATED` module into its packed linear layer (an identity takes its place)."""
    if model.config.model_type not in ACTIVATED:
        return
    owner, linear_name, activation_name = ACTIVATED[model.config.model_type]
    for module in model.modules():
        if type(module).__name__ != owner:
            continue
        linear, activation = getattr(module, linear_name), getattr(module, activation_name)
        if isinstance(linear, PackedLinear) and type(activation) in POST_OPS:
            linear.post_op = POST_OPS[type(activation)]
            setattr(module, activation_name, torch.nn.Identity())
