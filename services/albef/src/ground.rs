//! `albef ground`: weakly supervised grounding of a grounding checkpoint on a split of referring
//! expressions (RefCOCO+'s `{image, text, ref_id}`): the proposal box the Grad-CAM map of the ITM
//! score picks for each, its IoU with the referred object, accuracy per split; with
//! `--visualize`, a picture per expression (heat map, chosen box, true box).

use crate::eval::{ModelArgs, load_model, load_tokenizer, runtime};
use albef_config::GradcamMode;
use albef_eval::SplitOptions;
use albef_eval::gradcam::{ExpressionSplit, GroundingInputs, GroundingOptions, ground_shard};
use albef_eval::grounding::{BoxXywh, Grounded, Referent, render};
use albef_eval::model::EvalModel;
use anyhow::{Context, Result, ensure};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::runtime::Handle;

#[derive(Args, Debug)]
pub struct GroundArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Referring expressions (`[{image, text, ref_id}]`, the reference's refcoco+_val.json);
    /// default: the model's job.eval_data.
    #[arg(long)]
    pub data: Option<String>,
    /// Root of the split's image paths (default: the model's data.image_root, else the split's directory).
    #[arg(long)]
    pub image_root: Option<String>,
    /// The refer toolkit's refs(unc).p (or the same list as JSON); default: job.refs_file.
    #[arg(long)]
    pub refs: Option<String>,
    /// COCO's instances.json; default: job.instances_file.
    #[arg(long)]
    pub instances: Option<String>,
    /// Proposal boxes per image (dets.json); default: job.proposals_file.
    #[arg(long)]
    pub proposals: Option<String>,
    /// Whose score the map explains: itm (the ITM match logit, through a fusion layer's
    /// cross-attention) or itc (the image-text similarity, through an image-encoder block's
    /// attention); default: job.gradcam_mode.
    #[arg(long, value_parser = ["itm", "itc"])]
    pub mode: Option<String>,
    /// The layer whose attention gives the map (a fusion layer for itm, an image-encoder block for
    /// itc); default: job.gradcam_block.
    #[arg(long)]
    pub block: Option<usize>,
    /// The JSON report: accuracy per split and every expression's box.
    #[arg(long, default_value = "grounding.json")]
    pub out: PathBuf,
    /// A folder for a PNG per expression (`<ref_id>.png`): the heat map over the image, the
    /// chosen box in green and the referred object's in red.
    #[arg(long)]
    pub visualize: Option<PathBuf>,
}

/// One expression's outcome, as the report lists it.
#[derive(Serialize)]
struct Expression {
    ref_id: i64,
    image: String,
    text: String,
    split: &'static str,
    chosen: BoxXywh,
    truth: BoxXywh,
    iou: f64,
    correct: bool,
}

#[derive(Serialize)]
struct GroundingReport {
    model: String,
    step: Option<u64>,
    split: String,
    mode: GradcamMode,
    block: usize,
    /// Accuracy in percent per RefCOCO+ split and over all, and the rows without proposals.
    metrics: BTreeMap<String, f64>,
    expressions: Vec<Expression>,
    seconds: f64,
}

pub fn run(args: GroundArgs) -> Result<()> {
    let started = Instant::now();
    let rt = runtime()?;
    let handle = rt.handle();
    let model = load_model(&args.model, handle)?;
    let (url, inputs) = read_inputs(&args, &model, handle)?;
    let tokenizer = load_tokenizer(args.model.tokenizer.as_deref(), &model, Some(&url), handle)?;
    let opts = SplitOptions::for_data(&model.cfg.data, args.image_root.clone())?;
    let split = ExpressionSplit::load(&url, &inputs.refs, &opts, handle)?;
    let j = &model.cfg.job;
    let mode = match &args.mode {
        Some(m) => serde_json::from_value(serde_json::Value::String(m.clone()))?,
        None => j.gradcam_mode,
    };
    let block = args.block.unwrap_or(j.gradcam_block as usize);
    let opts = GroundingOptions { mode, block, batch_size: args.model.batch_size };
    if let Some(dir) = &args.visualize {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut expressions = vec![];
    let shard = ground_shard(model.albef()?, &split, &inputs, &tokenizer, opts, (0, 1), |row, referent, grounded| {
        if let Some(dir) = &args.visualize {
            draw(dir, &split, row, referent, grounded)?;
        }
        expressions.push(Expression {
            ref_id: referent.ref_id,
            image: split.image_keys[row].clone(),
            text: split.texts[row].clone(),
            split: referent.split.name(),
            chosen: grounded.chosen,
            truth: referent.bbox,
            iou: grounded.iou,
            correct: grounded.correct(),
        });
        Ok(())
    })?;
    println!("{} ({} expressions of {url}, {})", shard.summary(), split.len(), model.source);
    let seconds = started.elapsed().as_secs_f64();
    let metrics = shard.metrics();
    let report = GroundingReport {
        model: model.source.clone(),
        step: model.step,
        split: url,
        mode,
        block,
        metrics,
        expressions,
        seconds,
    };
    crate::eval::write_report(&args.out, &report)?;
    println!("report written to {}", args.out.display());
    if let Some(dir) = &args.visualize {
        println!("pictures written to {}", dir.display());
    }
    Ok(())
}

/// The expressions' file and the annotations: each given, else the model's `job.*`.
fn read_inputs(args: &GroundArgs, model: &EvalModel, handle: &Handle) -> Result<(String, GroundingInputs)> {
    let j = &model.cfg.job;
    let pick = |given: &Option<String>, configured: &str, what: &str| {
        given
            .clone()
            .or_else(|| (!configured.is_empty()).then(|| configured.to_string()))
            .with_context(|| format!("--{what}: the model's configuration names none"))
    };
    let url = pick(&args.data, &j.eval_data, "data")?;
    let refs = pick(&args.refs, &j.refs_file, "refs")?;
    let instances = pick(&args.instances, &j.instances_file, "instances")?;
    let proposals = pick(&args.proposals, &j.proposals_file, "proposals")?;
    let inputs = GroundingInputs::load(&refs, &instances, &proposals, model.cfg.data.max_pixels, handle)?;
    Ok((url, inputs))
}

/// Row `row`'s picture under `dir` (`<ref_id>.png`): its heat map, chosen box and true box.
fn draw(dir: &Path, split: &ExpressionSplit, row: usize, referent: &Referent, grounded: &Grounded) -> Result<()> {
    let img = split.image(row)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    ensure!(
        (w, h) == (referent.width as usize, referent.height as usize),
        "{}: the image is {w} x {h} but instances.json says {} x {}",
        split.image_keys[row],
        referent.width,
        referent.height
    );
    let picture = render(img.as_raw(), (w, h), &grounded.heat, &grounded.chosen, Some(&referent.bbox));
    let path = dir.join(format!("{}.png", referent.ref_id));
    image::save_buffer(&path, &picture, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("writing {}", path.display()))
}
