//! ALBEF's text tokenizer: BERT WordPiece through the Hugging Face `tokenizers` crate, loaded
//! from a `tokenizer.json` or a BERT `vocab.txt` (built as `BertTokenizerFast(vocab_file,
//! do_lower_case=True)` builds it).
//!
//! The reference text sequence is `[CLS]` + wordpieces with no `[SEP]`, truncated to
//! `max_tokens`. The `tokenizers` pipeline therefore runs without its post-processor and we add
//! `[CLS]` (and `[SEP]` when asked) ourselves. Captions are not cleaned here: the caller applies
//! [`crate::pre_caption`] first.

use anyhow::{Context, Result, anyhow, bail, ensure};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, PostProcessorWrapper};

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const CLS: &str = "[CLS]";
pub const SEP: &str = "[SEP]";
pub const MASK: &str = "[MASK]";

/// How [`Tokenizer::encode`] frames and truncates a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// Most tokens in a sequence, `[CLS]` (and `[SEP]`) included.
    pub max_tokens: usize,
    /// Append `[SEP]`. Off by default: ALBEF's text sequence has none.
    pub add_sep: bool,
}

impl Default for TokenizerOptions {
    fn default() -> Self {
        TokenizerOptions { max_tokens: 25, add_sep: false }
    }
}

/// A WordPiece tokenizer with its special ids read from the vocabulary.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    options: TokenizerOptions,
    pad: i64,
    unk: i64,
    cls: i64,
    sep: Option<i64>,
    mask: i64,
    vocab_size: usize,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` or a BERT `vocab.txt`: by extension (`.json` / `.txt`), else by
    /// content (a JSON object starts with `{`, a BERT vocabulary with `[PAD]`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading tokenizer {}", path.display()))?;
        let is_json = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => true,
            Some("txt") => false,
            _ => text.trim_start().starts_with('{'),
        };
        let loaded = if is_json {
            text.parse::<tokenizers::Tokenizer>()
                .map_err(|e| anyhow!("not a tokenizer.json: {e}"))
                .and_then(Self::from_hf_tokenizer)
        } else {
            // `lines` drops "\n" and "\r\n" only, as transformers' `load_vocab` does.
            Self::from_vocab_tokens(text.lines())
        };
        loaded.with_context(|| format!("loading tokenizer {}", path.display()))
    }

    /// A BERT WordPiece tokenizer over `tokens` (id = position), as `BertTokenizerFast` builds
    /// from a `vocab.txt` with `do_lower_case=True`.
    pub fn from_vocab_tokens<S: Into<String>>(tokens: impl IntoIterator<Item = S>) -> Result<Self> {
        // `tokenizers` wants its own hash map type; get one empty from it rather than depend on
        // ahash ourselves.
        let mut vocab = WordPiece::read_bytes(&[]).map_err(|e| anyhow!("{e}"))?;
        let mut seen = HashMap::new();
        for (line, token) in tokens.into_iter().enumerate() {
            let token = token.into();
            // transformers would let a later line win silently; a duplicate is a broken vocab.
            if let Some(first) = seen.insert(token.clone(), line) {
                bail!("vocabulary lists {token:?} twice (lines {} and {})", first + 1, line + 1);
            }
            vocab.insert(token, u32::try_from(line).context("vocabulary too large for u32 ids")?);
        }
        for special in [PAD, UNK, CLS, MASK] {
            ensure!(seen.contains_key(special), "vocabulary lacks {special}");
        }
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token(UNK.into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| anyhow!("building the WordPiece model: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        // strip_accents None: follow `lowercase`, as BERT uncased does.
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        // BertTokenizerFast registers its special tokens as unnormalised added tokens, so a
        // literal "[MASK]" in a caption becomes the mask id rather than "[", "mask", "]".
        let specials: Vec<AddedToken> = [PAD, UNK, CLS, SEP, MASK]
            .into_iter()
            .filter(|t| seen.contains_key(*t))
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Self::from_hf_tokenizer(inner)
    }

    /// Wraps a `tokenizers` pipeline, dropping what would change the sequence framing: the
    /// post-processor (it adds [SEP]) and any truncation or padding saved in a tokenizer.json.
    fn from_hf_tokenizer(mut inner: tokenizers::Tokenizer) -> Result<Self> {
        inner.with_post_processor(None::<PostProcessorWrapper>);
        inner.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        inner.with_padding(None);
        let id = |token: &str| inner.token_to_id(token).map(i64::from);
        let required = |token: &str| id(token).ok_or_else(|| anyhow!("vocabulary lacks {token}"));
        // Ids may exceed the model's vocabulary through added tokens: size by the largest id.
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        Ok(Tokenizer {
            pad: required(PAD)?,
            unk: required(UNK)?,
            cls: required(CLS)?,
            sep: id(SEP),
            mask: required(MASK)?,
            vocab_size,
            options: TokenizerOptions::default(),
            inner,
        })
    }

    /// Sets how sequences are framed and truncated.
    pub fn with_options(mut self, options: TokenizerOptions) -> Result<Self> {
        ensure!(!options.add_sep || self.sep.is_some(), "add_sep is set but the vocabulary lacks {SEP}");
        let framing = 1 + usize::from(options.add_sep);
        ensure!(options.max_tokens >= framing, "max_tokens {} leaves no room for [CLS]/[SEP]", options.max_tokens);
        self.options = options;
        Ok(self)
    }

    pub fn options(&self) -> TokenizerOptions {
        self.options
    }

    /// The wordpiece ids of `text`, without special tokens or truncation.
    pub fn wordpieces(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// `[CLS]` + wordpieces (+ `[SEP]`), the wordpieces truncated so that the whole fits
    /// `max_tokens` (so `[SEP]` stays last, as in Hugging Face truncation).
    pub fn try_encode(&self, text: &str) -> Result<Vec<i64>> {
        let pieces = self.wordpieces(text)?;
        let sep = if self.options.add_sep { self.sep } else { None };
        let room = self.options.max_tokens.saturating_sub(1 + usize::from(sep.is_some()));
        Ok(std::iter::once(self.cls).chain(pieces.into_iter().take(room)).chain(sep).collect())
    }

    /// A VQA answer as the reference's decoder reads and predicts it: the answer with `[SEP]`
    /// appended, tokenised with the special tokens, i.e. `[CLS]` + wordpieces + `[SEP]` +
    /// `[SEP]` (the reference appends its eos to a text the tokenizer ends with `[SEP]` too).
    /// Its wordpieces are cut to fit `max_tokens`.
    pub fn encode_answer(&self, answer: &str) -> Result<Vec<i64>> {
        let sep = self.sep.context("VQA answers end with [SEP], which the vocabulary lacks")?;
        let pieces = self.wordpieces(answer)?;
        let room = self.options.max_tokens.saturating_sub(3).max(1);
        Ok(std::iter::once(self.cls).chain(pieces.into_iter().take(room)).chain([sep, sep]).collect())
    }

    /// [`Self::try_encode`] without the `Result`: WordPiece fails only when its unknown token is
    /// missing, which loading rules out for a vocab.txt.
    ///
    /// # Panics
    /// When the underlying tokenizer fails (a tokenizer.json whose model cannot encode `text`).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        self.try_encode(text).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Encodes `texts` into row-major `(ids, mask)` of shape `(texts.len(), seq_len)`, padded
    /// with [`Self::pad_id`] to the longest sequence; the mask is 1 on tokens, 0 on padding.
    pub fn encode_batch(&self, texts: &[&str]) -> (Vec<i64>, Vec<i64>, usize) {
        let seqs: Vec<Vec<i64>> = texts.iter().map(|t| self.encode(t)).collect();
        let seq_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * seq_len);
        let mut mask = Vec::with_capacity(seqs.len() * seq_len);
        for seq in &seqs {
            ids.extend(seq.iter().copied().chain(std::iter::repeat_n(self.pad, seq_len - seq.len())));
            mask.extend((0..seq_len).map(|i| i64::from(i < seq.len())));
        }
        (ids, mask, seq_len)
    }

    pub fn pad_id(&self) -> i64 {
        self.pad
    }

    pub fn unk_id(&self) -> i64 {
        self.unk
    }

    pub fn cls_id(&self) -> i64 {
        self.cls
    }

    /// `None` when the vocabulary has no `[SEP]` (ALBEF's sequences do not need one).
    pub fn sep_id(&self) -> Option<i64> {
        self.sep
    }

    pub fn mask_id(&self) -> i64 {
        self.mask
    }

    /// One more than the largest id: the rows a word embedding needs.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}
