//! A retrieval split in the reference's annotation format: a JSON list of
//! `{"image": path, "caption": str | [str], "image_id": ...}`, one entry per image, its captions
//! numbered in order (as the reference's `re_eval_dataset`). Captions go through pre_caption and
//! the tokenizer; images are read once and decoded batch by batch with the test transform
//! (bicubic resize to the model's resolution, no crop).

use crate::metrics::GroundTruth;
use albef_data::bad::SkipCounts;
use albef_data::batch::normalize_rgb;
use albef_data::pre_caption;
use albef_data::sources::{annotation_image, parse_annotations, path_rewrites};
use albef_data::store::{Location, parent_of};
use albef_data::tokenizer::Tokenizer;
use albef_data::transform::{decode_rgb, resize_exact};
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use tokio::runtime::Handle;

/// Where images are read from, how captions are cleaned.
#[derive(Clone, Debug)]
pub struct SplitOptions {
    /// Root of the annotation's image paths; None: the annotation file's directory.
    pub image_root: Option<String>,
    /// Prefix replacements of the image paths, applied before the root (`data.path_rewrite`).
    pub path_rewrite: Vec<(String, String)>,
    /// Words kept by pre_caption.
    pub max_words: usize,
    /// Images whose header declares more pixels are refused.
    pub max_pixels: u64,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions { image_root: None, path_rewrite: vec![], max_words: 30, max_pixels: 89_478_485 }
    }
}

impl SplitOptions {
    /// A split read as the training data is: `data.image_root` (unless `image_root` overrides
    /// it; neither: the split's folder), `data.path_rewrite`, the caption and pixel limits.
    pub fn for_data(d: &albef_config::DataConfig, image_root: Option<String>) -> Result<Self> {
        Ok(SplitOptions {
            image_root: image_root.or_else(|| (!d.image_root.is_empty()).then(|| d.image_root.clone())),
            path_rewrite: path_rewrites(&d.path_rewrite)?,
            max_words: d.max_words,
            max_pixels: d.max_pixels,
        })
    }

    /// Where the image paths of the annotation file `url` start.
    pub fn root_of(&self, url: &str) -> Result<Location> {
        Location::open(&self.image_root.clone().unwrap_or_else(|| parent_of(url)))
    }
}

/// An image-text retrieval split, ready for the encoders.
pub struct RetrievalSplit {
    /// The annotation file it was read from.
    pub source: String,
    /// Image paths as the annotation names them, in order.
    pub image_keys: Vec<String>,
    images: Vec<Bytes>,
    /// Every caption after pre_caption, image by image.
    pub texts: Vec<String>,
    pub truth: GroundTruth,
    /// Token ids and mask of every text, (texts, seq_len) row-major, padded to the longest.
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub seq_len: usize,
    max_pixels: u64,
}

impl RetrievalSplit {
    /// Reads the annotation file `url` and every image it names.
    pub fn load(url: &str, tokenizer: &Tokenizer, opts: &SplitOptions, handle: &Handle) -> Result<Self> {
        let bytes = handle.block_on(Location::open(url)?.read_all())?;
        let skips = SkipCounts::default();
        let entries = parse_annotations(&bytes, url, &skips)?;
        if skips.total() > 0 {
            bail!("{url}: entries that are not retrieval annotations:\n{}", skips.summary());
        }
        ensure!(!entries.is_empty(), "{url} lists no images");
        let entries: Vec<_> = entries.into_iter().flatten().collect();
        let root = opts.root_of(url)?;

        let mut texts = vec![];
        let mut counts = vec![];
        for (i, e) in entries.iter().enumerate() {
            let cleaned: Vec<String> = e.captions.iter().map(|c| pre_caption(c, opts.max_words)).collect();
            ensure!(
                cleaned.iter().all(|c| !c.is_empty()),
                "{url}: entry {i} ({}) has a caption that pre_caption empties",
                e.image
            );
            counts.push(cleaned.len());
            texts.extend(cleaned);
        }
        let truth = GroundTruth::consecutive(&counts)?;

        let image_keys: Vec<String> = entries.iter().map(|e| e.image.clone()).collect();
        let images = read_images(&root, &image_keys, opts, handle)?;

        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (input_ids, attention_mask, seq_len) = tokenizer.encode_batch(&refs);
        Ok(RetrievalSplit {
            source: url.to_string(),
            image_keys,
            images,
            texts,
            truth,
            input_ids,
            attention_mask,
            seq_len,
            max_pixels: opts.max_pixels,
        })
    }

    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    pub fn num_texts(&self) -> usize {
        self.texts.len()
    }

    /// Images `range` decoded, resized to `res` x `res` and normalised: (n, 3, res, res)
    /// row-major. Decoding runs on up to `threads` threads.
    pub fn pixels(&self, range: std::ops::Range<usize>, res: usize, threads: usize) -> Result<Vec<f32>> {
        decode_images(&self.images[range.clone()], &self.image_keys[range], res, self.max_pixels, threads)
    }
}

/// The row ranges of rank `rank`'s share of `rows` rows in batches of `batch_size`: every
/// `world`-th batch.
pub fn rank_batches(
    rows: usize,
    batch_size: usize,
    (rank, world): (usize, usize),
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let b = batch_size.max(1);
    (0..rows).step_by(b).skip(rank).step_by(world.max(1)).map(move |start| start..(start + b).min(rows))
}

/// Rows of a split as the model reads them, on its device: images (n, 3, res, res) with the test
/// transform, texts tokenised and padded.
pub struct EvalBatch {
    pub image: tch::Tensor,
    pub ids: tch::Tensor,
    pub mask: tch::Tensor,
}

impl EvalBatch {
    /// The encoded `images` (named `keys`, for errors) and `texts` of some rows.
    pub fn load(
        (images, keys, texts): (&[Bytes], &[String], &[String]),
        (res, max_pixels): (usize, u64),
        tokenizer: &Tokenizer,
        device: tch::Device,
    ) -> Result<Self> {
        let n = images.len() as i64;
        let pixels = decode_images(images, keys, res, max_pixels, 1)?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (ids, mask, len) = tokenizer.encode_batch(&refs);
        let res = res as i64;
        Ok(EvalBatch {
            image: tch::Tensor::from_slice(&pixels).view([n, 3, res, res]).to_device(device),
            ids: tch::Tensor::from_slice(&ids).view([n, len as i64]).to_device(device),
            mask: tch::Tensor::from_slice(&mask).view([n, len as i64]).to_device(device),
        })
    }

    pub fn batch(&self) -> albef_model::Batch<'_> {
        albef_model::Batch::new(&self.image, &self.ids, &self.mask)
    }
}

/// Reads the images `keys` name under `root` (after `opts.path_rewrite`), 16 at a time.
pub fn read_images(root: &Location, keys: &[String], opts: &SplitOptions, handle: &Handle) -> Result<Vec<Bytes>> {
    let locations = keys
        .iter()
        .map(|k| annotation_image(root, k, &opts.path_rewrite))
        .collect::<std::result::Result<Vec<_>, String>>()
        .map_err(|why| {
            anyhow::anyhow!(
                "{why} (data.path_rewrite maps such paths, e.g. /export/share/datasets/vision/coco/images/=coco/)"
            )
        })?;
    handle.block_on(async {
        futures::stream::iter(locations.into_iter().map(|loc| async move { loc.read_all().await }))
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()
    })
}

/// Decodes encoded images with the test transform into one (n, 3, res, res) buffer.
pub fn decode_images(
    images: &[Bytes],
    names: &[String],
    res: usize,
    max_pixels: u64,
    threads: usize,
) -> Result<Vec<f32>> {
    let per_image = 3 * res * res;
    let mut out = vec![0f32; images.len() * per_image];
    let chunk = images.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| -> Result<()> {
        let jobs: Vec<_> = out
            .chunks_mut(chunk * per_image)
            .zip(images.chunks(chunk).zip(names.chunks(chunk)))
            .map(|(dst, (imgs, names))| {
                s.spawn(move || -> Result<()> {
                    let mut buf = Vec::with_capacity(per_image);
                    for ((bytes, name), dst) in imgs.iter().zip(names).zip(dst.chunks_mut(per_image)) {
                        let rgb = decode_rgb(bytes, max_pixels).with_context(|| format!("decoding {name}"))?;
                        buf.clear();
                        normalize_rgb(resize_exact(&rgb, res as u32).as_raw(), res, &mut buf);
                        dst.copy_from_slice(&buf);
                    }
                    Ok(())
                })
            })
            .collect();
        for j in jobs {
            j.join().map_err(|_| anyhow::anyhow!("an image decoding thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(out)
}
