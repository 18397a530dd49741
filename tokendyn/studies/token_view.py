"""The evaluation text with every token shaded by its loss change: a report section (safe HTML).

For each model (smallest first) and each of the first documents, the text is drawn token by token;
a token's background is blue where its loss fell between the two compared steps and red where it
rose, stronger for a larger change (full strength at the 95th percentile of |change| over the shown
tokens of all models). Hovering a token shows its loss at both steps. The text keeps its spaces and
line breaks (a newline also shows as ⏎); every token string is HTML-escaped.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from markupsafe import Markup, escape

from tokendyn.analysis.tokens import flat_tokens, steps_between
from tokendyn.analysis.trajectories import load_small, model_index
from tokendyn.data.corpus import PAD
from tokendyn.studies.study import models_by_size

STYLE = (
    "<style>.token-view{font-family:ui-monospace,monospace;font-size:0.85em;white-space:pre-wrap;"
    "line-height:1.6;border:1px solid #ccc;padding:0.5em;margin:0.3em 0 1em}"
    ".token-view span{border-radius:2px}</style>"
)


def _document_tokens(ds: xr.Dataset, n_docs: int, max_tokens: int) -> list[np.ndarray]:
    """Flat token indices of the first `n_docs` documents (at most `max_tokens` each), in text order."""
    ids = flat_tokens(ds["token_id"])
    doc = flat_tokens(ds["doc"]) if "doc" in ds.variables else np.zeros_like(ids)
    real = ids != PAD
    firsts = [d for d in dict.fromkeys(doc[real].tolist()) if d >= 0][:n_docs]
    return [np.flatnonzero(real & (doc == d))[:max_tokens] for d in firsts]


def _span(text: str, change: float, scale: float, title: str) -> str:
    colour = "255,255,255,0"
    if np.isfinite(change) and scale > 0:
        strength = min(1.0, abs(change) / scale) * 0.75
        colour = f"{'40,90,220' if change < 0 else '220,50,40'},{strength:.2f}"
    shown = text.replace("\n", "⏎\n").replace("\t", "→\t")
    return f'<span style="background:rgba({colour})" title="{escape(title)}">{escape(shown)}</span>'


def token_shading(
    source,
    between: tuple[float, float] | None = None,
    n_docs: int = 2,
    max_tokens: int = 400,
    models: list[str] | None = None,
) -> Markup:
    """HTML (markupsafe.Markup) of the first `n_docs` documents per model, each token shaded by its loss
    change between two training steps (`between`, default each model's first trained checkpoint and
    its last; see `tokendyn.analysis.tokens.top_tokens`); at most `max_tokens` tokens per document.
    models: which models, default all (smallest first). The token texts come from the store's
    vocabulary (`#<id>` without one) and are escaped."""
    from tokendyn.studies.study import open_source

    ds = load_small(open_source(source))
    names = models or models_by_size(ds)
    vocab = ds["vocab_text"].values if "vocab_text" in ds.variables else None
    ids = flat_tokens(ds["token_id"])
    docs = _document_tokens(ds, n_docs, max_tokens)
    per_model = {}
    for name in names:
        m = model_index(ds, name)
        a, b = steps_between(ds, m, between)
        loss = ds["loss"].isel(model=m)
        first, last = flat_tokens(loss.isel(ckpt=a)).astype(float), flat_tokens(loss.isel(ckpt=b)).astype(float)
        steps = ds["step"].values[m]
        per_model[name] = (first, last, f"{steps[a]:.0f}", f"{steps[b]:.0f}")
    shown = np.concatenate(docs) if docs else np.zeros(0, int)
    changes = np.concatenate([(last - first)[shown] for first, last, _, _ in per_model.values()]) if shown.size else []
    finite = np.abs(np.asarray(changes, dtype=float))
    finite = finite[np.isfinite(finite)]
    scale = float(np.percentile(finite, 95)) if finite.size else 0.0

    parts = [
        STYLE,
        '<p class="token-view-legend">Each token shaded by its loss change between the two steps: '
        '<span style="background:rgba(40,90,220,0.6)">fell</span> / '
        '<span style="background:rgba(220,50,40,0.6)">rose</span>, full colour at '
        f"{scale:.2f} nats (the 95th percentile); hover for the losses. ⏎ marks a line break.</p>",
    ]
    for name, (first, last, step_a, step_b) in per_model.items():
        parts.append(f"<h4>{escape(name)}: step {escape(step_a)} → {escape(step_b)}</h4>")
        for number, tokens in enumerate(docs):
            spans = []
            for t in tokens:
                text = str(vocab[ids[t]]) if vocab is not None else f"#{ids[t]} "
                title = (
                    f"step {step_a}: {first[t]:.2f} nats, step {step_b}: {last[t]:.2f} nats"
                    if np.isfinite(first[t]) and np.isfinite(last[t])
                    else "not scored (no left context)"
                )
                spans.append(_span(text, last[t] - first[t], scale, title))
            parts.append(f'<div class="token-view" data-doc="{number}">{"".join(spans)}</div>')
    return Markup("\n".join(parts))
