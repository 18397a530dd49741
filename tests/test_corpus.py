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


def jsonl_set(tmp_path, records: list[dict], **kwargs) -> EvalSet:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return EvalSet(name="main", files=(path,), seq_len=kwargs.pop("seq_len", 32), **kwargs)


def test_a_field_takes_its_type_from_all_its_values(tmp_path, tokenizer):
    text = "Hello there world."
    spans = [{"start": 0, "end": 5, "w": 1, "tag": 1}, {"start": 6, "end": 11, "w": 2.75, "tag": "PER"}]
    records = [
        {"text": text, "spans": spans, "year": 1970, "flag": True, "old": True},
        {"text": "Bob.", "year": None, "flag": False},
        {"text": "Al.", "year": 2.5, "flag": True},
    ]
    scored = tokenize_set(jsonl_set(tmp_path, records), tokenizer)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = np.asarray([a + (text[a] == " " and b > a + 1) for a, b in offsets])  # first non-space character
    n, spanned = len(starts), [starts < 5, (starts >= 6) & (starts < 11)]
    np.testing.assert_array_equal(scored.token_fields["w"][:n], np.select(spanned, [1.0, 2.75], np.nan))  # not 2
    assert scored.token_fields["tag"][:n].tolist() == np.select(spanned, ["1", "PER"], "").tolist()
    first = np.unique(scored.doc, return_index=True)[1]
    years = scored.token_fields["year"][first]
    np.testing.assert_array_equal(years, [1970.0, np.nan, 2.5])  # null is missing; missing is NaN, not -1
    assert scored.token_fields["flag"].dtype == bool  # a flag every document has stays one (a pair's is_true)
    assert scored.token_fields["old"][first].tolist() == [1, -1, -1]


def test_integers_beyond_int64_are_kept_as_text(tmp_path, tokenizer):
    """A 64-bit hash id does not fit int64 (was: an OverflowError traceback); it is kept exactly, as text."""
    records = [{"text": "Hello there.", "id": 2**63 + 5}, {"text": "Bob.", "id": 7}]
    scored = tokenize_set(jsonl_set(tmp_path, records), tokenizer)
    first = np.unique(scored.doc, return_index=True)[1]
    assert scored.token_fields["id"][first].tolist() == [str(2**63 + 5), "7"]


def test_a_corrupted_sets_bytes_are_its_texts(tmp_path, tokenizer):
    """bits_per_byte divides by the bytes of the text: the random replacement tokens do not count."""
    text = "The cat 日本語日本語日本語 the dog"
    for k in range(4, 20):
        clean = tokenize_set(jsonl_set(tmp_path, [{"text": text}], context="truncate", max_tokens=k), tokenizer)
        spec = jsonl_set(tmp_path, [{"text": text}], context="truncate", max_tokens=k, corrupt=0.9, seed=1)
        assert tokenize_set(spec, tokenizer).n_bytes == clean.n_bytes, k


def test_object_and_list_fields_are_their_compact_json_text(tmp_path, tokenizer):
    records = [
        {"text": "Hello there.", "meta": {"pile_set_name": "Wikipedia (en)", "a": "é"}, "tags": ["a", "b"]},
        {"text": "Bob.", "meta": {"pile_set_name": "ArXiv"}, "spans": [{"start": 0, "end": 3, "ids": [1, 2]}]},
    ]
    scored = tokenize_set(jsonl_set(tmp_path, records), tokenizer)
    first = np.unique(scored.doc, return_index=True)[1]
    assert scored.token_fields["meta"][first].tolist() == [
        '{"a":"é","pile_set_name":"Wikipedia (en)"}',
        '{"pile_set_name":"ArXiv"}',
    ]
    assert scored.token_fields["tags"][first].tolist() == ['["a","b"]', ""]
    assert scored.token_fields["ids"][scored.doc == 1][0] == "[1,2]"
    records[1]["spans"][0]["ids"] = None
    with pytest.raises(TokendynError, match=r"d\.jsonl:2: span field 'ids' is null; give it a value or leave it out"):
        tokenize_set(jsonl_set(tmp_path, records), tokenizer)


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    path = tmp_path / "d.jsonl"
    texts = ["one\u2028two", "three\u2029four\x85five"]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    path.write_bytes("\r\n".join([*lines, "", "[1]"]).encode("utf-8"))  # CRLF line ends, a blank line
    with pytest.raises(TokendynError, match=r"d\.jsonl:4: expected a JSON object per line"):
        list(json_lines(path))  # lines are numbered by line feeds only
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    assert [d.text for d in read_documents(EvalSet(name="main", files=(path,), seq_len=8))] == texts


def offset_trimming_tokenizer():
    """Byte-level BPE whose one merge " " + first byte of 日 crosses a character; offsets leave out the space."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE({**vocab, "Ġæ": len(vocab), "</s>": len(vocab) + 1}, [("Ġ", "æ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def byte_fallback_tokenizer():
    """SentencePiece-like BPE that spells a character it has no token for as <0xNN> byte tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(special_tokens=["<unk>", "</s>", *bytes_]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize(
    ("make", "text", "max_tokens", "n_bytes", "n_words"),
    [
        (None, "日本語のテキスト", 5, 5, 1),  # 日 and 2 of the 3 bytes of 本 (a token per byte)
        (None, "a\u3000b", 3, 3, 1),  # "a" and 2 of the 3 bytes of an ideographic space: no second word
        (offset_trimming_tokenizer, "a 日本", 2, 3, 2),  # "a", then " " + 1 byte of 日 in one token
        (byte_fallback_tokenizer, "hello 🙂 world", 4, 8, 2),  # "▁hello", "▁", 2 of the 4 bytes of 🙂
    ],
)
def test_bytes_and_words_are_those_of_the_scored_tokens(tmp_path, tokenizer, make, text, max_tokens, n_bytes, n_words):
    tokenizer = make() if make else tokenizer
    scored = tokenize_set(jsonl_set(tmp_path, [{"text": text}], context="truncate", max_tokens=max_tokens), tokenizer)
    assert scored.n_tokens == max_tokens
    assert (scored.n_bytes, scored.n_words) == (n_bytes, n_words)


def test_bytes_of_a_max_sequences_cut_inside_a_character(tmp_path, tokenizer):
    scored = tokenize_set(jsonl_set(tmp_path, [{"text": "日本語のテキスト"}], seq_len=4, max_sequences=1), tokenizer)
    assert scored.n_tokens == 4 and scored.n_bytes == 4  # one byte per token
