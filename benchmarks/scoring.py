"""Scoring speed on real model shapes: tokendyn vs lm-eval, minicons, a plain loop and the GEMM bound, in one run.

    python benchmarks/scoring.py [--tokens 4096] [--window 512] [--models llama,neox] [--dtypes float32] [--rounds 1]
                                [--inductor]

Random-init models with the configs of SmolLM2-135M (Llama) and Pythia-160M (GPT-NeoX), written
here (no hub access), score the same ~`--tokens` tokens of real English text (this repository's
docs, tokenized by a byte-level BPE trained on them, repeated when `--tokens` asks for more than their
~37,000 tokens) in lm-eval's rolling windows of `--window`
(one prefix token, stride = window, no padding). Every tool runs in its own fresh process, so
start-up (imports, loading the model, tokenizing, hashing weights, writing the store) is counted
the same way for all; each row prints wall seconds with and without start-up, CPU seconds, and the
summed NLL (equal across tools when they scored the same tokens the same way). What a worker does
after its tool returns (reading tokendyn's store back for the NLL, re-timing the weight hash) is timed
and left out of that tool's wall time. With --rounds N every tool runs N times (rotated order) and
each measure keeps its best, with the range of the scoring times beside it:

  - tokendyn: the real `tokendyn extract --model DIR --text FILE --seq-len WINDOW` path,
  - lm-eval: `HFLM(pretrained=DIR).loglikelihood_rolling` on the same text,
  - minicons: `IncrementalLMScorer.compute_stats` on the same windows (when installable),
  - a plain transformers loop: one window per forward pass, full logits, log_softmax, gather,
  - the GEMM bound: every linear layer and the head timed alone at (positions x in) @ (in x out),
    the model's own shapes, in the run's dtype, by the faster of torch's linear and oneDNN's with a
    packed weight (`tokendyn.models.onednn`, on x86 CPUs), all positions at once or (the head) in
    tokendyn's chunks of rows, whichever is faster, with glibc's thresholds as in `tokendyn extract`
    (`tokendyn.memory`); a tool at 1.0 x bound spends its time only in those
    matrix products (attention's own products, norms and the softmax are extra work). "x +attn" adds
    attention's two products to the bound: batched matmuls at the model's head shapes, the causal half,
  - with --inductor, tokendyn's scoring with the model body compiled by torch.compile's inductor with
    freezing (weights folded in as constants, element-wise ops fused, linear layers packed): the
    compile is start-up, scoring is the compiled forward plus tokendyn's head. Not a tokendyn option:
    it answers whether compiling would bring scoring nearer the bound, at the price of one compile
    per checkpoint (freezing folds that checkpoint's weights in).

lm-eval and minicons are not tokendyn dependencies: the benchmark runs every tool in a separate
virtual environment, `benchmarks/.venv-bench` (created on first use from this machine's torch
wheel, with transformers, lm-eval, minicons and tokendyn itself installed editable; pass --venv
to use another). On CUDA the tools run on the GPU and the bound is the GPU's GEMM rate in the
run's dtype (bfloat16 by default there). Ratios are the point: they are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "benchmarks" / ".venv-bench"
DOCS = ("methods.md", "analyses.md", "suite.md", "store.md", "cli.md")  # English prose and then some
BPE_VOCAB = 8192
CONFIGS = {
    "llama": (
        "SmolLM2-135M (Llama)",
        "LlamaConfig",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=10000.0,
        ),
    ),
    "neox": (
        "Pythia-160M (GPT-NeoX)",
        "GPTNeoXConfig",
        dict(
            vocab_size=50304,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            tie_word_embeddings=False,
            use_parallel_residual=True,
        ),
    ),
}
TOOLS = ("bound", "tokendyn", "lm-eval", "minicons", "loop")
INDUCTOR = "inductor"  # opt-in: --inductor


# --- the driver: a separate environment, one fresh process per tool ----------------------------------


def ensure_venv(venv: Path) -> Path:
    """The benchmark environment's python; created once (torch from this machine's wheel or index)."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {venv} (once): torch, transformers, lm-eval, minicons, tokendyn -e", flush=True)
    from importlib.metadata import PackageNotFoundError, version

    def pinned(name: str) -> str:
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            return name

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    packages = [pinned("torch"), pinned("transformers"), "lm-eval", "minicons"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages, "-e", str(REPO)], check=True)
    return python


def run_tool(python: Path, tool: str, args, model_dir: Path) -> dict:
    """One tool in a fresh process: its JSON result plus wall and CPU seconds of the whole process."""
    command = [str(python), __file__, "--worker", tool, "--dir", str(model_dir), "--window", str(args.window)]
    command += ["--dtype", args.dtype, "--batch-tokens", str(args.batch_tokens)]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # a full pipe would block
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # wait4: the child's own CPU seconds
        wall = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if os.waitstatus_to_exitcode(status) != 0 or not lines:
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return {"skipped": tail[:110]}
    result = json.loads(lines[-1])
    # the worker's own checks after the tool finished (reading tokendyn's store back, re-hashing) are not the tool's
    return {**result, "wall": wall - result.pop("checks", 0.0), "cpu": usage.ru_utime + usage.ru_stime}


def tools(args) -> tuple[str, ...]:
    return (*TOOLS, INDUCTOR) if args.inductor else TOOLS


def best_of_rounds(python: Path, args, model_dir: Path) -> dict:
    """Each tool's best over `args.rounds` rounds, each measure on its own: the shortest wall, scoring
    and start-up times and the highest bound, with the range of the scoring times. Each round starts
    one tool later in the list, so no tool always runs first or right after the same other tool."""
    order = tools(args)
    runs: dict[str, list[dict]] = {tool: [] for tool in order}
    for r in range(args.rounds):
        for tool in order[r % len(order) :] + order[: r % len(order)]:
            runs[tool].append(run_tool(python, tool, args, model_dir))
    best = {}
    for tool, results in runs.items():
        done = [result for result in results if "skipped" not in result]
        if not done:
            best[tool] = results[0]
        elif "rate" in done[0]:  # the bound
            best[tool] = max(done, key=lambda result: result["rate"])
        else:
            scores = [result["score"] for result in done]
            best[tool] = {
                **min(done, key=lambda result: result["wall"]),
                "score": min(scores),
                "startup": min(result["wall"] - result["score"] for result in done),
                "range": f"{min(scores):.1f}-{max(scores):.1f}",
            }
    return best


def report(label: str, dtype: str, results: dict, args) -> None:
    bound = results["bound"]
    print(
        f"\n{label}, {dtype}: {bound['positions']} positions, GEMM bound {bound['rate']:.0f} tok/s "
        f"({bound['gflops']:.1f} GFLOP/s at the model's shapes); {bound['rate_attention']:.0f} tok/s "
        "with attention's two products too (x +attn)"
    )
    print(
        f"  {'tool':<10} {'tokens':>6} {'wall s':>7} {'start-up':>8} {'score s':>7} {'CPU s':>6} "
        f"{'tok/s':>6} {'x bound':>7} {'x +attn':>7} {'sum NLL':>10}  score s, all rounds"
    )
    for tool in tools(args)[1:]:
        r = results[tool]
        if "skipped" in r:
            print(f"  {tool:<10} skipped: {r['skipped']}")
            continue
        rate = r["tokens"] / r["score"]
        print(
            f"  {tool:<10} {r['tokens']:>6} {r['wall']:>7.1f} {r['startup']:>8.1f} {r['score']:>7.1f} "
            f"{r['cpu']:>6.1f} {rate:>6.0f} {rate / bound['rate']:>7.2f} {rate / bound['rate_attention']:>7.2f} "
            f"{r['nll']:>10.2f}  {r['range']}"
        )
    ours = results["tokendyn"]
    for tool in ("lm-eval", "minicons", "loop", *tools(args)[len(TOOLS) :]):
        other = results[tool]
        if "skipped" not in other and "skipped" not in ours:
            print(
                f"  tokendyn vs {tool}: {other['score'] / ours['score']:.2f}x scoring only, "
                f"{other['wall'] / ours['wall']:.2f}x with start-up"
            )
    if "skipped" not in ours:
        print(f"  tokendyn weight hash: {ours['hash_s']:.2f} s, in a background thread begun before torch imports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text scored")
    parser.add_argument("--window", type=int, default=512, help="positions per window (seq_len)")
    parser.add_argument("--models", default="llama,neox")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default: auto's choice on this machine")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokendyn's and lm-eval's positions per batch")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every tool this many times, in a rotated order each round, and keep each measure's best",
    )
    parser.add_argument(
        "--inductor",
        action="store_true",
        help="also time tokendyn's scoring with the model compiled by inductor with freezing (about a minute of "
        "compiling per model and dtype on 2 cores)",
    )
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--worker", choices=(*TOOLS, INDUCTOR, "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more")
    if args.worker:
        WORKERS[args.worker](args)
        return
    python = ensure_venv(args.venv)
    facts = json.loads(
        subprocess.run(
            [str(python), __file__, "--worker", "prepare", "--dir", "-", "--tokens", "0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
    )
    print(
        f"{os.cpu_count()} cores, torch {facts['torch']}, device {facts['device']}, CPU capability "
        f"{facts['capability']}, torch threads {facts['threads']}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"--dtype auto on this machine: {facts['auto']} ({facts['why']})")
    dtypes = args.dtypes.split(",") if args.dtypes else [facts["auto"]]
    with tempfile.TemporaryDirectory(prefix="tokendyn-scoring-") as tmp:
        subprocess.run(
            [
                str(python),
                __file__,
                "--worker",
                "prepare",
                "--dir",
                tmp,
                "--tokens",
                str(args.tokens),
                "--models",
                args.models,
            ],
            check=True,
        )
        for key in args.models.split(","):
            for dtype in dtypes:
                args.dtype = dtype
                results = best_of_rounds(python, args, Path(tmp) / key)
                mark = " (auto's choice)" if dtype == facts["auto"] else " (not auto's choice here)"
                report(CONFIGS[key][0], dtype + mark, results, args)


# --- workers: each runs inside the benchmark environment ---------------------------------------------


def _emit(**values) -> None:
    print(json.dumps(values), flush=True)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prepare(args) -> None:
    """Facts about the machine (--dir -), or the text, tokenizer and random-init models under --dir."""
    import torch

    from tokendyn.models import hardware

    if str(args.dir) == "-":
        device = _device()
        choice = hardware.decide_dtype("auto", hardware.probe(device, "auto"))
        _emit(
            torch=torch.__version__,
            device=device,
            capability=torch.backends.cpu.get_cpu_capability(),
            threads=torch.get_num_threads(),
            auto=str(choice.dtype).removeprefix("torch."),
            why=choice.reason,
        )
        return
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    text = "\n\n".join((REPO / "docs" / name).read_text(encoding="utf-8") for name in DOCS)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    copies = max(1, -(-args.tokens // len(bpe.encode(text).ids)))  # the docs hold ~37,000 tokens: repeated beyond that
    text = "\n\n".join([text] * copies)
    encoding = bpe.encode(text)
    cut = encoding.offsets[min(args.tokens, len(encoding.ids)) - 1][1]
    (args.dir / "text.txt").write_text(text[:cut], encoding="utf-8")
    for key in args.models.split(","):
        _, config_class, config = CONFIGS[key]
        config = getattr(transformers, config_class)(**config, eos_token_id=0, bos_token_id=0)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(args.dir / key)
        tokenizer.save_pretrained(args.dir / key)


def bound(args) -> None:
    """Seconds of the model's linear layers and head alone at its shapes, for one batch of positions."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from tokendyn import memory
    from tokendyn.models import onednn
    from tokendyn.models.extract import CHUNK_LOGITS

    memory.use(memory.SCORING)  # glibc's thresholds as in `tokendyn extract`: outputs are not mapped afresh
    device, dtype = _device(), getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=dtype)
    n_text = _n_tokens(args)
    positions = min(n_text, max(1, args.batch_tokens // (args.window + 1)) * args.window)
    vocab = model.config.get_text_config().vocab_size
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shape = (module.in_features, module.out_features)
            shapes[shape] = shapes.get(shape, 0) + 1
    total = flops = 0.0
    for (n_in, n_out), count in shapes.items():
        x = torch.randn(positions, n_in, dtype=dtype, device=device)
        linear = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
        # The faster of torch's own linear and oneDNN's with a packed weight (what tokendyn runs on x86 CPUs).
        kernels = [linear]
        if device == "cpu" and onednn.supported(dtype):
            kernels.append(onednn.PackedLinear(linear))
        # All positions at once and, for the head, also in tokendyn's chunks of rows (`token_scores`).
        rows = [positions] if n_out != vocab else [positions, min(positions, max(1, CHUNK_LOGITS // vocab))]
        best = math.inf
        for kernel in kernels:
            for step in rows:
                chunks = [x[start : start + step] for start in range(0, positions, step)]
                for repeat in range(3 if n_in * n_out < 2**24 else 2):  # the first is a warm-up
                    _sync()
                    started = time.perf_counter()
                    for chunk in chunks:
                        kernel(chunk)
                    _sync()
                    if repeat:
                        best = min(best, time.perf_counter() - started)
        total += count * best
        flops += count * 2 * positions * n_in * n_out
    _emit(
        positions=n_text,
        rate=positions / total,
        gflops=flops / total / 1e9,
        rate_attention=positions / (total + _attention_seconds(model.config, positions, args.window, dtype)),
    )


def _attention_seconds(config, positions: int, window: int, dtype) -> float:
    """Seconds of attention's two products (scores q @ k^T, then scores @ v) over all layers for one batch
    of `positions` in windows of `window`, at the best batched-matmul rate of their shapes and for the
    causal half only (the half a causal kernel needs)."""
    import torch

    device, windows = _device(), max(1, positions // window)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q = torch.randn(windows * heads, window, head_dim, dtype=dtype, device=device)
    scores = torch.randn(windows * heads, window, window, dtype=dtype, device=device)
    seconds = 0.0
    for product in (lambda: torch.bmm(q, q.transpose(1, 2)), lambda: torch.bmm(scores, q)):
        product()  # warm-up
        best = float("inf")
        for _ in range(3):
            _sync()
            started = time.perf_counter()
            product()
            _sync()
            best = min(best, time.perf_counter() - started)
        seconds += best / 2
    return config.num_hidden_layers * seconds * positions / (windows * window)  # a partial window: its share


def _n_tokens(args) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.dir)
    return len(tokenizer((args.dir.parent / "text.txt").read_text(encoding="utf-8"))["input_ids"])


def tokendyn_extract(args) -> None:
    """The real CLI path; scoring time is the sum of `_score_set` calls, the rest is start-up."""
    from tokendyn.cli import exit_quickly
    from tokendyn.cli import main as cli
    from tokendyn.models import extract as ex
    from tokendyn.models import fingerprint

    scoring = []
    score_set = ex._score_set

    def timed(*a, **k):
        started = time.perf_counter()
        try:
            return score_set(*a, **k)
        finally:
            _sync()
            scoring.append(time.perf_counter() - started)

    ex._score_set = timed
    out = Path(tempfile.mkdtemp()) / "s.zarr"
    code = cli(
        [
            "extract",
            "--model",
            str(args.dir),
            "--text",
            str(args.dir.parent / "text.txt"),
            "--seq-len",
            str(args.window),
            "--out",
            str(out),
            "--dtype",
            args.dtype,
            "--batch-tokens",
            str(args.batch_tokens),
            "--no-progress",
        ]
    )
    finished = time.perf_counter()
    import numpy as np

    import tokendyn

    loss = tokendyn.open_store(out).loss.values.astype(np.float64)
    started = time.perf_counter()
    fingerprint.read_digest(fingerprint.weight_files(args.dir)[0])  # what the background thread hashed
    hash_s = time.perf_counter() - started
    _emit(
        tokens=int(np.isfinite(loss).sum()),
        score=sum(scoring),
        nll=float(np.nansum(loss)),
        hash_s=hash_s,
        checks=time.perf_counter() - finished,
    )
    exit_quickly(code)  # as the `tokendyn` console script ends


def lm_eval(args) -> None:
    """lm-eval's HF backend: load, then loglikelihood_rolling on the text (its own windows of --window)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    windows_per_batch = max(1, args.batch_tokens // (args.window + 1))
    lm = HFLM(
        pretrained=str(args.dir),
        backend="causal",
        device=_device(),
        dtype=args.dtype,
        batch_size=windows_per_batch,
        max_length=args.window,
    )
    text = (args.dir.parent / "text.txt").read_text(encoding="utf-8")
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    started = time.perf_counter()
    (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    _sync()
    seconds = time.perf_counter() - started
    _emit(tokens=len(lm.tok_encode(text)), score=seconds, nll=-float(loglikelihood))


def _windows(tokenizer, window: int) -> list[tuple[list[int], int]]:
    """lm-eval's rolling rule, written out: (model input ids, number of scored last positions)."""
    text = (Path(tokenizer.name_or_path).parent / "text.txt").read_text(encoding="utf-8")
    z = [tokenizer.eos_token_id, *tokenizer(text)["input_ids"]]
    out, b = [], 0
    while b < len(z) - 1:
        e = min(len(z) - 1, b + window)  # scores z[b+1 : e+1]
        out.append((z[max(0, e + 1 - window - 1) : e + 1], e - b))
        b = e
    return out


def loop(args) -> None:
    """What most scripts do: one window per forward pass, full logits, log_softmax, gather."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=getattr(torch, args.dtype)).to(_device()).eval()
    windows = _windows(AutoTokenizer.from_pretrained(args.dir), args.window)
    started, nll, n = time.perf_counter(), 0.0, 0
    with torch.no_grad():
        for ids, scored in windows:
            ids = torch.tensor([ids], device=model.device)
            logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
            nll -= logp[-scored:].gather(1, ids[0, -scored:, None]).sum().item()
            n += scored
    _emit(tokens=n, score=time.perf_counter() - started, nll=nll)


def inductor(args) -> None:
    """tokendyn's `token_scores` on lm-eval's windows with the model body compiled by inductor with freezing;
    the first call (which compiles) is start-up."""
    import torch
    import torch._inductor.config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokendyn.models import extract

    torch._inductor.config.freezing = True
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=getattr(torch, args.dtype)).to(_device()).eval()
    setattr(model, model.base_model_prefix, torch.compile(model.base_model, dynamic=False))
    windows = _windows(AutoTokenizer.from_pretrained(args.dir), args.window)
    per_batch = max(1, args.batch_tokens // (args.window + 1))
    batches = []
    for b in range(0, len(windows), per_batch):
        part = windows[b : b + per_batch]
        ids = torch.full((len(part), args.window + 1), -1, dtype=torch.long)  # one width: no recompiles
        score = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (window, scored) in enumerate(part):
            ids[row, : len(window)] = torch.tensor(window)
            score[row, len(window) - scored : len(window)] = True
        batches.append((ids, score))
    for ids, score in {ids.shape[0]: (ids, score) for ids, score in batches}.values():
        extract.token_scores(model, ids, score)  # compiles, once per batch height
    started, nll, n = time.perf_counter(), 0.0, 0
    for ids, score in batches:
        loss = extract.token_scores(model, ids, score)["loss"]
        nll, n = nll + float(loss.double().sum()), n + len(loss)
    _sync()
    _emit(tokens=n, score=time.perf_counter() - started, nll=nll)


def minicons(args) -> None:
    """minicons' IncrementalLMScorer on the same windows (their text; it re-tokenizes)."""
    import torch
    from minicons import scorer

    lm = scorer.IncrementalLMScorer(str(args.dir), device=_device(), dtype=getattr(torch, args.dtype))
    windows = _windows(lm.tokenizer, args.window)
    texts = [lm.tokenizer.decode(ids) for ids, _ in windows]
    started, nll, n = time.perf_counter(), 0.0, 0
    batch = max(1, args.batch_tokens // (args.window + 1))
    for b in range(0, len(texts), batch):
        scores = lm.compute_stats(lm.prepare_text(texts[b : b + batch]))
        for (_, scored), values in zip(windows[b : b + batch], scores):
            nll -= float(sum(values[-scored:]))
            n += min(scored, len(values))
    _sync()
    _emit(tokens=n, score=time.perf_counter() - started, nll=nll)


WORKERS = {
    "prepare": prepare,
    "bound": bound,
    "tokendyn": tokendyn_extract,
    "lm-eval": lm_eval,
    "minicons": minicons,
    "loop": loop,
    INDUCTOR: inductor,
}

if __name__ == "__main__":
    main()
