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
    pub context_length: usize,
    pub vocab_size: usize,
    pub eos_token_id: u32,
    pub bos_token_id: u32,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
}

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
            || spec.num_layers == 0
            || spec.num_heads == 0
            || spec.head_dim == 0
            || spec.eos_token_id as usize >= spec.vocab_size
            || spec.bos_token_id as usize >= spec.vocab_size
        {
            return Err(format!(
                "`{}`: [language] sizes must be positive and token ids below vocab_size: {spec:?}",
                manifest_path.display()
            ));
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

/// The tokenizer plus each token's exact bytes, so streaming output is assembled from bytes
/// (exact for byte-level BPE) rather than from lossy per-token strings.
pub struct Vocab {
    pub tokenizer: Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    /// The text of each special token, e.g. `<|endoftext|>`.
    special_texts: Vec<String>,
}

impl Vocab {
    pub fn load(path: &Path, vocab_size: usize) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer `{}`: {e}", path.display()))?;
        let size = tokenizer.get_vocab_size(true);
        if size > vocab_size {
            anyhow::bail!(
                "tokenizer `{}` has {size} tokens but the model's vocab_size is {vocab_size}",
                path.display()
            );
        }
        let unicode_to_byte = byte_level_table();
        let added = tokenizer.get_added_tokens_decoder();
        let specials: Vec<u32> = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let special_texts: Vec<String> = added
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        let mut token_bytes = Vec::with_capacity(vocab_size);
        let mut special = vec![false; vocab_size];
        for id in 0..vocab_size as u32 {
            if specials.contains(&id) {
                special[id as usize] = true;
                token_bytes.push(Vec::new());
                continue;
            }
            let bytes = match tokenizer.id_to_token(id) {
                Some(piece) => piece
                    .chars()
                    .map(|c| unicode_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    // Not a byte-level piece: the decoder's own rendering.
                    .unwrap_or_else(|| {
                        tokenizer
                            .decode(&[id], false)
                            .unwrap_or_default()
                            .into_bytes()
                    }),
                None => Vec::new(),
            };
            token_bytes.push(bytes);
        }
        Ok(Self {
            tokenizer,
            token_bytes,
            special,
            special_texts,
        })
    }

    /// The bytes token `id` stands for (empty for special tokens).
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Token ids and byte offsets of `text`, as plain text: the literal text of a special token
    /// (`<|endoftext|>`) in a prompt is encoded as ordinary characters, never as the control
    /// token, so a caller cannot end or splice documents by typing it.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<(u32, (usize, usize))>> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < text.len() {
            // The earliest special token's text from `start`, if any.
            let hit = self
                .special_texts
                .iter()
                .filter_map(|s| text[start..].find(s.as_str()).map(|i| (start + i, s.len())))
                .min();
            let (end, special) = match hit {
                Some((at, len)) => (at, Some(len)),
                None => (text.len(), None),
            };
            self.encode_plain(&text[start..end], start, &mut out)?;
            if let Some(len) = special {
                // Split after its first character: neither half is the special token.
                let first = text[end..].chars().next().map_or(1, char::len_utf8);
                self.encode_plain(&text[end..end + first], end, &mut out)?;
                self.encode_plain(&text[end + first..end + len], end + first, &mut out)?;
                start = end + len;
            } else {
                start = end;
            }
        }
        Ok(out)
    }

    fn encode_plain(
        &self,
        piece: &str,
        offset: usize,
        out: &mut Vec<(u32, (usize, usize))>,
    ) -> anyhow::Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        let enc = self
            .tokenizer
            .encode(piece, false)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
        out.extend(
            enc.get_ids().iter().copied().zip(
                enc.get_offsets()
                    .iter()
                    .map(|&(a, b)| (a + offset, b + offset)),
            ),
        );
        Ok(())
    }
}

/// GPT-2's byte-level alphabet, inverted: printable stand-in character → byte.
fn byte_level_table() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, b as u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_covers_every_byte_once() {
        let t = byte_level_table();
        assert_eq!(t.len(), 256);
        let mut bytes: Vec<u8> = t.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'a'], b'a');
    }
}
