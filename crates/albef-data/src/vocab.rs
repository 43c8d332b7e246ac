//! A word-level vocabulary in BERT's `vocab.txt` layout (one token a line, id = line number),
//! for generated datasets whose captions use a closed set of words.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::Path;

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const CLS: &str = "[CLS]";
pub const SEP: &str = "[SEP]";
pub const MASK: &str = "[MASK]";

#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, i64>,
}

impl Vocab {
    /// Special tokens first ([PAD]=0, [UNK], [CLS], [SEP], [MASK]), then `words` in order.
    pub fn with_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Self {
        let mut tokens: Vec<String> = [PAD, UNK, CLS, SEP, MASK].iter().map(|s| s.to_string()).collect();
        for w in words {
            if !tokens.iter().any(|t| t == w) {
                tokens.push(w.to_string());
            }
        }
        Self::from_tokens(tokens).expect("built-in vocabulary is valid")
    }

    pub fn from_tokens(tokens: Vec<String>) -> Result<Self> {
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if ids.insert(t.clone(), i as i64).is_some() {
                bail!("vocabulary lists {t:?} twice");
            }
        }
        for special in [PAD, UNK, CLS, MASK] {
            if !ids.contains_key(special) {
                bail!("vocabulary lacks {special}");
            }
        }
        Ok(Vocab { tokens, ids })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_tokens(text.lines().map(str::to_string).collect()).with_context(|| path.display().to_string())
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.tokens.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn id(&self, token: &str) -> i64 {
        self.ids.get(token).copied().unwrap_or(self.ids[UNK])
    }

    pub fn token(&self, id: i64) -> Option<&str> {
        self.tokens.get(usize::try_from(id).ok()?).map(String::as_str)
    }

    pub fn pad_id(&self) -> i64 {
        self.ids[PAD]
    }

    pub fn cls_id(&self) -> i64 {
        self.ids[CLS]
    }

    pub fn mask_id(&self) -> i64 {
        self.ids[MASK]
    }

    /// [CLS] + one id per whitespace-separated word (no [SEP], as the reference), truncated to
    /// `max_tokens`. Expects a caption already cleaned by `pre_caption`.
    pub fn encode(&self, caption: &str, max_tokens: usize) -> Vec<i64> {
        std::iter::once(self.cls_id()).chain(caption.split_whitespace().map(|w| self.id(w))).take(max_tokens).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_cls_and_truncates() {
        let v = Vocab::with_words(["a", "red", "circle"]);
        assert_eq!((v.pad_id(), v.cls_id(), v.mask_id()), (0, 2, 4));
        assert_eq!(v.encode("a red circle", 25), vec![2, 5, 6, 7]);
        assert_eq!(v.encode("a blue circle", 3), vec![2, 5, 1]);
    }

    #[test]
    fn round_trips_through_vocab_txt() {
        let dir = std::env::temp_dir().join(format!("albef-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = Vocab::with_words(["x", "y"]);
        v.write(&dir.join("vocab.txt")).unwrap();
        assert_eq!(Vocab::read(&dir.join("vocab.txt")).unwrap(), v);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_vocabularies_without_specials_or_with_duplicates() {
        assert!(Vocab::from_tokens(vec!["a".into()]).is_err());
        let dup = [PAD, UNK, CLS, MASK, "a", "a"].iter().map(|s| s.to_string()).collect();
        assert!(Vocab::from_tokens(dup).is_err());
    }
}
