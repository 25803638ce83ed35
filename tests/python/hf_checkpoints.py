"""Tiny, random-initialised Hugging Face checkpoints for the export tests, made offline with
fixed seeds: a GPT-2 with GPT-2's real tokenizer, a Llama (grouped-query attention, llama3 RoPE
scaling) with a small SentencePiece-style byte-fallback BPE tokenizer, and a BERT (an
architecture the exporter must refuse). Each is written with `save_pretrained`, as a user's
checkpoint would be."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS = Path("/usr/share/dict/words")

# Large initial weights: a random model with the default 0.02 has nearly tied logits, and
# greedy parity between two float32 implementations needs well separated choices.
INIT_RANGE = 0.2


def _models_dir_on_path() -> None:
    models = str(REPO_ROOT / "models")
    if models not in sys.path:
        sys.path.insert(0, models)


def make_gpt2(out: Path, seed: int = 0):
    """GPT2LMHeadModel (2 layers, d_model 64, 4 heads, 256 positions, GPT-2's 50,257-token
    vocabulary, tied output layer) + GPT-2's tokenizer, in `out`. Returns (model, tokenizer)."""
    import transformers

    _models_dir_on_path()
    import gpt2_tokenizer

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=256, n_embd=64, n_layer=2, n_head=4,
        initializer_range=INIT_RANGE, bos_token_id=50256, eos_token_id=50256,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(out))
    gpt2_tokenizer.save_hf_folder(out)
    return model, transformers.AutoTokenizer.from_pretrained(str(out))


def _word_lines(seed: int, lines: int = 8000, per_line: int = 12) -> list[str]:
    words = [w for w in WORDS.read_text(encoding="utf-8").split() if w]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(per_line)) for _ in range(lines)]


def llama_tokenizer(seed: int = 0, size: int = 1024):
    """A Llama-2-style tokenizer (`tokenizers` object): BPE with byte fallback over
    <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF> = 3..258 and merges trained on the system word list;
    Metaspace pre-tokenizer (prepend "▁" to the first word), and the decoder
    Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=size - 256, special_tokens=specials, show_progress=False,
                                  limit_alphabet=100)
    trainer_tok.train_from_iterator(_word_lines(seed), trainer=trainer)
    trained = trainer_tok.get_vocab()
    vocab = {token: i for i, token in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    import json
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def make_llama(out: Path, seed: int = 0):
    """LlamaForCausalLM (2 layers, hidden 64, 4 query heads over 2 key/value heads,
    intermediate 128, 256 positions, rope_theta 500000 with llama3 scaling, untied output layer)
    + its tokenizer (adds <s> to every encoding, like Llama 2's), in `out`."""
    import transformers

    tok = llama_tokenizer(seed)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        config = transformers.LlamaConfig(**common, rope_parameters=rope)
    else:
        config = transformers.LlamaConfig(**common, rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out))
    cls = getattr(transformers, "LlamaTokenizerFast", None) or transformers.LlamaTokenizer
    wrapped = cls(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                  add_bos_token=True, add_eos_token=False, model_max_length=256)
    wrapped.save_pretrained(str(out))
    return model, transformers.AutoTokenizer.from_pretrained(str(out))


def make_bert(out: Path, seed: int = 0) -> None:
    """A tiny BertForMaskedLM: not a causal LM."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(config).save_pretrained(str(out))
