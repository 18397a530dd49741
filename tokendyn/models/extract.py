"""The one scoring loop: every checkpoint of every model scores every evaluation set into the store.

Per checkpoint: load the weights (on x86 CPUs with the linear layers packed for oneDNN,
`tokendyn.models.onednn`; on CPU with causal attention in blocks of queries,
`tokendyn.models.attention`), run batched forward passes over the set's windows (see
`tokendyn.data.corpus`; batches group windows of similar length, `plan_batches`), and turn
the final hidden states into per-token metrics a chunk of positions at a time (the LM head and a
float32 log-softmax over `CHUNK_LOGITS` values at most), so memory does not grow with
batch x seq x vocab. Results are written block by block as soon as they are computed; the
checkpoint's `done` flag is written last (see `tokendyn.store`).
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tokendyn import __version__, store
from tokendyn.config.suite import Checkpoint, EvalSet, Suite, load_suite
from tokendyn.data.corpus import DEFAULT_BATCH_TOKENS, PAD, ScoredSet, describe, plan_batches, tokenize_set
from tokendyn.errors import TokendynError
from tokendyn.models import attention, checkpoints, gpu, hardware, onednn
from tokendyn.models.fetch import Fetcher, cache_state
from tokendyn.store.read import open_group

if TYPE_CHECKING:
    import zarr

# Logits materialised at once in the head: 64 MiB in float32 (~330 positions of a 50k vocabulary), a
# bound that does not grow with batch x seq x vocab. Smaller chunks starve the head's matrix product:
# at 2**22 (83 rows of Pythia's vocabulary) it ran 1.7x slower than at 1,024 rows, at 2**24 at full speed.
CHUNK_LOGITS = 2**24
AUTO = "auto"  # --batch-size auto: the most windows that fit in memory; --dtype auto
PRECISION_ATTR = "compute_dtype"  # the store's attribute naming the precision its models ran in
# Config attributes that make the head's logits differ from a plain projection of the hidden state;
# such models are scored through their own full forward pass instead.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@torch.inference_mode()  # the head writes into a reused buffer (out=), which autograd refuses
def token_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, score: torch.Tensor, metrics: Iterable[str] = ("loss",)
) -> dict[str, torch.Tensor]:
    """Per-token metrics of the scored tokens of a batch of right-padded windows.

    `input_ids` (batch, width) holds -1 on padding; `score` (batch, width) is True where token
    input_ids[b, t] (t >= 1) is scored given input_ids[b, :t]. The model reads input_ids[:, :-1]
    (the last column is only a target). Returns float32 tensors of shape (n_scored,), in
    row-major order of `score`. Metrics: ``loss`` (NLL, nats), ``entropy`` (nats), ``rank``
    (0 = argmax). Everything is computed on the model's device; only the results are copied back.
    """
    metrics = tuple(metrics)
    valid = score[:, 1:].to(torch.bool)
    out = {m: torch.empty(0, dtype=torch.float32) for m in metrics}
    if not valid.any():
        return out
    ids = input_ids.clamp(min=0)
    hidden, head = _hidden_and_head(model, ids[:, :-1])
    hidden = hidden[valid.to(hidden.device)]  # the scored positions only: one gather, no copy of padding
    targets = ids[:, 1:][valid].to(hidden.device, non_blocking=True)
    if metrics == ("loss",) and gpu.fused_head_available(head, hidden):
        return {"loss": gpu.fused_head_loss(head, hidden, targets).float().cpu()}
    rows = max(1, CHUNK_LOGITS // model.config.get_text_config().vocab_size)
    parts = {m: [] for m in metrics}
    buffers = _head_buffers(head, rows, hidden)
    for start in range(0, len(targets), rows):
        chunk = hidden[start : start + rows]
        if buffers is None:
            logits = head(chunk).float()
        else:
            products, logits = (None if buffer is None else buffer[: len(chunk)] for buffer in buffers)
            if products is None:
                logits.copy_(head(chunk))  # a packed half-precision head allocates its product
            else:
                torch.mm(chunk, head.weight.t(), out=products)
                if logits is not products:
                    logits.copy_(products)  # a half-precision head: the log-softmax runs in float32
        for m, values in _chunk_metrics(logits, targets[start : start + rows], metrics).items():
            parts[m].append(values)
    return {m: torch.cat(parts[m]).cpu() for m in metrics}  # only the per-token results leave the device


def _head_buffers(head, rows: int, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """(products, logits): the (rows, vocab) buffers every chunk's head product and float32 logits are
    written into, when the head is a bias-free linear layer in the hidden states' dtype (else None: the
    head allocates its output). In float32 both are one buffer; in half precision the product is
    written in that precision and copied into the float32 logits.

    On CPU a fresh 64 MiB tensor per chunk is a new memory map whose pages the kernel faults in and
    zeroes, twice per chunk (logits, then log-softmax): reusing one buffer made the head 20% faster.
    A `onednn.PackedLinear` head (x86 CPUs) has no `out=`: it allocates its product (products is None).
    In float32 that product is the logits (None is returned: the log-softmax runs in it, in place); in
    bfloat16 it is copied into the reused float32 logits: the head took 21-29% less time than with a
    fresh float32 copy per chunk.
    """
    if isinstance(head, onednn.PackedLinear):
        weight_dtype = head.packed.dtype
    elif isinstance(head, torch.nn.Linear):
        weight_dtype = head.weight.dtype
    else:  # the logits themselves (LOGIT_TRANSFORMS), or a head of the model's own
        return None
    if head.bias is not None or weight_dtype != hidden.dtype or not hidden.dtype.is_floating_point:
        return None
    shape = (min(rows, len(hidden)), head.out_features)
    logits = torch.empty(shape, dtype=torch.float32, device=hidden.device)
    if isinstance(head, onednn.PackedLinear):
        return None if hidden.dtype == torch.float32 else (None, logits)
    if hidden.dtype == torch.float32:
        return logits, logits
    return torch.empty(shape, dtype=hidden.dtype, device=hidden.device), logits


def _chunk_metrics(logits: torch.Tensor, target: torch.Tensor, metrics: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Metrics of (rows, vocab) float32 logits on their device; the logits are overwritten.

    One fused log-softmax in place (a row at a time in cache; on CPU 2-3x faster than logsumexp's
    separate max, subtract, exp and sum passes over the chunk): loss = -log p(target); entropy =
    -sum p log p; rank = number of tokens more probable than the target (log p is monotone in the logit).
    """
    logp = torch.log_softmax(logits, dim=-1, out=logits)
    target_logp = logp.gather(1, target[:, None])[:, 0]
    out = {"loss": -target_logp}
    if "entropy" in metrics:
        out["entropy"] = -(logp.exp() * logp).sum(-1)
    if "rank" in metrics:
        out["rank"] = (logp > target_logp[:, None]).sum(-1).float()
    return {m: out[m] for m in metrics}


def _hidden_and_head(model: torch.nn.Module, ids: torch.Tensor):
    """Final hidden states and the function mapping them to logits.

    Right padding needs no attention mask: causal attention keeps every real token blind to the
    padding after it, and positions then count from 0 as in an unpadded sequence. No key/value
    cache (it would only copy every layer's keys and values into a cache nobody reads).
    """
    if model.device.type == "cuda":
        ids = ids.pin_memory()  # lets the copy below overlap with queued GPU work
    ids = ids.to(model.device, non_blocking=True)
    config = model.config.get_text_config()
    with _no_mask_warning():
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
            logits = model(input_ids=ids, use_cache=False).logits
            return logits, lambda h: h
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    return hidden, model.get_output_embeddings()


# The warning transformers logs (modeling_utils' warn_if_padding_and_no_attention_mask, GPT-2 and other
# models) when a pad id is the first or last input token and no attention mask is passed: every window of a
# tokenizer whose pad id is its BOS or EOS (GPT-2's) starts with one. The mask is left out on purpose.
MASK_WARNING = "We strongly recommend passing in an `attention_mask`"


class _DropMaskWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(MASK_WARNING)


@contextmanager
def _no_mask_warning() -> Iterator[None]:
    """Drop `MASK_WARNING` while tokendyn calls the model; everything else transformers logs goes through.

    A filter on the one logger that emits it (`logging.Logger.addFilter`), removed again afterwards.
    transformers warns only once per process (`warning_once`), so after tokendyn has called a model, a
    library user's own call without a mask does not warn either."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropMaskWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def extract(
    suite: Suite | str | Path,
    out: str | Path,
    *,
    extra_sets: Iterable[EvalSet] = (),
    metrics: Iterable[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    store_dtype: str | None = None,
    batch_tokens: int | None = None,
    batch_size: int | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
    prefetch: int = 1,
    evict: bool = False,
    every: Mapping[str, int] | None = None,
) -> Path:
    """Score every evaluation set of `suite` with every checkpoint into the store at `out`.

    Parameters
    ----------
    extra_sets : named evaluation sets added to the suite's own `[[sets]]`.
    metrics : any of "loss", "entropy", "rank" ("loss" always included); default: the store's, else loss.
    device, dtype : where and in which precision the model runs ("auto": see `tokendyn.models.hardware`);
        log-softmax is always float32.
    store_dtype : "float32" or "float16" on disk; default: the store's, else float32.
    batch_tokens : model positions per forward pass, padding included (at least one window per batch);
        default 8192 unless batch_size is given.
    batch_size : windows (sequences) per forward pass at most, as lm-eval's --batch-size; give this or
        batch_tokens, not both. "auto": the most that fit in memory (`auto_batch_size`). The scores do
        not depend on either.
    force : recompute checkpoints that are already complete.
    scheduler, workers : run on the dask cluster at this address, or on a new local cluster of this many
        workers (one task per checkpoint; see `tokendyn.models.distributed`).
    prefetch : hub checkpoints downloaded ahead while the current one is scored (on a cluster: per worker).
    evict : delete each scored hub revision this run downloaded from the Hugging Face cache.
    every : {set name: k}: score that set only at every k-th checkpoint of each model and at its last
        (`scored_at`); it stays not done (NaN in the analyses) at the others, which a later run
        without `every` fills in. For sets that only need the shape of a curve.

    A rerun skips complete checkpoints and recomputes interrupted ones.
    """
    batch_tokens, batch_size = batching(batch_tokens, batch_size)
    if prefetch < 0:
        raise TokendynError(f"--prefetch {prefetch} is negative; give 0 (no prefetch) or more")
    cached_before = cache_state() if evict else None  # before any download: evict only what this run fetches
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    out = Path(out)
    suite = replace(suite, sets=tuple(suite.sets) + tuple(extra_sets))
    _check_unique_sets(suite)
    existing = _existing_attrs(out)
    device, torch_dtype = _precision(out, existing, device, dtype, force, progress)
    metrics = _parse_metrics(metrics, existing)
    store_dtype = store_dtype or existing.get("store_dtype", "float32")
    if store_dtype not in store.STORE_DTYPES:
        raise TokendynError(f"unknown store dtype '{store_dtype}'; use one of {', '.join(store.STORE_DTYPES)}")

    tokenizer = checkpoints.load_tokenizer(suite, trust_remote_code)
    tokenizer_fp = checkpoints.check_tokenizers(suite, trust_remote_code)
    _check_context(suite, max(s.seq_len for s in (suite.eval, *suite.sets)), trust_remote_code)  # before packing
    sets = {"main": tokenize_set(suite.eval, tokenizer), **{s.name: tokenize_set(s, tokenizer) for s in suite.sets}}
    every = _check_every(every, sets)
    model_coords = _model_coords(suite, trust_remote_code)
    vocab_text = np.asarray(checkpoints.surface_texts(tokenizer), dtype=object)
    layout = store.Layout(suite.to_dict(), tokenizer_fp, metrics, store_dtype)
    why = None
    if batch_size == AUTO:
        batch_size, why = auto_batch_size(
            suite, sets, device, torch_dtype, model_coords["n_params"], workers, trust_remote_code
        )
    summaries = {name: scored.summary(batch_tokens, batch_size) for name, scored in sets.items()}
    complete = not force and store.up_to_date(out, layout, sets)  # raises for a store of other models or text
    if not force:
        _check_scored_weights(out, suite, progress)
    if complete:
        return out  # nothing to write, so nothing written: a read-only store works
    if progress:
        if why is not None:
            tqdm.write(why)
        width = max(12, *(len(name) + 2 for name in summaries))  # a long set name never runs into its text
        for name, summary in summaries.items():
            lines = describe(summary)
            tqdm.write("\n".join(f"{name if i == 0 else '':<{width}}{line}" for i, line in enumerate(lines)))

    hf_logging.disable_progress_bar()  # one bar for the whole run, not one per weights load
    with store.writer_lock(out):
        _repair(out)
        for ckpt in _unscored(out, suite):  # before the store grows to hold it (a Trainer may still be writing it)
            checkpoints.check_local_weights(ckpt, allow_pickle)
        root = store.prepare(out, layout, sets, model_coords, vocab_text, __version__, summaries)
        # Recorded on a new (or fully rescored) store; a store of older versions with done checkpoints stays
        # unrecorded: its precision is unknown.
        precision = hardware.dtype_name(torch_dtype)
        if root.attrs.get(PRECISION_ATTR) != precision and (force or not any(existing.get("complete", {}).values())):
            root.attrs[PRECISION_ATTR] = precision
        rows = {}  # each set's done flags per model, read once (we hold the writer lock): `store.done_row`
        todo = _todo(suite, sets, root, rows, every, force)
        if progress:
            _warn_left_out(out, sets, root, rows, todo)
        options = dict(
            metrics=metrics,
            batch_tokens=batch_tokens,
            batch_size=batch_size,
            device=device,
            dtype=torch_dtype,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        if scheduler is not None or workers is not None:
            refused = _score_on_cluster(
                suite, out, sets, todo, options, scheduler, workers, progress, prefetch, cached_before
            )
        else:
            refused = _score_here(suite, root, sets, todo, rows, options, progress, prefetch, evict, cached_before)
    if refused:
        more = (
            f" (and {len(refused) - 1} more checkpoint-sets; see `tokendyn verify {out}`)" if len(refused) > 1 else ""
        )
        raise TokendynError(f"not marked done, {refused[0]}{more}; the other checkpoints are complete")
    return out


Todo = list[tuple[int, int, list[str]]]  # (model, checkpoint, names of the sets to score there)


def _todo(suite: Suite, sets: dict[str, ScoredSet], root, rows: dict, every: dict[str, int], force: bool) -> Todo:
    """Every (model, checkpoint) with the sets still to score there, in the suite's order."""
    todo = [
        (
            m,
            c,
            [
                name
                for name in sets
                if scored_at(c, len(spec.checkpoints), every.get(name, 1))
                and (force or not store.is_done(root, name, m, c, rows))
            ],
        )
        for m, spec in enumerate(suite.models)
        for c in range(len(spec.checkpoints))
    ]
    return [(m, c, names) for m, c, names in todo if names]


def _warn_left_out(out: Path, sets: dict[str, ScoredSet], root, rows: dict, todo: Todo) -> None:
    """Name the store's sets this run leaves missing at the checkpoints it scores."""
    left_out = [
        name
        for name in store.list_sets(out)
        if name not in sets and any(not store.is_done(root, name, m, c, rows) for m, c, _ in todo)
    ]
    if left_out:
        tqdm.write(
            f"tokendyn: the store's sets {', '.join(left_out)} are not in this run, so the checkpoints scored "
            "now stay missing in them (`tokendyn info` lists them); pass them again (--set, --pairs) to fill them"
        )


def _score_here(
    suite: Suite,
    root,
    sets: dict[str, ScoredSet],
    todo: Todo,
    rows: dict,
    options: dict,
    progress: bool,
    prefetch: int,
    evict: bool,
    cached_before: set[tuple[str, str]] | None,
) -> list[str]:
    """Score `todo` in this process, one checkpoint after another; the reasons of refused checkpoint-sets."""
    total = sum(sets[name].n_tokens for _, _, names in todo for name in names)
    refused = []
    with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        ckpts = [suite.models[m].checkpoints[c] for m, c, _ in todo]
        with Fetcher(ckpts, prefetch, evict, options["allow_pickle"], cached_before) as fetcher:
            for (m, c, names), ckpt in zip(todo, ckpts):
                fetcher.wait(ckpt)
                refused += score_checkpoint(
                    suite, root, {name: sets[name] for name in names}, m, c, bar=bar, rows=rows, **options
                )
                fetcher.release(ckpt)
    store.consolidate(root)  # once, from every node on disk: what each checkpoint's refresh kept up to date
    return refused


def _score_on_cluster(
    suite: Suite,
    out: Path,
    sets: dict[str, ScoredSet],
    todo: Todo,
    options: dict,
    scheduler: str | None,
    workers: int | None,
    progress: bool,
    prefetch: int,
    cached_before: set[tuple[str, str]] | None,
) -> list[str]:
    """Score `todo` on a dask cluster (one task per checkpoint); the reasons of refused checkpoint-sets."""
    from tokendyn.models.distributed import run_on_cluster

    run_on_cluster(
        suite,
        out.resolve(),  # workers may run in other folders, where a relative path names another store
        sets,
        todo,
        options,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
        prefetch=prefetch,
        cached_before=cached_before,
    )
    store.consolidate(open_group(out, mode="r+"))  # once, from every node on disk
    stored = open_group(out, mode="r")
    refused = [
        reason
        for name in sets
        for reason in (stored if name == "main" else stored[store.set_path(name)]).attrs.get("refused", {}).values()
    ]
    unwritten = [(m, c, n) for m, c, names in todo for n in names if not store.is_done(stored, n, m, c)]
    if unwritten and not refused:
        m, c, name = unwritten[0]
        raise TokendynError(
            f"the cluster finished, but {len(unwritten)} checkpoint-sets are not done in {out} (first: "
            f"{suite.models[m].checkpoints[c].source}, set {name}); the workers must see the store at "
            f"{out.resolve()} (a shared file system); rerun to resume"
        )
    return refused


def _unscored(out: Path, suite: Suite) -> list[Checkpoint]:
    """The suite's checkpoints whose step the store at `out` has not scored in its main set (every one
    without a readable store: damage elsewhere is the repair's and the rescoring's to mend)."""
    scored = store.scored_weights(out)
    return [c for spec in suite.models for c in spec.checkpoints if (spec.name, float(c.step)) not in scored]


def _check_scored_weights(out: Path, suite: Suite, progress: bool) -> None:
    """Refuse a local checkpoint the store has scored whose weight files are no longer the ones scored
    (a run retrained into the same folder, a path now naming another run's checkpoint): the store would
    keep values of other weights under its step. File times cannot tell (`mv` and `cp -p` keep them):
    each is hashed again unless `checkpoints.weights_match` verified these very files before. Hub
    revisions are named by their commit and need no check."""
    local = [(spec.name, ckpt) for spec in suite.models for ckpt in spec.checkpoints if ckpt.path is not None]
    scored = store.scored_weights(out) if local else {}
    local = [(name, ckpt) for name, ckpt in local if scored.get((name, float(ckpt.step)))]
    for name, ckpt in tqdm(local, desc="checking scored weights", unit="ckpt", disable=not progress, leave=False):
        if not checkpoints.has_weights(ckpt):
            continue  # nothing left to compare: the stored values stand
        checkpoints.check_local_weights(ckpt, allow_pickle=True)  # a missing shard is named as such
        stored_hash = scored[name, float(ckpt.step)]
        if not checkpoints.weights_match(ckpt, stored_hash):
            raise TokendynError(
                f"store {out} scored step {ckpt.step} of model '{name}' from other weights than "
                f"{ckpt.source} holds now (weights hash {stored_hash[:12]}); rescore with --force, or "
                "write to a new --out"
            )


def scored_at(c: int, n: int, every: int) -> bool:
    """Whether a set scored at every `every`-th checkpoint is scored at checkpoint `c` of a model's `n`:
    c = 0, every, 2 every, ... and the last, n - 1."""
    return c % every == 0 or c == n - 1


def batching(batch_tokens: int | None, batch_size: int | str | None) -> tuple[int | None, int | str | None]:
    """(batch_tokens, batch_size) with exactly one set: the token budget by default, else the batch size.

    batch_size may be "auto" (`AUTO`), resolved once the models are known (`auto_batch_size`).
    """
    if batch_tokens is not None and batch_size is not None:
        raise TokendynError("give --batch-size (windows per batch) or --batch-tokens (tokens per batch), not both")
    if isinstance(batch_size, str) and batch_size != AUTO:
        raise TokendynError(f"--batch-size {batch_size} is neither a number nor 'auto'; give e.g. 8 or auto")
    for name, value in (("batch-tokens", batch_tokens), ("batch-size", batch_size)):
        if isinstance(value, int) and value < 1:
            raise TokendynError(f"--{name} {value} must be at least 1")
    return (DEFAULT_BATCH_TOKENS if batch_size is None and batch_tokens is None else batch_tokens), batch_size


def auto_batch_size(
    suite: Suite,
    sets: dict[str, ScoredSet],
    device: str,
    dtype: torch.dtype,
    n_params: np.ndarray,
    workers: int | None = None,
    trust_remote_code: bool = False,
) -> tuple[int, str]:
    """`--batch-size auto`: the most windows per forward pass that fit in memory (lm-eval's meaning), and why.

    The memory is the free memory of the CUDA device, else the available RAM (`gpu.free_memory`), split
    between the `workers` processes of a local cluster, less the weights of the model (n_params, one
    per suite model, in `dtype`; twice where they are packed for oneDNN, `onednn.weight_copies`); the
    rule is `gpu.batch_tokens_for_memory`, the one that also lowers every batch on CUDA
    (`_fit_device_memory`). The size is the smallest over the suite's models and at most the number of
    windows of the largest set. Returns (size, one line saying why).
    """
    free, what = gpu.free_memory(device)
    share = free // max(1, workers or 1)
    window = max(int(scored.lengths.max(initial=1)) for scored in sets.values())
    most = max(1, max(len(scored.windows) for scored in sets.values()))
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    size, limit = most, None
    for spec, params in zip(suite.models, n_params):
        config = checkpoints.load_config(spec.checkpoints[0], trust_remote_code)
        room = share - int(params) * dtype_bytes * onednn.weight_copies(device, dtype, config.model_type)
        fit = gpu.config_batch_tokens(config, room, dtype_bytes, window, most * window, CHUNK_LOGITS) // window
        if fit < size:
            size, limit = fit, spec.name
    memory = f"{share / 2**30:.1f} GiB of {what}" + (f" per worker ({workers})" if workers and workers > 1 else "")
    if limit is None:
        return size, f"--batch-size auto: {size} windows per forward pass, every window of the largest set ({memory})"
    return size, (
        f"--batch-size auto: {size} windows of up to {window} tokens per forward pass, the most that fit in "
        f"{gpu.MEMORY_SHARE:.0%} of {memory} beside the weights of model '{limit}'"
    )


def _check_every(every: Mapping[str, int] | None, sets: Mapping[str, ScoredSet]) -> dict[str, int]:
    every = dict(every or {})
    for name, k in every.items():
        if name not in sets or name == "main":
            raise TokendynError(f"every: '{name}' is not a named evaluation set of this run; name one of its sets")
        if not isinstance(k, int) or k < 1:
            raise TokendynError(f"every: {name}={k!r}; give a whole number of checkpoints, at least 1")
    return every


def _repair(out: Path) -> None:
    """Before writing: repair what `tokendyn verify` finds (checkpoints with missing chunks are recomputed)."""
    if not (out / "zarr.json").is_file():
        return
    problems = store.repair(out)
    broken = [p for p in problems if not p.repairable]
    if broken:
        raise TokendynError(
            f"store {out} is damaged beyond repair: {store.verify_summary(broken)}; write to a new --out"
        )
    if problems:
        warnings.warn(f"store {out} repaired: {store.verify_summary(problems)}", stacklevel=3)


def score_checkpoint(
    suite: Suite,
    root: zarr.Group,
    sets: dict[str, ScoredSet],
    m: int,
    c: int,
    *,
    metrics: tuple[str, ...],
    batch_tokens: int | None,
    device: str,
    dtype: torch.dtype,
    allow_pickle: bool,
    trust_remote_code: bool,
    bar: tqdm,
    commit: Callable | None = None,
    batch_size: int | None = None,
    rows: dict | None = None,
) -> list[str]:
    """Score checkpoint `c` of model `m` on `sets`, writing only the chunks it owns, then commit it.

    A set whose scores are not all finite is not marked done: the reason is kept in the store and
    returned (one line per set), and the run goes on with the other checkpoints. The sets are
    committed together once all are scored (`store.commit_checkpoint`: done flags, then attributes,
    then consolidated metadata); a process killed before recomputes the checkpoint's sets.
    commit: replaces `store.commit_checkpoint` (same arguments but `rows`; cluster workers take a lock).
    rows: the writer's done flags (`store.done_row`), for a writer holding the store's writer lock.
    """
    ckpt = suite.models[m].checkpoints[c]
    bar.set_description(f"{ckpt.model} step {ckpt.step}")
    model = checkpoints.load_model(
        ckpt, device=device, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    onednn.pack_linear_layers(model)  # on x86 CPUs: forward plus head 3-16% faster (tokendyn.models.onednn)
    attention.use_query_blocks(model)  # on CPU, windows of 65-512: 2-8% faster (tokendyn.models.attention)
    # overlaps with the scoring below, or takes the hash begun while torch imported (tokendyn.models.fingerprint)
    weights_hash = checkpoints.weights_fingerprint_async(ckpt, allow_pickle)
    store_dtype = root.attrs["store_dtype"]
    done, refused = [], {}
    for name in sorted(sets, key=lambda n: n == "main"):  # main last: its flag follows val_ppl
        store.clear_done(root, name, m, c, rows)
        values = _score_set(model, sets[name], root, name, m, c, metrics, (batch_tokens, batch_size), bar)
        reason = check_scores(as_stored(values, store_dtype), sets[name].n_tokens, store_dtype)
        if reason is not None:
            refused[name] = f"model '{ckpt.model}' step {ckpt.step}, set '{name}': {reason}"
            warnings.warn(refused[name], stacklevel=2)
            continue
        if name == "main":
            val_ppl, per_byte = perplexities(float(values["loss"].astype(np.float64).sum()), sets[name])
            store.write_checkpoint_coords(root, m, c, val_ppl, weights_hash.result(), per_byte)
        done.append(name)
    if commit is None:
        store.commit_checkpoint(root, m, c, ckpt.model, done, refused, rows)
    else:
        commit(root, m, c, ckpt.model, done, refused)
    _warn_identical(root, suite, m, c, weights_hash.result())
    return list(refused.values())


def as_stored(values: dict[str, np.ndarray], store_dtype: str) -> dict[str, np.ndarray]:
    """The values as a store of `store_dtype` holds them (the same cast zarr makes: float16 overflows to inf)."""
    with np.errstate(over="ignore"):
        return {metric: np.asarray(v, dtype=store_dtype) for metric, v in values.items()}


def check_scores(scores: dict[str, np.ndarray], n_predicted: int, store_dtype: str) -> str | None:
    """Why one set's stored scores of a checkpoint cannot be marked done, or None if every prediction is finite.

    `scores` are the values as stored, per metric (format 2: one per scored token, so `n_predicted`
    is their number; any NaN counted beyond `values.size - n_predicted` is a failed prediction).
    Infinite values in a float16 store are overflows.
    """
    problems = []
    for metric, values in scores.items():
        nan = int(np.isnan(values).sum()) - (values.size - n_predicted)
        inf = int(np.isinf(values).sum())
        if nan > 0:
            problems.append(f"{nan} of {n_predicted} tokens have a NaN {metric}")
        if inf:
            limit = (
                f", above {np.finfo(store_dtype).max:.0f}, the largest {store_dtype}"
                if store_dtype != "float32"
                else ""
            )
            problems.append(f"{inf} of {n_predicted} tokens have an infinite {metric}{limit}")
    if not problems:
        return None
    fix = "--store-dtype float32" if store_dtype != "float32" and any("infinite" in p for p in problems) else ""
    return f"{'; '.join(problems)}; rerun with --dtype float32{' and ' + fix if fix else ''}"


def perplexity(mean_loss: float) -> float:
    """exp(mean loss), infinite (not an OverflowError) when the mean loss exceeds ~709.8 nats."""
    return math.exp(mean_loss) if mean_loss < math.log(np.finfo(np.float64).max) else math.inf


def perplexities(total_loss: float, scored: ScoredSet) -> tuple[float, dict[str, float]]:
    """val_ppl = exp(mean loss per scored token), and lm-eval's bits per byte and word perplexity.

    bits_per_byte = total / (bytes x ln 2) and word_ppl = exp(total / words), with bytes and
    words counted on the scored text (`ScoredSet.n_bytes`, `n_words`).
    """
    val_ppl = perplexity(total_loss / max(scored.n_tokens, 1))
    return val_ppl, {
        "bits_per_byte": total_loss / (max(scored.n_bytes, 1) * math.log(2)),
        "word_ppl": perplexity(total_loss / max(scored.n_words, 1)),
    }


def _score_set(
    model,
    scored: ScoredSet,
    root,
    name: str,
    m: int,
    c: int,
    metrics: tuple[str, ...],
    batches: tuple[int | None, int | None],
    bar: tqdm,
) -> dict[str, np.ndarray]:
    """Score one set with one checkpoint, writing every chunk of tokens as soon as it is complete.

    batches: (batch_tokens, batch_size) of `plan_batches`.

    Returns the values written, per metric (float32, one per scored token), all of them in the store.
    """
    chunk = store.token_chunk(scored.n_tokens)
    values = {metric: np.full(scored.n_tokens, np.nan, dtype=np.float32) for metric in metrics}
    first = np.asarray([t[t >= 0].min() if (t >= 0).any() else scored.n_tokens for t in scored.targets])
    first = np.minimum.accumulate(first[::-1])[::-1]  # first token still unscored once windows < w are done
    finished = np.zeros(len(scored.windows), dtype=bool)
    frontier = written = 0  # windows [0, frontier) are scored; tokens [0, written) are in the store
    if model.device.type == "cuda":
        batches = _fit_device_memory(model, scored, batches)
    with torch.inference_mode():
        for rows in plan_batches(scored.lengths, batches[0], batch_size=batches[1]):
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
    if written != scored.n_tokens:  # the values are checked in memory (`check_scores`): they must all be stored
        raise RuntimeError(f"set '{name}': {written} of {scored.n_tokens} tokens written")
    return values


def _fit_device_memory(model, scored: ScoredSet, batches: tuple[int | None, int | None]) -> tuple:
    """(batch_tokens, batch_size) lowered to what the free CUDA memory holds (`gpu.cuda_batch_tokens`)."""
    batch_tokens, batch_size = batches
    window = int(scored.lengths.max(initial=1))
    fit = gpu.cuda_batch_tokens(model, window, batch_tokens or batch_size * window, CHUNK_LOGITS)
    return (fit, None) if batch_tokens is not None else (None, max(1, fit // window))


def _batch(scored: ScoredSet, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ids, the mask of scored positions, and the flat token index of every scored value."""
    windows = [scored.windows[w] for w in rows]
    ids = np.full((len(rows), max(len(w) for w in windows)), PAD, dtype=np.int64)
    score = np.zeros(ids.shape, dtype=bool)
    index = []
    for i, (window, target) in enumerate(zip(windows, (scored.targets[w] for w in rows))):
        ids[i, : len(window)] = window
        score[i, 1 : len(window)] = target >= 0
        index.append(target[target >= 0])
    return ids, score, np.concatenate(index)


def _check_context(suite: Suite, seq_len: int, trust_remote_code: bool) -> None:
    """Refuse a seq_len beyond any model's context, before the text is packed (a huge seq_len fails fast)."""
    for spec in suite.models:
        config = checkpoints.load_config(spec.checkpoints[0], trust_remote_code)
        context = checkpoints.max_context(config)
        if context is not None and seq_len > context:
            raise TokendynError(
                f"seq_len {seq_len} exceeds the context of model '{spec.name}' ({context} tokens); "
                f"lower seq_len to at most {context} (the suite's [eval] seq_len, or --seq-len with --model)"
            )


def _model_coords(suite: Suite, trust_remote_code: bool) -> dict:
    """Per-model and per-checkpoint coordinates known before any weights load."""
    n_ckpt = max(len(spec.checkpoints) for spec in suite.models)
    shape = (len(suite.models), n_ckpt)
    coords = {
        "model": np.asarray([spec.name for spec in suite.models], dtype=object),
        "step": np.full(shape, np.nan),
        "tokens_seen": np.full(shape, np.nan),
        "source": np.full(shape, "", dtype=object),
        "n_params": np.zeros(len(suite.models), dtype=np.int64),
        "n_params_nonembed": np.zeros(len(suite.models), dtype=np.int64),
    }
    for m, spec in enumerate(suite.models):
        for c, ckpt in enumerate(spec.checkpoints):
            coords["step"][m, c] = ckpt.step
            coords["tokens_seen"][m, c] = np.nan if ckpt.tokens_seen is None else ckpt.tokens_seen
            coords["source"][m, c] = ckpt.source
        first = spec.checkpoints[0]
        config = checkpoints.load_config(first, trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        coords["n_params"][m], coords["n_params_nonembed"][m] = checkpoints.count_params(skeleton)
    return coords


def _warn_identical(root, suite: Suite, m: int, c: int, weights_hash: str) -> None:
    hashes = np.asarray(root["weights_hash"][m])
    for other in np.flatnonzero(hashes == weights_hash):
        if other != c:
            steps = suite.models[m].checkpoints
            warnings.warn(
                f"model '{suite.models[m].name}': checkpoints at steps {steps[other].step} and "
                f"{steps[c].step} have identical weights (a known defect of some public suites)",
                stacklevel=2,
            )


def _parse_metrics(metrics: Iterable[str] | None, existing: dict) -> tuple[str, ...]:
    if metrics is None:
        return tuple(existing.get("metrics", ("loss",)))
    metrics = tuple(dict.fromkeys(["loss", *metrics]))
    unknown = [m for m in metrics if m not in store.METRICS]
    if unknown:
        raise TokendynError(f"unknown metric '{unknown[0]}'; choose from {','.join(store.METRICS)}")
    return tuple(m for m in store.METRICS if m in metrics)


def _precision(
    out: Path, existing: dict, device: str, dtype: str, force: bool, verbose: bool
) -> tuple[str, torch.dtype]:
    """Device and dtype to score in. A store keeps the precision it was scored in (`PRECISION_ATTR`):
    auto stands for it, another dtype is refused unless `force` rescores every checkpoint."""
    recorded = existing.get(PRECISION_ATTR)
    if recorded is None or force:
        return hardware.choose(device, dtype)
    if hardware.canonical_dtype(dtype) == AUTO:
        chosen = hardware.choose(device, recorded, verbose=False)
        if verbose:
            print(f"tokendyn: running on {chosen[0]} in {recorded} (the precision of {out})", file=sys.stderr)
        return chosen
    chosen = hardware.choose(device, dtype)
    if hardware.dtype_name(chosen[1]) != recorded:
        name = hardware.dtype_name(chosen[1])
        raise TokendynError(
            f"store {out} was scored in {recorded}, not {name}: one store never mixes precisions; pass "
            f"--dtype {recorded} (or auto), --force to rescore every checkpoint in {name}, or a new --out"
        )
    return chosen


def _existing_attrs(out: Path) -> dict:
    if not (out / "zarr.json").is_file():
        return {}
    return store.read_attrs(out)


def _check_unique_sets(suite: Suite) -> None:
    names = [s.name for s in suite.sets]
    for name in names:
        if name == "main" or names.count(name) > 1:
            raise TokendynError(f"evaluation set name '{name}' is used twice (or is reserved); rename the set")
