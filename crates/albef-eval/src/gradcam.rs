//! Weakly supervised grounding over a split of referring expressions, as the reference's
//! Grounding.py (`val`, then `grounding_eval`): each expression's Grad-CAM map of the ITM or ITC
//! score ([`Albef::gradcam`]) grounded among its image's proposal boxes ([`grounding::ground`]),
//! tallied per RefCOCO+ split. In a job each rank grounds its share of the rows and the ranks sum
//! the tallies.

use crate::grounding::{self, BoxXywh, Grounded, GroundingTally, RefCoco, Referent};
use crate::split::{EvalBatch, SplitOptions, rank_batches, read_images};
use albef_config::GradcamMode;
use albef_data::pre_caption;
use albef_data::store::Location;
use albef_data::tokenizer::Tokenizer;
use albef_data::transform::decode_rgb;
use albef_model::{Albef, TaskModel};
use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use tch::{Device, Kind, Tensor};
use tokio::runtime::Handle;

/// A split of referring expressions (the reference's refcoco+_val.json / refcoco+_test.json: rows
/// `{image, text, ref_id}`), its images read.
pub struct ExpressionSplit {
    pub source: String,
    pub image_keys: Vec<String>,
    images: Vec<Bytes>,
    /// Every expression after pre_caption.
    pub texts: Vec<String>,
    pub ref_ids: Vec<i64>,
    max_pixels: u64,
}

#[derive(Deserialize)]
struct ExpressionRow {
    image: String,
    text: String,
    ref_id: i64,
}

impl ExpressionSplit {
    /// Reads `url` and every image it names; a row of another shape, or whose ref_id `refs` does
    /// not know, is an error naming it (an evaluation must not quietly drop rows).
    pub fn load(url: &str, refs: &RefCoco, opts: &SplitOptions, handle: &Handle) -> Result<Self> {
        let bytes = handle.block_on(Location::open(url)?.read_all())?;
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&bytes).with_context(|| format!("{url} is not a JSON list of expressions"))?;
        let (mut image_keys, mut texts, mut ref_ids) = (vec![], vec![], vec![]);
        for (i, row) in rows.into_iter().enumerate() {
            let row: ExpressionRow = serde_json::from_value(row)
                .with_context(|| format!("{url}: row {i}: expected {{image, text, ref_id}}"))?;
            ensure!(refs.get(row.ref_id).is_some(), "{url}: row {i}: ref_id {} is not in the refs file", row.ref_id);
            image_keys.push(row.image);
            texts.push(pre_caption(&row.text, opts.max_words));
            ref_ids.push(row.ref_id);
        }
        ensure!(!ref_ids.is_empty(), "{url} lists no expressions");
        let images = read_images(&opts.root_of(url)?, &image_keys, opts, handle)?;
        Ok(ExpressionSplit { source: url.to_string(), image_keys, images, texts, ref_ids, max_pixels: opts.max_pixels })
    }

    pub fn len(&self) -> usize {
        self.ref_ids.len()
    }

    /// Row `row`'s image as stored, decoded (for pictures of the outcome).
    pub fn image(&self, row: usize) -> Result<image::RgbImage> {
        decode_rgb(&self.images[row], self.max_pixels).with_context(|| format!("decoding {}", self.image_keys[row]))
    }

    pub fn is_empty(&self) -> bool {
        self.ref_ids.is_empty()
    }
}

/// The annotations a grounding evaluation reads besides its split.
pub struct GroundingInputs {
    pub refs: RefCoco,
    /// Proposal boxes by image id.
    pub proposals: HashMap<i64, Vec<BoxXywh>>,
}

impl GroundingInputs {
    /// Reads the refs (`refs(unc).p` or JSON), COCO's instances.json (an image over `max_pixels`
    /// is refused) and the proposals file (dets.json).
    pub fn load(refs: &str, instances: &str, proposals: &str, max_pixels: u64, handle: &Handle) -> Result<Self> {
        let refs = RefCoco::load(refs, instances, max_pixels, handle)?;
        Ok(GroundingInputs { refs, proposals: grounding::load_proposals(proposals, handle)? })
    }
}

/// A rank's share of a split grounded: the tally, and the expressions whose image has no
/// proposals (skipped: nothing to choose from).
#[derive(Default)]
pub struct ShardGrounding {
    pub tally: GroundingTally,
    pub without_proposals: u64,
}

impl ShardGrounding {
    /// The counts as a tensor on `device` for the ranks to sum: the tally's, then the skipped rows.
    pub fn to_tensor(&self, device: Device) -> Tensor {
        let mut v = self.tally.to_vec();
        v.push(self.without_proposals as f32);
        Tensor::from_slice(&v).to_device(device)
    }

    /// The counts of [`ShardGrounding::to_tensor`] (or their sum over ranks).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let v = Vec::<f32>::try_from(t.to_device(Device::Cpu))?;
        let (skipped, tally) = v.split_last().context("no grounding counts")?;
        Ok(ShardGrounding { tally: GroundingTally::from_vec(tally)?, without_proposals: *skipped as u64 })
    }

    /// Accuracy in percent per split with rows (`val`, `testA`, `testB`) and over all of them
    /// (`accuracy`), and the rows skipped for want of proposals (`without_proposals`).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let counts = self.tally.to_vec();
        let (correct, total) = counts.chunks_exact(2).fold((0.0, 0.0), |(c, n), p| (c + p[0], n + p[1]));
        let mut metrics: BTreeMap<String, f64> =
            self.tally.accuracies().into_iter().map(|(split, acc)| (split.to_string(), acc)).collect();
        if total > 0.0 {
            metrics.insert(OVERALL.to_string(), 100.0 * f64::from(correct) / f64::from(total));
        }
        metrics.insert("without_proposals".to_string(), self.without_proposals as f64);
        metrics
    }

    /// One line for a person.
    pub fn summary(&self) -> String {
        let splits: Vec<String> = self.tally.accuracies().iter().map(|(s, a)| format!("{s} {a:.1}%")).collect();
        let skipped = match self.without_proposals {
            0 => String::new(),
            n => format!(", {n} without proposals skipped"),
        };
        format!("grounding accuracy {}{skipped}", splits.join(" "))
    }
}

/// The metric over every evaluated row of a split: what selects the best checkpoint.
pub const OVERALL: &str = "accuracy";

/// How a split is grounded: the Grad-CAM's mode and layer (`job.gradcam_mode`,
/// `job.gradcam_block`), and the rows per forward.
#[derive(Clone, Copy, Debug)]
pub struct GroundingOptions {
    pub mode: GradcamMode,
    pub block: usize,
    pub batch_size: usize,
}

/// Grounds rank `rank`'s share of `split` (every `world`-th batch of rows) with the Grad-CAM of
/// `opts`; `each` sees every grounded row (its index in the split, its referent, the outcome).
pub fn ground_shard(
    model: &Albef,
    split: &ExpressionSplit,
    inputs: &GroundingInputs,
    tokenizer: &Tokenizer,
    opts: GroundingOptions,
    (rank, world): (usize, usize),
    mut each: impl FnMut(usize, &Referent, &Grounded) -> Result<()>,
) -> Result<ShardGrounding> {
    let (dev, res) = (model.device(), model.config().image_res as usize);
    let mut shard = ShardGrounding::default();
    model.config().gradcam_layers(opts.mode, opts.block as u64)?;
    for rows in rank_batches(split.len(), opts.batch_size, (rank, world)) {
        let r = rows.clone();
        let loaded = (&split.images[r.clone()], &split.image_keys[r.clone()], &split.texts[r.clone()]);
        let b = EvalBatch::load(loaded, (res, split.max_pixels), tokenizer, dev)?;
        let maps = model.gradcam(opts.mode, &b.image, &b.ids, &b.mask, opts.block);
        let maps = maps.to_device(Device::Cpu).to_kind(Kind::Float);
        let grid = maps.size()[1] as usize;
        let maps = Vec::<f32>::try_from(maps.flatten(0, -1))?;
        for (row, map) in rows.zip(maps.chunks_exact(grid * grid)) {
            let referent = inputs.refs.get(split.ref_ids[row]).expect("checked when the split was read");
            let proposals = inputs.proposals.get(&referent.image_id).map(Vec::as_slice).unwrap_or_default();
            match grounding::ground(map, grid, referent, proposals)? {
                Some(grounded) => {
                    shard.tally.add(referent.split, grounded.correct());
                    each(row, referent, &grounded)?;
                }
                None => shard.without_proposals += 1,
            }
        }
    }
    Ok(shard)
}
