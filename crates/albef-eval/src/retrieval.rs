//! Zero-shot retrieval with a trained ALBEF, as the reference's `evaluation()`:
//!
//! 1. Every image through the image encoder (all tokens kept) and its normalised ITC feature;
//!    every caption through the text encoder (mode `text`) and its normalised ITC feature.
//! 2. `sims = image_feat @ text_feat^T`.
//! 3. For each image, its `k_test` most similar texts are scored with the ITM "match" logit of a
//!    fusion forward over (text tokens, image tokens); the other texts get -100. Likewise for each
//!    text over images. LAVIS adds the ITC similarity to the ITM logit ([`Scoring::ItmItc`]).
//!
//! Everything runs batched, without gradient and in evaluation mode (dropout off), on the
//! model's device. In a job every rank extracts all features (cheap) and re-ranks its own rows
//! of both directions (the expensive part): [`evaluate_shard`], then a sum over ranks of
//! [`ShardScores::reducible`], then [`ShardScores::results`].

use crate::metrics::{GroundTruth, RetrievalMetrics, ScoreMatrix, retrieval_metrics};
use crate::split::RetrievalSplit;
use albef_data::progress::{self, Progress};
use albef_model::device::with_autocast;
use albef_model::{Albef, TaskModel};
use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// How a split is evaluated.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Candidates per query re-ranked by ITM (reference: 128 on Flickr30K, 256 on COCO).
    pub k_test: usize,
    /// Images or texts per encoder forward.
    pub batch_size: usize,
    /// (query, candidate) pairs per fusion forward.
    pub itm_batch: usize,
    /// bf16 autocast on CUDA (ignored on the CPU).
    pub bf16: bool,
    /// Threads decoding images.
    pub decode_threads: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            k_test: 128,
            batch_size: 64,
            itm_batch: 256,
            bf16: true,
            decode_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Which score ranks the candidates.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// The ITC similarity alone (no re-ranking).
    #[serde(rename = "itc")]
    Itc,
    /// The ITM match logit of the top k_test (the original ALBEF).
    #[serde(rename = "itm")]
    Itm,
    /// ITM logit + ITC similarity of the top k_test (LAVIS).
    #[serde(rename = "itm+itc")]
    ItmItc,
}

impl Scoring {
    pub const ALL: [Scoring; 3] = [Scoring::Itc, Scoring::Itm, Scoring::ItmItc];

    pub fn name(self) -> &'static str {
        match self {
            Scoring::Itc => "itc",
            Scoring::Itm => "itm",
            Scoring::ItmItc => "itm+itc",
        }
    }
}

impl std::str::FromStr for Scoring {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Scoring::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown scoring {s:?} (expected itc, itm or itm+itc)"))
    }
}

/// The score given to candidates outside a query's top k_test, as the reference.
pub const NOT_RERANKED: f32 = -100.0;

/// Encoder outputs of a whole split, on the model's device.
pub struct Features {
    /// (images, tokens, width): every image token, for the fusion encoder.
    pub image_embeds: Tensor,
    /// (images, embed_dim), normalised.
    pub image_feat: Tensor,
    /// (texts, seq_len, hidden): text-mode outputs, for the fusion encoder.
    pub text_embeds: Tensor,
    /// (texts, seq_len).
    pub text_mask: Tensor,
    /// (texts, embed_dim), normalised.
    pub text_feat: Tensor,
}

/// Row-major host data as a tensor on `device`.
fn host_tensor<T: tch::kind::Element>(data: &[T], shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(data).view(shape).to_device(device)
}

/// Normalised ITC features of (n, 3, res, res) images: (tokens, features), both Float.
pub fn encode_images(model: &Albef, pixels: &Tensor, bf16: bool) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        with_autocast(model.device(), bf16, || {
            let (embeds, feat) = model.encode_image(pixels);
            (embeds.to_kind(Kind::Float), feat.to_kind(Kind::Float))
        })
    })
}

/// Normalised ITC features of token ids and masks (n, L): (tokens, features), both Float.
pub fn encode_texts(model: &Albef, ids: &Tensor, mask: &Tensor, bf16: bool) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        with_autocast(model.device(), bf16, || {
            let (embeds, feat) = model.encode_text(ids, mask, false);
            (embeds.to_kind(Kind::Float), feat.to_kind(Kind::Float))
        })
    })
}

/// Step 1: every image and text of the split through the encoders, in batches.
pub fn extract_features(model: &Albef, split: &RetrievalSplit, opts: &EvalOptions) -> Result<Features> {
    let dev = model.device();
    let res = model.config().image_res as usize;
    let bs = opts.batch_size.max(1);
    let mut progress = progress::start("encoding images and texts", (split.num_images() + split.num_texts()) as u64);
    let (mut image_embeds, mut image_feat) = (vec![], vec![]);
    for start in (0..split.num_images()).step_by(bs) {
        let end = (start + bs).min(split.num_images());
        let pixels = split.pixels(start..end, res, opts.decode_threads)?;
        let (e, f) = encode_images(
            model,
            &host_tensor(&pixels, &[(end - start) as i64, 3, res as i64, res as i64], dev),
            opts.bf16,
        );
        image_embeds.push(e);
        image_feat.push(f);
        progress.advance((end - start) as u64);
    }
    let (n, l) = (split.num_texts() as i64, split.seq_len as i64);
    let ids = host_tensor(&split.input_ids, &[n, l], dev);
    let text_mask = host_tensor(&split.attention_mask, &[n, l], dev);
    let (mut text_embeds, mut text_feat) = (vec![], vec![]);
    for start in (0..n).step_by(bs) {
        let len = (bs as i64).min(n - start);
        let (e, f) = encode_texts(model, &ids.narrow(0, start, len), &text_mask.narrow(0, start, len), opts.bf16);
        text_embeds.push(e);
        text_feat.push(f);
        progress.advance(len as u64);
    }
    Ok(Features {
        image_embeds: Tensor::cat(&image_embeds, 0),
        image_feat: Tensor::cat(&image_feat, 0),
        text_embeds: Tensor::cat(&text_embeds, 0),
        text_mask,
        text_feat: Tensor::cat(&text_feat, 0),
    })
}

/// Rows `rank` computes of `n`: contiguous, sizes differing by at most one.
pub fn shard_rows(n: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    (n * rank / world)..(n * (rank + 1) / world)
}

/// ITM match logits of (text, image) pairs given by index, in batches of `batch` pairs.
fn itm_match_logits(
    model: &Albef,
    f: &Features,
    texts: &Tensor,
    images: &Tensor,
    opts: &EvalOptions,
    progress: &mut Progress,
) -> Tensor {
    let n = texts.size()[0];
    let step = opts.itm_batch.max(1) as i64;
    let mut out = vec![];
    tch::no_grad(|| {
        for start in (0..n).step_by(step as usize) {
            let len = step.min(n - start);
            let (t, i) = (texts.narrow(0, start, len), images.narrow(0, start, len));
            let logits = with_autocast(model.device(), opts.bf16, || {
                model.itm_logits(
                    &f.text_embeds.index_select(0, &t),
                    &f.text_mask.index_select(0, &t),
                    &f.image_embeds.index_select(0, &i),
                    false,
                )
            });
            out.push(logits.to_kind(Kind::Float).select(1, 1));
            progress.advance(len as u64);
        }
    });
    if out.is_empty() { Tensor::zeros([0], (Kind::Float, model.device())) } else { Tensor::cat(&out, 0) }
}

/// One direction of step 3 for query rows `rows` of `sims` (queries x candidates): the ITM
/// logits of each row's top k (zeros elsewhere) and a mask of those entries (1.0, else 0.0).
fn rerank(
    model: &Albef,
    f: &Features,
    sims: &Tensor,
    rows: Range<usize>,
    queries_are_images: bool,
    opts: &EvalOptions,
) -> (Tensor, Tensor) {
    let (nq, nc) = sims.size2().expect("sims are 2-D");
    let dev = sims.device();
    let logits = Tensor::zeros([nq, nc], (Kind::Float, dev));
    let mask = Tensor::zeros([nq, nc], (Kind::Float, dev));
    let k = (opts.k_test as i64).min(nc);
    if rows.is_empty() || k == 0 {
        return (logits, mask);
    }
    let (start, len) = (rows.start as i64, rows.len() as i64);
    let (_, top) = sims.narrow(0, start, len).topk(k, 1, true, true);
    let query = Tensor::arange_start(start, start + len, (Kind::Int64, dev)).unsqueeze(1).expand([len, k], false);
    let (q, c) = (query.reshape([-1]), top.reshape([-1]));
    let (texts, images) = if queries_are_images { (&c, &q) } else { (&q, &c) };
    let what = if queries_are_images { "re-ranking texts per image" } else { "re-ranking images per text" };
    let scores = itm_match_logits(model, f, texts, images, opts, &mut progress::start(what, q.size()[0] as u64));
    let flat = &q * nc + &c;
    let _ = logits.view([-1]).index_copy_(0, &flat, &scores);
    let _ = mask.view([-1]).index_fill_(0, &flat, 1.0);
    (logits, mask)
}

/// What one rank computed: the ITC similarities of the whole split (equal on every rank) and,
/// for its rows of each direction, the ITM logits of the re-ranked candidates with their mask.
/// Summing `reducible()` over ranks (all-reduce SUM) gives every row's.
pub struct ShardScores {
    /// (images, texts) ITC similarities.
    pub sims: Tensor,
    /// (images, texts): ITM logits of the re-ranked texts of this rank's images, else 0.
    pub i2t_itm: Tensor,
    pub i2t_mask: Tensor,
    /// (texts, images): ITM logits of the re-ranked images of this rank's texts, else 0.
    pub t2i_itm: Tensor,
    pub t2i_mask: Tensor,
    pub image_rows: Range<usize>,
    pub text_rows: Range<usize>,
}

impl ShardScores {
    /// The tensors to sum over ranks.
    pub fn reducible(&mut self) -> [&mut Tensor; 4] {
        [&mut self.i2t_itm, &mut self.i2t_mask, &mut self.t2i_itm, &mut self.t2i_mask]
    }

    /// Both score matrices under `scoring` (call after the sum over ranks).
    pub fn matrices(&self, scoring: Scoring) -> Result<(ScoreMatrix, ScoreMatrix)> {
        let build = |sims: &Tensor, itm: &Tensor, mask: &Tensor| -> Result<ScoreMatrix> {
            let scores = match scoring {
                Scoring::Itc => sims.shallow_clone(),
                Scoring::Itm => itm.where_self(&mask.gt(0.5), &Tensor::from(NOT_RERANKED).to_device(itm.device())),
                Scoring::ItmItc => {
                    (itm + sims).where_self(&mask.gt(0.5), &Tensor::from(NOT_RERANKED).to_device(itm.device()))
                }
            };
            let (rows, cols) = scores.size2()?;
            let data =
                Vec::<f32>::try_from(scores.to_kind(Kind::Float).to_device(Device::Cpu).contiguous().view([-1]))?;
            ScoreMatrix::new(rows as usize, cols as usize, data)
        };
        let sims_t = self.sims.tr();
        Ok((build(&self.sims, &self.i2t_itm, &self.i2t_mask)?, build(&sims_t, &self.t2i_itm, &self.t2i_mask)?))
    }

    /// Metrics under every scoring.
    pub fn results(&self, truth: &GroundTruth) -> Result<RetrievalResults> {
        let metrics = |s: Scoring| -> Result<RetrievalMetrics> {
            let (i2t, t2i) = self.matrices(s)?;
            retrieval_metrics(&i2t, &t2i, truth)
        };
        Ok(RetrievalResults {
            itc: metrics(Scoring::Itc)?,
            itm: metrics(Scoring::Itm)?,
            itm_itc: metrics(Scoring::ItmItc)?,
        })
    }
}

/// The metrics of one evaluation under each scoring.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct RetrievalResults {
    pub itc: RetrievalMetrics,
    pub itm: RetrievalMetrics,
    #[serde(rename = "itm+itc")]
    pub itm_itc: RetrievalMetrics,
}

impl RetrievalResults {
    pub fn get(&self, scoring: Scoring) -> &RetrievalMetrics {
        match scoring {
            Scoring::Itc => &self.itc,
            Scoring::Itm => &self.itm,
            Scoring::ItmItc => &self.itm_itc,
        }
    }
}

/// Steps 2 and 3 for `rank`'s share of the rows, from features of the whole split.
pub fn score_shard(model: &Albef, f: &Features, opts: &EvalOptions, rank: usize, world: usize) -> ShardScores {
    let sims = tch::no_grad(|| f.image_feat.matmul(&f.text_feat.tr()));
    let (n_img, n_txt) = (f.image_feat.size()[0] as usize, f.text_feat.size()[0] as usize);
    let (image_rows, text_rows) = (shard_rows(n_img, rank, world), shard_rows(n_txt, rank, world));
    let (i2t_itm, i2t_mask) = rerank(model, f, &sims, image_rows.clone(), true, opts);
    let (t2i_itm, t2i_mask) = rerank(model, f, &sims.tr(), text_rows.clone(), false, opts);
    ShardScores { sims, i2t_itm, i2t_mask, t2i_itm, t2i_mask, image_rows, text_rows }
}

/// `rank`'s part of an evaluation in a world of `world` ranks: every feature, its rows' ITM
/// scores. A job's workers call this, sum [`ShardScores::reducible`] over ranks, then
/// [`ShardScores::results`] with the split's `truth`.
pub fn evaluate_shard(
    model: &Albef,
    split: &RetrievalSplit,
    opts: &EvalOptions,
    rank: usize,
    world: usize,
) -> Result<ShardScores> {
    ensure!(rank < world.max(1), "rank {rank} outside a world of {world}");
    let features = extract_features(model, split, opts)?;
    Ok(score_shard(model, &features, opts, rank, world))
}

/// The whole evaluation in one process.
pub fn evaluate(model: &Albef, split: &RetrievalSplit, opts: &EvalOptions) -> Result<RetrievalResults> {
    evaluate_shard(model, split, opts, 0, 1)?.results(&split.truth)
}
