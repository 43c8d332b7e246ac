//! VQA evaluation, as the reference's VQA.py and its vqaTools: each question of a split in the
//! reference's format (a JSON list of `{"question_id", "question", "image", "answer": [..]}`,
//! answers optional) is answered from a candidate list by the answer decoder
//! ([`AlbefVqa::answer`]); the answers are written as the evaluation server takes them
//! (`[{question_id, answer}]`), and where the split gives the human answers the official VQA
//! accuracy is computed ([`vqa_accuracy`]). In a job each rank answers its share of the
//! questions and the ranks sum the answer indexes.

use crate::split::{EvalBatch, SplitOptions, rank_batches, read_images};
use albef_config::AnswerScoring;
use albef_data::bad::SkipCounts;
use albef_data::pre_caption;
use albef_data::sources::parse_annotations;
use albef_data::store::Location;
use albef_data::tokenizer::Tokenizer;
use albef_model::TaskModel;
use albef_model::device::with_autocast;
use albef_model::vqa::AlbefVqa;
use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use tch::{Device, Kind, Tensor};
use tokio::runtime::Handle;

/// A split of questions, ready for the model.
pub struct QuestionSplit {
    pub source: String,
    /// Each question's id as the split gives it (the row number where it gives none).
    pub question_ids: Vec<String>,
    pub image_keys: Vec<String>,
    images: Vec<Bytes>,
    pub questions: Vec<String>,
    /// Each question's human answers (repeats kept); empty where the split gives none.
    pub human_answers: Vec<Vec<String>>,
    max_pixels: u64,
}

impl QuestionSplit {
    /// Reads the annotation file `url` and every image it names (a row that is not a question
    /// is an error naming it: an evaluation must not quietly drop rows).
    pub fn load(url: &str, opts: &SplitOptions, handle: &Handle) -> Result<Self> {
        let bytes = handle.block_on(Location::open(url)?.read_all())?;
        let skips = SkipCounts::default();
        let entries = parse_annotations(&bytes, url, &skips)?;
        ensure!(skips.total() == 0, "{url}: rows that are not questions: {}", skips.summary());
        let root = opts.root_of(url)?;
        let mut split = QuestionSplit {
            source: url.to_string(),
            question_ids: vec![],
            image_keys: vec![],
            images: vec![],
            questions: vec![],
            human_answers: vec![],
            max_pixels: opts.max_pixels,
        };
        for (i, e) in entries.into_iter().flatten().enumerate() {
            split.question_ids.push(e.question_id.unwrap_or_else(|| i.to_string()));
            split.image_keys.push(e.image);
            split.questions.push(pre_caption(&e.captions[0], opts.max_words));
            split.human_answers.push(e.answers);
        }
        ensure!(!split.questions.is_empty(), "{url} lists no questions");
        split.images = read_images(&root, &split.image_keys, opts, handle)?;
        Ok(split)
    }

    pub fn len(&self) -> usize {
        self.questions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.questions.is_empty()
    }

    /// Whether every question has its human answers (accuracy can be measured).
    pub fn answered(&self) -> bool {
        self.human_answers.iter().all(|a| !a.is_empty())
    }

    /// Every distinct human answer, in order of first appearance (the candidates when no answer
    /// list is configured).
    pub fn distinct_answers(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.human_answers.iter().flatten().filter(|a| seen.insert(a.as_str())).cloned().collect()
    }
}

/// The candidate answers' texts: the JSON list of strings at `answer_list` (the reference's
/// answer_list.json), or where that is "" every human answer of `split`.
pub fn candidate_answers(answer_list: &str, split: &QuestionSplit, handle: &Handle) -> Result<Vec<String>> {
    if answer_list.is_empty() {
        ensure!(
            split.answered(),
            "{}: questions without answers; set job.answer_list (the candidate answers)",
            split.source
        );
        return Ok(split.distinct_answers());
    }
    let bytes = handle.block_on(Location::open(answer_list)?.read_all())?;
    serde_json::from_slice(&bytes).with_context(|| format!("{answer_list}: expected a JSON list of answer strings"))
}

/// The candidate answers, tokenised for the decoder.
pub struct AnswerList {
    pub texts: Vec<String>,
    ids: Tensor,
    mask: Tensor,
}

impl AnswerList {
    pub fn new(texts: Vec<String>, tokenizer: &Tokenizer, device: Device) -> Result<Self> {
        ensure!(!texts.is_empty(), "the answer list is empty");
        let seqs = texts.iter().map(|t| tokenizer.encode_answer(t)).collect::<Result<Vec<_>>>()?;
        let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let pad = tokenizer.pad_id();
        let ids: Vec<i64> =
            seqs.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(pad, len - s.len()))).collect();
        let mask: Vec<i64> = seqs.iter().flat_map(|s| (0..len).map(move |i| i64::from(i < s.len()))).collect();
        let shape = [texts.len() as i64, len as i64];
        Ok(AnswerList {
            texts,
            ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        })
    }
}

/// How questions are answered.
#[derive(Clone, Copy, Debug)]
pub struct AnswerOptions {
    pub batch_size: usize,
    pub bf16: bool,
    /// Candidates teacher-forced per question.
    pub k: i64,
    pub scoring: AnswerScoring,
}

/// Rank `rank`'s share of the questions (every `world`-th batch) answered: a Float tensor with
/// one element per question, the chosen candidate's index + 1 on this rank's questions and 0 on
/// the others', for the ranks to sum.
pub fn answer_shard(
    model: &AlbefVqa,
    split: &QuestionSplit,
    tokenizer: &Tokenizer,
    candidates: &AnswerList,
    opts: AnswerOptions,
    (rank, world): (usize, usize),
) -> Result<Tensor> {
    let dev = model.device();
    let res = model.config().image_res as usize;
    let mut chosen = vec![0f32; split.len()];
    for rows in rank_batches(split.len(), opts.batch_size, (rank, world)) {
        let r = rows.clone();
        let loaded = (&split.images[r.clone()], &split.image_keys[r.clone()], &split.questions[r]);
        let b = EvalBatch::load(loaded, (res, split.max_pixels), tokenizer, dev)?;
        let (ids, mask) = (&candidates.ids, &candidates.mask);
        let best = tch::no_grad(|| {
            with_autocast(dev, opts.bf16, || model.answer(&b.batch(), ids, mask, opts.k, opts.scoring))
        });
        let best = Vec::<i64>::try_from(best.to_device(Device::Cpu).to_kind(Kind::Int64))?;
        for (slot, b) in chosen[rows].iter_mut().zip(best) {
            *slot = (b + 1) as f32;
        }
    }
    Ok(Tensor::from_slice(&chosen).to_device(dev))
}

/// The answers of summed [`answer_shard`]s, one per question.
pub fn chosen_answers<'a>(summed: &Tensor, candidates: &'a AnswerList) -> Result<Vec<&'a str>> {
    let v = Vec::<f32>::try_from(summed.to_device(Device::Cpu))?;
    v.iter()
        .map(|&x| {
            let i = x.round() as usize;
            candidates.texts.get(i.wrapping_sub(1)).map(String::as_str).context("a question was left unanswered")
        })
        .collect()
}

/// Writes the result file the VQA evaluation server takes: `[{question_id, answer}]` (numeric
/// ids as numbers).
pub fn write_results(path: &std::path::Path, split: &QuestionSplit, answers: &[&str]) -> Result<()> {
    let rows = split.question_ids.iter().zip(answers).map(|(id, answer)| {
        let id = id.parse::<i64>().map(serde_json::Value::from).unwrap_or_else(|_| id.as_str().into());
        serde_json::json!({ "question_id": id, "answer": answer })
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_vec(&rows.collect::<Vec<_>>())?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// Mean VQA accuracy in percent of `answers` against the split's human answers.
pub fn split_accuracy(split: &QuestionSplit, answers: &[&str]) -> f64 {
    let total: f64 = answers.iter().zip(&split.human_answers).map(|(a, human)| vqa_accuracy(a, human)).sum();
    100.0 * total / answers.len().max(1) as f64
}

/// The VQA accuracy of one predicted answer (0..=1), as the VQA evaluation computes it: the
/// prediction normalised (punctuation, number words, articles, contractions), the human answers'
/// punctuation normalised when they disagree; then, for each human answer left out in turn,
/// min(1, matches among the others / 3), averaged.
pub fn vqa_accuracy(predicted: &str, human: &[String]) -> f64 {
    if human.is_empty() {
        return 0.0;
    }
    let predicted = normalize_answer(predicted.replace(['\n', '\t'], " ").trim());
    let distinct: std::collections::HashSet<&String> = human.iter().collect();
    let human: Vec<String> =
        if distinct.len() > 1 { human.iter().map(|h| punctuation(h)).collect() } else { human.to_vec() };
    let matches = human.iter().filter(|h| **h == predicted).count();
    let sum: f64 = human
        .iter()
        .map(|h| {
            let others = matches - usize::from(*h == predicted);
            (others as f64 / 3.0).min(1.0)
        })
        .sum();
    sum / human.len() as f64
}

/// An answer as the VQA evaluation normalises a prediction.
pub fn normalize_answer(answer: &str) -> String {
    digits_and_articles(&punctuation(answer))
}

/// Characters the VQA evaluation removes or turns into spaces.
const PUNCTUATION: [char; 21] =
    [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];

/// The VQA evaluation's processPunctuation: each mark is removed where it touches a space (or
/// the text has a digit-comma-digit), else becomes a space; a period not followed by a digit is
/// removed.
fn punctuation(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let comma_in_number = chars.windows(3).any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for p in PUNCTUATION {
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if touches_space || comma_in_number { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c != '.' || chars.get(i + 1).is_some_and(char::is_ascii_digit))
        .map(|(_, c)| c)
        .collect()
}

/// The VQA evaluation's processDigitArticle: lower case, number words as digits, articles
/// dropped, contractions given their apostrophe.
fn digits_and_articles(text: &str) -> String {
    const NUMBERS: [&str; 11] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];
    let lower = text.to_lowercase();
    let words = lower.split_whitespace().filter_map(|w| {
        let w = if w == "none" {
            "0".to_string()
        } else {
            NUMBERS.iter().position(|n| *n == w).map_or(w.to_string(), |d| d.to_string())
        };
        (!["a", "an", "the"].contains(&w.as_str())).then_some(w)
    });
    words
        .map(|w| match CONTRACTIONS.binary_search_by(|(k, _)| (*k).cmp(w.as_str())) {
            Ok(i) => CONTRACTIONS[i].1.to_string(),
            Err(_) => w,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The VQA evaluation's contraction table (its vqaEval.py), sorted by key for a binary search.
const CONTRACTIONS: [(&str, &str); 120] = [
    ("'ow'sat", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("I'dve", "I'd've"),
    ("Id've", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt", "couldn't"),
    ("couldnt've", "couldn't've"),
    ("couldve", "could've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadn'tve", "hadn't've"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("he'dve", "he'd've"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("isnt", "isn't"),
    ("it'dve", "it'd've"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightn'tve", "mightn't've"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("shant", "shan't"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shed've", "she'd've"),
    ("shouldn'tve", "shouldn't've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldve", "should've"),
    ("somebody'd", "somebodyd"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyd've", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someone'dve", "someone'd've"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("something'dve", "something'd've"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("there'dve", "there'd've"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("they'dve", "they'd've"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("we'dve", "we'd've"),
    ("wed've", "we'd've"),
    ("werent", "weren't"),
    ("weve", "we've"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("who'dve", "who'd've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldn'tve", "wouldn't've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldve", "would've"),
    ("y'all'dve", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'allll", "y'all'll"),
    ("yall", "y'all"),
    ("yall'd've", "y'all'd've"),
    ("yall'll", "y'all'll"),
    ("you'dve", "you'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn accuracy_counts_matches_among_the_other_nine() {
        let ten = |a: &str, n: usize| answers(&[vec![a; n], vec!["other"; 10 - n]].concat());
        // c matching answers: (c * min(1, (c-1)/3) + (10-c) * min(1, c/3)) / 10.
        assert_eq!(vqa_accuracy("red", &ten("red", 0)), 0.0);
        assert!((vqa_accuracy("red", &ten("red", 1)) - 0.3).abs() < 1e-12);
        assert!((vqa_accuracy("red", &ten("red", 2)) - 0.6).abs() < 1e-12);
        assert!((vqa_accuracy("red", &ten("red", 3)) - (0.3 * 2.0 / 3.0 + 0.7)).abs() < 1e-12);
        assert_eq!(vqa_accuracy("red", &ten("red", 4)), 1.0);
        assert_eq!(vqa_accuracy("red", &ten("red", 10)), 1.0);
    }

    #[test]
    fn predictions_are_normalised_as_the_official_evaluation_does() {
        assert_eq!(normalize_answer("Two"), "2");
        assert_eq!(normalize_answer("none"), "0");
        assert_eq!(normalize_answer("a dog"), "dog");
        assert_eq!(normalize_answer("The Red one."), "red 1");
        assert_eq!(normalize_answer("isnt"), "isn't");
        assert_eq!(normalize_answer("3.5"), "3.5", "a period before a digit stays");
        assert_eq!(normalize_answer("1,000"), "1000", "a comma in a number goes");
        assert_eq!(normalize_answer("black-and-white"), "black and white");
        assert_eq!(normalize_answer("yes !"), "yes");
        // Human answers that all agree are compared as given; ones that differ lose punctuation.
        assert_eq!(vqa_accuracy("two", &answers(&["2"; 10])), 1.0);
        let mixed = answers(&["t-shirt", "t-shirt", "t-shirt", "shirt", "shirt", "tee", "tee", "tee", "tee", "tee"]);
        assert!((vqa_accuracy("T-shirt", &mixed) - vqa_accuracy("t shirt", &mixed)).abs() < 1e-12);
        assert!((vqa_accuracy("t shirt", &mixed) - 0.9).abs() < 1e-12, "3 of 10 match");
    }

    #[test]
    fn contractions_are_sorted_for_the_search() {
        assert!(CONTRACTIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
