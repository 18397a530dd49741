"""Packing: documents into fixed-length sequences, annotations into per-token coordinates."""

from __future__ import annotations

import json

import numpy as np

from tokendyn.data.corpus import PAD, pack, read_documents
from tokendyn.config.suite import EvalSet

DOCS = ["Alice was born in Paris in 1970 and works as a baker.", "Bob lives in Berlin.",
        "The quick brown fox jumps over the lazy dog. " * 3]


def text_set(tmp_path, **kwargs) -> EvalSet:
    path = tmp_path / "valid.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return EvalSet(name="main", files=(path,), seq_len=kwargs.pop("seq_len", 16), **kwargs)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_document_packing(tmp_path, tokenizer):
    packed = pack(text_set(tmp_path), tokenizer)
    bos = tokenizer.bos_token_id
    for d, text in enumerate(DOCS):
        rows = np.flatnonzero(packed.doc == d)
        tokens = packed.token_id[rows].reshape(-1)
        assert tokens[tokens != PAD].tolist() == [bos] + ids_of(tokenizer, text.strip())
        assert (packed.token_doc[rows][packed.token_id[rows] != PAD] == d).all()
        assert np.all(np.diff(rows) == 1)  # a document's sequences are consecutive
    assert (packed.token_doc[packed.token_id == PAD] == PAD).all()
    # padding only at the end of a document's last sequence
    for row in packed.token_id:
        real = row != PAD
        assert real[: real.sum()].all()


def test_concat_packing(tmp_path, tokenizer):
    packed = pack(text_set(tmp_path, packing="concat"), tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [t for text in DOCS for t in [bos, *ids_of(tokenizer, text.strip()), eos]]
    flat = packed.token_id.reshape(-1)
    assert flat[flat != PAD].tolist() == stream
    assert (flat[len(stream):] == PAD).all()
    assert packed.n_seq == -(-len(stream) // 16)


def test_no_bos_and_max_sequences(tmp_path, tokenizer):
    packed = pack(text_set(tmp_path, bos=False, max_sequences=2), tokenizer)
    assert packed.n_seq == 2
    assert packed.token_id[0, 0] == ids_of(tokenizer, DOCS[0])[0]
    assert packed.n_predicted == int((packed.token_id[:, 1:] != PAD).sum())


def test_txt_and_jsonl_give_the_same_sequences(tmp_path, tokenizer):
    jsonl = tmp_path / "valid.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t.strip()}) for t in DOCS) + "\n")
    from_txt = pack(text_set(tmp_path), tokenizer)
    from_jsonl = pack(EvalSet(name="main", files=(jsonl,), seq_len=16), tokenizer)
    np.testing.assert_array_equal(from_txt.token_id, from_jsonl.token_id)
    assert from_txt.fingerprint == from_jsonl.fingerprint
    assert pack(text_set(tmp_path, seq_len=12), tokenizer).fingerprint != from_txt.fingerprint


def test_spans_and_document_fields(tmp_path, tokenizer):
    text = "Alice was born in Paris."
    record = {"text": text, "topic": "bio", "year": 1970,
              "spans": [{"start": 0, "end": 5, "role": "name"},
                        {"start": 18, "end": 23, "role": "value", "rank": 3}]}
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"text": "Bob."}) + "\n")
    packed = pack(EvalSet(name="main", files=(path,), seq_len=32), tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]])
    expected_role = np.where(starts < 5, "name", np.where((starts >= 18) & (starts < 23), "value", ""))
    n = len(starts)
    assert packed.token_fields["role"][0, 1: n + 1].tolist() == expected_role.tolist()
    assert packed.token_fields["role"][0, 0] == ""  # BOS
    assert packed.token_fields["rank"][0, 1: n + 1].tolist() == np.where(expected_role == "value", 3, -1).tolist()
    assert packed.doc_fields["topic"].tolist() == ["bio", ""]
    assert packed.doc_fields["year"].tolist() == [1970, -1]


def test_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"true": "Paris is in France.", "false": "Paris is in Spain.", "kind": "geo"}) + "\n")
    docs = read_documents(EvalSet(name="facts", files=(path,), seq_len=16, kind="pairs"))
    assert [(d.text, d.fields["pair"], d.fields["is_true"], d.fields["kind"]) for d in docs] == [
        ("Paris is in France.", 0, True, "geo"), ("Paris is in Spain.", 0, False, "geo")]
