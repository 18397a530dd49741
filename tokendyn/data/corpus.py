"""Read evaluation documents, tokenize them and cut them into scoring windows (docs/suite.md, "Scoring protocols").

A document's token ids `x[0..n)` are scored after a context-only part `ctx`: the prefix token
(see `prefix_ids`) and, for a generated text, its prompt ids. Call `z = ctx + x`; every scored
token is some `z[j]`, predicted from tokens before it inside one *window*. A window is a slice
`z[lo:e]`: the model reads `z[lo:e-1]` (at most `seq_len` positions) and the window scores its
new targets `z[b:e]`; earlier positions are context it re-reads. The protocols (the set's
`context`):

- ``rolling``: windows advance by `stride` (default `seq_len`). The first window scores as many
  targets as fit; each later one scores the next `stride` targets and reads the `seq_len` tokens
  before its end, so the last, partial window is right-aligned and keeps a full context. With
  ``stride = seq_len`` and one prefix token this is lm-eval's `loglikelihood_rolling` window rule.
- ``truncate``: the first `max_tokens` tokens of each document only (Xia et al.: 2,047 after the prefix), rolled
  as above if the context makes them longer than a window.
- ``packed``: one window per (short) document; a document that does not fit is an error.
- ``concat``: all documents joined into one stream, each followed by EOS (context only), then
  rolled as one document: contexts cross documents, as in pre-training.

Tokens tokendyn inserts (prefix, separators, prompt ids) are never scored. Without any prefix
a document's first token has no context and is not scored either.

Document sources: ``.txt`` files are one document each unless `split` is "paragraph" (blank-line
separated blocks) or "line", each document stripped of leading and trailing whitespace (JSONL texts are
used as they are); ``.jsonl`` files hold one JSON object per line with the text in
`text_field` (default "text"), optional ``"spans"`` (character spans ``{"start", "end", <field>:
value, ...}`` whose fields become per-token coordinates), optional ``"token_ids"`` (the ids to
score, used as they are instead of tokenizing the text) and ``"context_ids"`` (ids placed before
the document as context only, e.g. a generation prompt), and any other keys (document-level
fields, stored per token; an object or a list as its JSON text, see `_field_type`). Sets of kind
``"pairs"`` read ``{"true": ..., "false": ...}`` lines and yield two documents per pair with the
fields ``pair`` (pair index) and ``is_true``.

Corruption (``corrupt = r``): after tokenization, round(r * n) of the set's n document tokens are
replaced by uniformly random non-special vocabulary tokens other than the original, positions and
replacements drawn from the set's `seed` (see `corrupt_tokens`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tokendyn.config.suite import EvalSet
from tokendyn.errors import TokendynError

if TYPE_CHECKING:  # for annotations only: the data layer never imports transformers at run time
    from transformers import PreTrainedTokenizerBase

PAD = -1
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's token for one byte of a character
RESERVED_JSONL = ("spans", "token_ids", "context_ids")  # JSONL keys that are not document fields
DEFAULT_BATCH_TOKENS = 8192  # model positions per forward pass when neither a token budget nor a batch size is given
PADDING_TOLERANCE = 0.04  # most padding share of the positions computed in any one batch


@dataclass
class Document:
    text: str
    fields: dict = field(default_factory=dict)
    spans: list[dict] = field(default_factory=list)
    token_ids: list[int] | None = None  # scored as given (no re-tokenisation of the text)
    context_ids: list[int] = field(default_factory=list)  # context only, after the prefix


@dataclass
class ScoredSet:
    """One evaluation set under its protocol: the flat list of scored tokens and the windows that score them.

    Token arrays are (token,), in document order then text order: `token_id`, `doc` (document
    index), `offset` (index of the token in its document's ids), `n_context` (tokens the model
    read before predicting it, inserted ones included) and `token_fields` (span fields and
    document fields, one value per token). `windows[w]` holds the ids of window w (the model
    reads all but the last); `targets[w][t]` is the flat index of the token predicted at
    position t + 1 of the window, or -1 where that prediction is context only.
    """

    name: str
    token_id: np.ndarray
    doc: np.ndarray
    offset: np.ndarray
    n_context: np.ndarray
    token_fields: dict[str, np.ndarray]
    windows: list[np.ndarray]
    targets: list[np.ndarray]
    params: dict
    n_documents: int
    n_bytes: int
    n_words: int
    inserted: dict[str, int] = field(default_factory=dict)  # token text -> count of insertions

    @property
    def n_tokens(self) -> int:
        return len(self.token_id)

    @property
    def seq_len(self) -> int:
        return int(self.params["seq_len"])

    @property
    def lengths(self) -> np.ndarray:
        """Model positions of every window (its ids minus the last, which is only a target)."""
        return np.asarray([len(w) - 1 for w in self.windows], dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode())
        for array in (self.token_id, self.doc, self.offset, self.n_context):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def summary(self, batch_tokens: int | None, batch_size: int | None = None) -> dict:
        """What the protocol costs and gives (docs/store.md, "Protocol summary"); batching as in `plan_batches`."""
        lengths = self.lengths
        positions = int(lengths.sum())
        batches = plan_batches(lengths, batch_tokens, batch_size=batch_size)
        padded = sum(len(rows) * int(lengths[rows].max()) for rows in batches)
        context = self.n_context
        # documents up to the last one scored (max_sequences may stop early); the first token of each is
        # unscored unless something precedes it (a prefix, a prompt, the previous document under concat)
        reached = int(self.doc.max()) + 1 if len(self.doc) else 0
        unscored_first = reached - len(np.unique(self.doc[self.offset == 0]))
        return {
            "context": self.params["context"],
            "seq_len": self.seq_len,
            "stride": self.params.get("stride"),
            "documents": reached,
            "scored_tokens": self.n_tokens,
            "windows": len(self.windows),
            "positions": positions,
            "padding_share": round(1 - positions / max(padded, 1), 6),
            "reread_share": round(1 - self.n_tokens / max(positions, 1), 6),
            "min_context": int(context.min()) if len(context) else 0,
            "median_context": float(np.median(context)) if len(context) else 0.0,
            "prefix": self.params["prefix_text"],
            "inserted": dict(self.inserted),
            "unscored_first_tokens": unscored_first,
            "bytes": self.n_bytes,
            "words": self.n_words,
            "batch_tokens": batch_tokens,
            "batch_size": batch_size,
        }


def describe(summary: dict) -> list[str]:
    """The protocol summary as short lines for a terminal."""
    stride = f", stride {summary['stride']}" if summary.get("stride") else ""
    inserted = ", ".join(f"{text!r} x{n}" for text, n in summary["inserted"].items()) or "none"
    return [
        f"{summary['context']} windows of {summary['seq_len']} positions{stride}: {summary['documents']} "
        f"documents, {summary['scored_tokens']} scored tokens, {summary['windows']} windows",
        f"context per scored token: min {summary['min_context']}, median {summary['median_context']:g}; "
        f"re-read context {100 * summary['reread_share']:.1f}% of the compute, padding "
        f"{100 * summary['padding_share']:.1f}% ({_batches(summary)})",
        f"prefix {summary['prefix']}; tokens inserted (context only, never scored): {inserted}; "
        f"first tokens unscored (no prefix): {summary['unscored_first_tokens']}",
    ]


def _batches(summary: dict) -> str:
    if summary.get("batch_size"):
        return f"batches of at most {summary['batch_size']} windows"
    return f"batches of {summary['batch_tokens']} tokens"


def plan_batches(
    lengths: np.ndarray, batch_tokens: int | None, block_batches: int = 8, *, batch_size: int | None = None
) -> list[np.ndarray]:
    """Windows grouped into batches of similar length, in blocks of consecutive windows.

    A batch is limited either by `batch_tokens` (rows x longest row, padding included) or, given
    `batch_size` instead, by its number of windows (lm-eval's --batch-size); at least one window
    per batch. Windows are taken in order in blocks of about block_batches batches (so results
    complete, and can be written, roughly in token order); inside a block they are sorted by
    length, longest first, and cut into batches within that limit whose padding stays within
    PADDING_TOLERANCE of their positions. Returns the window indices of every batch.
    """
    if (batch_tokens is None) == (batch_size is None):
        raise ValueError("give exactly one of batch_tokens and batch_size")
    lengths = np.asarray(lengths, dtype=np.int64)
    batches, start = [], 0
    while start < len(lengths):
        if batch_size is None:
            block = int(np.searchsorted(np.cumsum(lengths[start:]), block_batches * batch_tokens, side="right"))
        else:
            block = block_batches * batch_size
        stop = start + max(1, block)
        order = start + np.argsort(-lengths[start:stop], kind="stable")
        rows: list[int] = []
        padding = 0
        for w in order:
            longest = lengths[rows[0]] if rows else lengths[w]
            grown = (len(rows) + 1) * longest
            full = len(rows) + 1 > batch_size if batch_size is not None else grown > batch_tokens
            if rows and (full or padding + longest - lengths[w] > PADDING_TOLERANCE * grown):
                batches.append(np.asarray(rows))
                rows, padding, longest = [], 0, lengths[w]
            padding += longest - lengths[w]
            rows.append(int(w))
        batches.append(np.asarray(rows))
        start = stop
    return batches


# --- documents -------------------------------------------------------------------------------------


def read_documents(spec: EvalSet) -> list[Document]:
    """All documents of an evaluation set, in file order."""
    docs: list[Document] = []
    for path in spec.files:
        if spec.kind == "pairs":
            docs += _pair_documents(path)
        elif path.suffix == ".jsonl":
            docs += _jsonl_documents(path, spec.text_field)
        else:
            docs += _text_documents(_read_text(path), spec.split)
    if not docs:
        raise TokendynError(
            f"evaluation set '{spec.name}' has no documents (files: "
            f"{', '.join(map(str, spec.files))}); add text to them"
        )
    return docs


def _text_documents(text: str, split: str) -> list[Document]:
    if split == "none":
        blocks = [text]
    elif split == "paragraph":
        blocks = re.split(r"\n\s*\n", text)
    else:
        blocks = text.splitlines()
    return [Document(block.strip()) for block in blocks if block.strip()]


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise TokendynError(f"file {path} does not exist; fix the path (in the suite TOML or the command)")
    try:
        return path.read_bytes().decode("utf-8-sig")  # a byte-order mark is not text (it was scored as 3 tokens)
    except UnicodeDecodeError as err:
        raise TokendynError(f"file {path} is not UTF-8 (byte {err.start}); re-encode it as UTF-8") from None


def json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a UTF-8 JSONL file; one-line errors otherwise.

    Lines end at line feeds only: str.splitlines() also breaks at U+2028, U+2029 and U+0085, which JSON
    allows unescaped inside a string. A CRLF file's carriage returns are JSON whitespace.
    """
    path = Path(path)
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TokendynError(f"{path}:{number}: not valid JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(record, dict):
            raise TokendynError(f"{path}:{number}: expected a JSON object per line")
        if _SURROGATE_ESCAPE.search(line):  # JSON accepts an unpaired half; tokenizers and UTF-8 do not
            try:
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise TokendynError(
                    f"{path}:{number}: a \\u escape is half of a UTF-16 surrogate pair without its other half "
                    "(no character); fix or remove it"
                ) from None
        yield number, record


def _jsonl_documents(path: Path, text_field: str = "text") -> list[Document]:
    docs = []
    for number, record in json_lines(path):
        if not isinstance(record.get(text_field), str):
            raise TokendynError(f'{path}:{number}: missing string field "{text_field}" (the set\'s text_field)')
        ids = {key: record.get(key) for key in ("token_ids", "context_ids")}
        for key, value in ids.items():
            if value is not None and not (isinstance(value, list) and all(_is_id(i) for i in value)):
                raise TokendynError(f'{path}:{number}: "{key}" must be a list of token ids')
        fields = {k: v for k, v in record.items() if k != text_field and k not in RESERVED_JSONL}
        spans = _check_spans(record.get("spans", []), record[text_field], f"{path}:{number}")
        docs.append(Document(record[text_field], fields, spans, ids["token_ids"], ids["context_ids"] or []))
    return docs


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_spans(spans, text: str, where: str) -> list[dict]:
    """`spans` must be a list of {"start": int, "end": int, field: value (not null), ...} within the text."""
    form = 'a list of {"start": int, "end": int, field: value} objects'
    if not isinstance(spans, list) or not all(isinstance(s, dict) for s in spans):
        raise TokendynError(f'{where}: "spans" must be {form}; fix the line')
    for span in spans:
        start, end = span.get("start"), span.get("end")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)) or not 0 <= start <= end:
            raise TokendynError(f'{where}: span {span} needs integer "start" <= "end" (character offsets); fix it')
        if end > len(text):
            raise TokendynError(f"{where}: span {span} ends after the text ({len(text)} characters); fix it")
        for key, value in span.items():
            if key not in ("start", "end") and value is None:
                raise TokendynError(f"{where}: span field '{key}' is null; give it a value or leave it out")
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


# --- special tokens --------------------------------------------------------------------------------


def prefix_ids(prefix: str | int, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The context-only token(s) before every document.

    "auto": the tokens the tokenizer's own `add_special_tokens=True` puts before a text (Llama
    `<s>`, OPT `</s>`); if it adds none (GPT-NeoX), EOS as lm-eval does, unless EOS is a token of
    the tokenizer's chat template (then nothing: the first token of a document is not scored).
    "none": nothing. A string: that single token. An integer: that token id.
    """
    if prefix == "none":
        return []
    if isinstance(prefix, int):
        if not 0 <= prefix < len(tokenizer):
            raise TokendynError(f"prefix token id {prefix} is outside the vocabulary (0..{len(tokenizer) - 1}); fix it")
        return [prefix]
    if prefix != "auto":
        ids = tokenizer.convert_tokens_to_ids([prefix])
        if ids[0] is None or ids[0] == tokenizer.unk_token_id and prefix != tokenizer.unk_token:
            raise TokendynError(
                f"prefix '{prefix}' is not a token of the tokenizer; give a token string, an id or \"none\""
            )
        return [int(ids[0])]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    lead = next((k for k in range(len(special) - len(plain) + 1) if special[k : k + len(plain)] == plain), 0)
    if lead:
        return [int(i) for i in special[:lead]]
    eos = tokenizer.eos_token_id
    if eos is None or tokenizer.eos_token in (getattr(tokenizer, "chat_template", None) or ""):
        return []
    return [int(eos)]


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


# --- windows ---------------------------------------------------------------------------------------


def rolling_windows(length: int, start: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (lo, b, e) scoring the targets z[start:length] of a stream z of `length` tokens.

    The model reads z[lo:e-1] (lo = max(0, e-1-seq_len)) and scores z[b:e]. The first window
    scores every target that fits into its seq_len positions (stride targets if the context
    before `start` already fills them); each later window scores the next `stride` targets.
    """
    windows, b, first = [], start, True
    while b < length:
        new = seq_len + 1 - b if first and seq_len + 1 - b >= 1 else stride
        e = min(length, b + new)
        windows.append((max(0, e - 1 - seq_len), b, e))
        b, first = e, False
    return windows


def tokenize_set(
    spec: EvalSet, tokenizer: PreTrainedTokenizerBase, documents: list[Document] | None = None
) -> ScoredSet:
    """Tokenize an evaluation set (documents read from its files unless given) and cut it into windows."""
    docs = read_documents(spec) if documents is None else documents
    _check_given_ids(spec, docs, len(tokenizer))
    text_ids, offsets = _encode(docs, tokenizer)
    original_ids = text_ids  # the text's own tokens: a corrupted set's bytes and words are its text's
    if spec.corrupt is not None:
        text_ids = [np.asarray(i) for i in corrupt_tokens(text_ids, spec.corrupt, spec.seed, tokenizer)]
    prefix = prefix_ids(spec.prefix, tokenizer)
    streams = _streams(spec, docs, text_ids, prefix, tokenizer)
    stride = spec.stride or spec.seq_len
    windows, targets, stream_tokens = [], [], []
    base = 0
    for z, doc_of, offset_of, start in streams:
        if spec.context == "packed" and len(z) - 1 > spec.seq_len:
            d = int(doc_of[start]) if start < len(z) else 0
            raise TokendynError(
                f"set '{spec.name}': document {d} needs {len(z) - 1} positions, more than seq_len "
                f'= {spec.seq_len}; use context = "rolling" or a larger seq_len'
            )
        flat = np.full(len(z), -1, dtype=np.int64)
        scored = np.flatnonzero(doc_of >= 0)
        scored = scored[scored >= start]
        flat[scored] = base + np.arange(len(scored))
        stream_tokens.append((z[scored], doc_of[scored], offset_of[scored]))
        for lo, b, e in rolling_windows(len(z), start, spec.seq_len, stride):
            target = flat[lo + 1 : e].copy()
            target[: b - lo - 1] = -1
            windows.append(z[lo:e].astype(np.int64))
            targets.append(target)
        base += len(scored)
    if spec.max_sequences is not None:
        windows, targets = windows[: spec.max_sequences], targets[: spec.max_sequences]
    n_tokens = max((int(t.max()) + 1 for t in targets if (t >= 0).any()), default=0)
    if n_tokens == 0:
        raise TokendynError(f"evaluation set '{spec.name}' has no token to score; check its files")

    token_id, doc, offset = (np.concatenate(parts)[:n_tokens] for parts in zip(*stream_tokens))
    n_context = np.zeros(n_tokens, dtype=np.int32)
    for target in targets:
        t = np.flatnonzero(target >= 0)
        n_context[target[t]] = t + 1
    fields = _token_fields(docs, offsets, doc, offset)
    n_bytes, n_words = _text_size(docs, tokenizer, offsets, original_ids, doc, offset)
    params = {
        "name": spec.name,
        "kind": spec.kind,
        "context": spec.context,
        "seq_len": spec.seq_len,
        "stride": stride if spec.context in ("rolling", "concat") else None,
        "max_tokens": (spec.max_tokens or spec.seq_len) if spec.context == "truncate" else None,
        "max_sequences": spec.max_sequences,
        "prefix": spec.prefix,
        "prefix_ids": prefix,
        "prefix_text": " ".join(_token_texts(tokenizer, prefix)) or "none",
        "split": spec.split,
        "text_field": spec.text_field,
        "unscored_first_tokens": int(
            sum(1 for d in docs if not prefix and not d.context_ids and spec.context != "concat")
        ),
    }
    if spec.corrupt is not None:
        params.update(corrupt=spec.corrupt, seed=spec.seed)
    # insertions into the documents up to the last one scored (max_sequences may stop early), as in ScoredSet.summary
    reached = docs[: int(doc.max()) + 1]
    inserted = {}
    if prefix:
        inserted[" ".join(_token_texts(tokenizer, prefix))] = 1 if spec.context == "concat" else len(reached)
    if spec.context == "concat" and tokenizer.eos_token_id is not None:
        inserted[str(tokenizer.eos_token)] = inserted.get(str(tokenizer.eos_token), 0) + len(reached) - 1
    n_prompt = sum(len(d.context_ids) for d in reached)
    if n_prompt:
        inserted["context_ids (prompts)"] = n_prompt
    return ScoredSet(
        spec.name,
        token_id.astype(np.int32),
        doc.astype(np.int32),
        offset.astype(np.int32),
        n_context,
        fields,
        windows,
        targets,
        params,
        len(docs),
        n_bytes,
        n_words,
        inserted,
    )


def _check_given_ids(spec: EvalSet, docs: list[Document], n_vocab: int) -> None:
    """Given token ids must name tokens of the suite's tokenizer (a larger id fails deep in the model)."""
    for d, doc in enumerate(docs):
        for key, given in (("token_ids", doc.token_ids), ("context_ids", doc.context_ids)):
            if given and max(given) >= n_vocab:
                raise TokendynError(
                    f"set '{spec.name}': document {d} has \"{key}\" with id {max(given)}, beyond the "
                    f"tokenizer's {n_vocab} tokens; give ids of the suite's tokenizer"
                )


def _encode(docs: list[Document], tokenizer) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Token ids of every document (given ids as they are) and their character offsets (None for given ids)."""
    todo = [d for d, doc in enumerate(docs) if doc.token_ids is None]
    ids: list[np.ndarray] = [np.asarray(doc.token_ids or [], dtype=np.int64) for doc in docs]
    offsets: list[np.ndarray | None] = [None] * len(docs)
    if todo:
        encoded = tokenizer([docs[d].text for d in todo], add_special_tokens=False, return_offsets_mapping=True)
        for d, row, off in zip(todo, encoded["input_ids"], encoded["offset_mapping"]):
            ids[d] = np.asarray(row, dtype=np.int64)
            offsets[d] = np.asarray(off, dtype=np.int64).reshape(-1, 2)
    return ids, offsets


def _streams(spec: EvalSet, docs: list[Document], text_ids: list[np.ndarray], prefix: list[int], tokenizer):
    """Per stream: ids z, document of each position (-1 for inserted tokens), offset in the document, first target.

    One stream per document, or one for the whole set with context "concat".
    """
    keep = (spec.max_tokens or spec.seq_len) if spec.context == "truncate" else None
    streams = []
    for d, (doc, x) in enumerate(zip(docs, text_ids)):
        x = x[:keep]
        ctx = ([] if spec.context == "concat" else prefix) + list(doc.context_ids)
        z = np.concatenate([np.asarray(ctx, dtype=np.int64), x])
        doc_of = np.concatenate([np.full(len(ctx), -1), np.full(len(x), d)])
        offset_of = np.concatenate([np.full(len(ctx), -1), np.arange(len(x))])
        streams.append((z, doc_of, offset_of, max(len(ctx), 1)))
    if spec.context != "concat":
        return streams
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    parts = [(np.asarray(prefix, dtype=np.int64), np.full(len(prefix), -1), np.full(len(prefix), -1))]
    for i, (z, doc_of, offset_of, _) in enumerate(streams):
        sep = eos if i < len(streams) - 1 else []
        parts.append(
            (
                np.concatenate([z, sep]).astype(np.int64),
                np.concatenate([doc_of, np.full(len(sep), -1)]),
                np.concatenate([offset_of, np.full(len(sep), -1)]),
            )
        )
    z, doc_of, offset_of = (np.concatenate(p) for p in zip(*parts))
    return [(z, doc_of, offset_of, 1)]


def _token_fields(docs: list[Document], offsets: list, doc: np.ndarray, offset: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token values of span fields (the span holding the token's anchor, `_anchors`) and document fields."""
    out = {}
    span_keys = sorted({k for d in docs for s in d.spans for k in s if k not in ("start", "end")})
    spanned = []  # (rows, anchors, spans) of every document with spans and text offsets
    for d in np.unique(doc) if span_keys else ():
        if docs[d].spans and offsets[d] is not None:
            rows = np.flatnonzero(doc == d)
            spanned.append((rows, _anchors(docs[d].text, offsets[d][offset[rows]]), docs[d].spans))
    for key in span_keys:
        fill, dtype = _field_type([s[key] for d in docs for s in d.spans if key in s])
        values = np.full(len(doc), fill, dtype=dtype)
        for rows, anchors, spans in spanned:
            for span in spans:
                if key in span:
                    inside = rows[(anchors >= span["start"]) & (anchors < span["end"])]
                    values[inside] = _json_text(span[key]) if dtype is object else span[key]
        out[key] = values
    for key in sorted({k for d in docs for k in d.fields}):
        given = [d for d, document in enumerate(docs) if document.fields.get(key) is not None]  # null is missing
        fill, dtype = _field_type([docs[d].fields[key] for d in given], complete=len(given) == len(docs))
        per_doc = np.full(len(docs), fill, dtype=dtype)
        for d in given:
            value = docs[d].fields[key]
            per_doc[d] = _json_text(value) if dtype is object else value
        out[key] = per_doc[doc]
    return out


def _field_type(values: list, complete: bool = False) -> tuple:
    """Fill value (for tokens or documents without the field) and dtype of a field, from all its values in the set.

    Integers (bools too) give int64 with -1 missing, numbers float64 with NaN missing, anything else text
    with "" missing (strings as objects: variable-length strings in Zarr), and so do integers beyond
    int64. A flag that every document has (a pair's is_true) stays bool.
    """
    if complete and all(isinstance(v, bool) for v in values):
        return False, bool
    if all(isinstance(v, int) for v in values):
        if all(-(2**63) <= v < 2**63 for v in values):
            return -1, np.int64
        return "", object  # beyond int64 (64-bit hash ids): kept exactly, as text
    if all(isinstance(v, (int, float)) for v in values):
        return np.nan, np.float64
    return "", object


def _json_text(value) -> str:
    """A value of a text field: a string as it is; a list, an object or a number among strings as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _anchors(text: str, token_offsets: np.ndarray) -> np.ndarray:
    """The character of each (start, end) token that a span must hold for the token to count as inside it:
    its first non-space character, or its first if it is all space. Byte-level BPE puts the space before
    a word into the word's token (' cat' starts at the space), so a span over "cat" still holds ' cat'."""
    starts, ends = token_offsets[:, 0], token_offsets[:, 1]
    n = len(text)
    positions = np.where([not c.isspace() for c in text], np.arange(n), n)
    next_word = np.append(np.minimum.accumulate(positions[::-1])[::-1], n)  # first non-space at or after i
    first = next_word[np.minimum(starts, n)]
    return np.where(first < ends, first, starts)


def _text_size(
    docs: list[Document], tokenizer, offsets: list, text_ids: list, doc: np.ndarray, offset: np.ndarray
) -> tuple[int, int]:
    """UTF-8 bytes and words (lm-eval's count: pieces of re.split(r"\\s+", text)) of the scored text.

    A document counts from its start to the end of its last scored token: all of it when every
    token is scored, as in lm-eval; the scored part under truncate or max_sequences (`_scored_part`).
    """
    if len(doc) == 0:
        return 0, 0
    last = np.full(len(docs), -1)
    np.maximum.at(last, doc, offset)
    n_bytes = n_words = 0
    for d in np.flatnonzero(last >= 0):
        if docs[d].token_ids is not None:
            text = tokenizer.decode(list(text_ids[d][: last[d] + 1]))
            size = len(text.encode("utf-8"))
        elif last[d] + 1 == len(text_ids[d]):
            text = docs[d].text
            size = len(text.encode("utf-8"))
        else:
            text, size = _scored_part(docs[d].text, offsets[d], text_ids[d], int(last[d]), tokenizer)
        n_bytes += size
        n_words += len(re.split(r"\s+", text))
    return n_bytes, n_words


def _scored_part(text: str, offsets: np.ndarray, ids: np.ndarray, last: int, tokenizer) -> tuple[str, int]:
    """The characters that tokens 0..last of a text hold whole, and the UTF-8 bytes those tokens hold.

    They differ where token last + 1 starts inside a character: a byte-level tokenizer split it into
    bytes, and the character offsets of its pieces cannot tell them apart. Then the bytes come from
    the tokens since the last clean boundary (no earlier token reaching past their start): a byte
    fallback token (<0xNN>) holds one byte, a byte-level BPE token one per character of its string.
    """
    end, following = int(offsets[last, 1]), int(offsets[last + 1, 0])
    whole = text[: min(end, following)]
    if following >= end:
        return whole, len(whole.encode("utf-8"))
    first = last
    while first > 0 and offsets[first - 1, 1] > offsets[first, 0]:
        first -= 1
    # up to the end of the token before (not the start of `first`: trimmed offsets leave out a leading space)
    before = len(text[: int(offsets[first - 1, 1])].encode("utf-8")) if first else 0
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids[first : last + 1]])
    return whole, before + sum(1 if _BYTE_FALLBACK.fullmatch(t) else len(t) for t in tokens)


def corrupt_tokens(token_ids: list, rate: float, seed: int, tokenizer: PreTrainedTokenizerBase) -> list[np.ndarray]:
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
