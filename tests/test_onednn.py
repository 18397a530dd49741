"""oneDNN's packed linear layers: the same scores as transformers' own layers, and used by extract."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tokendyn
from conftest import save_checkpoint, write_suite
from tokendyn.models import onednn
from tokendyn.models.extract import extract, token_scores

pytestmark = pytest.mark.skipif(not onednn.available(), reason="oneDNN's linear runs on x86 CPUs only")


def _linears(model: torch.nn.Module) -> int:
    return sum(type(module) is torch.nn.Linear for module in model.modules())


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(not onednn.supported(torch.bfloat16), reason="this CPU emulates bfloat16"),
        ),
    ],
)
def test_packed_model_scores_as_the_plain_model(tokenizer, tmp_path, family, dtype):
    plain = save_checkpoint(tmp_path, family, tokenizer, seed=7).to(dtype)
    packed = copy.deepcopy(plain)
    n_linear = _linears(plain)
    assert onednn.pack_linear_layers(packed) == n_linear > 0
    assert _linears(packed) == 0 and isinstance(packed.get_output_embeddings(), onednn.PackedLinear)
    post_ops = {m.post_op for m in packed.modules() if isinstance(m, onednn.PackedLinear)} - {("none", "")}
    assert post_ops == {"opt": {("relu", "")}, "gpt_neox": {("gelu", "none")}, "llama": set()}[family]
    ids = torch.randint(0, len(tokenizer), (3, 20))
    ids[2, 12:] = -1  # right padding
    score = ids >= 0
    score[:, 0] = False
    with torch.inference_mode():
        want = token_scores(plain, ids, score, ["loss", "entropy"])
        got = token_scores(packed, ids, score, ["loss", "entropy"])
        hidden = (m.base_model(input_ids=ids[:2]).last_hidden_state.float() for m in (plain, packed))
        np.testing.assert_allclose(*hidden, atol=1e-5 if dtype == torch.float32 else 0.05)
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    for metric in want:
        np.testing.assert_allclose(got[metric], want[metric], atol=tolerance)
    # the tied input embedding keeps its weight; the packed head is a copy
    assert packed.get_input_embeddings().weight.shape == (len(tokenizer), packed.config.hidden_size)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu", "gelu_python", "silu"])
def test_activations_fused_into_packed_layers_match_the_plain_model(activation):
    """GPT-J's MLP with each kind of GELU (tanh approximation in Python or C, exact in C or Python), and
    one oneDNN has no post-op for here (SiLU), which stays a module."""
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, activation_function=activation)
    torch.manual_seed(4)
    plain = GPTJForCausalLM(config).eval()
    for layer in plain.transformer.h:  # pre-activations of order 1, where the GELU variants differ by ~1e-3
        torch.nn.init.normal_(layer.mlp.fc_in.weight, std=0.3)
    packed = copy.deepcopy(plain)
    onednn.pack_linear_layers(packed)
    fused = [type(layer.mlp.act) is torch.nn.Identity for layer in packed.transformer.h]
    assert fused == [activation != "silu"] * 2
    ids = torch.randint(0, 97, (2, 30))
    with torch.inference_mode():
        want, got = (m.transformer(input_ids=ids).last_hidden_state for m in (plain, packed))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("model_type", ["phi", "gpt_bigcode", "starcoder2"])
def test_other_activated_mlps_fuse_and_match_the_plain_model(model_type):
    """The `onednn.ACTIVATED` entries no other test builds: each MLP's activation moves into its packed
    first layer, and the hidden states stay those of the plain model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {
        "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "starcoder2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
    }[model_type]  # fmt: skip
    torch.manual_seed(8)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=97, **sizes)).eval()
    cls, linear, act = onednn.ACTIVATED[model_type]
    mlps = [m for m in plain.modules() if type(m).__name__ == cls]
    assert len(mlps) == 2
    for mlp in mlps:  # pre-activations of order 1, where a wrong GELU variant would show
        torch.nn.init.normal_(getattr(mlp, linear).weight, std=0.3)
    packed = copy.deepcopy(plain)
    onednn.pack_linear_layers(packed)
    for mlp in (m for m in packed.modules() if type(m).__name__ == cls):
        assert type(getattr(mlp, act)) is torch.nn.Identity and getattr(mlp, linear).post_op[0] == "gelu"
    ids = torch.randint(0, 97, (2, 30))
    with torch.inference_mode():
        want, got = (m.base_model(input_ids=ids).last_hidden_state for m in (plain, packed))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_packed_head_buffers(tokenizer, tmp_path):
    """A packed head has no `out=`: in float32 its product is the logits (no buffers); in bfloat16 the
    product is copied into one reused float32 buffer."""
    from tokendyn.models.extract import _head_buffers

    model = save_checkpoint(tmp_path, "llama", tokenizer, seed=10)
    onednn.pack_linear_layers(model)
    head = model.get_output_embeddings()
    assert _head_buffers(head, 4, torch.zeros(3, head.in_features)) is None
    if not onednn.supported(torch.bfloat16):
        return  # oneDNN cannot pack bfloat16 on this CPU
    hidden = torch.zeros(3, head.in_features, dtype=torch.bfloat16)
    half = onednn.PackedLinear(torch.nn.Linear(head.in_features, head.out_features, bias=False, dtype=torch.bfloat16))
    products, logits = _head_buffers(half, 4, hidden)
    assert products is None and logits.dtype == torch.float32 and logits.shape == (3, head.out_features)
    biased = onednn.PackedLinear(torch.nn.Linear(head.in_features, head.out_features, dtype=torch.bfloat16))
    assert _head_buffers(biased, 4, hidden) is None  # the bias is added by the layer: no reused buffer


def test_only_plain_linear_layers_in_supported_dtypes_are_packed(tokenizer, tmp_path):
    class Adapter(torch.nn.Linear):
        """A subclass with its own forward (as LoRA or quantized layers have): must keep it."""

    model = save_checkpoint(tmp_path, "llama", tokenizer, seed=8)
    layer = model.base_model.layers[0].mlp
    layer.up_proj = Adapter(layer.up_proj.in_features, layer.up_proj.out_features, bias=False)
    assert onednn.pack_linear_layers(model) == _linears(save_checkpoint(tmp_path / "b", "llama", tokenizer, 8)) - 1
    assert type(layer.up_proj) is Adapter
    half = save_checkpoint(tmp_path / "c", "llama", tokenizer, seed=8).to(torch.float16)
    assert onednn.pack_linear_layers(half) == 0  # oneDNN's float16 needs AVX512-FP16: left to torch


def test_architectures_that_read_their_weights_are_not_packed(tokenizer):
    """Mamba reads `dt_proj.weight` in its forward: its layers stay torch's, and it still scores."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=2)
    model = MambaForCausalLM(config).eval()
    n_linear = _linears(model)
    assert config.model_type not in onednn.MODEL_TYPES and onednn.weight_copies("cpu", torch.float32, "mamba") == 1
    assert onednn.pack_linear_layers(model) == 0 and _linears(model) == n_linear > 0
    ids = torch.randint(0, len(tokenizer), (1, 8))
    with torch.inference_mode():
        assert torch.isfinite(token_scores(model, ids, ids >= 0)["loss"]).all()


def test_bfloat16_is_not_packed_where_the_cpu_emulates_it(tmp_path):
    """oneDNN limited to AVX2 (as on the pool's AVX2-only machines) cannot pack bfloat16 weights: those
    stay torch's, float32 ones are packed."""
    probe = (
        "import torch\n"
        "from tokendyn.models import onednn\n"
        "from transformers import OPTConfig, OPTForCausalLM\n"
        "config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,"
        " word_embed_proj_dim=16)\n"
        "half = OPTForCausalLM(config).to(torch.bfloat16)\n"
        "print(onednn.supported(torch.bfloat16), onednn.weight_copies('cpu', torch.bfloat16, 'opt'),"
        " onednn.pack_linear_layers(half), onednn.pack_linear_layers(OPTForCausalLM(config)) > 0)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "1", "0", "True"]


def test_remote_code_is_not_packed(tokenizer, tmp_path):
    """A model class from outside transformers (--trust-remote-code) may read its weights in its forward,
    whatever its config's model_type says."""
    model = save_checkpoint(tmp_path, "llama", tokenizer, seed=12)
    remote = type("RemoteLlama", (type(model),), {"__module__": "transformers_modules.someone.modeling"})
    model.__class__ = remote
    n_linear = _linears(model)
    assert onednn.pack_linear_layers(model) == 0 and _linears(model) == n_linear


def test_nothing_is_packed_where_onednn_is_not_measured(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(onednn.platform, "machine", lambda: "arm64")
    model = save_checkpoint(tmp_path, "opt", tokenizer, seed=9)
    n_linear = _linears(model)
    assert onednn.pack_linear_layers(model) == 0 and _linears(model) == n_linear


def test_a_model_too_large_for_the_available_ram_is_not_packed(tokenizer, tmp_path, monkeypatch):
    model = save_checkpoint(tmp_path, "opt", tokenizer, seed=11)
    n_linear = _linears(model)
    weight_bytes = sum(m.weight.nbytes for m in model.modules() if type(m) is torch.nn.Linear)
    monkeypatch.setattr(onednn.gpu, "free_memory", lambda device: (2 * weight_bytes - 1, "available RAM"))
    assert onednn.pack_linear_layers(model) == 0 and _linears(model) == n_linear
    monkeypatch.setattr(onednn.gpu, "free_memory", lambda device: (2 * weight_bytes, "available RAM"))
    assert onednn.pack_linear_layers(model) == n_linear


def test_extract_scores_through_packed_layers(tmp_path, monkeypatch):
    """The CLI's scoring path packs the model: the packed forward runs, and the losses equal an
    extraction with packing switched off."""
    suite = write_suite(tmp_path, families=("llama",), steps=(0, 10))
    calls = []
    forward = onednn.PackedLinear.forward
    monkeypatch.setattr(onednn.PackedLinear, "forward", lambda self, x: calls.append(1) or forward(self, x))
    extract(suite, tmp_path / "packed.zarr", progress=False)
    assert calls
    monkeypatch.setattr(onednn, "available", lambda: False)
    extract(suite, tmp_path / "plain.zarr", progress=False)
    packed, plain = (tokendyn.open_store(tmp_path / name).loss.values for name in ("packed.zarr", "plain.zarr"))
    np.testing.assert_allclose(packed, plain, atol=1e-5)
