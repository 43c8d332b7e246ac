//! `albef eval`: zero-shot image-text retrieval of a checkpoint (or of the untrained model a job
//! starts from) on a retrieval split; prints a table and writes JSON.

use albef_config::{AlbefConfig, ConfigArgs};
use albef_data::dataset::training_sources;
use albef_data::store::Location;
use albef_data::store::parent_of;
use albef_data::synth::{TEST_JSON, VOCAB_TXT};
use albef_data::tokenizer::{Tokenizer, TokenizerOptions};
use albef_eval::classification::{LabelledSplit, accuracy, accuracy_shard};
use albef_eval::metrics::{RetrievalMetrics, chance, table};
use albef_eval::model::{EvalModel, from_checkpoint, from_pth, from_safetensors, resolve_checkpoint, untrained};
use albef_eval::retrieval::{EvalOptions, RetrievalResults, Scoring, evaluate};
use albef_eval::split::{RetrievalSplit, SplitOptions};
use albef_eval::vqa::{
    AnswerList, AnswerOptions, QuestionSplit, answer_shard, candidate_answers, chosen_answers, split_accuracy,
    write_results,
};
use albef_model::device;
use albef_model::task_model::{self, Classifier};
use albef_model::vqa::AlbefVqa;
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::runtime::Handle;

/// Where the model comes from and how it runs, shared by `eval` and `embed`.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A checkpoint folder (`<run>/checkpoints/step-N`), `<run>/best` (the run's best), a run
    /// directory (its latest complete checkpoint), or a bare model.safetensors or the authors'
    /// .pth (then --config gives the model).
    #[arg(long, conflicts_with = "untrained")]
    pub checkpoint: Option<String>,
    /// Evaluate the freshly initialised model a job with this configuration starts from.
    #[arg(long)]
    pub untrained: bool,
    /// Configuration: for --untrained and bare safetensors; with a checkpoint, its own
    /// configuration is used and --set overrides it (data.*, train.device, ...).
    #[command(flatten)]
    pub config: ConfigArgs,
    /// WordPiece vocab.txt or tokenizer.json (default: data.tokenizer, else vocab.txt beside the
    /// split or the training data).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Images or texts per encoder forward.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Retrieval annotation JSON (reference format: image, caption list, image_id), for an
    /// SNLI-VE model a labelled one (image, sentence, label), for a VQA model questions
    /// (question_id, question, image, answers optional). Default (retrieval): the
    /// held-out split of the generated dataset, `<job.run_dir>/data/test.json`.
    #[arg(long)]
    pub data: Option<String>,
    /// Root of the split's image paths (default: the model's data.image_root, else the split's directory).
    #[arg(long)]
    pub image_root: Option<String>,
    /// Candidates per query re-ranked by ITM.
    #[arg(long, default_value_t = 128)]
    pub k_test: usize,
    /// Score of the main table: itm (ALBEF), itm+itc (LAVIS) or itc (no re-ranking).
    #[arg(long, default_value = "itm+itc")]
    pub score: String,
    /// (query, candidate) pairs per fusion forward.
    #[arg(long, default_value_t = 256)]
    pub itm_batch: usize,
    /// The JSON report (default: `<run>/eval/step-N.json` or `final.json` for a checkpoint of a run,
    /// `<job.run_dir>/eval/untrained.json` for --untrained).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Name of this evaluation in tables (default: "untrained" or "step N").
    #[arg(long)]
    pub label: Option<String>,
    /// An earlier report: print its table and this one side by side.
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

/// What `albef eval` writes.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EvalReport {
    pub label: String,
    pub model: String,
    pub step: Option<u64>,
    pub split: String,
    pub images: usize,
    pub texts: usize,
    pub k_test: usize,
    /// The scoring of the top-level metrics.
    pub score: Scoring,
    #[serde(flatten)]
    pub metrics: RetrievalMetrics,
    /// The metrics under every scoring.
    pub scores: RetrievalResults,
    /// What a random ranking would score.
    pub chance: RetrievalMetrics,
    pub seconds: f64,
    pub device: String,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    crate::data::runtime()
}

/// The model asked for, on the configured device.
pub fn load_model(args: &ModelArgs, handle: &Handle) -> Result<EvalModel> {
    match (&args.checkpoint, args.untrained) {
        (Some(path), _) if path.ends_with(".safetensors") => {
            let cfg = args.config.load()?;
            let dev = device_of(&cfg)?;
            from_safetensors(path, &cfg, dev, handle)
        }
        (Some(path), _) if path.ends_with(".pth") => {
            let cfg = args.config.load()?;
            from_pth(path, &cfg, device_of(&cfg)?)
        }
        (Some(path), _) => {
            let dir = resolve_checkpoint(path, handle)?;
            ensure!(
                args.config.config.is_none(),
                "--config applies to --untrained and bare .safetensors; a checkpoint brings its own (use --set to override)"
            );
            // The device is read from the overrides first, so the weights load straight onto it.
            let probe = from_checkpoint_config(&dir, &args.config.overrides, handle)?;
            from_checkpoint(&dir, &args.config.overrides, device_of(&probe)?, handle)
        }
        (None, true) => {
            let cfg = args.config.load()?;
            untrained(&cfg, device_of(&cfg)?)
        }
        (None, false) => bail!("name the model: --checkpoint PATH or --untrained"),
    }
}

fn from_checkpoint_config(dir: &Location, overrides: &[String], handle: &Handle) -> Result<AlbefConfig> {
    let bytes = handle.block_on(dir.join(albef_train::trainer::STATE_FILE).read_all())?;
    let saved: albef_train::SavedState = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}/{} is not a trainer state", dir.url, albef_train::trainer::STATE_FILE))?;
    albef_eval::model::config_with_overrides(&saved.config, overrides)
}

fn device_of(cfg: &AlbefConfig) -> Result<tch::Device> {
    let dev = device::resolve(cfg.train.device)?;
    device::configure_cuda(cfg.train.tf32)?;
    if cfg.train.num_threads > 0 {
        tch::set_num_threads(cfg.train.num_threads);
    }
    Ok(dev)
}

/// The tokenizer: --tokenizer, else data.tokenizer, else the first `vocab.txt` found beside
/// `beside` (a split or a data file), beside the training data, in the run's generated data, or
/// in the generated data of a run the model's checkpoint lies in.
pub fn load_tokenizer(
    explicit: Option<&str>,
    model: &EvalModel,
    beside: Option<&str>,
    handle: &Handle,
) -> Result<Tokenizer> {
    let cfg = &model.cfg;
    let url = match (explicit, cfg.data.tokenizer.as_str()) {
        (Some(t), _) => t.to_string(),
        (None, t) if !t.is_empty() => t.to_string(),
        (None, _) => {
            let mut candidates: Vec<String> =
                beside.map(|b| format!("{}/{VOCAB_TXT}", parent_of(b))).into_iter().collect();
            if let Some(first) = cfg.data.train_file.first() {
                candidates.push(format!("{}/{VOCAB_TXT}", parent_of(&first.source)));
            }
            candidates.push(format!("{}/data/{VOCAB_TXT}", cfg.job.run_dir.trim_end_matches('/')));
            for dir in Path::new(&model.source).ancestors().skip(1).take(3) {
                candidates.push(dir.join("data").join(VOCAB_TXT).to_string_lossy().into_owned());
            }
            let mut found = None;
            for c in &candidates {
                if Location::open(c).and_then(|l| handle.block_on(l.exists())).unwrap_or(false) {
                    found = Some(c.clone());
                    break;
                }
            }
            found
                .with_context(|| format!("no tokenizer given and none found (looked for {})", candidates.join(", ")))?
        }
    };
    let bytes =
        handle.block_on(Location::open(&url)?.read_all()).with_context(|| format!("reading the tokenizer {url}"))?;
    let dir = tempfile::tempdir()?;
    let name = url.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or(VOCAB_TXT);
    let path = dir.path().join(name);
    std::fs::write(&path, &bytes)?;
    let tok = Tokenizer::from_file(&path)?
        .with_options(TokenizerOptions { max_tokens: cfg.data.max_tokens, add_sep: cfg.data.add_sep })?;
    ensure!(
        tok.vocab_size() as i64 <= cfg.model.bert.vocab_size,
        "the tokenizer {url} has {} tokens but the model's vocabulary has {}",
        tok.vocab_size(),
        cfg.model.bert.vocab_size
    );
    Ok(tok)
}

/// The split to evaluate: --data, else the held-out split of the generated dataset the model
/// was trained on (`data/test.json` in the run the checkpoint lies in), else the one under
/// `job.run_dir` (generated now if the job has not done it yet).
fn split_url(data: Option<&str>, model: &EvalModel, handle: &Handle) -> Result<String> {
    if let Some(d) = data {
        return Ok(d.to_string());
    }
    let cfg = &model.cfg;
    ensure!(
        cfg.data.train_file.is_empty(),
        "--data is required when the configuration trains on data.train_file (there is no generated held-out split)"
    );
    if model.source != "untrained" {
        for dir in Path::new(&model.source).ancestors().skip(1).take(3) {
            let candidate = dir.join("data").join(TEST_JSON);
            if candidate.exists() {
                return Ok(candidate.to_string_lossy().into_owned());
            }
        }
    }
    let run = Path::new(&cfg.job.run_dir);
    training_sources(cfg, run, handle)?;
    Ok(run.join("data").join(TEST_JSON).to_string_lossy().into_owned())
}

fn default_out(model: &EvalModel, args: &EvalArgs) -> PathBuf {
    let source = Path::new(&model.source);
    if let (Some(name), Some(parent)) = (source.file_name(), source.parent()) {
        // A checkpoint of a run (`<run>/checkpoints/step-N`), or the final state `albef train`
        // leaves (`<run>/final`).
        let run = match parent.file_name() {
            Some(p) if p == "checkpoints" => parent.parent(),
            _ if name == "final" => Some(parent),
            _ => None,
        };
        if let Some(run) = run {
            return run.join("eval").join(format!("{}.json", name.to_string_lossy()));
        }
    }
    if args.model.untrained {
        return Path::new(&model.cfg.job.run_dir).join("eval").join("untrained.json");
    }
    PathBuf::from("retrieval-eval.json")
}

pub fn run(args: EvalArgs) -> Result<()> {
    let scoring: Scoring = args.score.parse()?;
    let rt = runtime()?;
    let handle = rt.handle();
    let started = Instant::now();
    let model = load_model(&args.model, handle)?;
    if let Some(classifier) = model.model.as_classifier() {
        return run_classification(&args, &model, classifier, handle);
    }
    if let Some(vqa) = model.model.as_any().downcast_ref::<AlbefVqa>() {
        return run_vqa(&args, &model, vqa, handle);
    }
    let cfg = &model.cfg;
    let split_url = split_url(args.data.as_deref(), &model, handle)?;
    let tokenizer = load_tokenizer(args.model.tokenizer.as_deref(), &model, Some(&split_url), handle)?;
    let split_opts = SplitOptions::for_data(&cfg.data, args.image_root.clone())?;
    let split = RetrievalSplit::load(&split_url, &tokenizer, &split_opts, handle)?;
    let opts = EvalOptions {
        k_test: args.k_test,
        batch_size: args.model.batch_size,
        itm_batch: args.itm_batch,
        bf16: cfg.train.bf16,
        ..EvalOptions::default()
    };
    let label = args.label.clone().unwrap_or_else(|| match model.step {
        Some(0) if model.source == "untrained" => "untrained".into(),
        Some(s) => format!("step {s}"),
        None => "model".into(),
    });
    eprintln!(
        "evaluating {} ({label}) on {split_url}: {} images, {} texts, k_test {}, on {:?}",
        model.source,
        split.num_images(),
        split.num_texts(),
        args.k_test,
        model.model.device()
    );
    let results = evaluate(model.albef()?, &split, &opts)?;
    let report = EvalReport {
        label: label.clone(),
        model: model.source.clone(),
        step: model.step,
        split: split_url.clone(),
        images: split.num_images(),
        texts: split.num_texts(),
        k_test: args.k_test,
        score: scoring,
        metrics: *results.get(scoring),
        scores: results,
        chance: chance(&split.truth),
        seconds: started.elapsed().as_secs_f64(),
        device: format!("{:?}", model.model.device()),
    };
    let out = args.out.clone().unwrap_or_else(|| default_out(&model, &args));
    write_report(&out, &report)?;

    let mut columns: Vec<(String, RetrievalMetrics)> = vec![];
    if let Some(path) = &args.compare {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let earlier: EvalReport =
            serde_json::from_str(&text).with_context(|| format!("{} is no eval report", path.display()))?;
        ensure!(
            (earlier.images, earlier.texts) == (report.images, report.texts),
            "{} evaluated another split ({} images, {} texts)",
            path.display(),
            earlier.images,
            earlier.texts
        );
        columns.push((earlier.label.clone(), *earlier.scores.get(scoring)));
    }
    columns.push((label, report.metrics));
    println!("{}", summary(&report, &columns, scoring));
    println!("report written to {}", out.display());
    Ok(())
}

/// The printed result: the split, the table (earlier evaluations first, then chance), and how
/// re-ranking compares with ITC alone.
/// Writes a report as JSON at `out`, creating its folder.
pub fn write_report(out: &Path, report: &impl Serialize) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_vec_pretty(report)?).with_context(|| format!("writing {}", out.display()))
}

/// What `albef eval` measured of an SNLI-VE model.
#[derive(Serialize, Deserialize, Debug)]
pub struct AccuracyReport {
    pub model: String,
    pub step: Option<u64>,
    pub split: String,
    pub rows: usize,
    /// Percent of the rows classified right.
    pub accuracy: f64,
    pub seconds: f64,
    pub device: String,
}

/// A classifier's accuracy on the labelled split of --data (SNLI-VE rows `{image, sentence,
/// label}`, NLVR2 rows `{images, sentence, label}`).
fn run_classification(args: &EvalArgs, model: &EvalModel, classifier: &dyn Classifier, handle: &Handle) -> Result<()> {
    let started = Instant::now();
    let task = model.cfg.task.name();
    let url =
        args.data.as_deref().with_context(|| format!("--data: a {task} model is evaluated on a labelled split"))?;
    let classes = task_model::classes(model.cfg.task).context("the model classifies rows")?;
    let tokenizer = load_tokenizer(args.model.tokenizer.as_deref(), model, Some(url), handle)?;
    let d = &model.cfg.data;
    let opts = SplitOptions::for_data(d, args.image_root.clone())?;
    let split = LabelledSplit::load(url, classes, &opts, handle)?;
    let counts = accuracy_shard(classifier, &split, &tokenizer, (args.model.batch_size, model.cfg.train.bf16), (0, 1))?;
    let report = AccuracyReport {
        model: model.source.clone(),
        step: model.step,
        split: url.to_string(),
        rows: split.len(),
        accuracy: accuracy(&counts)?,
        seconds: started.elapsed().as_secs_f64(),
        device: format!("{:?}", model.model.device()),
    };
    let out = args.out.clone().unwrap_or_else(|| default_out(model, args));
    write_report(&out, &report)?;
    println!("accuracy {:.2}% on {} rows of {url} ({})", report.accuracy, report.rows, model.source);
    println!("report written to {}", out.display());
    Ok(())
}

/// What `albef eval` measured of a VQA model.
#[derive(Serialize, Deserialize, Debug)]
pub struct AnswerReport {
    pub model: String,
    pub step: Option<u64>,
    pub split: String,
    pub questions: usize,
    pub candidates: usize,
    /// The official VQA accuracy in percent, where the split gives the human answers.
    pub vqa_accuracy: Option<f64>,
    /// The answers, as the VQA evaluation server takes them.
    pub answers: String,
    pub seconds: f64,
    pub device: String,
}

/// A VQA model's answers to the questions of --data (rows `{question_id, question, image}`, with
/// `answer` for the accuracy), from the candidates of the model's `job.answer_list` (else the
/// split's answers): written beside the report as `<report>.answers.json`.
fn run_vqa(args: &EvalArgs, model: &EvalModel, vqa: &AlbefVqa, handle: &Handle) -> Result<()> {
    let started = Instant::now();
    let url = args.data.as_deref().context("--data: a VQA model answers the questions of a split")?;
    let tokenizer = load_tokenizer(args.model.tokenizer.as_deref(), model, Some(url), handle)?;
    let cfg = &model.cfg;
    let opts = SplitOptions::for_data(&cfg.data, args.image_root.clone())?;
    let split = QuestionSplit::load(url, &opts, handle)?;
    let texts = candidate_answers(&cfg.job.answer_list, &split, handle)?;
    let candidates = AnswerList::new(texts, &tokenizer, model.model.device())?;
    let answer = AnswerOptions {
        batch_size: args.model.batch_size,
        bf16: cfg.train.bf16,
        k: args.k_test as i64,
        scoring: cfg.job.answer_scoring,
    };
    let chosen = answer_shard(vqa, &split, &tokenizer, &candidates, answer, (0, 1))?;
    let answers = chosen_answers(&chosen, &candidates)?;
    let out = args.out.clone().unwrap_or_else(|| default_out(model, args));
    let answers_file = out.with_extension("answers.json");
    write_results(&answers_file, &split, &answers)?;
    let report = AnswerReport {
        model: model.source.clone(),
        step: model.step,
        split: url.to_string(),
        questions: split.len(),
        candidates: candidates.texts.len(),
        vqa_accuracy: split.answered().then(|| split_accuracy(&split, &answers)),
        answers: answers_file.display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
        device: format!("{:?}", model.model.device()),
    };
    write_report(&out, &report)?;
    if let Some(accuracy) = report.vqa_accuracy {
        println!("VQA accuracy {accuracy:.2}% on {} questions of {url} ({})", report.questions, model.source);
    }
    println!("answers written to {}, report to {}", answers_file.display(), out.display());
    Ok(())
}

pub fn summary(report: &EvalReport, columns: &[(String, RetrievalMetrics)], scoring: Scoring) -> String {
    let mut cols: Vec<(&str, &RetrievalMetrics)> = columns.iter().map(|(l, m)| (l.as_str(), m)).collect();
    cols.push(("chance", &report.chance));
    let s = &report.scores;
    format!(
        "zero-shot retrieval on {} ({} images, {} texts; scores: {}, top {} re-ranked), in percent:\n{}\
         r_mean of {}: itc alone {:.2}, itm {:.2}, itm+itc {:.2}",
        report.split,
        report.images,
        report.texts,
        scoring.name(),
        report.k_test,
        table(&cols),
        report.label,
        s.itc.r_mean,
        s.itm.r_mean,
        s.itm_itc.r_mean
    )
}
