"""The one scoring loop: every checkpoint of every model scores every evaluation set into the store.

Per checkpoint: load the weights, run batched forward passes over the set's windows (see
`tokendyn.data.corpus`; batches group windows of similar length, `plan_batches`), and turn
the final hidden states into per-token metrics a chunk of positions at a time (the LM head and a
float32 log-softmax over `CHUNK_LOGITS` values at most), so memory does not grow with
batch x seq x vocab. Results are written block by block as soon as they are computed; the
checkpoint's `done` flag is written last (see `tokendyn.store`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tokendyn import __version__, store
from tokendyn.models import checkpoints
from tokendyn.data.corpus import PAD, ScoredSet, describe, plan_batches, tokenize_set
from tokendyn.errors import TokendynError
from tokendyn.config.suite import EvalSet, Suite, load_suite

CHUNK_LOGITS = 2**25  # logits materialised at once in the head: 128 MiB in float32
# Config attributes that make the head's logits differ from a plain projection of the hidden state;
# such models are scored through their own full forward pass instead.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, score: torch.Tensor,
                 metrics: Iterable[str] = ("loss",)) -> dict[str, torch.Tensor]:
    """Per-token metrics of the scored tokens of a batch of right-padded windows.

    `input_ids` (batch, width) holds -1 on padding; `score` (batch, width) is True where token
    input_ids[b, t] (t >= 1) is scored given input_ids[b, :t]. The model reads input_ids[:, :-1]
    (the last column is only a target). Returns float32 tensors of shape (n_scored,), in
    row-major order of `score`. Metrics: ``loss`` (NLL, nats), ``entropy`` (nats), ``rank``
    (0 = argmax).
    """
    metrics = tuple(metrics)
    valid = score[:, 1:].to(torch.bool)
    out = {m: torch.empty(0, dtype=torch.float32) for m in metrics}
    if not valid.any():
        return out
    ids = input_ids.clamp(min=0)
    hidden, head = _hidden_and_head(model, ids[:, :-1])
    hidden = hidden[valid.to(hidden.device)]
    targets = ids[:, 1:][valid].to(hidden.device)
    rows = max(1, CHUNK_LOGITS // model.config.get_text_config().vocab_size)
    parts = {m: [] for m in metrics}
    for start in range(0, len(targets), rows):
        logits = head(hidden[start: start + rows]).float()
        target = targets[start: start + rows, None]
        logp = torch.log_softmax(logits, dim=-1)
        if "loss" in metrics:
            parts["loss"].append(-logp.gather(1, target)[:, 0])
        if "entropy" in metrics:
            parts["entropy"].append(-(logp.exp() * logp).sum(-1))
        if "rank" in metrics:
            parts["rank"].append((logits > logits.gather(1, target)).sum(-1).float())
    return {m: torch.cat(parts[m]).cpu() for m in metrics}


def _hidden_and_head(model: torch.nn.Module, ids: torch.Tensor):
    """Final hidden states and the function mapping them to logits.

    Right padding needs no attention mask: causal attention keeps every real token blind to the
    padding after it, and positions then count from 0 as in an unpadded sequence.
    """
    ids = ids.to(model.device)
    config = model.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        logits = model(input_ids=ids).logits
        return logits, lambda h: h
    hidden = model.base_model(input_ids=ids).last_hidden_state
    return hidden, model.get_output_embeddings()


def extract(suite: Suite | str | Path, out: str | Path, *, extra_sets: Iterable[EvalSet] = (),
            metrics: Iterable[str] | None = None, device: str = "cpu", dtype: str = "float32",
            store_dtype: str | None = None, batch_tokens: int = 8192, force: bool = False,
            allow_pickle: bool = False, trust_remote_code: bool = False, progress: bool = True) -> Path:
    """Score every evaluation set of `suite` with every checkpoint into the store at `out`.

    Parameters
    ----------
    extra_sets : named evaluation sets added to the suite's own `[[sets]]`.
    metrics : any of "loss", "entropy", "rank" ("loss" always included); default: the store's, else loss.
    device, dtype : where and in which precision the model runs; log-softmax is always float32.
    store_dtype : "float32" (default) or "float16" on disk.
    batch_tokens : model positions per forward pass, padding included (at least one window per batch).
    force : recompute checkpoints that are already complete.

    A rerun skips complete checkpoints and recomputes interrupted ones.
    """
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    out = Path(out)
    suite = replace(suite, sets=tuple(suite.sets) + tuple(extra_sets))
    _check_unique_sets(suite)
    torch_dtype = checkpoints.parse_dtype(dtype)
    _check_device(device)
    existing = _existing_attrs(out)
    metrics = _parse_metrics(metrics, existing)
    store_dtype = store_dtype or existing.get("store_dtype", "float32")
    if store_dtype not in store.STORE_DTYPES:
        raise TokendynError(f"unknown store dtype '{store_dtype}'; use one of {', '.join(store.STORE_DTYPES)}")

    tokenizer = checkpoints.load_tokenizer(suite)
    tokenizer_fp = checkpoints.check_tokenizers(suite)
    sets = {"main": tokenize_set(suite.eval, tokenizer), **{s.name: tokenize_set(s, tokenizer) for s in suite.sets}}
    model_coords = _model_coords(suite, max(int(p.lengths.max()) for p in sets.values()), trust_remote_code)
    vocab_text = np.asarray(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]), dtype=object)
    layout = store.Layout(suite.to_dict(), tokenizer_fp, metrics, store_dtype)
    summaries = {name: scored.summary(batch_tokens) for name, scored in sets.items()}
    if progress:
        for name, summary in summaries.items():
            tqdm.write("\n".join(f"{name if i == 0 else '':<12}{line}" for i, line in enumerate(describe(summary))))
    root = store.prepare(out, layout, sets, model_coords, vocab_text, __version__, summaries)

    hf_logging.disable_progress_bar()  # one bar for the whole run, not one per weights load
    todo = [(m, c, [name for name in sets if force or not store.is_done(root, name, m, c)])
            for m, spec in enumerate(suite.models) for c in range(len(spec.checkpoints))]
    todo = [(m, c, names) for m, c, names in todo if names]
    total = sum(sets[name].n_tokens for _, _, names in todo for name in names)
    with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        for m, c, names in todo:
            score_checkpoint(suite, root, {name: sets[name] for name in names}, m, c, metrics=metrics,
                             batch_tokens=batch_tokens, device=device, dtype=torch_dtype, allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code, bar=bar)
    return out


def score_checkpoint(suite: Suite, root, sets: dict[str, ScoredSet], m: int, c: int, *, metrics: tuple[str, ...],
                     batch_tokens: int, device: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool,
                     bar: tqdm) -> None:
    """Score checkpoint `c` of model `m` on `sets`, writing only the chunks it owns, then mark each set done."""
    ckpt = suite.models[m].checkpoints[c]
    bar.set_description(f"{ckpt.model} step {ckpt.step}")
    model = checkpoints.load_model(ckpt, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code)
    weights_hash = checkpoints.weights_fingerprint(ckpt)
    _warn_identical(root, suite, m, c, weights_hash)
    for name in sorted(sets, key=lambda n: n == "main"):  # main last: its flag follows val_ppl
        store.clear_done(root, name, m, c)
        total = _score_set(model, sets[name], root, name, m, c, metrics, batch_tokens, bar)
        if name == "main":
            val_ppl, per_byte = perplexities(total, sets[name])
            store.write_checkpoint_coords(root, m, c, val_ppl, weights_hash, per_byte)
        store.mark_done(root, name, m, c, ckpt.model)


def perplexities(total_loss: float, scored: ScoredSet) -> tuple[float, dict[str, float]]:
    """val_ppl = exp(mean loss per scored token), and lm-eval's bits per byte and word perplexity.

    bits_per_byte = total / (bytes x ln 2) and word_ppl = exp(total / words), with bytes and
    words counted on the scored text (`ScoredSet.n_bytes`, `n_words`).
    """
    val_ppl = math.exp(total_loss / max(scored.n_tokens, 1))
    return val_ppl, {"bits_per_byte": total_loss / (max(scored.n_bytes, 1) * math.log(2)),
                     "word_ppl": math.exp(min(total_loss / max(scored.n_words, 1), 700.0))}


def _score_set(model, scored: ScoredSet, root, name: str, m: int, c: int, metrics: tuple[str, ...],
               batch_tokens: int, bar: tqdm) -> float:
    """Score one set with one checkpoint, writing every chunk of tokens as soon as it is complete.

    Returns the summed loss (nats, float64) over the set's scored tokens.
    """
    chunk = store.token_chunk(scored.n_tokens)
    values = {metric: np.full(scored.n_tokens, np.nan, dtype=np.float32) for metric in metrics}
    first = np.asarray([t[t >= 0].min() if (t >= 0).any() else scored.n_tokens for t in scored.targets])
    first = np.minimum.accumulate(first[::-1])[::-1]  # first token still unscored once windows < w are done
    finished = np.zeros(len(scored.windows), dtype=bool)
    frontier = written = 0  # windows [0, frontier) are scored; tokens [0, written) are in the store
    with torch.inference_mode():
        for rows in plan_batches(scored.lengths, batch_tokens):
            ids, score, index = _batch(scored, rows)
            results = token_scores(model, torch.from_numpy(ids), torch.from_numpy(score), metrics)
            for metric in metrics:
                values[metric][index] = results[metric].numpy()
            bar.update(len(index))
            finished[rows] = True
            while frontier < len(finished) and finished[frontier]:
                frontier += 1
            complete = scored.n_tokens if frontier == len(finished) else int(first[frontier])
            upto = complete if complete == scored.n_tokens else complete // chunk * chunk
            if upto > written:
                store.write_block(root, name, m, c, written, {k: v[written:upto] for k, v in values.items()})
                written = upto
    return float(values["loss"].astype(np.float64).sum())


def _batch(scored: ScoredSet, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids, the mask of scored positions, and the flat token index of every scored value."""
    windows = [scored.windows[w] for w in rows]
    ids = np.full((len(rows), max(len(w) for w in windows)), PAD, dtype=np.int64)
    score = np.zeros(ids.shape, dtype=bool)
    index = []
    for i, (window, target) in enumerate(zip(windows, (scored.targets[w] for w in rows))):
        ids[i, :len(window)] = window
        score[i, 1:len(window)] = target >= 0
        index.append(target[target >= 0])
    return ids, score, np.concatenate(index)


def _model_coords(suite: Suite, seq_len: int, trust_remote_code: bool) -> dict:
    """Per-model and per-checkpoint coordinates known before any weights load; checks the context length."""
    n_ckpt = max(len(spec.checkpoints) for spec in suite.models)
    shape = (len(suite.models), n_ckpt)
    coords = {"model": np.asarray([spec.name for spec in suite.models], dtype=object),
              "step": np.full(shape, np.nan), "tokens_seen": np.full(shape, np.nan),
              "source": np.full(shape, "", dtype=object),
              "n_params": np.zeros(len(suite.models), dtype=np.int64),
              "n_params_nonembed": np.zeros(len(suite.models), dtype=np.int64)}
    for m, spec in enumerate(suite.models):
        for c, ckpt in enumerate(spec.checkpoints):
            coords["step"][m, c] = ckpt.step
            coords["tokens_seen"][m, c] = np.nan if ckpt.tokens_seen is None else ckpt.tokens_seen
            coords["source"][m, c] = ckpt.source
        first = spec.checkpoints[0]
        config = AutoConfig.from_pretrained(checkpoints.resolve(first), trust_remote_code=trust_remote_code)
        context = checkpoints.max_context(config)
        if context is not None and seq_len > context:
            raise TokendynError(f"seq_len {seq_len} exceeds the context of model '{spec.name}' ({context} tokens); "
                                f"lower seq_len in the suite TOML to at most {context}")
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        coords["n_params"][m], coords["n_params_nonembed"][m] = checkpoints.count_params(skeleton)
    return coords


def _warn_identical(root, suite: Suite, m: int, c: int, weights_hash: str) -> None:
    hashes = np.asarray(root["weights_hash"][m])
    for other in np.flatnonzero(hashes == weights_hash):
        if other != c:
            steps = suite.models[m].checkpoints
            warnings.warn(f"model '{suite.models[m].name}': checkpoints at steps {steps[other].step} and "
                          f"{steps[c].step} have identical weights (a known defect of some public suites)",
                          stacklevel=2)


def _parse_metrics(metrics: Iterable[str] | None, existing: dict) -> tuple[str, ...]:
    if metrics is None:
        return tuple(existing.get("metrics", ("loss",)))
    metrics = tuple(dict.fromkeys(["loss", *metrics]))
    unknown = [m for m in metrics if m not in store.METRICS]
    if unknown:
        raise TokendynError(f"unknown metric '{unknown[0]}'; choose from {','.join(store.METRICS)}")
    return tuple(m for m in store.METRICS if m in metrics)


def _existing_attrs(out: Path) -> dict:
    if not (out / "zarr.json").is_file():
        return {}
    return store.read_attrs(out)


def _check_device(device: str) -> None:
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise TokendynError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise TokendynError("--device mps requested but MPS is not available; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise TokendynError(f"unknown device '{device}'; use cpu, cuda[:N] or mps")


def _check_unique_sets(suite: Suite) -> None:
    names = [s.name for s in suite.sets]
    for name in names:
        if name == "main" or names.count(name) > 1:
            raise TokendynError(f"evaluation set name '{name}' is used twice (or is reserved); rename the set")
