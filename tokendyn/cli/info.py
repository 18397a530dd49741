"""`tokendyn info STORE`: what a store holds and how far its extraction got."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="summarise a store: models, checkpoints done/missing, tokens, size",
        description="Print the models of a store with their done and missing "
        "checkpoints, the evaluation sets and their tokens, the size on disk, checkpoints that look "
        "mislabelled (identical weights, out of order), and a quick integrity check (chunk files and "
        "metadata; `tokendyn verify` checks the values too). Never writes.",
    )
    p.add_argument("store", type=Path, help="store path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    print(describe(args.store))


def describe(path: Path) -> str:
    import json

    from tokendyn.analysis.checkpoints import mislabelled
    from tokendyn.analysis.trajectories import load_small
    from tokendyn.data.corpus import describe as describe_protocol
    from tokendyn.store import list_sets, open_store, read_attrs, verify, verify_summary

    attrs = read_attrs(path)
    ds = open_store(path)
    lines = [
        f"store     {path}  ({_size(path)} on disk, tokendyn {attrs['tokendyn_version']})",
        f"metrics   {', '.join(attrs['metrics'])}  stored as {attrs['store_dtype']}, "
        f"scored in {attrs.get('compute_dtype', 'a precision not recorded (an older store)')}",
    ]
    for name in ["main", *list_sets(path)]:
        s = ds if name == "main" else open_store(path, set=name)
        if "summary" in s.attrs:
            protocol = describe_protocol(json.loads(s.attrs["summary"]))
            lines += [f"set       {name}: {protocol[0]}", *(f"{'':10}{line}" for line in protocol[1:])]
        else:
            lines.append(f"set       {name}: {s.sizes['token']} scored tokens")
        lines += [f"refused   {reason}" for reason in s.attrs.get("refused", {}).values()]
        if name != "main":
            lines += _set_gaps(name, s.done.values, ds.step.values, ds.model.values)
    done = ds.done.values
    steps = ds.step.values
    for m, model in enumerate(ds.model.values):
        present = np.isfinite(steps[m])
        missing = [int(s) for s in steps[m][present & ~done[m]]]
        ppl = ds.val_ppl.values[m][present & done[m]]
        idx = np.flatnonzero(present & done[m])
        last = (
            f", at the last done: val_ppl {ppl[-1]:.2f}, bits/byte {ds.bits_per_byte.values[m, idx[-1]]:.3f}, "
            f"word ppl {ds.word_ppl.values[m, idx[-1]]:.2f}"
            if len(ppl)
            else ""
        )
        lines.append(
            f"model     {model} ({int(ds.n_params.values[m]):,} params): "
            f"{int((present & done[m]).sum())}/{int(present.sum())} checkpoints done{last}"
            + (f"; missing steps {_short(missing)}" if missing else "")
        )
    lines += [f"suspect   {line}" for line in mislabelled(load_small(ds))]
    problems = verify(path)  # files and metadata only: cheap; `tokendyn verify` also reads the values
    lines.append(
        f"integrity {len(problems)} problem(s): {verify_summary(problems)}; see `tokendyn verify {path}`"
        if problems
        else "integrity every done checkpoint has its chunks; metadata consistent"
    )
    return "\n".join(lines)


def _set_gaps(name: str, done: np.ndarray, steps: np.ndarray, models: np.ndarray) -> list[str]:
    """A line per model whose checkpoints a named set lacks (e.g. a set added with --set, not extended when
    the store grew; or scored with --every)."""
    lines = []
    for m, model in enumerate(models):
        present = np.isfinite(steps[m])
        missing = [int(step) for step in steps[m][present & ~done[m]]]
        if missing:
            lines.append(
                f"{'':10}{model}: {int((present & done[m]).sum())}/{int(present.sum())} checkpoints done; "
                f"missing steps {_short(missing)} (rerun extract with this set to fill them)"
            )
    return lines


def _short(values: list[int], most: int = 8) -> str:
    shown = ", ".join(map(str, values[:most]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > most else "")


def _size(path: Path) -> str:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
