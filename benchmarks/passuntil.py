"""PassUntil sampling throughput, measured side by side in one run.

    python benchmarks/passuntil.py [--hidden 96] [--layers 3] [--vocab 1000] [--prompt 60] [--new-tokens 1,3]
                                   [--batches 64,256,1024] [--threads 1]

A random-init OPT model (the default shape is the built-in suite's middle size) samples completions
of one prompt with `tokendyn.models.sampling.Sampler` (what `tokendyn passuntil` runs: `generate.decode`
on the prompt repeated batch times). Prints completions/s per batch size and new-token count, next
to a prefix-shared reference that runs the prompt once and only the new tokens per completion
(the prompt's next-token distribution sampled n times when new_tokens = 1): their ratio is what
reusing the prompt's KV cache across a batch would gain. Prints the load average: the machine may
be shared, say so when you quote the numbers.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from tokendyn.models.generate import pick_tokens
from tokendyn.models.sampling import Sampler


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {"</s>": 0, "<pad>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def timed(function, repeats: int = 3) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--prompt", type=int, default=60)
    parser.add_argument("--new-tokens", default="1,3")
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = word_tokenizer(args.vocab)
    config = OPTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=2,
        ffn_dim=4 * args.hidden,
        word_embed_proj_dim=args.hidden,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = OPTForCausalLM(config).eval()
    prompt = [0, *np.random.default_rng(0).integers(3, args.vocab, args.prompt).tolist()]
    print(
        f"OPT hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, prompt {args.prompt} tokens, "
        f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'new tokens':>10} {'batch':>6} {'Sampler/s':>11} {'shared/s':>10} {'ratio':>6}")
    for new_tokens in (int(v) for v in args.new_tokens.split(",")):
        sampler = Sampler(model, tokenizer, prompt, new_tokens, top_p=None, stop=("\n",))
        for batch in (int(v) for v in args.batches.split(",")):
            rng = np.random.default_rng(0)
            ours = batch / timed(lambda: sampler(batch, rng))

            def shared() -> None:
                with torch.inference_mode():
                    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
                    probs = torch.softmax(out.logits[:, -1].float(), -1).expand(batch, -1)
                    token = pick_tokens(probs, 1.0, torch.from_numpy(rng.random(batch)))
                    cache = out.past_key_values
                    cache.batch_repeat_interleave(batch)
                    for _ in range(new_tokens - 1):
                        out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
                        token = pick_tokens(
                            torch.softmax(out.logits[:, -1].float(), -1), 1.0, torch.from_numpy(rng.random(batch))
                        )
                    tokenizer.batch_decode(token[:, None].tolist())

            reference = batch / timed(shared)
            print(f"{new_tokens:>10} {batch:>6} {ours:>11.0f} {reference:>10.0f} {reference / ours:>6.1f}")


if __name__ == "__main__":
    main()
