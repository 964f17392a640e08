//! Tokenizers: nanochat's pickled tiktoken encoding (read without executing pickle code) and Hugging Face
//! `tokenizer.json` files.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context};

use super::pickle::{self, Value};

/// Encodes text to ids and back.
pub enum Tokenizer {
    /// tiktoken BPE (nanochat).
    Tiktoken {
        /// The BPE.
        bpe: Box<tiktoken_rs::CoreBPE>,
        /// Special tokens by name.
        specials: HashMap<String, u32>,
        /// Vocabulary size including specials.
        vocab_size: usize,
    },
    /// A Hugging Face tokenizer.
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Reads nanochat's `tokenizer.pkl` (a pickled `tiktoken.core.Encoding`).
    pub fn from_tiktoken_pickle(path: &Path) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_tiktoken_pickle_bytes(&bytes, &path.display().to_string())
    }

    /// [`Tokenizer::from_tiktoken_pickle`] on the file's bytes; `what` names them in errors.
    pub fn from_tiktoken_pickle_bytes(bytes: &[u8], what: &str) -> anyhow::Result<Self> {
        let root = pickle::parse(bytes, &["tiktoken.core.Encoding"])
            .with_context(|| format!("{}: unsafe or malformed tokenizer pickle", what))?;
        let state = match &root {
            Value::Object {
                class,
                state: Some(state),
                ..
            } if class == "tiktoken.core.Encoding" => state.as_ref(),
            Value::Dict(_) => &root,
            _ => bail!("{}: not a pickled tiktoken Encoding", what),
        };
        let field = |name: &str| {
            state
                .get(name)
                .with_context(|| format!("{}: no `{name}` in the encoding", what))
        };
        let pattern = field("pat_str")?
            .as_str()
            .with_context(|| format!("{}: `pat_str` is not a string", what))?;
        let Value::Dict(ranks) = field("mergeable_ranks")? else {
            bail!("{}: `mergeable_ranks` is not a dict", what)
        };
        let mut encoder: rustc_hash::FxHashMap<Vec<u8>, u32> = Default::default();
        let mut seen = HashSet::new();
        for (k, v) in ranks {
            let (Value::Bytes(token), Some(rank)) = (k, v.as_int()) else {
                bail!("{}: mergeable_ranks must map bytes to integers", what);
            };
            let rank = u32::try_from(rank)
                .with_context(|| format!("{}: rank {rank} out of range", what))?;
            if !seen.insert(rank) {
                bail!("{}: rank {rank} is given to two tokens", what);
            }
            encoder.insert(token.clone(), rank);
        }
        // tiktoken falls back to single bytes for text its merges do not cover, and panics when one is missing.
        if let Some(b) = (0..=255u8).find(|b| !encoder.contains_key(&[*b][..])) {
            bail!("{what}: mergeable_ranks has no token for byte 0x{b:02x} (every single byte needs one)");
        }
        let mut specials = HashMap::new();
        if let Some(Value::Dict(items)) = state.get("special_tokens") {
            for (k, v) in items {
                let (Some(name), Some(id)) = (k.as_str(), v.as_int()) else {
                    bail!("{}: special_tokens must map strings to integers", what);
                };
                let id = u32::try_from(id)
                    .with_context(|| format!("{}: special id {id} out of range", what))?;
                if !seen.insert(id) {
                    bail!(
                        "{}: special token id {id} collides with another token",
                        what
                    );
                }
                specials.insert(name.to_string(), id);
            }
        }
        let vocab_size = seen.iter().max().map_or(0, |m| *m as usize + 1);
        let bpe = tiktoken_rs::CoreBPE::new(
            encoder,
            specials.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            pattern,
        )
        .map_err(|e| anyhow::anyhow!("{}: bad split pattern: {e}", what))?;
        Ok(Tokenizer::Tiktoken {
            bpe: Box::new(bpe),
            specials,
            vocab_size,
        })
    }

    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_hf_file(path: &Path) -> anyhow::Result<Self> {
        let t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
        Ok(Tokenizer::HuggingFace(Box::new(t)))
    }

    /// Ids of `text`, special-token text treated as plain text (no BOS added).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        match self {
            Tokenizer::Tiktoken { bpe, .. } => Ok(bpe.encode_ordinary(text)),
            Tokenizer::HuggingFace(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    /// Ids of `text` where special tokens written in the text (e.g. `<|user_start|>`) become their ids.
    pub fn encode_with_specials(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        match self {
            Tokenizer::Tiktoken { bpe, .. } => Ok(bpe.encode_with_special_tokens(text)),
            Tokenizer::HuggingFace(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }

    /// Text of ids (special tokens included as their names).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        match self {
            Tokenizer::Tiktoken { bpe, .. } => {
                let bytes = bpe
                    .decode_bytes(ids)
                    .map_err(|e| anyhow::anyhow!("decoding: {e:?}"))?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::HuggingFace(t) => t
                .decode(ids, false)
                .map_err(|e| anyhow::anyhow!("decoding: {e}")),
        }
    }

    /// The id of a special token, by name.
    pub fn special(&self, name: &str) -> Option<u32> {
        match self {
            Tokenizer::Tiktoken { specials, .. } => specials.get(name).copied(),
            Tokenizer::HuggingFace(t) => t.token_to_id(name),
        }
    }

    /// Vocabulary size (ids are below it).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Tiktoken { vocab_size, .. } => *vocab_size,
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_seed_pickles() {
        let tiny = include_bytes!("../../../../fuzz/seeds/tokenizer_pkl/tiny.pkl");
        let t = Tokenizer::from_tiktoken_pickle_bytes(tiny, "tiny.pkl").unwrap();
        assert_eq!(t.vocab_size(), 258);
        assert_eq!(t.encode("ab a").unwrap(), [256, 32, 97]);
        assert_eq!(t.special("<|bos|>"), Some(257));
        for (name, bytes) in crate::models::gguf_check::fuzz_seeds("tokenizer_pkl") {
            let r = Tokenizer::from_tiktoken_pickle_bytes(&bytes, &name);
            let expect_err = name.starts_with("refused-") || name.starts_with("invalid-");
            assert_eq!(r.is_err(), expect_err, "{name}");
        }
    }

    #[test]
    fn ranks_without_every_single_byte_are_refused() {
        // Loaded, then tiktoken panicked (no entry found for key) encoding a byte the ranks lack.
        let bytes =
            include_bytes!("../../../../fuzz/seeds/tokenizer_pkl/invalid-missing-bytes.pkl");
        let err = Tokenizer::from_tiktoken_pickle_bytes(bytes, "t.pkl")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("t.pkl: mergeable_ranks has no token for byte 0x00"),
            "{err}"
        );
    }

    #[test]
    fn fuzz_regressions_fail_cleanly() {
        for (name, bytes) in crate::models::gguf_check::fuzz_regressions("tokenizer_pkl") {
            assert!(
                Tokenizer::from_tiktoken_pickle_bytes(&bytes, &name).is_err(),
                "{name}"
            );
        }
    }
}
