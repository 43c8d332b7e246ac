//! Accuracy of a classifying task (SNLI-VE, NLVR2) on a labelled split in the reference's
//! annotation format: a JSON list of `{"image": path, "sentence": str, "label": class}` (NLVR2:
//! `"images": [path, path]`), images read with the test transform. In a job each rank classifies
//! its share of the rows and the ranks sum the counts.

use crate::split::{EvalBatch, SplitOptions, decode_images, rank_batches, read_images};
use albef_data::bad::SkipCounts;
use albef_data::pre_caption;
use albef_data::sources::parse_annotations;
use albef_data::store::Location;
use albef_data::tokenizer::Tokenizer;
use albef_model::device::with_autocast;
use albef_model::task_model::Classifier;
use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use tch::{Device, Kind, Tensor};
use tokio::runtime::Handle;

/// A labelled split, ready for the model.
pub struct LabelledSplit {
    pub source: String,
    pub image_keys: Vec<String>,
    images: Vec<Bytes>,
    /// Each row's second image (NLVR2), when the rows have two.
    second_images: Option<(Vec<String>, Vec<Bytes>)>,
    pub texts: Vec<String>,
    /// Each row's class id (its index in the task's classes).
    pub labels: Vec<i64>,
    max_pixels: u64,
}

impl LabelledSplit {
    /// Reads the annotation file `url` and every image it names; a row whose label is not one of
    /// `classes` is an error naming it (an evaluation must not quietly drop rows).
    pub fn load(url: &str, classes: &[&str], opts: &SplitOptions, handle: &Handle) -> Result<Self> {
        let bytes = handle.block_on(Location::open(url)?.read_all())?;
        let skips = SkipCounts::default();
        let entries = parse_annotations(&bytes, url, &skips)?;
        ensure!(skips.total() == 0, "{url}: rows that are not annotations: {}", skips.summary());
        let root = opts.root_of(url)?;
        let (mut image_keys, mut second_keys, mut texts, mut labels) = (vec![], vec![], vec![], vec![]);
        for (i, e) in entries.into_iter().flatten().enumerate() {
            let label = e.label.as_deref().unwrap_or("none");
            let class = classes.iter().position(|c| *c == label);
            let class = class.with_context(|| format!("{url}: row {i}: label {label:?} is not one of {classes:?}"))?;
            image_keys.push(e.image);
            second_keys.extend(e.second_image);
            texts.push(pre_caption(&e.captions[0], opts.max_words));
            labels.push(class as i64);
        }
        ensure!(!labels.is_empty(), "{url} lists no rows");
        ensure!(
            second_keys.is_empty() || second_keys.len() == labels.len(),
            "{url}: {} of {} rows name two images: a split's rows have one image each or two",
            second_keys.len(),
            labels.len()
        );
        let images = read_images(&root, &image_keys, opts, handle)?;
        let second_images = match second_keys.is_empty() {
            true => None,
            false => Some((second_keys.clone(), read_images(&root, &second_keys, opts, handle)?)),
        };
        Ok(LabelledSplit {
            source: url.to_string(),
            image_keys,
            images,
            second_images,
            texts,
            labels,
            max_pixels: opts.max_pixels,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// (correct, rows) of rank `rank`'s share of the rows (every `world`-th batch), as a Float
/// tensor of two elements on the model's device, for the ranks to sum.
pub fn accuracy_shard(
    model: &dyn Classifier,
    split: &LabelledSplit,
    tokenizer: &Tokenizer,
    (batch_size, bf16): (usize, bool),
    (rank, world): (usize, usize),
) -> Result<Tensor> {
    let (dev, res) = (model.device(), model.config().image_res as usize);
    let (mut correct, mut classified) = (0i64, 0i64);
    for rows in rank_batches(split.len(), batch_size, (rank, world)) {
        let r = rows.clone();
        let loaded = (&split.images[r.clone()], &split.image_keys[r.clone()], &split.texts[r.clone()]);
        let mut b = EvalBatch::load(loaded, (res, split.max_pixels), tokenizer, dev)?;
        if let Some((keys, images)) = &split.second_images {
            let pixels = decode_images(&images[r.clone()], &keys[r.clone()], res, split.max_pixels, 1)?;
            let second = Tensor::from_slice(&pixels).view_as(&b.image).to_device(dev);
            b.image = Tensor::stack(&[&b.image, &second], 1);
        }
        let logits = tch::no_grad(|| with_autocast(dev, bf16, || model.predict(&b.batch())))?;
        let predicted = logits.argmax(1, false);
        let truth = Tensor::from_slice(&split.labels[r]).to_device(dev);
        correct += predicted.eq_tensor(&truth).sum(Kind::Int64).int64_value(&[]);
        classified += rows.len() as i64;
    }
    Ok(Tensor::from_slice(&[correct as f32, classified as f32]).to_device(dev))
}

/// Accuracy in percent from summed (correct, rows).
pub fn accuracy(counts: &Tensor) -> Result<f64> {
    let v = Vec::<f32>::try_from(counts.to_device(Device::Cpu))?;
    ensure!(v.len() == 2 && v[1] > 0.0, "no rows were classified");
    Ok(100.0 * f64::from(v[0]) / f64::from(v[1]))
}
