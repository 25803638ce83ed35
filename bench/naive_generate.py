#!/usr/bin/env python3
"""Naive text-generation baseline for the gpt_reviews model.

What a straightforward Python server would do: requests are served ONE AT A TIME, and for
every new token the model's `forward` is run over the whole sequence so far (no KV cache,
no batching), then the next token is sampled (temperature 0.8, top-k 40) from the last
position's logits. The Rust language service's bench compares its tokens/s against this.

Prints one JSON line: {"requests", "tokens", "seconds", "tokens_per_s", "threads"}, where
tokens counts every sampled token (a final EOS included) and seconds covers tokenization, generation and
decoding of every request (model loading and --warmup requests excluded).

    python bench/naive_generate.py --model-dir model-repository/gpt_reviews \\
        --requests 8 --max-new-tokens 64
"""

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import torch
from tokenizers import Tokenizer

TEMPERATURE = 0.8
TOP_K = 40

DEFAULT_PROMPTS = [
    "This dress",
    "I love this top",
    "The fabric is",
    "Runs small, so",
    "I ordered my usual size and",
    "These jeans",
    "Beautiful color but",
    "Perfect for summer",
]


def latest_version(model_dir):
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise SystemExit(f"no numeric version directory in {model_dir}")
    return max(versions, key=lambda p: int(p.name))


@torch.no_grad()
def generate(module, prompt_ids, max_new_tokens, context_length, eos_id, generator):
    ids = list(prompt_ids)
    produced = 0
    while produced < max_new_tokens and len(ids) < context_length:
        logits = module(torch.tensor([ids]))[0, -1] / TEMPERATURE  # full recompute
        top_values, top_ids = torch.topk(logits, TOP_K)
        choice = torch.multinomial(torch.softmax(top_values, dim=-1), 1, generator=generator)
        token = int(top_ids[choice])
        produced += 1
        if token == eos_id:
            break
        ids.append(token)
    return ids[len(prompt_ids):], produced


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="the model's directory (holds model.toml and numbered versions)")
    parser.add_argument("--prompts", type=Path, help="JSON file: a list of prompt strings (default: built-in)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed requests first: TorchScript's profiling executor optimises "
                             "a method only after its first calls, and the service warms up too")
    parser.add_argument("--print-text", action="store_true", help="also print each completion (to stderr)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = tomllib.loads((args.model_dir / "model.toml").read_text())["language"]
    version = latest_version(args.model_dir)
    module = torch.jit.load(str(version / "model.pt"))
    module.eval()
    tokenizer = Tokenizer.from_file(str(version / config["tokenizer"]))
    prompts = json.loads(args.prompts.read_text()) if args.prompts else DEFAULT_PROMPTS
    generator = torch.Generator().manual_seed(args.seed)

    for i in range(args.warmup):
        prompt_ids = [config["bos_token_id"]] + tokenizer.encode(prompts[i % len(prompts)], add_special_tokens=False).ids
        generate(module, prompt_ids, 16, config["context_length"], config["eos_token_id"], torch.Generator().manual_seed(i))

    tokens = 0
    started = time.perf_counter()
    for i in range(args.requests):
        prompt = prompts[i % len(prompts)]
        # Same framing as the service: BOS first, then the prompt's ids.
        prompt_ids = [config["bos_token_id"]] + tokenizer.encode(prompt, add_special_tokens=False).ids
        new_ids, produced = generate(module, prompt_ids, args.max_new_tokens, config["context_length"],
                                     config["eos_token_id"], generator)
        text = tokenizer.decode(new_ids)
        tokens += produced
        if args.print_text:
            print(json.dumps({"prompt": prompt, "completion": text}), file=sys.stderr)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "requests": args.requests,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
