"""One module per command (see `tokendyn.cli`). Shared here: the options of every command that runs models."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from tokendyn.data.corpus import DEFAULT_BATCH_TOKENS


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --allow-pickle, --trust-remote-code and --no-progress."""
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda[:N], mps, or auto: cuda if available, else mps, else cpu (default: auto)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="model precision: float32 (fp32), bfloat16 (bf16), float16 (fp16), or auto: bfloat16 where "
        "the hardware runs it natively (CUDA with bf16, CPUs with AVX512_BF16/AMX/ARM bf16 flags), "
        "else float32; the choice and its reason are printed. A store remembers its precision: auto "
        "keeps it, another --dtype is refused unless --force. The environment variable TOKENDYN_DTYPE, "
        "when set, names what auto stands for (float32: the same numbers on every machine) "
        "(default: auto)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle checkpoints (pytorch_model.bin); only for weights you trust",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run model code shipped with a hub checkpoint; only for code you trust",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bar and the protocol summary printed before scoring (as -q)",
    )
    add_quiet(p)


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """--batch-size (windows per forward pass, as in lm-eval) or --batch-tokens (a token budget)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--batch-size",
        type=batch_size,
        default=None,
        metavar="N|auto",
        help="windows (sequences) per forward pass, at most, as lm-eval's --batch-size; auto: the most that "
        "fit in memory (free GPU memory on CUDA, else available RAM, beside the weights; the choice and "
        "its reason are printed, unless -q); the alternative to --batch-tokens (the scores do not depend on either)",
    )
    group.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        metavar="T",
        help="model positions per forward pass, padding included (as many windows as fit, at least one; "
        f"default: {DEFAULT_BATCH_TOKENS} unless --batch-size is given)",
    )


def batch_size(text: str) -> int | str:
    """--batch-size: a whole number, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor auto") from None


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= minimum."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got '{text}'")
        return int(text)

    return parse


seed_value = whole_number(0)  # numpy's generators take no negative seed
count = whole_number(1)  # threads, workers, tokens, samples, batch sizes
at_least_two = whole_number(2)  # PassUntil's pass target: its unbiased estimate needs r >= 2
window = whole_number(2)  # a window of one position predicts nothing


def add_quiet(p: argparse.ArgumentParser) -> None:
    """-q/--quiet: no progress bar (as analyze and report had it); results and errors are still printed."""
    if not any("--quiet" in action.option_strings for action in p._actions):
        p.add_argument(
            "-q", "--quiet", action="store_true", help="no progress bar (nor, where there is one, the protocol summary)"
        )


def model_options(args: argparse.Namespace) -> dict:
    """The keyword arguments that `add_model_options` collects, as the library functions take them."""
    return dict(
        device=args.device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        progress=not (args.no_progress or args.quiet),
    )


def warn_if_damaged(store: Path) -> None:
    """Analyses of a store that `tokendyn verify` rejects run, but their findings may rest on missing data: say so."""
    from tokendyn.store import verify, verify_summary

    problems = verify(store)
    if problems:
        print(
            f"tokendyn: warning: {store} has {len(problems)} integrity problem(s) ({verify_summary(problems)}), so "
            f"findings may rest on missing values; see `tokendyn verify {store}`",
            file=sys.stderr,
        )
