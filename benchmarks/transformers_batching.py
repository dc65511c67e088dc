"""Batched vs one-at-a-time decoding with the transformers backend, on the CPU.

A randomly-initialised GPT-2 (no download) serves the same requests twice through an
engine: once with ``max_batch_size=1`` (each request decodes alone, as a lock around
the model would force), once with ``max_batch_size=N`` (they decode together). Prints a
table of tokens/s and the ratio.

    python benchmarks/transformers_batching.py [--requests 8] [--tokens 48] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from llmbridge import Engine
from llmbridge.backends import transformers_backend

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def build(layers: int, hidden: int) -> tuple[object, object]:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(vocab),
        n_positions=512,
        n_embd=hidden,
        n_layer=layers,
        n_head=max(1, hidden // 64),
        eos_token_id=1,
        bos_token_id=1,
        pad_token_id=0,
    )
    # EOS is never chosen (its logit bias is pushed down), so every request runs to length.
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight[1].fill_(0)
        model.transformer.wte.weight[1].fill_(0)
    return model, tokenizer


def run(model: object, tokenizer: object, batch: int, prompts: list[str], tokens: int) -> float:
    with Engine(transformers_backend(model, tokenizer, max_batch_size=batch)) as engine:
        engine.submit("warm up", max_new_tokens=4).result()
        start = time.perf_counter()
        streams = [engine.submit(p, max_new_tokens=tokens) for p in prompts]
        produced = sum(s.result().completion_tokens for s in streams)
        elapsed = time.perf_counter() - start
    return produced / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = build(args.layers, args.hidden)
    prompts = [f"request {i}: tell me about batching on the cpu" for i in range(args.requests)]
    alone = run(model, tokenizer, 1, prompts, args.tokens)
    together = run(model, tokenizer, args.requests, prompts, args.tokens)
    print(
        f"GPT-2 (random) {args.layers} layers, hidden {args.hidden}; {args.requests} requests "
        f"x {args.tokens} new tokens; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'mode':<28}{'tokens/s':>12}{'ratio':>9}")
    print(f"{'one at a time (batch 1)':<28}{alone:>12.1f}{1.0:>9.2f}")
    print(f"{f'batched (batch {args.requests})':<28}{together:>12.1f}{together / alone:>9.2f}")


if __name__ == "__main__":
    main()
