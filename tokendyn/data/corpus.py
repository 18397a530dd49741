"""Read evaluation documents, tokenize them with the suite's tokenizer and pack them into fixed-length sequences.

Packing policies (parameter `packing` of an evaluation set):

- ``"document"`` (default): every document starts a new sequence, beginning with the tokenizer's
  BOS token when `bos` is true. A document longer than `seq_len` continues in the next sequence
  (its first token there has no context, so no prediction). The tail of a sequence is padding.
  Contexts never cross documents.
- ``"concat"``: documents are joined into one stream, each one starting with BOS (when `bos`) and
  ending with EOS, and the stream is cut into consecutive `seq_len` windows, as in pre-training.
  Contexts cross document boundaries.

Document sources: ``.txt`` files hold one document per blank-line-separated block (a file without
blank lines is one document); ``.jsonl`` files hold one JSON object per line with a ``"text"``
field, optional ``"spans"`` (character spans ``{"start", "end", <field>: value, ...}`` whose fields
become per-token coordinates) and any other keys (document-level coordinates). Sets of kind
``"pairs"`` read ``{"true": ..., "false": ...}`` lines and yield two documents per pair with the
fields ``pair`` (pair index) and ``is_true``.

Corruption (``corrupt = r``): after tokenization and before BOS/EOS are added, round(r * n) of the
set's n document tokens are replaced by uniformly random non-special vocabulary tokens other than
the original, positions and replacements drawn from the set's `seed` (see `corrupt_tokens`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokendyn.errors import TokendynError
from tokendyn.config.suite import EvalSet

PAD = -1


@dataclass
class Document:
    text: str
    fields: dict = field(default_factory=dict)
    spans: list[dict] = field(default_factory=list)


@dataclass
class PackedSet:
    """One evaluation set, tokenized and packed. Arrays are (seq, pos) unless stated."""

    name: str
    token_id: np.ndarray
    token_doc: np.ndarray
    token_fields: dict[str, np.ndarray]
    doc_fields: dict[str, np.ndarray]  # (seq,): the field of the sequence's first document
    params: dict

    @property
    def n_seq(self) -> int:
        return self.token_id.shape[0]

    @property
    def seq_len(self) -> int:
        return self.token_id.shape[1]

    @property
    def doc(self) -> np.ndarray:
        """(seq,): the document of each sequence's first token."""
        return self.token_doc[:, 0]

    @property
    def n_predicted(self) -> int:
        """Tokens that get a prediction: not padding and not the first of their sequence."""
        return int((self.token_id[:, 1:] != PAD).sum())

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(self.token_id).tobytes())
        digest.update(np.ascontiguousarray(self.token_doc).tobytes())
        return digest.hexdigest()[:16]


def read_documents(spec: EvalSet) -> list[Document]:
    """All documents of an evaluation set, in file order."""
    docs: list[Document] = []
    for path in spec.files:
        if spec.kind == "pairs":
            docs += _pair_documents(path)
        elif path.suffix == ".jsonl":
            docs += _jsonl_documents(path)
        else:
            docs += [Document(block.strip()) for block in _read_text(path).split("\n\n") if block.strip()]
    if not docs:
        raise TokendynError(f"evaluation set '{spec.name}' has no documents (files: "
                            f"{', '.join(map(str, spec.files))}); add text to them")
    return docs


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise TokendynError(f"file {path} does not exist; fix the path (in the suite TOML or the command)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokendynError(f"file {path} is not UTF-8 (byte {err.start}); "
                            "re-encode it as UTF-8") from None


def json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a UTF-8 JSONL file; one-line errors otherwise."""
    path = Path(path)
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TokendynError(f"{path}:{number}: not valid JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(record, dict):
            raise TokendynError(f"{path}:{number}: expected a JSON object per line")
        yield number, record


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for number, record in json_lines(path):
        if not isinstance(record.get("text"), str):
            raise TokendynError(f'{path}:{number}: missing string field "text"')
        fields = {k: v for k, v in record.items() if k not in ("text", "spans")}
        docs.append(Document(record["text"], fields, _check_spans(record.get("spans", []), record["text"],
                                                                  f"{path}:{number}")))
    return docs


def _check_spans(spans, text: str, where: str) -> list[dict]:
    """`spans` must be a list of {"start": int, "end": int, field: scalar, ...} within the text."""
    form = 'a list of {"start": int, "end": int, field: value} objects'
    if not isinstance(spans, list) or not all(isinstance(s, dict) for s in spans):
        raise TokendynError(f'{where}: "spans" must be {form}; fix the line')
    for span in spans:
        start, end = span.get("start"), span.get("end")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)) or not 0 <= start <= end:
            raise TokendynError(f'{where}: span {span} needs integer "start" <= "end" (character offsets); fix it')
        if end > len(text):
            raise TokendynError(f'{where}: span {span} ends after the text ({len(text)} characters); fix it')
        for key, value in span.items():
            if key not in ("start", "end") and (value is None or not isinstance(value, (str, int, float))):
                raise TokendynError(f"{where}: span field '{key}' must be a string or a number, "
                                    f"not {type(value).__name__}; fix it")
    return spans


def _pair_documents(path: Path) -> list[Document]:
    docs = []
    for pair, (number, record) in enumerate(json_lines(path)):
        if not isinstance(record.get("true"), str) or not isinstance(record.get("false"), str):
            raise TokendynError(f'{path}:{number}: a pair needs string fields "true" and "false"')
        fields = {k: v for k, v in record.items() if k not in ("true", "false")}
        docs.append(Document(record["true"], {**fields, "pair": pair, "is_true": True}))
        docs.append(Document(record["false"], {**fields, "pair": pair, "is_true": False}))
    return docs


def pack(spec: EvalSet, tokenizer, documents: list[Document] | None = None) -> PackedSet:
    """Tokenize and pack an evaluation set (documents read from its files unless given)."""
    docs = read_documents(spec) if documents is None else documents
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True)
    token_ids = encoded["input_ids"]
    if spec.corrupt is not None:
        token_ids = corrupt_tokens(token_ids, spec.corrupt, spec.seed, tokenizer)
    bos = [tokenizer.bos_token_id] if spec.bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if spec.packing == "concat" and tokenizer.eos_token_id is not None else []
    span_keys = sorted({k for d in docs for s in d.spans for k in s if k not in ("start", "end")})
    span_fill = {k: _fill(np.asarray([next(s[k] for d in docs for s in d.spans if k in s)])) for k in span_keys}

    pieces = []  # per document: (ids, per-token span fields), BOS/EOS included
    for doc, ids, offsets in zip(docs, token_ids, encoded["offset_mapping"]):
        values = _span_values(doc.spans, span_fill, np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
        pieces.append((np.asarray(bos + list(ids) + eos, dtype=np.int64),
                       {k: np.concatenate([np.full(len(bos), *span_fill[k]), v, np.full(len(eos), *span_fill[k])])
                        for k, v in values.items()}))

    if spec.packing == "document":
        windows = [(d, start) for d, (ids, _) in enumerate(pieces) for start in range(0, len(ids), spec.seq_len)]
        stream = None
    elif spec.packing == "concat":
        stream = np.concatenate([ids for ids, _ in pieces])
        windows = [(None, start) for start in range(0, len(stream), spec.seq_len)]
    else:
        raise TokendynError(f"unknown packing '{spec.packing}' in set '{spec.name}'; use 'document' or 'concat'")
    if spec.max_sequences is not None:
        windows = windows[: spec.max_sequences]
    if not windows:
        raise TokendynError(f"evaluation set '{spec.name}' tokenized to nothing; check its files")

    shape = (len(windows), spec.seq_len)
    token_id = np.full(shape, PAD, dtype=np.int32)
    token_doc = np.full(shape, PAD, dtype=np.int32)
    token_fields = {k: np.full(shape, *span_fill[k]) for k in span_keys}
    if stream is None:
        for row, (d, start) in enumerate(windows):
            ids, values = pieces[d]
            piece = slice(start, start + spec.seq_len)
            n = len(ids[piece])
            token_id[row, :n] = ids[piece]
            token_doc[row, :n] = d
            for k in span_keys:
                token_fields[k][row, :n] = values[k][piece]
    else:
        doc_of = np.concatenate([np.full(len(ids), d) for d, (ids, _) in enumerate(pieces)])
        flat = {k: np.concatenate([v[k] for _, v in pieces]) for k in span_keys}
        n = min(len(stream), token_id.size)
        token_id.reshape(-1)[:n] = stream[:n]
        token_doc.reshape(-1)[:n] = doc_of[:n]
        for k in span_keys:
            token_fields[k].reshape(-1)[:n] = flat[k][:n]

    first_doc = token_doc[:, 0]
    doc_keys = sorted({k for d in docs for k in d.fields})
    doc_fields = {k: _field_array([docs[d].fields.get(k, _missing_like(docs, k)) for d in first_doc]) for k in doc_keys}
    params = {"name": spec.name, "seq_len": spec.seq_len, "packing": spec.packing, "bos": spec.bos,
              "max_sequences": spec.max_sequences, "kind": spec.kind}
    if spec.corrupt is not None:
        params.update(corrupt=spec.corrupt, seed=spec.seed)
    return PackedSet(spec.name, token_id, token_doc, token_fields, doc_fields, params)


def corrupt_tokens(token_ids: list[list[int]], rate: float, seed: int, tokenizer) -> list[np.ndarray]:
    """Replace round(rate * n) of the n tokens of all documents by random other non-special tokens.

    One random permutation of the token positions and one replacement draw per position come from
    `numpy.random.default_rng(seed)`; rate r replaces the first round(r * n) positions of the
    permutation. So the result is deterministic, and for one seed a lower rate's replaced tokens
    are a subset of a higher rate's, with the same replacements. Each replacement is drawn
    uniformly from the non-special vocabulary without the original token, so exactly
    round(r * n) tokens change.
    """
    lengths = [len(ids) for ids in token_ids]
    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in token_ids])
    pool = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)
    slot = np.searchsorted(pool, flat)
    in_pool = pool[np.minimum(slot, len(pool) - 1)] == flat
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(flat))
    draw = rng.integers(0, len(pool) - in_pool[order])  # one draw per position, in permutation order
    draw += in_pool[order] & (draw >= slot[order])  # skip over the original token
    chosen = order[: round(rate * len(flat))]
    corrupted = flat.copy()
    corrupted[chosen] = pool[draw[: len(chosen)]]
    return np.split(corrupted, np.cumsum(lengths)[:-1])


def _span_values(spans: list[dict], fill: dict[str, tuple], offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token values of span fields: a token takes the span that contains its first character."""
    out = {}
    starts = offsets[:, 0]
    for key, key_fill in fill.items():
        values = np.full(len(offsets), *key_fill)
        for span in spans:
            if key in span:
                values[(starts >= span["start"]) & (starts < span["end"])] = span[key]
        out[key] = values
    return out


def _field_array(values: list) -> np.ndarray:
    """Document-level field values; strings as objects (variable-length strings in Zarr, like the span fields)."""
    array = np.asarray(values)
    return array.astype(object) if array.dtype.kind == "U" else array


def _fill(example: np.ndarray) -> tuple:
    """Fill value and dtype for a field: -1 for integers, NaN for floats, "" for anything else."""
    if np.issubdtype(example.dtype, np.integer) or example.dtype == bool:
        return -1, np.int64
    if np.issubdtype(example.dtype, np.floating):
        return np.nan, np.float64
    return "", object



def _missing_like(docs: list[Document], key: str):
    example = next(d.fields[key] for d in docs if key in d.fields)
    if isinstance(example, (bool, int)):
        return -1
    return np.nan if isinstance(example, float) else ""
