"""Documents, protocols and windows; annotations into per-token coordinates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokendyn.config.suite import EvalSet
from tokendyn.data.corpus import json_lines, read_documents, rolling_windows, tokenize_set
from tokendyn.errors import TokendynError

DOCS = [
    "Alice was born in Paris in 1970 and works as a baker.",
    "Bob lives in Berlin.",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def text_set(tmp_path, **kwargs) -> EvalSet:
    path = tmp_path / "valid.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return EvalSet(name="main", files=(path,), seq_len=kwargs.pop("seq_len", 16), split="paragraph", **kwargs)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_unpaired_surrogate_escape_in_jsonl_is_a_one_line_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a pair \\ud83d\\ude00"}\n{"text": "lone \\ud800 x"}\n')
    with pytest.raises(TokendynError, match=r"t\.jsonl:2: a \\u escape is half of a UTF-16 surrogate pair"):
        list(json_lines(path))


def test_rolling_windows_rule():
    # lm-eval's rule for 40 targets after one prefix token, L = 16: ends 17, 33, 41; the last right-aligned
    assert rolling_windows(41, 1, 16, 16) == [(0, 1, 17), (16, 17, 33), (24, 33, 41)]
    assert rolling_windows(41, 1, 16, 8) == [(0, 1, 17), (8, 17, 25), (16, 25, 33), (24, 33, 41)]
    assert rolling_windows(5, 1, 16, 16) == [(0, 1, 5)]


def test_rolling_windows_of_documents(tmp_path, tokenizer):
    scored = tokenize_set(text_set(tmp_path), tokenizer)
    eos = tokenizer.eos_token_id  # this tokenizer adds nothing itself: EOS is the prefix, as in lm-eval
    expected = [(d, i, t) for d, text in enumerate(DOCS) for i, t in enumerate(ids_of(tokenizer, text.strip()))]
    assert list(zip(scored.doc.tolist(), scored.offset.tolist(), scored.token_id.tolist())) == expected
    for d, text in enumerate(DOCS):
        ids = ids_of(tokenizer, text.strip())
        first = next(w for w, t in zip(scored.windows, scored.targets) if scored.doc[t[t >= 0][0]] == d)
        assert first.tolist()[:2] == [eos, ids[0]]  # the prefix is context only
    assert all(len(w) - 1 <= 16 for w in scored.windows)
    assert scored.params["prefix_text"] == "</s>"


def test_concat_joins_documents_with_context_only_separators(tmp_path, tokenizer):
    scored = tokenize_set(text_set(tmp_path, context="concat"), tokenizer)
    eos = tokenizer.eos_token_id
    stream = [eos] + [t for text in DOCS for t in [*ids_of(tokenizer, text.strip()), eos]][:-1]
    assert scored.windows[0].tolist() == stream[:17]
    assert scored.token_id.tolist() == [t for text in DOCS for t in ids_of(tokenizer, text.strip())]
    assert len(scored.windows) == -(-(len(stream) - 1) // 16)
    assert scored.n_context.max() == 16 and scored.inserted == {"</s>": 3}


def test_no_prefix_and_max_sequences(tmp_path, tokenizer):
    scored = tokenize_set(text_set(tmp_path, prefix="none", max_sequences=2), tokenizer)
    assert len(scored.windows) == 2
    assert scored.windows[0][0] == ids_of(tokenizer, DOCS[0])[0]
    assert scored.token_id[0] == ids_of(tokenizer, DOCS[0])[1]  # the first token has no context: not scored
    assert scored.n_tokens == sum(int((t >= 0).sum()) for t in scored.targets)


def test_packed_refuses_a_long_document(tmp_path, tokenizer):
    with pytest.raises(TokendynError, match="needs .* positions, more than seq_len = 8"):
        tokenize_set(text_set(tmp_path, context="packed", seq_len=8), tokenizer)


def test_prefix_overrides(tmp_path, tokenizer):
    assert tokenize_set(text_set(tmp_path, prefix="<s>"), tokenizer).windows[0][0] == tokenizer.bos_token_id
    assert tokenize_set(text_set(tmp_path, prefix=3), tokenizer).windows[0][0] == 3
    with pytest.raises(TokendynError, match="not a token"):
        tokenize_set(text_set(tmp_path, prefix="<nope>"), tokenizer)


def test_txt_and_jsonl_give_the_same_sequences(tmp_path, tokenizer):
    jsonl = tmp_path / "valid.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t.strip()}) for t in DOCS) + "\n")
    from_txt = tokenize_set(text_set(tmp_path), tokenizer)
    from_jsonl = tokenize_set(EvalSet(name="main", files=(jsonl,), seq_len=16), tokenizer)
    np.testing.assert_array_equal(from_txt.token_id, from_jsonl.token_id)
    assert from_txt.fingerprint != from_jsonl.fingerprint  # the split is part of the protocol
    assert tokenize_set(text_set(tmp_path, seq_len=12), tokenizer).fingerprint != from_txt.fingerprint


def test_spans_and_document_fields(tmp_path, tokenizer):
    text = "Alice was born in Paris."
    record = {
        "text": text,
        "topic": "bio",
        "year": 1970,
        "spans": [
            {"start": 0, "end": 5, "role": "name"},
            {"start": 6, "end": 9, "role": "verb"},
            {"start": 18, "end": 23, "role": "value", "rank": 3},
        ],
    }
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"text": "Bob."}) + "\n")
    packed = tokenize_set(EvalSet(name="main", files=(path,), seq_len=32), tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # a token counts by its first non-space character: byte-level BPE's " w" of " was" starts at the space (5)
    assert (5, 7) in [tuple(o) for o in enc["offset_mapping"]]
    starts = np.asarray([a + (text[a] == " " and b > a + 1) for a, b in enc["offset_mapping"]])
    expected_role = np.select(
        [starts < 5, (starts >= 6) & (starts < 9), (starts >= 18) & (starts < 23)], ["name", "verb", "value"], ""
    )
    assert expected_role[[i for i, o in enumerate(enc["offset_mapping"]) if tuple(o) == (5, 7)][0]] == "verb"
    n = len(starts)
    assert packed.token_fields["role"][:n].tolist() == expected_role.tolist()
    assert packed.token_fields["rank"][:n].tolist() == np.where(expected_role == "value", 3, -1).tolist()
    n_bob = packed.n_tokens - n
    assert packed.token_fields["topic"].tolist() == ["bio"] * n + [""] * n_bob  # document fields, per token
    assert packed.token_fields["year"].tolist() == [1970] * n + [-1] * n_bob


def test_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"true": "Paris is in France.", "false": "Paris is in Spain.", "kind": "geo"}) + "\n")
    docs = read_documents(EvalSet(name="facts", files=(path,), seq_len=16, kind="pairs"))
    assert [(d.text, d.fields["pair"], d.fields["is_true"], d.fields["kind"]) for d in docs] == [
        ("Paris is in France.", 0, True, "geo"),
        ("Paris is in Spain.", 0, False, "geo"),
    ]


def test_a_byte_order_mark_is_not_scored(tmp_path, tokenizer):
    text = "Alice was born in Paris.\n"
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "bom.txt").write_text(text, encoding="utf-8-sig")
    (tmp_path / "bom.jsonl").write_text(json.dumps({"text": text.strip()}) + "\n", encoding="utf-8-sig")
    plain, bom, jsonl = (
        tokenize_set(EvalSet(name="main", files=(tmp_path / name,), seq_len=32), tokenizer).token_id.tolist()
        for name in ("plain.txt", "bom.txt", "bom.jsonl")
    )
    assert bom == plain == jsonl
