"""Contrastive generation: mixture and nucleus rules, equality with transformers' greedy decoding,
KV cache against full re-forwarding, seeded reproducibility, and the JSONL as an evaluation set."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_checkpoint, write_suite
from tokendyn.cli.generate import parse_mixture, parse_model
from tokendyn.config.suite import EvalSet, load_suite
from tokendyn.data.corpus import tokenize_set
from tokendyn.errors import TokendynError
from tokendyn.models.generate import decode, generate, mixture_probs, pick_tokens, write_jsonl


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_suite(
        tmp_path_factory.mktemp("gen"), families=("opt", "llama"), steps=(0, 5), seq_len=32, split="paragraph"
    )


def test_mixture_clips_negatives_and_renormalises():
    small = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    large = torch.tensor([[0.1, 0.5, 0.1, 0.3]])
    got = mixture_probs([small, large], [1.0, -1.0])
    expected = np.array([0.4, 0.0, 0.1, 0.0]) / 0.5
    np.testing.assert_allclose(got.numpy()[0], expected, atol=1e-7)
    # identical models under (1, -1): no positive mass, all of it on the argmax of the weighted sum
    same = mixture_probs([small, small], [1.0, -1.0])
    assert same.sum().item() == pytest.approx(1.0) and same.max().item() == 1.0


def test_nucleus_samples_the_renormalised_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    n = 10_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # an evenly spread stand-in for U(0, 1)
    tokens = pick_tokens(probs.expand(n, -1), top_p=0.75, uniform=uniforms)
    frequency = np.bincount(tokens.numpy(), minlength=4) / n
    # nucleus = {1, 3} (0.5 + 0.3 >= 0.75), renormalised to 0.625 / 0.375
    np.testing.assert_allclose(frequency, [0, 0.625, 0, 0.375], atol=2e-4)
    assert pick_tokens(probs, None, None).item() == 1


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
def test_kv_cache_equals_full_reforward(tmp_path, tokenizer, family):
    small = save_checkpoint(tmp_path / "a", family, tokenizer, seed=1)
    large = save_checkpoint(tmp_path / "b", family, tokenizer, seed=2)
    prompt = torch.randint(4, len(tokenizer), (3, 5), generator=torch.Generator().manual_seed(0))
    uniforms = torch.rand(3, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for top_p in (None, 0.9):
        args = ([small, large], [1.0, -1.0], prompt, 12)
        options = dict(vocab_size=len(tokenizer), top_p=top_p, uniforms=uniforms)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the cache passed by its current keyword
            cached = decode(*args, **options)
        full = decode(*args, **options, use_cache=False)
        assert torch.equal(cached, full), top_p


def test_mixture_1_0_greedy_equals_transformers_generate(suite, tokenizer):
    records = generate(
        suite,
        small="opt",
        large="llama",
        mixtures=[(1, 0)],
        prompts=3,
        prompt_tokens=4,
        new_tokens=10,
        stop_at_eos=False,
        progress=False,
    )
    model = AutoModelForCausalLM.from_pretrained(load_suite(suite).models[0].checkpoints[-1].path).eval()
    assert len(records) == 3
    for record in records:
        prompt = [tokenizer.eos_token_id] + tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        assert len(prompt) == 5
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert record["text"] == tokenizer.decode(out[0, 1:])
        assert (record["small"], record["small_step"], record["l1"], record["l2"]) == ("opt", 5, 1.0, 0.0)
        assert record["decoding"] == "greedy" and "top_p" not in record


def test_sampling_is_seeded_and_batch_independent(suite):
    options = dict(
        small="opt", large="llama", mixtures=[(1, -1), (-1, 1)], prompts=3, new_tokens=8, top_p=0.9, progress=False
    )
    first = generate(suite, seed=3, batch_size=2, **options)
    again = generate(suite, seed=3, batch_size=1, **options)
    other = generate(suite, seed=4, batch_size=2, **options)
    assert first == again
    assert [r["text"] for r in first] != [r["text"] for r in other]
    assert {r["mixture"] for r in first} == {"1,-1", "-1,1"}
    assert all(r["top_p"] == 0.9 and r["seed"] == 3 for r in first)


def test_final_checkpoints_by_default_and_steps_on_request(suite):
    options = dict(mixtures=[(1, 1)], prompts=1, new_tokens=2, progress=False)
    default = generate(suite, **options)[0]
    # the tiny OPT has fewer parameters than the tiny Llama
    assert (default["small"], default["small_step"], default["large"], default["large_step"]) == ("opt", 5, "llama", 5)
    early = generate(suite, small="llama", small_step=0, large="llama", **options)[0]
    assert (early["small"], early["small_step"], early["large_step"]) == ("llama", 0, 5)
    with pytest.raises(TokendynError, match="no checkpoint at step 7"):
        generate(suite, small="opt", small_step=7, **options)
    with pytest.raises(TokendynError, match="positive weight"):
        generate(suite, mixtures=[(-1, 0)], prompts=1, progress=False)


def test_output_is_an_evaluation_set(suite, tmp_path, tokenizer):
    records = generate(suite, small="opt", large="llama", mixtures=[(1, -1)], prompts=2, new_tokens=6, progress=False)
    path = write_jsonl(records, tmp_path / "gen.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == records
    scored = tokenize_set(EvalSet("hallucinated", (path,), seq_len=32), tokenizer)
    assert scored.n_documents == 2 and scored.token_id.tolist() == records[0]["token_ids"] + records[1]["token_ids"]
    assert list(scored.token_fields["mixture"]) == ["1,-1"] * scored.n_tokens
    assert list(np.unique(scored.token_fields["source_doc"])) == sorted({r["source_doc"] for r in records})
    # scored as generated: the prompt is context only, after the prefix
    assert scored.windows[0].tolist() == [tokenizer.eos_token_id, *records[0]["context_ids"], *records[0]["token_ids"]]
    assert tokenizer.decode(records[0]["context_ids"] + records[0]["token_ids"]) == records[0]["text"]


def test_cli_parsers():
    assert parse_mixture("small=1,large=-1") == (1.0, -1.0)
    assert parse_mixture("large=0.5") == (0.0, 0.5)
    assert parse_mixture("-1,1") == (-1.0, 1.0)
    assert parse_model("pythia-70m@1000") == ("pythia-70m", 1000)
    assert parse_model("opt") == ("opt", None)
    for bad in ("small=1,medium=2", "1", "a,b"):
        with pytest.raises(TokendynError):
            parse_mixture(bad)
    with pytest.raises(TokendynError):
        parse_model("opt@last")
