#!/usr/bin/env python3
"""Export a Hugging Face causal language model checkpoint to Marquee's TorchScript contract.

    python models/export_causal_lm.py SRC --out REPO --name NAME [--version 1] [--context N]
        [--threads 1] [--description TEXT] [--eos-token-id ID] [--prepend-bos true|false]

SRC is a folder written by `save_pretrained` (config.json; model.safetensors, sharded
safetensors or pytorch_model.bin; tokenizer.json, or vocab.json + merges.txt for GPT-2).
Writes

    REPO/NAME/model.toml
    REPO/NAME/VERSION/model.pt        # torch.jit.script, float32, CPU: forward, prefill, decode
    REPO/NAME/VERSION/tokenizer.json  # the checkpoint's tokenizer, without post-processor

as described in docs/LANGUAGE_MODEL.md. Supported architectures:

- `GPT2LMHeadModel`: learned positions, fused qkv (`Conv1D`, stored transposed), LayerNorm,
  gelu_new MLP, tied (or untied) output layer;
- `LlamaForCausalLM`: RoPE (rope_theta; rope scaling none or "llama3"), RMSNorm, SwiGLU MLP,
  grouped-query attention (the KV cache holds `num_key_value_heads` heads), attention/MLP biases,
  tied or untied output layer;
- `MistralForCausalLM`, as Llama, when its sliding window does not cut into the context.

The modules are written here (Hugging Face's classes are not scripted) and the weights copied
into them. Before anything is written the export checks the scripted module, reloaded from disk,
against the checkpoint's own transformers model in float32: prefill of a right-padded batch,
20 cached decode steps through narrowed views of a bigger cache, and `forward`, each against
Hugging Face's logits; and the exported tokenizer (plus the BOS rule) against transformers'
tokenizer. Everything is assembled in REPO/NAME.tmp (or, when REPO/NAME already exists, in
REPO/NAME/VERSION.tmp) and renamed into place only after every check passed, so a failed export
leaves nothing behind. Errors exit with status 1 and one line naming what is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpt2_tokenizer, beside this file

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")
DECODE_CHECK_STEPS = 20
# Float32 logits from two implementations of the same network differ by rounding only; the
# limit grows with the magnitude of the logits (the rounding of a sum grows with its terms).
RELATIVE_TOLERANCE = 1e-4
# Prompts of the self-check (plain text: no special-token text).
CHECK_TEXTS = [
    "Hello world",
    "The capital of France is",
    "Café crème — ünïcode ✓ and 日本語",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  leading and trailing spaces  ",
    "Once upon a time, in a small village by the sea, there lived",
]


class ExportError(Exception):
    """A problem with the checkpoint or the arguments: reported as one line, exit status 1."""


def log(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


# =============================================================================== modules ====

def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu_new" or kind == "gelu_pytorch_tanh" or kind == "gelu_fast":
        return F.gelu(x, approximate="tanh")
    if kind == "gelu":
        return F.gelu(x)
    if kind == "relu":
        return F.relu(x)
    return F.silu(x)  # "silu" / "swish"


class GPT2Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, inner: int, eps: float, scale: float, act: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.scale = scale
        self.act = act
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.fc = nn.Linear(d_model, inner)
        self.fc_out = nn.Linear(inner, d_model)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(activation(self.fc(self.ln_2(x)), self.act))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> (x, keys [B, H, T, D], values [B, H, T, D]), causal."""
        b, t = x.shape[0], x.shape[1]
        qkv = self.qkv(self.ln_1(x)).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return x + self.mlp(x), k, v

    def decode(self, x: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x [B, C]; caches [B, H, S, D], written in place at `positions`."""
        b = x.shape[0]
        qkv = self.qkv(self.ln_1(x)).view(b, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        rows = torch.arange(b, device=x.device)
        # transpose(1, 2) is a view of the caller's buffer: the write lands in the service's cache.
        k_cache.transpose(1, 2).index_put_([rows, positions], k)
        v_cache.transpose(1, 2).index_put_([rows, positions], v)
        s = k_cache.shape[2]
        visible = (torch.arange(s, device=x.device).unsqueeze(0) <= positions.unsqueeze(1)).view(b, 1, 1, s)
        y = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=visible,
                                           scale=self.scale).squeeze(2)
        x = x + self.proj(y.reshape(b, self.num_heads * self.head_dim))
        return x + self.mlp(x)


class GPT2(nn.Module):
    def __init__(self, vocab: int, context: int, d_model: int, layers: List[GPT2Block], eps: float):
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(layers)
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

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
        """[B, T] -> logits [B, T, V]; full causal recompute, no padding."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h, _, _ = self.run(input_ids, positions)
        return self.lm_head(self.ln_f(h))

    @torch.jit.export
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded [B, T] -> (logits at each row's last real token [B, V],
        keys [L, B, H, T, D], values [L, B, H, T, D])."""
        h, keys, values = self.run(input_ids, positions.clamp(0, self.context - 1))
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.lm_head(self.ln_f(h[rows, last])), torch.stack(keys), torch.stack(values)

    @torch.jit.export
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """tokens [B] at positions [B]; caches [L, B, H, S, D] written in place -> logits [B, V]."""
        h = self.wte(tokens) + self.wpe(positions)
        layer = 0
        for block in self.blocks:
            h = block.decode(h, positions, k_cache[layer], v_cache[layer])
            layer += 1
        return self.lm_head(self.ln_f(h))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, inner: int,
                 eps: float, attention_bias: bool, mlp_bias: bool, act: str):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.groups = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.act = act
        self.input_layernorm = RMSNorm(hidden, eps)
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=attention_bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=attention_bias)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, inner, bias=mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=mlp_bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.post_attention_layernorm(x)
        return self.down_proj(activation(self.gate_proj(h), self.act) * self.up_proj(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C], cos/sin [B or 1, T, D] -> (x, keys [B, Hkv, T, D] (rotated), values)."""
        b, t = x.shape[0], x.shape[1]
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        k_all, v_all = k, v
        if self.groups > 1:  # query head j reads key/value head j // groups
            k_all = k.repeat_interleave(self.groups, dim=1)
            v_all = v.repeat_interleave(self.groups, dim=1)
        y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, scale=self.scale)
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return x + self.mlp(x), k, v

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x [B, C], cos/sin [B, D]; caches [B, Hkv, S, D], written in place at `positions`."""
        b = x.shape[0]
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, self.num_heads, self.head_dim)
        k = self.k_proj(h).view(b, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).view(b, self.num_kv_heads, self.head_dim)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        rows = torch.arange(b, device=x.device)
        k_cache.transpose(1, 2).index_put_([rows, positions], k)
        v_cache.transpose(1, 2).index_put_([rows, positions], v)
        n = k_cache.shape[2]
        visible = (torch.arange(n, device=x.device).unsqueeze(0) <= positions.unsqueeze(1)).view(b, 1, 1, n)
        # The query heads of one key/value head attend together, as `groups` query rows: no copy
        # of the cache is made for grouped-query attention.
        y = F.scaled_dot_product_attention(q.view(b, self.num_kv_heads, self.groups, self.head_dim),
                                           k_cache, v_cache, attn_mask=visible, scale=self.scale)
        x = x + self.o_proj(y.reshape(b, self.num_heads * self.head_dim))
        return x + self.mlp(x)


class Llama(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: List[LlamaBlock], eps: float, inv_freq: torch.Tensor):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32).clone())

    def rope(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor
            ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions)
        keys: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        for block in self.blocks:
            h, k, v = block(h, cos, sin)
            keys.append(k)
            values.append(v)
        return h, keys, values

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h, _, _ = self.run(input_ids, positions)
        return self.lm_head(self.norm(h))

    @torch.jit.export
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, keys, values = self.run(input_ids, positions)
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.lm_head(self.norm(h[rows, last])), torch.stack(keys), torch.stack(values)

    @torch.jit.export
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        cos, sin = self.rope(positions)
        layer = 0
        for block in self.blocks:
            h = block.decode(h, cos, sin, positions, k_cache[layer], v_cache[layer])
            layer += 1
        return self.lm_head(self.norm(h))


# ============================================================================ checkpoint ====

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None


def load_state_dict(src: Path) -> dict:
    """Every tensor of the checkpoint (safetensors, sharded safetensors or pytorch_model.bin)."""
    files: List[Path] = []
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / single).is_file():
            files = [src / single]
            break
        if (src / index).is_file():
            shards = sorted(set(read_json(src / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (src / s).is_file()]
            if missing:
                raise ExportError(f"{src}: shard {missing[0]} named in {index} is missing")
            files = [src / s for s in shards]
            break
    if not files:
        raise ExportError(f"{src}: no weights (model.safetensors, model.safetensors.index.json "
                          f"or pytorch_model.bin)")
    state: dict = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state.update(load_file(str(path), device="cpu"))
            else:
                state.update(torch.load(str(path), map_location="cpu", weights_only=True))
        except Exception as e:  # corrupt or truncated file
            raise ExportError(f"cannot read weights {path}: {e}") from None
    return state


class Weights:
    """The checkpoint's tensors by name, taken one at a time with a shape check; whatever is
    left at the end was not understood and fails the export."""

    def __init__(self, state: dict, prefix: str, ignore: Tuple[str, ...] = ()):
        self.state = {}
        for key, value in state.items():
            name = key[len(prefix):] if key.startswith(prefix) else key
            if any(re.fullmatch(pattern, name) for pattern in ignore):
                continue
            self.state[name] = value
        self.prefix = prefix

    def has(self, name: str) -> bool:
        return name in self.state

    def take(self, name: str, shape: Tuple[int, ...], transpose: bool = False) -> torch.Tensor:
        if name not in self.state:
            raise ExportError(f"weight {self.prefix}{name} is missing from the checkpoint")
        tensor = self.state.pop(name)
        if transpose:
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(shape):
            stored = tuple(tensor.t().shape) if transpose else tuple(tensor.shape)
            want = tuple(reversed(shape)) if transpose else tuple(shape)
            raise ExportError(f"weight {self.prefix}{name} has shape {stored}, config.json implies {want}")
        return tensor.to(torch.float32).contiguous()

    def finish(self) -> None:
        if self.state:
            names = sorted(self.state)
            raise ExportError(f"the checkpoint has {len(names)} weights this exporter does not know, "
                              f"e.g. {names[0]} (unsupported variant of the architecture?)")


def copy_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(tensor)


def copy_linear(linear: nn.Linear, w: Weights, name: str, transpose: bool = False) -> None:
    copy_into(linear.weight, w.take(f"{name}.weight", tuple(linear.weight.shape), transpose))
    if linear.bias is not None:
        copy_into(linear.bias, w.take(f"{name}.bias", tuple(linear.bias.shape)))


def copy_norm(norm: nn.Module, w: Weights, name: str) -> None:
    copy_into(norm.weight, w.take(f"{name}.weight", tuple(norm.weight.shape)))
    if getattr(norm, "bias", None) is not None:
        copy_into(norm.bias, w.take(f"{name}.bias", tuple(norm.bias.shape)))


def positive_int(config: dict, key: str, default=None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ExportError(f"config.json: `{key}` must be a positive integer, got {value!r}")
    return value


def check_activation(kind) -> str:
    if kind not in ACTIVATIONS:
        raise ExportError(f"config.json: activation {kind!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return kind


def build_gpt2(config: dict, state: dict):
    if config.get("add_cross_attention"):
        raise ExportError("config.json: GPT-2 with cross-attention (add_cross_attention) is not supported")
    vocab = positive_int(config, "vocab_size", 50257)
    d_model = positive_int(config, "n_embd", 768)
    layers = positive_int(config, "n_layer", 12)
    heads = positive_int(config, "n_head", 12)
    positions = positive_int(config, "n_positions", 1024)
    if d_model % heads:
        raise ExportError(f"config.json: n_embd {d_model} is not a multiple of n_head {heads}")
    inner = config.get("n_inner") or 4 * d_model
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    act = check_activation(config.get("activation_function", "gelu_new"))
    head_dim = d_model // heads
    blocks = []
    for i in range(layers):
        scale = head_dim ** -0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        blocks.append(GPT2Block(d_model, heads, inner, eps, scale, act))
    model = GPT2(vocab, positions, d_model, blocks, eps)
    w = Weights(state, "transformer.", ignore=(r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias"))
    copy_into(model.wte.weight, w.take("wte.weight", (vocab, d_model)))
    copy_into(model.wpe.weight, w.take("wpe.weight", (positions, d_model)))
    for i, block in enumerate(model.blocks):
        p = f"h.{i}"
        copy_norm(block.ln_1, w, f"{p}.ln_1")
        copy_linear(block.qkv, w, f"{p}.attn.c_attn", transpose=True)  # Conv1D: [in, out]
        copy_linear(block.proj, w, f"{p}.attn.c_proj", transpose=True)
        copy_norm(block.ln_2, w, f"{p}.ln_2")
        copy_linear(block.fc, w, f"{p}.mlp.c_fc", transpose=True)
        copy_linear(block.fc_out, w, f"{p}.mlp.c_proj", transpose=True)
    copy_norm(model.ln_f, w, "ln_f")
    tied = config.get("tie_word_embeddings", True)
    head = "lm_head.weight"
    if w.has(head) and not tied:
        copy_into(model.lm_head.weight, w.take(head, (vocab, d_model)))
    else:
        if w.has(head):  # a saved copy of the tied matrix
            w.take(head, (vocab, d_model))
        model.lm_head.weight = model.wte.weight
    w.finish()
    shape = {"num_layers": layers, "num_heads": heads, "head_dim": head_dim, "vocab_size": vocab,
             "max_context": positions, "d_model": d_model}
    return model, shape


def rope_inv_freq(config: dict, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies as transformers computes them (default and "llama3" types),
    from either the transformers 4 keys (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    if isinstance(params, dict) and any(k in params for k in config.get("layer_types", []) or []):
        raise ExportError("config.json: per-layer rope_parameters are not supported")
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", params.get("type")) or "default"
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ExportError(f"config.json: partial_rotary_factor {factor} is not supported")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ExportError(f"config.json: rope scaling type {kind!r} is not supported (only none or \"llama3\")")
    s = {**params, **scaling}
    try:
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_context = float(s["original_max_position_embeddings"])
    except KeyError as e:
        raise ExportError(f"config.json: llama3 rope scaling lacks {e.args[0]}") from None
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_llama(config: dict, state: dict, mistral: bool):
    vocab = positive_int(config, "vocab_size", 32000)
    hidden = positive_int(config, "hidden_size", 4096)
    layers = positive_int(config, "num_hidden_layers", 32)
    heads = positive_int(config, "num_attention_heads", 32)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inner = positive_int(config, "intermediate_size", 14336 if mistral else 11008)
    positions = positive_int(config, "max_position_embeddings", 32768 if mistral else 2048)
    eps = float(config.get("rms_norm_eps", 1e-6))
    act = check_activation(config.get("hidden_act", "silu"))
    if heads % kv_heads:
        raise ExportError(f"config.json: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise ExportError(f"config.json: head_dim {head_dim} must be even for RoPE")
    attention_bias = bool(config.get("attention_bias", False)) and not mistral
    mlp_bias = bool(config.get("mlp_bias", False)) and not mistral
    inv_freq = rope_inv_freq(config, head_dim)
    blocks = [LlamaBlock(hidden, heads, kv_heads, head_dim, inner, eps, attention_bias, mlp_bias, act)
              for _ in range(layers)]
    model = Llama(vocab, hidden, blocks, eps, inv_freq)
    w = Weights(state, "model.", ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
    copy_into(model.embed_tokens.weight, w.take("embed_tokens.weight", (vocab, hidden)))
    for i, block in enumerate(model.blocks):
        p = f"layers.{i}"
        copy_norm(block.input_layernorm, w, f"{p}.input_layernorm")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            copy_linear(getattr(block, proj), w, f"{p}.self_attn.{proj}")
        copy_norm(block.post_attention_layernorm, w, f"{p}.post_attention_layernorm")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            copy_linear(getattr(block, proj), w, f"{p}.mlp.{proj}")
    copy_norm(model.norm, w, "norm")
    tied = config.get("tie_word_embeddings", False)
    head = "lm_head.weight"
    if w.has(head) and not tied:
        copy_into(model.lm_head.weight, w.take(head, (vocab, hidden)))
    elif tied:
        if w.has(head):
            w.take(head, (vocab, hidden))
        model.lm_head.weight = model.embed_tokens.weight
    else:
        raise ExportError(f"weight {head} is missing from the checkpoint (tie_word_embeddings is false)")
    w.finish()
    shape = {"num_layers": layers, "num_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
             "max_context": positions, "d_model": hidden, "query_heads": heads}
    return model, shape


def architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    if not archs:
        archs = [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM"}.get(config.get("model_type"), str(config.get("model_type")))]
    if len(archs) != 1 or archs[0] not in SUPPORTED:
        raise ExportError(f"unsupported architecture {', '.join(map(str, archs))} "
                          f"(supported: {', '.join(SUPPORTED)})")
    return archs[0]


# ============================================================================= tokenizer ====

def tokenizer_json(src: Path, arch: str) -> dict:
    """The checkpoint's tokenizer as tokenizer.json data (built from vocab.json + merges.txt for a
    GPT-2 checkpoint without tokenizer.json)."""
    if (src / "tokenizer.json").is_file():
        return read_json(src / "tokenizer.json")
    if arch == "GPT2LMHeadModel" and (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        from gpt2_tokenizer import build_tokenizer, parse_merges
        vocab = read_json(src / "vocab.json")
        merges = parse_merges((src / "merges.txt").read_text(encoding="utf-8"))
        return json.loads(build_tokenizer(vocab, merges).to_str())
    if arch == "GPT2LMHeadModel":
        raise ExportError(f"{src}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    raise ExportError(f"{src}: no tokenizer.json (convert a SentencePiece tokenizer.model with "
                      f"transformers: AutoTokenizer.from_pretrained(SRC).save_pretrained(SRC))")


def added_prefix_suffix(post_processor) -> Tuple[List[str], List[str]]:
    """Which tokens a tokenizer.json post-processor adds before and after a single sequence."""
    if not post_processor:
        return [], []
    kind = post_processor.get("type")
    if kind == "Sequence":
        before: List[str] = []
        after: List[str] = []
        for p in post_processor.get("processors", []):
            b, a = added_prefix_suffix(p)
            before, after = b + before, after + a
        return before, after
    if kind == "TemplateProcessing":
        before, after, seen = [], [], False
        for item in post_processor.get("single", []):
            if "Sequence" in item:
                seen = True
            elif "SpecialToken" in item:
                (after if seen else before).append(item["SpecialToken"]["id"])
        return before, after
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [post_processor["cls"][0]], [post_processor["sep"][0]]
    return [], []  # ByteLevel: offsets only


def token_id(tokens: dict, value):
    """An id from config-style values: an int, a list (first), a token string, a dict."""
    if isinstance(value, list):
        return token_id(tokens, value[0]) if value else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return tokens.get(value)
    return None


def special_ids(src: Path, config: dict, tok, tok_config: dict, arch: str, eos_override) -> Tuple[int, int]:
    """(eos, bos): --eos-token-id, else generation_config.json, config.json, the tokenizer."""
    gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    vocab = tok.get_vocab(with_added_tokens=True)

    def find(key):
        for source in (gen, config):
            value = source.get(f"{key}_token_id")
            if isinstance(value, list) and len(value) > 1 and key == "eos":
                log(f"several eos ids {value}: the service stops on {value[0]} only "
                    f"(choose another with --eos-token-id)")
            found = token_id(vocab, value)
            if found is not None:
                return found
        return token_id(vocab, tok_config.get(f"{key}_token"))

    eos = eos_override if eos_override is not None else find("eos")
    bos = find("bos")
    if arch == "GPT2LMHeadModel":
        eos = 50256 if eos is None else eos
        bos = eos if bos is None else bos
    if eos is None:
        raise ExportError("no eos token id in generation_config.json, config.json or the tokenizer "
                          "(give --eos-token-id)")
    return eos, bos


def prepend_bos_rule(arch: str, tok_config: dict, data: dict, override) -> bool:
    """--prepend-bos, else tokenizer_config.json's add_bos_token, else whether tokenizer.json's
    post-processor puts a token before the text, else the family's habit (GPT-2 no, Llama yes).
    check_tokenizer then confirms the rule against transformers' tokenizer."""
    if override is not None:
        return override
    if isinstance(tok_config.get("add_bos_token"), bool):
        return tok_config["add_bos_token"]
    before, _ = added_prefix_suffix(data.get("post_processor"))
    if before:
        return True
    return arch != "GPT2LMHeadModel"


def clean_tokenizer(data: dict) -> dict:
    """The tokenizer the service loads: nothing added to an encoding (no post-processor), no
    truncation or padding."""
    data = dict(data)
    data["post_processor"] = None
    data["truncation"] = None
    data["padding"] = None
    return data


# ================================================================================ checks ====

def hf_reference(src: Path):
    """The checkpoint's own transformers model, float32, eager attention."""
    try:
        import transformers
    except ImportError:
        raise ExportError("the self-check needs the transformers package (pip install transformers)") from None

    transformers.utils.logging.disable_progress_bar()
    kwargs = {"attn_implementation": "eager"}
    major = int(transformers.__version__.split(".")[0])
    kwargs["dtype" if major >= 5 else "torch_dtype"] = torch.float32
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(src), **kwargs)
    except Exception as e:
        raise ExportError(f"transformers cannot load {src} for the self-check: {e}".replace("\n", " ")) from None
    return model.float().eval()


def tolerance(reference: torch.Tensor) -> float:
    return RELATIVE_TOLERANCE * max(1.0, reference.abs().max().item())


class Check:
    def __init__(self):
        self.worst_ratio = 0.0
        self.lines: List[str] = []

    def compare(self, what: str, ours: torch.Tensor, reference: torch.Tensor) -> None:
        diff = (ours - reference).abs().max().item()
        limit = tolerance(reference)
        if not diff < limit:  # also catches NaN
            raise ExportError(f"self-check failed: {what} differ from transformers by {diff:.3e} "
                              f"(limit {limit:.1e})")
        self.worst_ratio = max(self.worst_ratio, diff / limit)
        self.lines.append(f"{what}: max |diff| {diff:.2e} (limit {limit:.1e})")
        log(self.lines[-1])


@torch.no_grad()
def self_check(module, hf, prompts: List[List[int]], shape: dict, context: int) -> Check:
    check = Check()
    L, H, D = shape["num_layers"], shape["num_heads"], shape["head_dim"]
    ref_last = [hf(torch.tensor([p])).logits[0, -1] for p in prompts]

    # (a) prefill of a right-padded batch.
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
        ids[row, len(prompt):] = prompts[0][0]  # pads hold a real id: they must not matter
        mask[row, :len(prompt)] = 1
        positions[row, :len(prompt)] = torch.arange(len(prompt))
    logits, keys, values = module.prefill(ids, mask, positions)
    expected = (L, len(prompts), H, width, D)
    if tuple(keys.shape) != expected or tuple(values.shape) != expected:
        raise ExportError(f"self-check failed: prefill caches have shape {tuple(keys.shape)}, expected {expected}")
    check.compare(f"prefill of {len(prompts)} right-padded prompts ({min(map(len, prompts))}..{width} tokens)",
                  logits, torch.stack(ref_last))

    # (b) greedy decode through narrowed views of a larger, zeroed cache at a batch offset.
    batch, offset = len(prompts), 1
    steps = min(DECODE_CHECK_STEPS, context - width)
    span_max = min(context, width + steps + 4)
    k_buffer = torch.zeros(L, batch + 2, H, span_max, D)
    v_buffer = torch.zeros_like(k_buffer)
    k_buffer[:, offset:offset + batch, :, :width] = keys
    v_buffer[:, offset:offset + batch, :, :width] = values
    sequences = [list(p) for p in prompts]
    decoded: List[torch.Tensor] = []
    for _ in range(steps):
        tokens = logits.argmax(dim=-1)
        pos = torch.tensor([len(s) for s in sequences])
        for row in range(batch):
            sequences[row].append(int(tokens[row]))
        span = int(pos.max()) + 1
        logits = module.decode(tokens, pos,
                               k_buffer.narrow(1, offset, batch).narrow(3, 0, span),
                               v_buffer.narrow(1, offset, batch).narrow(3, 0, span))
        decoded.append(logits)
    if k_buffer[:, 0].abs().sum() != 0 or k_buffer[:, offset + batch:].abs().sum() != 0:
        raise ExportError("self-check failed: decode wrote outside the cache view it was given")
    if steps > 0:
        worst_ours, worst_ref = [], []
        for row, prompt in enumerate(prompts):
            full = hf(torch.tensor([sequences[row]])).logits[0]
            start = len(prompt)
            worst_ours.append(torch.stack([decoded[i][row] for i in range(steps)]))
            worst_ref.append(full[start:start + steps])
        check.compare(f"{steps} cached decode steps x {batch} rows", torch.cat(worst_ours), torch.cat(worst_ref))

    # (c) forward over whole sequences (a batch of two of the same length, and one alone).
    n = min(len(s) for s in sequences)
    pair = torch.tensor([sequences[0][:n], sequences[-1][:n]])
    check.compare(f"forward of a [2, {n}] batch", module(pair), hf(pair).logits)
    return check


def check_tokenizer(src: Path, tok, prepend_bos: bool, bos: int, forced: bool) -> None:
    """The exported tokenizer + the service's BOS rule == transformers' tokenizer(text). With
    --prepend-bos (`forced`) only the text's own tokens must agree."""
    import transformers

    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        log(f"transformers cannot load the tokenizer ({str(e).splitlines()[0] if str(e) else e}); "
            f"tokenizer parity not checked")
        return
    noted = False
    for text in CHECK_TEXTS:
        ours = ([bos] if prepend_bos else []) + tok.encode(text, add_special_tokens=False).ids
        theirs = hf_tok(text)["input_ids"]
        if forced and ours != theirs:
            if not noted:
                log(f"note: transformers encodes {text!r} as {theirs}; with --prepend-bos the service "
                    f"uses {ours}")
                noted = True
            ours = ours[1:] if prepend_bos else ours
            theirs = hf_tok(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise ExportError(f"tokenizer parity: transformers encodes {text!r} as {theirs}, the export "
                              f"would serve {ours} (prepend_bos = {str(prepend_bos).lower()}; the service "
                              f"can only prepend BOS, see --prepend-bos)")
        expected = hf_tok.decode(theirs, skip_special_tokens=True)
        got = tok.decode(ours, skip_special_tokens=True)
        if expected != got:
            raise ExportError(f"tokenizer parity: {theirs} decodes to {expected!r} in transformers "
                              f"but {got!r} in the exported tokenizer.json")
    log(f"tokenizer: {len(CHECK_TEXTS)} texts encode and decode as transformers' tokenizer does "
        f"(prepend_bos = {str(prepend_bos).lower()})")


# ================================================================================= main ====

def toml_text(manifest: dict) -> str:
    """model.toml in the layout of docs/LANGUAGE_MODEL.md: top-level keys, then [language] and
    [instance]. Re-parsed, it must equal `manifest`."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in manifest.items() if not isinstance(v, dict)]
    for table, entries in manifest.items():
        if isinstance(entries, dict):
            lines += ["", f"[{table}]"] + [f"{k} = {value(v)}" for k, v in entries.items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != manifest:
        raise ExportError("model.toml does not round-trip (a bug in the exporter)")
    return text


def parse_bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def export(args) -> Path:
    src = args.src.resolve()
    if not src.is_dir():
        raise ExportError(f"{src} is not a directory")
    if not (src / "config.json").is_file():
        raise ExportError(f"{src}: config.json is missing (not a save_pretrained folder?)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name) or args.name.endswith(".tmp"):
        raise ExportError(f"--name {args.name!r}: use letters, digits, '_', '-' and '.'")
    if args.version < 1:
        raise ExportError("--version must be 1 or more")
    config = read_json(src / "config.json")
    arch = architecture(config)
    repo = args.out.resolve()
    final = repo / args.name
    existing = final.exists()
    if existing and (final / str(args.version)).exists():
        raise ExportError(f"{final / str(args.version)} already exists (choose another --version)")
    if existing and not (final / "model.toml").is_file():
        raise ExportError(f"{final} exists but is not a model directory (no model.toml)")
    if args.threads < 1:
        raise ExportError("--threads must be 1 or more")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # Tokenizer first: cheap, and its size must fit the model.
    from tokenizers import Tokenizer

    raw = tokenizer_json(src, arch)
    tok_config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    data = clean_tokenizer(raw)
    try:
        tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    except Exception as e:
        raise ExportError(f"the checkpoint's tokenizer does not load in tokenizers: {e}") from None

    started = time.perf_counter()
    state = load_state_dict(src)
    max_context = config.get("n_positions" if arch == "GPT2LMHeadModel" else "max_position_embeddings")
    context = args.context or max_context
    if not isinstance(context, int) or context < 2:
        raise ExportError(f"context length {context!r} is not valid (give --context)")
    if isinstance(max_context, int) and context > max_context:
        raise ExportError(f"--context {context} exceeds the model's {max_context} positions")
    if arch == "MistralForCausalLM":
        window = config.get("sliding_window")
        if window is not None and config.get("use_sliding_window", True) and window < context:
            raise ExportError(f"sliding-window attention (sliding_window = {window}) is not supported; "
                              f"pass --context {window} or less")
    if arch == "GPT2LMHeadModel":
        model, shape = build_gpt2(config, state)
    else:
        model, shape = build_llama(config, state, mistral=arch == "MistralForCausalLM")
    del state
    model.eval()
    vocab_size = shape["vocab_size"]
    tok_size = tok.get_vocab_size(with_added_tokens=True)
    if tok_size > vocab_size:
        raise ExportError(f"the tokenizer has {tok_size} tokens but the model's vocab_size is {vocab_size}")
    eos, bos = special_ids(src, config, tok, tok_config, arch, args.eos_token_id)
    prepend_bos = prepend_bos_rule(arch, tok_config, raw, args.prepend_bos)
    if bos is None:
        if prepend_bos:
            raise ExportError("the tokenizer prepends BOS but no bos token id was found")
        bos = eos  # never used: prepend_bos is false
    for what, value in (("eos_token_id", eos), ("bos_token_id", bos)):
        if not 0 <= value < vocab_size:
            raise ExportError(f"{what} {value} is outside the vocabulary (0..{vocab_size - 1})")
    params = sum(p.numel() for p in model.parameters())
    log(f"{arch}: {shape['num_layers']} layers, d_model {shape['d_model']}, "
        f"{shape.get('query_heads', shape['num_heads'])} heads ({shape['num_heads']} in the KV cache) "
        f"x {shape['head_dim']}, vocab {vocab_size}, context {context}, {params / 1e6:.2f}M parameters")

    # Staging: a new model dir beside the final one, or a new version dir inside it.
    repo.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(args.name + ".tmp") if not existing else final / f"{args.version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    version_dir = staging / str(args.version) if not existing else staging
    version_dir.mkdir(parents=True)
    staged_toml = final / f".model.toml.{os.getpid()}.tmp"
    try:
        scripted = torch.jit.script(model)
        scripted.save(str(version_dir / "model.pt"))
        module = torch.jit.load(str(version_dir / "model.pt"))  # every check runs on the written file
        module.eval()
        del model, scripted

        texts = CHECK_TEXTS
        prompts = [([bos] if prepend_bos else []) + tok.encode(t, add_special_tokens=False).ids for t in texts]
        prompts = [p[:max(1, context - DECODE_CHECK_STEPS - 8)] for p in prompts if p]
        hf = hf_reference(src)
        check = self_check(module, hf, prompts, shape, context)
        del hf
        check_tokenizer(src, tok, prepend_bos, bos, forced=args.prepend_bos is not None)

        (version_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n",
                                                    encoding="utf-8")
        description = args.description or (
            f"{arch} exported from {src.name}: {shape['num_layers']} layers, d_model {shape['d_model']}, "
            f"{params / 1e6:.1f}M parameters")
        manifest = {
            "name": args.name,
            "kind": "causal_lm",
            "platform": "torchscript",
            "description": " ".join(description.split()),
            "language": {
                "tokenizer": "tokenizer.json",
                "context_length": context,
                "vocab_size": vocab_size,
                "eos_token_id": eos,
                "bos_token_id": bos,
                "prepend_bos": prepend_bos,
                "num_layers": shape["num_layers"],
                "num_heads": shape["num_heads"],
                "head_dim": shape["head_dim"],
            },
            "instance": {"threads": args.threads, "device": "cpu"},
        }
        text = toml_text(manifest)
        if existing:  # the new version, then its model.toml (the service retries on a change)
            staged_toml.write_text(text, encoding="utf-8")
            staging.rename(final / str(args.version))
            os.replace(staged_toml, final / "model.toml")
        else:
            # model.toml last: until then the repository does not see the staging dir as a model.
            (staging / "model.toml").write_text(text, encoding="utf-8")
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if existing:
            staged_toml.unlink(missing_ok=True)
        raise
    cache_bytes = 2 * shape["num_layers"] * shape["num_heads"] * context * shape["head_dim"] * 4
    log(f"self-check passed (worst difference {check.worst_ratio:.2f} of its limit); "
        f"KV cache {cache_bytes / 2**20:.1f} MiB per batch slot at context {context}")
    log(f"wrote {final / str(args.version)} in {time.perf_counter() - started:.1f}s "
        f"(eos {eos}, bos {bos}, prepend_bos {str(prepend_bos).lower()})")
    return final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Hugging Face checkpoint folder (save_pretrained)")
    parser.add_argument("--out", type=Path, required=True, help="model repository to write into")
    parser.add_argument("--name", required=True, help="model name (directory in the repository)")
    parser.add_argument("--version", type=int, default=1, help="version number (default 1)")
    parser.add_argument("--context", type=int, help="context length (default: the model's positions)")
    parser.add_argument("--threads", type=int, default=1, help="[instance] threads (default 1); also used here")
    parser.add_argument("--description", help="one-line description for model.toml")
    parser.add_argument("--eos-token-id", type=int, help="override the end-of-sequence id")
    parser.add_argument("--prepend-bos", type=parse_bool, help="override whether the service prepends BOS")
    args = parser.parse_args(argv)
    try:
        export(args)
    except ExportError as e:
        print(f"export_causal_lm: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
