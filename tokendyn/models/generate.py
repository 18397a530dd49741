"""Contrastive generation (methods.md §1.4): decode from a mixture of two models of a suite.

The next-token distribution is p' = l1 * p_small + l2 * p_large, negative entries clipped to 0 and
renormalised. Each model keeps its own KV cache, so a step feeds one new token per sequence to each
model. Prompts are the first k tokens of validation documents of the suite's main set; all prompts
have the same length, so a batch needs no padding.

Decoding is greedy (argmax of p') or nucleus (top-p) sampling. Sampling is by inverse CDF with one
uniform number per (prompt, step), drawn from `numpy.random.default_rng(seed)` as a
(prompt, new_tokens) table: the same seed gives the same text whatever the batch size, and every
mixture uses the same numbers (common random numbers, so mixtures differ only by their weights).
The generated JSONL is a valid evaluation set: `"text"` is prompt + continuation and every other
field becomes a document-level coordinate of the store.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tokendyn.atomic import write_atomically
from tokendyn.config.suite import Checkpoint, Suite, load_suite
from tokendyn.data.corpus import PAD, prefix_ids, read_documents
from tokendyn.errors import TokendynError
from tokendyn.models import checkpoints, hardware

# (l1, l2) of the paper: small - large, small, small + large, large, large - small.
MIXTURES = ((1.0, -1.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (-1.0, 1.0))


def mixture_probs(probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * probs_i with negative entries set to 0, renormalised per row.

    A row without positive mass (the weighted sum is <= 0 everywhere, e.g. two identical models
    under (1, -1)) puts all its mass on the argmax of the weighted sum.
    """
    mix = sum(w * p for w, p in zip(weights, probs))
    clipped = mix.clamp(min=0)
    total = clipped.sum(-1, keepdim=True)
    empty = total[:, 0] <= 0
    if empty.any():
        clipped[empty] = torch.nn.functional.one_hot(mix[empty].argmax(-1), mix.shape[-1]).to(mix.dtype)
        total = clipped.sum(-1, keepdim=True)
    return clipped / total


def pick_tokens(probs: torch.Tensor, top_p: float | None, uniform: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: argmax (top_p None) or a nucleus sample driven by `uniform` in [0, 1).

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (at least one
    token); the sample is the token where the nucleus' cumulative mass first exceeds
    uniform * (nucleus mass).
    """
    if top_p is None:
        return probs.argmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    n_keep = ((cumulative - sorted_probs) < top_p).sum(-1, keepdim=True)
    mass = cumulative.gather(-1, n_keep - 1)
    index = torch.searchsorted(cumulative, uniform[:, None].to(mass.dtype) * mass, right=True)
    return order.gather(-1, torch.minimum(index, n_keep - 1))[:, 0]


def decode(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float],
    prompt_ids: torch.Tensor,
    new_tokens: int,
    *,
    vocab_size: int,
    top_p: float | None = None,
    uniforms: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Generate `new_tokens` tokens after each prompt row from the clipped mixture of `models`.

    prompt_ids: (batch, k) token ids, no padding. vocab_size: logits beyond it (embedding padding)
    are dropped. uniforms: (batch, new_tokens) in [0, 1), needed for top_p. A row stops at
    eos_token_id (not included); later positions are PAD (-1). use_cache=False re-runs every model
    on the whole sequence at each step (the reference the cached path must equal).
    Returns (batch, new_tokens) token ids.
    """
    if top_p is not None and uniforms is None:
        raise TokendynError("nucleus sampling needs uniforms of shape (batch, new_tokens)")
    batch = prompt_ids.shape[0]
    device = models[0].device
    out = torch.full((batch, new_tokens), PAD, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    caches: list = [None] * len(models)
    names = [_cache_keyword(model) for model in models]
    sequence = prompt_ids.to(device)
    step_input = sequence
    with torch.inference_mode():
        for t in range(new_tokens):
            probs = []
            for i, model in enumerate(models):
                if use_cache:
                    result = model(input_ids=step_input, use_cache=True, **{names[i]: caches[i]})
                    caches[i] = getattr(result, names[i])
                else:
                    result = model(input_ids=sequence, use_cache=False)
                logits = result.logits[:, -1].float()
                if logits.shape[-1] < vocab_size:
                    raise TokendynError(
                        f"a model has {logits.shape[-1]} output tokens but the tokenizer has "
                        f"{vocab_size}; they do not belong together"
                    )
                probs.append(torch.softmax(logits[:, :vocab_size], dim=-1))
            uniform = None if uniforms is None else uniforms[:, t].to(device)
            token = pick_tokens(mixture_probs(probs, weights), top_p, uniform).cpu()
            if eos_token_id is not None:
                finished |= token == eos_token_id
            out[:, t] = torch.where(finished, PAD, token)
            if finished.all():
                break
            # a finished row keeps decoding (shapes stay fixed) but its tokens are discarded
            step_input = token[:, None].to(device)
            sequence = torch.cat([sequence, step_input], dim=1)
    return out


def prompts_from_suite(
    suite: Suite, tokenizer: PreTrainedTokenizerBase, n_prompts: int | None, prompt_tokens: int
) -> list[tuple[int, list[int]]]:
    """(document index, first `prompt_tokens` token ids) of validation documents of the main set.

    Documents shorter than `prompt_tokens` are skipped. n_prompts documents are taken evenly spaced
    over the file order (all when None or larger than what is there).
    """
    if prompt_tokens < 1:
        raise TokendynError(f"prompt length {prompt_tokens} must be at least 1 token")
    docs = read_documents(suite.eval)
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    usable = [(d, row[:prompt_tokens]) for d, row in enumerate(ids) if len(row) >= prompt_tokens]
    if not usable:
        raise TokendynError(f"no validation document has {prompt_tokens} tokens; lower the prompt length")
    if n_prompts is not None:
        if n_prompts < 1:
            raise TokendynError(f"number of prompts {n_prompts} must be at least 1")
        if n_prompts < len(usable):
            usable = [usable[i] for i in np.unique(np.linspace(0, len(usable) - 1, n_prompts).round().astype(int))]
    return usable


def find_checkpoint(suite: Suite, model: str, step: int | None = None) -> Checkpoint:
    """A model's checkpoint at `step` (default: its final one)."""
    names = [spec.name for spec in suite.models]
    if model not in names:
        raise TokendynError(f"unknown model '{model}'; the suite has {', '.join(names)}")
    ckpts = suite.models[names.index(model)].checkpoints
    if step is None:
        return ckpts[-1]
    steps = [c.step for c in ckpts]
    if step not in steps:
        raise TokendynError(
            f"model '{model}' has no checkpoint at step {step}; its steps: {', '.join(map(str, steps))}"
        )
    return ckpts[steps.index(step)]


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword (and output field) of the key/value cache: `cache` in recent transformers,
    which warns on the older `past_key_values` and will drop it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def smallest_and_largest(suite: Suite, trust_remote_code: bool = False) -> tuple[str, str]:
    """Names of the suite's models with the fewest and the most parameters (from configs only)."""
    if len(suite.models) < 2:
        raise TokendynError(
            "the suite has one model; name the two checkpoints to mix with small= and large= "
            "(e.g. the same model at two steps)"
        )
    sizes = []
    for spec in suite.models:
        config = checkpoints.load_config(spec.checkpoints[-1], trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        sizes.append(checkpoints.count_params(skeleton)[0])
    order = np.argsort(sizes, kind="stable")
    return suite.models[order[0]].name, suite.models[order[-1]].name


def _check_mixture(mixture: Sequence[float]) -> tuple[float, float]:
    if len(mixture) != 2:
        raise TokendynError(f"a mixture is two weights (l1, l2), got {tuple(mixture)}")
    l1, l2 = (float(w) for w in mixture)
    if not (np.isfinite(l1) and np.isfinite(l2)) or max(l1, l2) <= 0:
        raise TokendynError(f"mixture ({l1:g}, {l2:g}) needs a finite, positive weight on at least one model")
    return l1, l2


def generate(
    suite: Suite | str | Path,
    *,
    small: str | None = None,
    large: str | None = None,
    small_step: int | None = None,
    large_step: int | None = None,
    mixtures: Sequence[Sequence[float]] = MIXTURES,
    prompts: int | None = 100,
    prompt_tokens: int = 5,
    new_tokens: int = 50,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    batch_size: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Contrastive generation from two models of a suite; one record per (mixture, prompt).

    Parameters
    ----------
    small, large : model names in the suite (default: the models with the fewest / most parameters).
    small_step, large_step : checkpoint steps (default: each model's final checkpoint).
    mixtures : (l1, l2) weight pairs on (small, large); default the paper's five.
    prompts : number of prompts (validation documents, evenly spaced; None = all).
    prompt_tokens : k, the prompt is the first k tokens of a document (BOS is prepended for the
        models when the main set uses BOS; it is not part of the k tokens or of the text).
    new_tokens : tokens generated per prompt (fewer when the mixture emits EOS and stop_at_eos).
    top_p : None for greedy decoding, else nucleus sampling with this mass in (0, 1].
    seed : seeds the sampling uniforms (see the module docstring).

    Records: text (prompt + continuation), prompt, continuation, source_doc, mixture ("l1,l2"),
    l1, l2, small, small_step, large, large_step, decoding ("greedy" or "top_p"), top_p (nucleus
    only), seed, prompt_tokens, new_tokens, n_generated, and context_ids (the prompt's ids) and
    token_ids (the generated ids): scored as an evaluation set, the generated ids are scored as
    they are, with the prompt as context only.
    """
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    mixtures = [_check_mixture(m) for m in mixtures]
    if not mixtures:
        raise TokendynError("no mixture given; pass at least one (l1, l2)")
    if top_p is not None and not 0 < top_p <= 1:
        raise TokendynError(f"top_p = {top_p} must be in (0, 1]; or None for greedy decoding")
    if new_tokens < 1 or batch_size < 1:
        raise TokendynError("new_tokens and batch_size must be at least 1")
    if small is None or large is None:
        default_small, default_large = smallest_and_largest(suite, trust_remote_code)
        small, large = small or default_small, large or default_large
    roles = [find_checkpoint(suite, small, small_step), find_checkpoint(suite, large, large_step)]
    tokenizer = checkpoints.load_tokenizer(suite, trust_remote_code)
    bos = prefix_ids(suite.eval.prefix, tokenizer)  # the main set's context-only prefix
    chosen = prompts_from_suite(suite, tokenizer, prompts, prompt_tokens)
    _check_context(roles, len(bos) + prompt_tokens + new_tokens, trust_remote_code)

    device, torch_dtype = hardware.choose(device, dtype)
    hf_logging.disable_progress_bar()  # one bar for the whole run, not one per weights load
    needed = {i for l1, l2 in mixtures for i, w in enumerate((l1, l2)) if w != 0}
    loaded = {
        i: checkpoints.load_model(
            roles[i], device=device, dtype=torch_dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
        )
        for i in sorted(needed)
    }
    uniforms = torch.from_numpy(np.random.default_rng(seed).random((len(chosen), new_tokens)))
    prompt_ids = torch.tensor([bos + ids for _, ids in chosen], dtype=torch.long)
    eos = tokenizer.eos_token_id if stop_at_eos else None

    records = []
    with tqdm(total=len(mixtures) * len(chosen), unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for l1, l2 in mixtures:
            bar.set_description(f"mixture {l1:g},{l2:g}")
            active = [i for i, w in enumerate((l1, l2)) if w != 0]
            for start in range(0, len(chosen), batch_size):
                rows = slice(start, start + batch_size)
                generated = decode(
                    [loaded[i] for i in active],
                    [(l1, l2)[i] for i in active],
                    prompt_ids[rows],
                    new_tokens,
                    vocab_size=len(tokenizer),
                    top_p=top_p,
                    uniforms=uniforms[rows],
                    eos_token_id=eos,
                )
                for (doc, ids), row in zip(chosen[rows], generated.numpy()):
                    records.append(
                        _record(tokenizer, doc, ids, row[row != PAD].tolist(), (l1, l2), roles, top_p, seed, new_tokens)
                    )
                bar.update(len(generated))
    return records


def _check_context(roles: Sequence[Checkpoint], length: int, trust_remote_code: bool) -> None:
    for ckpt in roles:
        config = checkpoints.load_config(ckpt, trust_remote_code)
        context = checkpoints.max_context(config)
        if context is not None and length > context:
            raise TokendynError(
                f"prompt + new tokens ({length}) exceed the context of model '{ckpt.model}' "
                f"({context} tokens); generate fewer new tokens"
            )


def _record(
    tokenizer,
    doc: int,
    prompt: list[int],
    new: list[int],
    mixture: tuple[float, float],
    roles: Sequence[Checkpoint],
    top_p: float | None,
    seed: int,
    new_tokens: int,
) -> dict:
    prompt_text = tokenizer.decode(prompt)
    text = tokenizer.decode(prompt + new)
    # decoding the whole sequence keeps characters that straddle the prompt/continuation boundary
    continuation = text[len(prompt_text) :] if text.startswith(prompt_text) else tokenizer.decode(new)
    record = {
        "text": text,
        "prompt": prompt_text,
        "continuation": continuation,
        "source_doc": doc,
        "mixture": f"{mixture[0]:g},{mixture[1]:g}",
        "l1": mixture[0],
        "l2": mixture[1],
        "small": roles[0].model,
        "small_step": roles[0].step,
        "large": roles[1].model,
        "large_step": roles[1].step,
        "decoding": "greedy" if top_p is None else "top_p",
    }
    if top_p is not None:
        record["top_p"] = top_p
    record.update(seed=seed, prompt_tokens=len(prompt), new_tokens=new_tokens, n_generated=len(new))
    # scored as generated: the ids themselves, with the prompt as context only (tokendyn.data.corpus)
    record.update(context_ids=[int(i) for i in prompt], token_ids=[int(i) for i in new])
    return record


def check_out(path: str | Path) -> Path:
    """`path` if generations may be written there: absent, empty, or a file of earlier generations
    (its first line a record with the fields `_record` writes); else a one-line TokendynError."""
    path = Path(path)
    if path.is_dir():
        raise TokendynError(f"--out {path} is a folder; give the path of a .jsonl file")
    if path.exists() and path.stat().st_size and not _generations(path):
        raise TokendynError(
            f"--out {path} exists and was not written by tokendyn generate; give a new path "
            "(tokendyn replaces only its own generations)"
        )
    return path


def _generations(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            first = json.loads(handle.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(first, dict) and {"mixture", "decoding", "context_ids", "token_ids"} <= first.keys()


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    """Write records as JSON lines (UTF-8); the file is usable as an evaluation set.

    Written to a temporary file beside `path` and renamed over it once complete, so a killed run or
    a full disk never leaves a truncated file (or an existing one half-overwritten). A file at
    `path` that is not earlier generations is refused (`check_out`).
    """
    path = check_out(path)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text)
    except OSError as err:
        raise TokendynError(f"cannot write {path} ({err.strerror}); choose a writable --out with free space") from None
    return path
