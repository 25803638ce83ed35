//! A causal language model directory: `model.toml` (`[language]` section), and per version
//! `model.pt` (TorchScript with `forward`, `prefill`, `decode`: see docs/LANGUAGE_MODEL.md)
//! and `tokenizer.json`. Every size the service needs is read from these files, none is a
//! constant here.

use std::path::{Path, PathBuf};

use marquee_core::model::Instance;
use serde::Deserialize;
use tokenizers::Tokenizer;

/// `model.toml` of a `kind = "causal_lm"` model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub description: String,
    pub language: LanguageSpec,
    /// The same `[instance]` as every model kind; the engine is one lane.
    #[serde(default)]
    pub instance: Instance,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanguageSpec {
    /// Tokenizer file, relative to the version directory.
    pub tokenizer: String,
    /// What the engine keeps per sequence between steps.
    #[serde(default)]
    pub architecture: Architecture,
    pub context_length: usize,
    pub vocab_size: usize,
    pub eos_token_id: u32,
    pub bos_token_id: u32,
    /// Whether the service puts `bos_token_id` before every prompt. GPT-2 was trained without
    /// one (its `generate(ids)` starts from the prompt itself); Llama-family tokenizers add one.
    /// Absent means true: models exported before this key had BOS prepended.
    #[serde(default = "yes")]
    pub prepend_bos: bool,
    /// Transformer: the KV cache's layers, heads (key/value heads under grouped-query
    /// attention) and head size.
    #[serde(default)]
    pub num_layers: usize,
    #[serde(default)]
    pub num_heads: usize,
    #[serde(default)]
    pub head_dim: usize,
    /// Recurrent: floats of state per sequence.
    #[serde(default)]
    pub state_size: usize,
}

fn yes() -> bool {
    true
}

/// The two model contracts of docs/LANGUAGE_MODEL.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// Attention with a KV cache `[layers, batch, heads, context, head_dim]`.
    #[default]
    Transformer,
    /// A fixed-size state per sequence `[batch, state_size]`, no context axis (LSTM, GRU...).
    Recurrent,
}

/// Largest per-sequence recurrent state accepted (floats): 64 MiB a slot would already be an
/// attention cache in disguise.
const MAX_STATE_SIZE: usize = 16 << 20;

/// One version of a model on disk, not yet loaded.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub manifest: Manifest,
    pub version: u64,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

impl ModelFiles {
    /// Reads and checks `dir/model.toml` for `version` (found by the repository).
    pub fn read(dir: &Path, version: u64) -> Result<Self, String> {
        let manifest_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("cannot read `{}`: {e}", manifest_path.display()))?;
        let manifest: Manifest =
            toml::from_str(&text).map_err(|e| format!("`{}`: {e}", manifest_path.display()))?;
        if manifest.kind != "causal_lm" {
            return Err(format!(
                "`{}` declares kind `{}`; the language service serves `causal_lm` models",
                manifest_path.display(),
                manifest.kind
            ));
        }
        let dir_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if manifest.name != dir_name {
            return Err(format!(
                "`{}`: `name` is `{}` but the directory is `{dir_name}`",
                manifest_path.display(),
                manifest.name
            ));
        }
        let spec = &manifest.language;
        if spec.context_length < 2
            || spec.vocab_size == 0
            || spec.eos_token_id as usize >= spec.vocab_size
            || spec.bos_token_id as usize >= spec.vocab_size
        {
            return Err(format!(
                "`{}`: [language] sizes must be positive and token ids below vocab_size: {spec:?}",
                manifest_path.display()
            ));
        }
        let shape_error = match spec.architecture {
            Architecture::Transformer
                if spec.num_layers == 0 || spec.num_heads == 0 || spec.head_dim == 0 =>
            {
                Some("a transformer needs num_layers, num_heads and head_dim (all positive)")
            }
            Architecture::Transformer if spec.state_size != 0 => {
                Some("state_size is for `architecture = \"recurrent\"` models")
            }
            Architecture::Recurrent if !(1..=MAX_STATE_SIZE).contains(&spec.state_size) => {
                Some("a recurrent model needs state_size in 1..=16777216")
            }
            Architecture::Recurrent
                if spec.num_layers != 0 || spec.num_heads != 0 || spec.head_dim != 0 =>
            {
                Some(
                    "num_layers, num_heads and head_dim describe a KV cache; a recurrent model has none",
                )
            }
            _ => None,
        };
        if let Some(why) = shape_error {
            return Err(format!("`{}`: [language]: {why}", manifest_path.display()));
        }
        let vdir = dir.join(version.to_string());
        Ok(Self {
            version,
            weights: vdir.join("model.pt"),
            tokenizer: vdir.join(&spec.tokenizer),
            manifest,
        })
    }
}

/// The tokenizer, and the text of its special tokens. Text comes out of the tokenizer's own
/// decoder (byte-level, SentencePiece with byte fallback, character-level alike), never from
/// an assumption about how its pieces are spelled.
pub struct Vocab {
    pub tokenizer: Tokenizer,
    /// Ids of byte-fallback pieces (`<0xE9>`) under a `ByteFallback` decoder: a run of them is
    /// one character or, if the run is not valid UTF-8, U+FFFD for each, so their text is only
    /// known once the run ends.
    byte_piece: Vec<bool>,
}

impl Vocab {
    pub fn load(path: &Path, vocab_size: usize) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer `{}`: {e}", path.display()))?;
        Self::new(tokenizer, vocab_size, path)
    }

    /// Checks `tokenizer` (read from `path`) against the model's vocabulary size.
    pub fn new(mut tokenizer: Tokenizer, vocab_size: usize, path: &Path) -> anyhow::Result<Self> {
        let size = tokenizer.get_vocab_size(true);
        if size > vocab_size {
            anyhow::bail!(
                "tokenizer `{}` has {size} tokens but the model's vocab_size is {vocab_size}",
                path.display()
            );
        }
        // A post-processor that adds tokens (BOS, EOS, CLS) to every encoding would double the
        // service's own BOS (`prepend_bos`), and an EOS after the prompt would end generation.
        let with = tokenizer.encode("a", true);
        let without = tokenizer.encode("a", false);
        match (with, without) {
            (Ok(a), Ok(b)) if a.get_ids() != b.get_ids() => anyhow::bail!(
                "tokenizer `{}` has a post-processor that adds tokens; remove it and set `prepend_bos` in model.toml instead (models/export_causal_lm.py does)",
                path.display()
            ),
            (Err(e), _) | (_, Err(e)) => {
                anyhow::bail!("tokenizer `{}` cannot encode: {e}", path.display())
            }
            _ => {}
        }
        // The literal text of a special token in a prompt (`<|endoftext|>`) is ordinary
        // characters, never the control token, so a caller cannot end or splice documents by
        // typing it; the prompt is still encoded in one piece (a SentencePiece pre-tokenizer
        // would add a word boundary at every cut).
        tokenizer.set_encode_special_tokens(true);
        let byte_fallback = tokenizer
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|json| json.contains("ByteFallback"));
        let byte_piece = (0..vocab_size as u32)
            .map(|id| {
                byte_fallback
                    && tokenizer.id_to_token(id).is_some_and(|t| {
                        t.len() == 6
                            && t.starts_with("<0x")
                            && t.ends_with('>')
                            && u8::from_str_radix(&t[3..5], 16).is_ok()
                    })
            })
            .collect();
        Ok(Self {
            tokenizer,
            byte_piece,
        })
    }

    fn is_byte_piece(&self, id: u32) -> bool {
        self.byte_piece.get(id as usize).copied().unwrap_or(false)
    }

    /// Each token's text as the decoder renders it after the token before it (so a
    /// SentencePiece word keeps its leading space; a partial character shows as U+FFFD).
    pub fn token_texts(&self, ids: &[u32]) -> Vec<String> {
        (0..ids.len())
            .map(|i| {
                let from = i.saturating_sub(1);
                let before = self.decode(&ids[from..i]);
                let with = self.decode(&ids[from..=i]);
                with.strip_prefix(before.as_str())
                    .map_or_else(|| self.decode(&ids[i..=i]), str::to_owned)
            })
            .collect()
    }

    /// The text of `ids` by the tokenizer's decoder, special tokens left out. An incomplete
    /// character (a byte-level or byte-fallback piece on its own) shows as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Token ids and byte offsets of `text`, as plain text (special-token text included).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<(u32, (usize, usize))>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
        Ok(enc
            .get_ids()
            .iter()
            .copied()
            .zip(enc.get_offsets().iter().copied())
            .collect())
    }
}

/// Incremental detokenisation: the text a growing list of generated ids adds, as the
/// tokenizer's decoder renders the whole, emitted only once it is final. A decoder's output for
/// a token can depend on its neighbours (SentencePiece drops the space of a sequence's first
/// piece; byte-level and byte-fallback pieces form one character together), so each new token
/// is decoded with the few before it and only the difference is new text; text ending in an
/// incomplete character (U+FFFD) waits for the next token.
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the ids decoded as context for the next difference.
    prefix: usize,
    /// Ids before this are emitted.
    read: usize,
}

/// Prompt tokens decoded before the first generated one, so the output continues the prompt
/// (its first word keeps its leading space under a SentencePiece decoder).
const PROMPT_CONTEXT: usize = 4;
/// Undecodable tokens held back at most before they are emitted as U+FFFD anyway: a model
/// emitting invalid bytes forever must not make every step decode a growing window.
const MAX_PENDING: usize = 8;

impl Detokenizer {
    pub fn new(prompt: &[u32]) -> Self {
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        let read = ids.len();
        Self {
            ids,
            prefix: 0,
            read,
        }
    }

    /// Adds a generated token; returns the text that is now final (possibly empty).
    pub fn push(&mut self, vocab: &Vocab, id: u32) -> String {
        self.ids.push(id);
        let force = self.ids.len() - self.read >= MAX_PENDING;
        if !force && vocab.is_byte_piece(id) {
            // A byte-fallback run can still turn the text before it into U+FFFD: wait for it
            // to end.
            return String::new();
        }
        self.emit(vocab, force)
    }

    /// Generation ended: whatever text is still held back.
    pub fn finish(&mut self, vocab: &Vocab) -> String {
        self.emit(vocab, true)
    }

    fn emit(&mut self, vocab: &Vocab, force: bool) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let before = vocab.decode(&self.ids[self.prefix..self.read]);
        let now = vocab.decode(&self.ids[self.prefix..]);
        let fresh = match now.strip_prefix(before.as_str()) {
            Some(tail) => tail,
            // The decoder rewrote text already sent: wait for it to settle; when forced, send
            // what follows as many characters as were sent (never the sent text again).
            None if force => {
                let sent = before.chars().count();
                now.char_indices()
                    .nth(sent)
                    .map_or("", |(at, _)| &now[at..])
            }
            None => return String::new(),
        };
        if !force && (fresh.is_empty() || fresh.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let out = fresh.to_owned();
        // The emitted ids become the context of the next difference; older ones are dropped.
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;

    /// A character-level tokenizer with a `Fuse` decoder and byte-fallback-free pieces.
    fn char_vocab() -> Vocab {
        let vocab: std::collections::HashMap<String, u32> = ["<unk>", "a", "é", " ", "b"]
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .expect("word level");
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_decoder(Some(tokenizers::decoders::fuse::Fuse::new()));
        Vocab {
            tokenizer,
            byte_piece: vec![false; 5],
        }
    }

    /// A SentencePiece-style tokenizer: byte-fallback pieces and Llama's decoder chain.
    fn byte_fallback_vocab() -> Vocab {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,
            "decoder":{"type":"Sequence","decoders":[
                {"type":"Replace","pattern":{"String":"▁"},"content":" "},
                {"type":"ByteFallback"},{"type":"Fuse"},
                {"type":"Strip","content":" ","start":1,"stop":0}]},
            "model":{"type":"BPE","dropout":null,"unk_token":null,
                "continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,
                "byte_fallback":true,"ignore_merges":false,
                "vocab":{"<0x7A>":0,"<0xC3>":1,"<0xA9>":2,"<0xEE>":3,"▁a":4,"b":5},
                "merges":[]}}"#;
        let tokenizer: Tokenizer = json.parse().expect("tokenizer json");
        Vocab::new(tokenizer, 6, Path::new("test")).expect("vocab")
    }

    /// What the output must read: the decoder's text of prompt + output, after the prompt's.
    fn continuation(v: &Vocab, prompt: &[u32], out: &[u32]) -> String {
        let all: Vec<u32> = prompt.iter().chain(out).copied().collect();
        v.decode(&all)[v.decode(prompt).len()..].to_string()
    }

    #[test]
    fn a_byte_fallback_run_is_held_until_it_ends_and_never_contradicted() {
        let v = byte_fallback_vocab();
        // "é" from two byte pieces; then a run that is not UTF-8 ("z" + 0xEE), which the
        // decoder renders as U+FFFD for each byte, the "z" included: "z" alone would have been
        // wrong to send.
        for out in [[4u32, 1, 2, 5], [4, 0, 3, 5]] {
            let prompt = [4u32];
            let mut d = Detokenizer::new(&prompt);
            let mut text = String::new();
            for &id in &out {
                let piece = d.push(&v, id);
                assert!(
                    continuation(&v, &prompt, &out).starts_with(&(text.clone() + &piece)),
                    "{out:?}: sent {text:?} + {piece:?}"
                );
                text.push_str(&piece);
            }
            text.push_str(&d.finish(&v));
            assert_eq!(text, continuation(&v, &prompt, &out), "{out:?}");
        }
        assert_eq!(continuation(&v, &[4], &[4, 1, 2, 5]), " aéb");
        assert_eq!(continuation(&v, &[4], &[4, 0, 3, 5]), " a\u{FFFD}\u{FFFD}b");
    }

    #[test]
    fn character_tokens_decode_to_their_characters_not_to_byte_level_stand_ins() {
        let v = char_vocab();
        let mut d = Detokenizer::new(&[1]);
        let mut out: String = [2u32, 3, 4, 2].iter().map(|&id| d.push(&v, id)).collect();
        out.push_str(&d.finish(&v));
        assert_eq!(out, "é bé");
    }
}
