//! Parity of our tokenizer with Hugging Face `BertTokenizerFast(vocab_file, do_lower_case=True)`.
//! The vocabulary is written here; `tests/python/tokenize_ref.py` holds the captions and writes
//! the reference ids for them, plus the same tokenizer saved as a tokenizer.json.

use albef_data::tokenizer::{Tokenizer, TokenizerOptions};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Words and subwords covering most of the reference captions; the rest exercise [UNK].
const WORDS: &str = "
    a an the and or of on in at to with near over behind across next while as is are it its
    man woman men women people person child children boy girl dog dogs cat cats ball bicycle
    taxi car bus street road city sidewalk corner park church buildings building sun sky mat
    red blue black white yellow green brown old small tall busy lazy quick fox jumps jump
    riding ride wave top surf shirt jeans down walk walks waits play sets two one yes best
    cafe creme la noel naive facade elan capitals combining accent quotes em dash que si single
    guillemets pizza lots spaces newlines space control chars here replacement
    zero width life really isn t s striped mask cls unk literals lowercase emoji letters
    ligature too long but not pizzas xylophone qwerty running playing walked jumped un happy
    sitting standing looking holding table plate food water beach tree grass field snow
    mountain horse bird train airplane kitchen room bed window door computer phone picture
    group front side view close up large little young wooden pink orange purple gray
    three four five many some other each this that there their his her they he she we
    sits stands looks holds eats drinks flies runs plays rides parked sign
    clock tower bridge river lake boat ocean shore sand rock hill forest trees flowers vase
    bowl cup glass bottle knife fork spoon sandwich cake banana apple donut hot
    ##s ##ing ##ed ##ly ##er ##ers ##ness ##ful ##y ##a ##b ##ii ##uio ##p ##believ ##ably
    ##happy ##phone ##z ##va ##ty ##99 ##4 ##ga ##zz
    b zy 1 2 3 10 14 19 1999 100
    , . ! ' - ( ) ? \" / ~ # * ; : < > [ ] “ ” — … ¿ ¡ ‘ ’ « »
    一 只 猫 和 狗
";

/// What BERT's vocab.txt puts between [PAD] and [UNK].
const BERT_UNUSED: usize = 99;

#[derive(Deserialize)]
struct Case {
    caption: String,
    ids: Vec<i64>,
    ids_sep_truncated: Vec<i64>,
}

#[derive(Deserialize)]
struct Reference {
    transformers: String,
    tokenizers: String,
    construction: String,
    vocab_size: usize,
    special_ids: BTreeMap<String, i64>,
    max_length: usize,
    cases: Vec<Case>,
}

fn words() -> Vec<String> {
    WORDS.split_whitespace().map(str::to_string).collect()
}

fn specials() -> Vec<String> {
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().map(|s| s.to_string()).collect()
}

/// Specials at 0..5, then the words.
fn compact_vocab() -> Vec<String> {
    specials().into_iter().chain(words()).collect()
}

/// BERT's layout: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
fn bert_vocab() -> Vec<String> {
    let mut v = vec!["[PAD]".to_string()];
    v.extend((0..BERT_UNUSED).map(|i| format!("[unused{i}]")));
    v.extend(specials().into_iter().skip(1));
    v.extend(words());
    v
}

/// The words first, the specials last and in another order.
fn specials_last_vocab() -> Vec<String> {
    let mut v = words();
    v.extend(specials().into_iter().rev());
    v
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes `tokens` as dir/vocab.txt and runs tokenize_ref.py on it, which also saves the
/// tokenizer as dir/tokenizer.json.
fn reference(tokens: &[String], dir: &Path) -> Reference {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    // A missing venv is a broken setup, not a reason to skip: the test would pass vacuously.
    assert!(python.exists(), "{} not found: run `make setup` to create the Python venv", python.display());
    let vocab = dir.join("vocab.txt");
    std::fs::write(&vocab, tokens.join("\n") + "\n").unwrap();
    let out_json = dir.join("reference.json");
    let out = Command::new(&python)
        .arg(root.join("tests/python/tokenize_ref.py"))
        .arg(&vocab)
        .arg(&out_json)
        .arg(dir.join("tokenizer.json"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("running tokenize_ref.py");
    assert!(out.status.success(), "tokenize_ref.py failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).expect("parsing reference.json")
}

fn with(tok: &Tokenizer, max_tokens: usize, add_sep: bool) -> Tokenizer {
    tok.clone().with_options(TokenizerOptions { max_tokens, add_sep }).unwrap()
}

/// Checks every caption three ways against the reference: returns how many matched all three
/// and a line for each mismatch.
fn compare(tok: &Tokenizer, r: &Reference) -> (usize, Vec<String>) {
    let full = with(tok, usize::MAX, false);
    let truncated = with(tok, r.max_length, false);
    let with_sep = with(tok, r.max_length, true);
    let mut matched = 0;
    let mut bad = Vec::new();
    for c in &r.cases {
        let expected: Vec<i64> = std::iter::once(tok.cls_id()).chain(c.ids.iter().copied()).collect();
        let checks = [
            ("full", full.encode(&c.caption), expected.clone()),
            ("truncated", truncated.encode(&c.caption), expected[..expected.len().min(r.max_length)].to_vec()),
            ("with [SEP]", with_sep.encode(&c.caption), c.ids_sep_truncated.clone()),
        ];
        let before = bad.len();
        for (what, ours, hf) in checks {
            if ours != hf {
                bad.push(format!("{:?} {what}: ours {ours:?}, hf {hf:?}", c.caption));
            }
        }
        matched += usize::from(bad.len() == before);
    }
    (matched, bad)
}

fn special_ids(tok: &Tokenizer) -> [(&'static str, i64); 5] {
    [
        ("[PAD]", tok.pad_id()),
        ("[UNK]", tok.unk_id()),
        ("[CLS]", tok.cls_id()),
        ("[SEP]", tok.sep_id().expect("test vocabularies have [SEP]")),
        ("[MASK]", tok.mask_id()),
    ]
}

fn check_parity(name: &str, tokens: Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let r = reference(&tokens, dir.path());
    let tok = Tokenizer::from_file(dir.path().join("vocab.txt")).unwrap();

    assert_eq!(tok.vocab_size(), r.vocab_size);
    for (token, id) in special_ids(&tok) {
        assert_eq!(id, r.special_ids[token], "{token} id");
        assert_eq!(id, tokens.iter().position(|t| t == token).unwrap() as i64, "{token} is not at its line");
    }

    // The captions must exercise the vocabulary, [UNK], and truncation, or parity says little.
    let all: Vec<i64> = r.cases.iter().flat_map(|c| c.ids.iter().copied()).collect();
    let unknown = all.iter().filter(|&&id| id == tok.unk_id()).count();
    assert!(unknown > 0 && unknown * 5 < all.len(), "{unknown} of {} reference ids are [UNK]", all.len());
    assert!(r.cases.iter().any(|c| c.ids.len() >= 3 * r.max_length), "no caption is far over max_length");
    assert!(r.cases.iter().any(|c| c.ids.is_empty()), "no caption is empty");

    let (matched, bad) = compare(&tok, &r);
    println!(
        "{name}: {matched}/{} captions identical to BertTokenizerFast (full; [CLS]-first truncated to {n}; \
         with [SEP] truncated to {n}) [transformers {}, tokenizers {}, built from `{}`]",
        r.cases.len(),
        r.transformers,
        r.tokenizers,
        r.construction,
        n = r.max_length,
    );
    assert!(bad.is_empty(), "{name}: mismatches:\n{}", bad.join("\n"));

    // The same tokenizer saved by Python as tokenizer.json (with truncation to max_length saved
    // in it, which loading must drop) gives the same ids.
    let from_json = Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(from_json.vocab_size(), tok.vocab_size());
    assert_eq!(special_ids(&from_json), special_ids(&tok));
    let (matched, bad) = compare(&from_json, &r);
    println!("{name} via tokenizer.json: {matched}/{} captions identical", r.cases.len());
    assert!(bad.is_empty(), "{name} via tokenizer.json: mismatches:\n{}", bad.join("\n"));
}

#[test]
fn parity_with_specials_first() {
    check_parity("specials at 0..5", compact_vocab());
}

#[test]
fn parity_with_bert_layout() {
    check_parity("BERT layout (0, 100..104)", bert_vocab());
}

#[test]
fn parity_with_specials_last() {
    check_parity("specials last", specials_last_vocab());
}

#[test]
fn defaults_frame_like_albef() {
    let tok = Tokenizer::from_vocab_tokens(compact_vocab()).unwrap();
    assert_eq!(tok.options(), TokenizerOptions { max_tokens: 25, add_sep: false });
    let long = "a dog ".repeat(30);
    let ids = tok.encode(&long);
    assert_eq!(ids.len(), 25);
    assert_eq!(ids[0], tok.cls_id());
    assert!(!ids.contains(&tok.sep_id().unwrap()));
}

#[test]
fn batch_pads_to_the_longest_and_masks_padding() {
    let tok = Tokenizer::from_vocab_tokens(bert_vocab()).unwrap();
    let (ids, mask, seq_len) = tok.encode_batch(&["a red dog", "", "the cat"]);
    let (cls, pad) = (tok.cls_id(), tok.pad_id());
    let a = tok.encode("a red dog");
    assert_eq!(a.len(), 4);
    assert_eq!(seq_len, 4);
    let the_cat = tok.encode("the cat");
    assert_eq!(ids, [a, vec![cls, pad, pad, pad], the_cat, vec![pad]].concat());
    assert_eq!(mask, vec![1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0]);
    assert_eq!(pad, 0);

    let (ids, mask, seq_len) = tok.encode_batch(&[]);
    assert_eq!((ids.len(), mask.len(), seq_len), (0, 0, 0));
}

#[test]
fn batch_respects_truncation_and_sep() {
    let tok = with(&Tokenizer::from_vocab_tokens(specials_last_vocab()).unwrap(), 4, true);
    let (ids, mask, seq_len) = tok.encode_batch(&["a red dog on a mat", "cat"]);
    let sep = tok.sep_id().unwrap();
    assert_eq!(seq_len, 4);
    assert_eq!(ids[..4], [tok.cls_id(), tok.encode("a")[1], tok.encode("red")[1], sep]);
    assert_eq!(ids[4..], [tok.cls_id(), tok.encode("cat")[1], sep, tok.pad_id()]);
    assert_eq!(mask, vec![1, 1, 1, 1, 1, 1, 1, 0]);
}

#[test]
fn vocabulary_without_a_special_token_is_an_error() {
    for missing in ["[PAD]", "[UNK]", "[CLS]", "[MASK]"] {
        let tokens: Vec<String> = compact_vocab().into_iter().filter(|t| t != missing).collect();
        let err = Tokenizer::from_vocab_tokens(tokens.clone()).unwrap_err().to_string();
        assert!(err.contains(missing), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.txt");
        std::fs::write(&path, tokens.join("\n")).unwrap();
        let err = format!("{:#}", Tokenizer::from_file(&path).unwrap_err());
        assert!(err.contains(missing) && err.contains(&path.display().to_string()), "{err}");
    }
    // [SEP] is optional until asked for.
    let no_sep: Vec<String> = compact_vocab().into_iter().filter(|t| t != "[SEP]").collect();
    let tok = Tokenizer::from_vocab_tokens(no_sep).unwrap();
    assert_eq!(tok.sep_id(), None);
    let err = tok.with_options(TokenizerOptions { max_tokens: 25, add_sep: true }).unwrap_err();
    assert!(err.to_string().contains("[SEP]"), "{err}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dup = [compact_vocab(), vec!["dog".to_string()]].concat();
    let err = Tokenizer::from_vocab_tokens(dup).unwrap_err().to_string();
    assert!(err.contains("\"dog\" twice"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let err = format!("{:#}", Tokenizer::from_file(&missing).unwrap_err());
    assert!(err.contains("nope.txt"), "{err}");

    let broken = dir.path().join("tokenizer.json");
    std::fs::write(&broken, "{\"not\": \"a tokenizer\"}").unwrap();
    let err = format!("{:#}", Tokenizer::from_file(&broken).unwrap_err());
    assert!(err.contains("tokenizer.json"), "{err}");

    let tok = Tokenizer::from_vocab_tokens(compact_vocab()).unwrap();
    assert!(tok.clone().with_options(TokenizerOptions { max_tokens: 0, add_sep: false }).is_err());
    assert!(tok.clone().with_options(TokenizerOptions { max_tokens: 1, add_sep: true }).is_err());
    assert_eq!(with(&tok, 1, false).encode("a dog"), vec![tok.cls_id()]);
    assert_eq!(with(&tok, 2, true).encode("a dog"), vec![tok.cls_id(), tok.sep_id().unwrap()]);
}

#[test]
fn file_kind_is_sniffed_without_a_known_extension() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = dir.path().join("vocab");
    std::fs::write(&vocab, bert_vocab().join("\n")).unwrap();
    let tok = Tokenizer::from_file(&vocab).unwrap();
    assert_eq!((tok.cls_id(), tok.vocab_size()), (101, bert_vocab().len()));
    // CRLF line ends are line ends, not part of the tokens.
    let crlf = dir.path().join("crlf.txt");
    std::fs::write(&crlf, bert_vocab().join("\r\n")).unwrap();
    assert_eq!(Tokenizer::from_file(&crlf).unwrap().encode("a red dog"), tok.encode("a red dog"));
}
