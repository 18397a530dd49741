"""Scoring protocols against independent computations: transformers' own loss (labels=) on windows
built in this file by the rules of docs/suite.md (lm-eval's loglikelihood_rolling for stride = seq_len)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import zarr
from tokenizers import processors

import tokendyn
from conftest import build_tokenizer, save_checkpoint
from tokendyn.config.suite import EvalSet
from tokendyn.data.corpus import plan_batches, prefix_ids, tokenize_set
from tokendyn.errors import TokendynError
from tokendyn.models.extract import extract

L = 16
DOCS = [
    ("The quick brown fox jumps over the lazy dog. A cat sat on the mat. " * 3).strip(),
    "Bob lives in Berlin.",
    "Alice was born in Paris in 1970 and works as a baker. Numbers like 12, 345 and 6789!",
]


def lm_eval_windows(tokens: list[int], prefix: int, max_len: int):
    """lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window, written out again."""
    first = min(max_len, len(tokens))
    yield [prefix] + tokens[: first - 1], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        yield tokens[end - max_len - 1 : end - 1], tokens[end - n : end]
        predicted += n


def stride_windows(z: list[int], start: int, max_len: int, stride: int):
    """The sliding rule of docs/suite.md on a stream z: window ends L+1, L+1+s, ... (capped), each
    reading the max_len tokens before its end and scoring the targets since the previous end."""
    ends = list(range(max_len + 1, len(z), stride)) + [len(z)]
    ends = [e for e in ends if e > start]
    previous = start
    for end in ends:
        yield z[max(0, end - 1 - max_len) : end - 1], list(range(previous, end))
        previous = end


def nll_with_labels(model, context: list[int], target: int) -> float:
    """NLL of `target` after `context`, from transformers' own loss: labels mask all but the target."""
    ids = torch.tensor([context + [target]])
    labels = torch.full_like(ids, -100)
    labels[0, -1] = target
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def reference_rolling(model, tokens, prefix, max_len):
    out = []
    for inputs, predicted in lm_eval_windows(tokens, prefix, max_len):
        window = inputs + [predicted[-1]]
        for k, target in enumerate(predicted):
            at = len(window) - len(predicted) + k  # right-aligned: the predictions are the window's last ones
            out.append(nll_with_labels(model, window[:at], target))
    return out


@pytest.fixture(scope="module")
def family_suites(tmp_path_factory):
    """One random checkpoint per family; the tokenizer of each follows that family's convention:
    Llama adds <s> (add_special_tokens), OPT adds </s>, GPT-NeoX adds nothing (EOS is then the prefix)."""
    root = tmp_path_factory.mktemp("protocols")
    (root / "docs.txt").write_text("\n\n".join(DOCS) + "\n")
    out = {}
    for i, (family, added) in enumerate((("opt", "</s>"), ("gpt_neox", None), ("llama", "<s>"))):
        tokenizer = build_tokenizer()
        if added is not None:
            tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{added} $A", special_tokens=[(added, tokenizer.convert_tokens_to_ids(added))]
            )
        model = save_checkpoint(root / family, family, tokenizer, seed=i)
        out[family] = (root, tokenizer, model)
    return out


def suite_toml(root, family: str, eval_keys: str) -> str:
    path = root / f"{family}-{abs(hash(eval_keys))}.toml"
    path.write_text(
        f'[eval]\nfiles = ["docs.txt"]\nseq_len = {L}\n{eval_keys}\n\n[[models]]\nname = "{family}"\n'
        f'checkpoints = [{{ step = 0, path = "{family}" }}]\n'
    )
    return path


def stored(root, family, eval_keys, tmp_path, **options):
    out = extract(suite_toml(root, family, eval_keys), tmp_path / f"{family}.zarr", progress=False, **options)
    return tokendyn.open_store(out)


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
def test_rolling_equals_lm_eval(family_suites, family, tmp_path):
    root, tokenizer, model = family_suites[family]
    expected_prefix = {"opt": "</s>", "llama": "<s>", "gpt_neox": "</s>"}[family]  # NeoX: EOS, as lm-eval
    prefix = tokenizer.convert_tokens_to_ids(expected_prefix)
    assert prefix_ids("auto", tokenizer) == [prefix]
    ds = stored(root, family, 'split = "paragraph"', tmp_path, batch_tokens=40)
    got = ds.loss.values[0, 0]
    for d, text in enumerate(DOCS):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows = np.flatnonzero(ds.doc.values == d)
        assert ds.token_id.values[rows].tolist() == tokens and ds.offset.values[rows].tolist() == list(
            range(len(tokens))
        )
        np.testing.assert_allclose(got[rows], reference_rolling(model, tokens, prefix, L), atol=1e-5, rtol=0)
    assert len(DOCS[0]) > 3 * L  # the first document spans several windows, the last one partial
    summary = json.loads(ds.attrs["summary"])
    assert summary["prefix"] == expected_prefix and summary["scored_tokens"] == ds.sizes["token"]
    assert summary["inserted"] == {expected_prefix: len(DOCS)}


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
def test_rolling_with_stride(family_suites, family, tmp_path):
    root, tokenizer, model = family_suites[family]
    stride = L // 2
    ds = stored(root, family, f"stride = {stride}", tmp_path)
    tokens = tokenizer("\n\n".join(DOCS).strip(), add_special_tokens=False)["input_ids"]  # one document
    z = prefix_ids("auto", tokenizer) + tokens
    expected = np.full(len(tokens), np.nan)
    for inputs, targets in stride_windows(z, 1, L, stride):
        window = inputs + [z[targets[-1]]]
        for j in targets:
            at = len(window) - (targets[-1] - j) - 1
            expected[j - 1] = nll_with_labels(model, window[:at], z[j])
    assert ds.token_id.values.tolist() == tokens
    np.testing.assert_allclose(ds.loss.values[0, 0], expected, atol=1e-5, rtol=0)
    assert (ds.n_context.values[L:] >= L - stride).all() and ds.n_context.values.max() <= L


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "llama"])
def test_truncate_packed_and_concat(family_suites, family, tmp_path):
    root, tokenizer, model = family_suites[family]
    prefix = prefix_ids("auto", tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in DOCS]

    ds = stored(root, family, 'split = "paragraph"\ncontext = "truncate"\nmax_tokens = 10', tmp_path / "t")
    expected = [nll_with_labels(model, prefix + x[:k], x[k]) for x in ids for k in range(min(10, len(x)))]
    np.testing.assert_allclose(ds.loss.values[0, 0], expected, atol=1e-5, rtol=0)

    (root / "short.txt").write_text("\n\n".join(DOCS[1:]))  # documents that fit one window each
    short = suite_toml(root, family, 'split = "paragraph"\ncontext = "packed"').read_text()
    path = root / f"{family}-packed.toml"
    path.write_text(
        short.replace(f"seq_len = {L}", f"seq_len = {max(len(x) for x in ids[1:])}").replace("docs.txt", "short.txt")
    )
    ds = tokendyn.open_store(extract(path, tmp_path / "p.zarr", progress=False))
    expected = [nll_with_labels(model, prefix + x[:k], x[k]) for x in ids[1:] for k in range(len(x))]
    np.testing.assert_allclose(ds.loss.values[0, 0], expected, atol=1e-5, rtol=0)

    ds = stored(root, family, 'split = "paragraph"\ncontext = "concat"', tmp_path / "c")
    eos = tokenizer.eos_token_id
    z, scored = list(prefix), []
    for d, x in enumerate(ids):
        scored += list(range(len(z), len(z) + len(x)))
        z += x + ([eos] if d < len(ids) - 1 else [])
    reference = {}
    for inputs, targets in stride_windows(z, 1, L, L):
        window = inputs + [z[targets[-1]]]
        for j in targets:
            reference[j] = nll_with_labels(model, window[: len(window) - (targets[-1] - j) - 1], z[j])
    np.testing.assert_allclose(ds.loss.values[0, 0], [reference[j] for j in scored], atol=1e-5, rtol=0)
    assert ds.token_id.values.tolist() == [t for x in ids for t in x]  # separators are context only


def test_chat_tokenizer_inserts_nothing_scored(tmp_path):
    """bos = a chat-template token, add_special_tokens adds nothing, EOS ends a chat turn: no prefix at all."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    save_checkpoint(tmp_path / "llama", "llama", tokenizer, seed=0)
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS))
    ds = stored(tmp_path, "llama", 'split = "paragraph"', tmp_path)
    assert prefix_ids("auto", tokenizer) == []
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in DOCS]
    assert ds.token_id.values.tolist() == [t for x in ids for t in x[1:]]  # first tokens are context only
    assert not set(ds.token_id.values.tolist()) & set(tokenizer.all_special_ids)
    summary = json.loads(ds.attrs["summary"])
    assert summary["inserted"] == {} and summary["prefix"] == "none" and summary["unscored_first_tokens"] == 3


def test_the_summary_counts_the_documents_reached_and_their_unscored_first_tokens(tmp_path, tokenizer):
    path = tmp_path / "many.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the cat sat on the mat." for i in range(20)))
    common = dict(seq_len=8, split="paragraph", prefix="none")
    scored = tokenize_set(EvalSet("main", (path,), max_sequences=5, **common), tokenizer)
    cut, reached = scored.summary(64), len(set(scored.doc.tolist()))
    assert cut["documents"] == reached < 20 and cut["unscored_first_tokens"] == reached
    concat = tokenize_set(EvalSet("main", (path,), context="concat", **common), tokenizer).summary(64)
    assert concat["documents"] == 20 and concat["unscored_first_tokens"] == 1  # only the stream's first token


def test_inserted_tokens_are_counted_in_the_documents_reached(tmp_path, tokenizer):
    path = tmp_path / "three.txt"
    path.write_text("First doc.\n\nSecond doc.\n\nThird doc.\n")  # 10 tokens each
    common = dict(seq_len=16, split="paragraph", max_sequences=1)
    rolling = tokenize_set(EvalSet("main", (path,), **common), tokenizer).summary(64)
    assert rolling["documents"] == 1 and rolling["inserted"] == {"</s>": 1}
    concat = tokenize_set(EvalSet("main", (path,), context="concat", **common), tokenizer).summary(64)
    assert concat["documents"] == 2 and concat["inserted"] == {"</s>": 2}  # the prefix and one separator
    prompted = tmp_path / "prompted.jsonl"
    prompted.write_text("".join(json.dumps({"text": t, "context_ids": [5, 6]}) + "\n" for t in ("A b.", "C d.")))
    summary = tokenize_set(EvalSet("main", (prompted,), seq_len=16, max_sequences=1), tokenizer).summary(64)
    assert summary["inserted"] == {"</s>": 1, "context_ids (prompts)": 2}


def test_jsonl_objects_and_lists_are_stored_as_json_text(family_suites, tmp_path):
    root, _, _ = family_suites["opt"]
    records = [
        {"text": "Bob lives in Berlin.", "meta": {"pile_set_name": "ArXiv"}, "tags": ["a", "b"]},
        {"text": "A cat.", "meta": {"pile_set_name": "Wikipedia (en)"}, "spans": [{"start": 2, "end": 5, "k": [1]}]},
    ]
    (root / "pile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    extra = [EvalSet("pile", (root / "pile.jsonl",), seq_len=L)]
    out = extract(suite_toml(root, "opt", ""), tmp_path / "s.zarr", extra_sets=extra, progress=False)
    ds = tokendyn.open_store(out, set="pile")
    first = np.unique(ds.doc.values, return_index=True)[1]
    assert ds.meta.values[first].tolist() == ['{"pile_set_name":"ArXiv"}', '{"pile_set_name":"Wikipedia (en)"}']
    assert ds.tags.values[first].tolist() == ['["a","b"]', ""]
    assert set(ds.k.values.tolist()) == {"", "[1]"}


def test_every_token_of_a_multi_document_file_once(tmp_path, tokenizer):
    path = tmp_path / "many.txt"
    texts = [f"Paragraph {i}: " + "the cat sat on the mat. " * (i % 5 + 1) for i in range(12)]
    texts = [t.strip() for t in texts]
    path.write_text("\n\n".join(texts))
    whole = tokenize_set(EvalSet("main", (path,), seq_len=8), tokenizer)
    assert whole.n_documents == 1  # a .txt file is one document by default
    scored = tokenize_set(EvalSet("main", (path,), seq_len=8, split="paragraph", stride=3), tokenizer)
    expected = [
        (d, i, t)
        for d, text in enumerate(texts)
        for i, t in enumerate(tokenizer(text, add_special_tokens=False)["input_ids"])
    ]
    assert list(zip(scored.doc.tolist(), scored.offset.tolist(), scored.token_id.tolist())) == expected
    targets = np.concatenate([t[t >= 0] for t in scored.targets])
    assert np.array_equal(np.sort(targets), np.arange(len(expected)))  # each token in exactly one window
    for window, target in zip(scored.windows, scored.targets):
        assert np.array_equal(window[1:][target >= 0], scored.token_id[target[target >= 0]])
        assert len(window) - 1 <= 8


def test_lines_split_and_text_field(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("one line\n\nsecond line\nthird\n")
    assert tokenize_set(EvalSet("main", (tmp_path / "a.txt",), seq_len=8, split="line"), tokenizer).n_documents == 3
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "a cat", "text": 3}) + "\n")
    scored = tokenize_set(EvalSet("main", (tmp_path / "a.jsonl",), seq_len=8, text_field="body"), tokenizer)
    assert scored.token_id.tolist() == tokenizer("a cat", add_special_tokens=False)["input_ids"]
    assert scored.token_fields["text"].tolist() == [3] * scored.n_tokens


def test_generated_ids_scored_with_prompt_as_context(family_suites, tmp_path):
    root, tokenizer, model = family_suites["llama"]
    prompt, new = tokenizer("Alice was", add_special_tokens=False)["input_ids"], [40, 41, 42, 7]
    (root / "gen.jsonl").write_text(json.dumps({"text": "ignored", "context_ids": prompt, "token_ids": new}) + "\n")
    scored = tokenize_set(EvalSet("gen", (root / "gen.jsonl",), seq_len=L), tokenizer)
    assert (
        scored.token_id.tolist() == new and scored.windows[0].tolist() == prefix_ids("auto", tokenizer) + prompt + new
    )
    path = suite_toml(root, "llama", "")
    ds = tokendyn.open_store(
        extract(
            path, tmp_path / "g.zarr", extra_sets=[EvalSet("gen", (root / "gen.jsonl",), seq_len=L)], progress=False
        ),
        set="gen",
    )
    context = prefix_ids("auto", tokenizer) + prompt
    expected = [nll_with_labels(model, context + new[:k], new[k]) for k in range(len(new))]
    np.testing.assert_allclose(ds.loss.values[0, 0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["token_ids", "context_ids"])
def test_given_ids_beyond_the_tokenizer_are_a_one_line_error_before_any_store(tmp_path, tokenizer, key):
    record = {"text": "ignored", "token_ids": [5, 6], key: [7, len(tokenizer)]}
    (tmp_path / "gen.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(TokendynError, match=f"set 'gen': document 0 has \"{key}\" with id {len(tokenizer)}, beyond"):
        tokenize_set(EvalSet("gen", (tmp_path / "gen.jsonl",), seq_len=8), tokenizer)


def test_the_printed_summary_keeps_long_set_names_apart_from_their_text(family_suites, tmp_path, capsys):
    root, _, _ = family_suites["opt"]
    long_name = "a-set-name-longer-than-the-column"
    (root / "more.txt").write_text(DOCS[0])
    extra = [EvalSet(long_name, (root / "more.txt",), seq_len=L)]
    extract(suite_toml(root, "opt", ""), tmp_path / "s.zarr", extra_sets=extra, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"{long_name}  rolling windows of") for line in lines), lines
    assert any(line.startswith("main" + " " * (len(long_name) - 2) + "rolling windows of") for line in lines), lines


def test_bits_per_byte_and_word_perplexity(family_suites, tmp_path):
    root, tokenizer, _ = family_suites["opt"]
    ds = stored(root, "opt", 'split = "paragraph"', tmp_path)
    total = float(ds.loss.values[0, 0].astype(np.float64).sum())
    n_bytes = sum(len(t.encode("utf-8")) for t in DOCS)
    n_words = sum(len(re.split(r"\s+", t)) for t in DOCS)
    assert ds.bits_per_byte.values[0, 0] == pytest.approx(total / (n_bytes * math.log(2)), rel=1e-6)
    assert ds.word_ppl.values[0, 0] == pytest.approx(math.exp(total / n_words), rel=1e-6)
    assert ds.val_ppl.values[0, 0] == pytest.approx(math.exp(total / ds.sizes["token"]), rel=1e-6)


def test_batches_group_similar_lengths():
    lengths = np.array([5, 100, 6, 99, 7, 98, 5, 97] * 8)
    batches = plan_batches(lengths, batch_tokens=400)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert 1 - lengths.sum() / padded < 0.05
    assert all(len(b) * lengths[b].max() <= 400 for b in batches)


def test_old_format_store_is_refused(tiny_suite, tmp_path):
    old = tmp_path / "old.zarr"
    root = zarr.open_group(old, mode="w", zarr_format=3)
    root.attrs.update(tokendyn_version="0.1.0")  # format 1: no format_version attribute
    message = (
        f"store {old} has format 1, this tokendyn reads format 2; rescore with `tokendyn extract SUITE --out NEW.zarr`"
    )
    with pytest.raises(TokendynError, match=re.escape(message)):
        tokendyn.open_store(old)
    with pytest.raises(TokendynError, match=re.escape(message)):
        extract(tiny_suite, old, progress=False)
