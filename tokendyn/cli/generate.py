"""`tokendyn generate SUITE --out GEN.jsonl`: contrastive generation from two models of a suite."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokendyn import memory
from tokendyn.cli.options import add_model_options, count, model_options, seed_value
from tokendyn.errors import TokendynError

ROLES = ("small", "large")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a mixture of a small and a large model (hallucinated text)",
        description="Decode from p' = l1 * p_small + l2 * p_large (negative entries clipped to 0, renormalised), "
        "prompted with the first tokens of validation documents of the suite's main set. The "
        'output JSONL has a "text" field (prompt + continuation) and the prompt, mixture, '
        "models, checkpoints and decoding settings as further fields, so it can be scored as a "
        "named set: tokendyn extract SUITE --set hallucinated=GEN.jsonl --out STORE.",
    )
    p.add_argument("suite", type=Path, help="suite description (TOML)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output JSONL file (an existing one is replaced only if it holds earlier generations)",
    )
    p.add_argument(
        "--small",
        default=None,
        metavar="MODEL[@STEP]",
        help="the model weighted by l1, optionally at a checkpoint step (default: the model with "
        "the fewest parameters, final checkpoint)",
    )
    p.add_argument(
        "--large",
        default=None,
        metavar="MODEL[@STEP]",
        help="the model weighted by l2 (default: the model with the most parameters, final checkpoint)",
    )
    p.add_argument(
        "--mix",
        action="append",
        default=None,
        metavar="small=L1,large=L2",
        help="a mixture, as small=1,large=-1 (an omitted role weighs 0) or L1,L2; repeat for several "
        "(default: the paper's five: 1,-1  1,0  1,1  0,1  -1,1)",
    )
    p.add_argument(
        "--prompts",
        type=_count,
        default=100,
        help="number of prompts: validation documents, evenly spaced over the files, or 'all' (default: %(default)s)",
    )
    p.add_argument("--prompt-tokens", type=count, default=5, help="prompt length k in tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=count, default=50, help="tokens generated per prompt (default: %(default)s)")
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling with this mass, e.g. 0.9 (default: greedy decoding)"
    )
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the sampling (default: %(default)s)")
    p.add_argument(
        "--no-stop-at-eos",
        action="store_true",
        help="keep generating after the end-of-sequence token (default: a continuation stops there)",
    )
    p.add_argument("--batch-size", type=count, default=32, help="prompts decoded together (default: %(default)s)")
    add_model_options(p)
    p.set_defaults(func=run)


def _count(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return int(text)


def parse_mixture(text: str) -> tuple[float, float]:
    """'small=1,large=-1' (omitted roles weigh 0) or '1,-1' -> (l1, l2)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        if all("=" not in part for part in parts):
            if len(parts) != 2:
                raise ValueError
            return float(parts[0]), float(parts[1])
        weights = dict.fromkeys(ROLES, 0.0)
        for part in parts:
            role, value = part.split("=")
            if role.strip() not in ROLES:
                raise ValueError
            weights[role.strip()] = float(value)
        return weights["small"], weights["large"]
    except ValueError:
        raise TokendynError(f"--mix '{text}' is not a mixture; write small=1,large=-1 or 1,-1") from None


def parse_model(text: str | None) -> tuple[str | None, int | None]:
    """'MODEL' or 'MODEL@STEP' -> (name, step)."""
    if text is None:
        return None, None
    name, _, step = text.partition("@")
    if step and not step.isdigit():
        raise TokendynError(f"'{text}' has no valid step after '@'; write MODEL or MODEL@STEP, e.g. m@1000")
    return name, int(step) if step else None


def run(args: argparse.Namespace) -> None:
    from tokendyn.models.generate import MIXTURES, check_out, generate, write_jsonl

    check_out(args.out)  # before any model loads
    memory.use(memory.SCORING)  # as `tokendyn extract` (tokendyn.memory)
    small, small_step = parse_model(args.small)
    large, large_step = parse_model(args.large)
    mixtures = MIXTURES if args.mix is None else [parse_mixture(m) for m in args.mix]
    records = generate(
        args.suite,
        small=small,
        large=large,
        small_step=small_step,
        large_step=large_step,
        mixtures=mixtures,
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=not args.no_stop_at_eos,
        batch_size=args.batch_size,
        **model_options(args),
    )
    out = write_jsonl(records, args.out)
    print(
        f"{len(records)} generations written: {out}  "
        f"(score them with: tokendyn extract {args.suite} --set NAME={out} --out STORE)"
    )
