//! Features of images and/or captions for use outside the service, what LAVIS users take from
//! `extract_features`, written by `albef embed` as safetensors or `.npz`:
//!
//! - [`embed_images`], [`embed_texts`]: the normalised ITC embeddings only (`embeddings`).
//! - [`extract`] by mode: `image` (`image_embeds`, the ViT's tokens, and `image_feat`, the
//!   normalised projection of their [CLS]), `text` (`text_embeds`, the text encoder's tokens,
//!   `text_feat`, `text_mask`) or `multimodal` (`multimodal_embeds`, the fusion layers' tokens of
//!   each (image, caption) pair, and `text_mask`).
//!
//! A file also holds `kind` and `keys` (the image URLs and/or captions of its rows) and the model
//! source and step: metadata in safetensors, string arrays in `.npz`.

use crate::npy::{NpyArray, write_npz};
use crate::retrieval::{encode_images, encode_texts};
use crate::split::decode_images;
use albef_data::pre_caption;
use albef_data::tokenizer::Tokenizer;
use albef_model::device::with_autocast;
use albef_model::{Albef, TaskModel};
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use safetensors::{Dtype, tensor::TensorView};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The name of the tensor in an embeddings file written without a mode.
pub const EMBEDDINGS: &str = "embeddings";

/// Encoded images (any format the loader decodes) with their names, read with the test
/// transform.
pub struct Images<'a> {
    pub bytes: &'a [Bytes],
    pub names: &'a [String],
    pub max_pixels: u64,
}

impl Images<'_> {
    fn pixels(&self, model: &Albef, rows: Range<usize>) -> Result<Tensor> {
        let res = model.config().image_res;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (bytes, names) = (&self.bytes[rows.clone()], &self.names[rows]);
        let pixels = decode_images(bytes, names, res as usize, self.max_pixels, threads)?;
        Ok(Tensor::from_slice(&pixels).view([bytes.len() as i64, 3, res, res]).to_device(model.device()))
    }
}

/// Token ids and masks (n, L) of captions (pre_caption, then the tokenizer), on the CPU, padded
/// to the longest caption of all so that every batch's tokens stack into one array.
pub struct Tokens {
    ids: Tensor,
    mask: Tensor,
}

impl Tokens {
    pub fn new(tokenizer: &Tokenizer, texts: &[String], max_words: usize) -> Self {
        let cleaned: Vec<String> = texts.iter().map(|t| pre_caption(t, max_words)).collect();
        let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
        let (ids, mask, len) = tokenizer.encode_batch(&refs);
        let shape = [texts.len() as i64, len as i64];
        Self { ids: Tensor::from_slice(&ids).view(shape), mask: Tensor::from_slice(&mask).view(shape) }
    }

    fn len(&self) -> usize {
        self.ids.size()[0] as usize
    }

    fn rows(&self, rows: Range<usize>, device: Device) -> (Tensor, Tensor) {
        let narrow = |t: &Tensor| t.narrow(0, rows.start as i64, rows.len() as i64).to_device(device);
        (narrow(&self.ids), narrow(&self.mask))
    }
}

/// What [`extract`] encodes; the variant is the mode.
pub enum Inputs<'a> {
    Image(Images<'a>),
    Text(Tokens),
    /// (image, caption) pairs, row by row.
    Multimodal(Images<'a>, Tokens),
}

/// `f` over consecutive row ranges of `n` rows; its outputs on the CPU, concatenated by position.
fn batched(n: usize, batch_size: usize, mut f: impl FnMut(Range<usize>) -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    ensure!(n > 0, "nothing to embed");
    let bs = batch_size.max(1);
    let mut parts: Vec<Vec<Tensor>> = vec![];
    for start in (0..n).step_by(bs) {
        let out = f(start..(start + bs).min(n))?;
        parts.resize_with(out.len(), Vec::new);
        for (part, t) in parts.iter_mut().zip(out) {
            part.push(t.to_device(Device::Cpu));
        }
    }
    Ok(parts.iter().map(|p| Tensor::cat(p, 0)).collect())
}

/// Normalised ITC embeddings (n, embed_dim) of images, in batches.
pub fn embed_images(model: &Albef, images: &Images, batch_size: usize, bf16: bool) -> Result<Tensor> {
    let n = images.names.len();
    ensure!(images.bytes.len() == n, "{} images but {n} names", images.bytes.len());
    let mut out = batched(n, batch_size, |r| Ok(vec![encode_images(model, &images.pixels(model, r)?, bf16).1]))?;
    Ok(out.remove(0))
}

/// Normalised ITC embeddings (n, embed_dim) of captions, in batches.
pub fn embed_texts(model: &Albef, tokens: &Tokens, batch_size: usize, bf16: bool) -> Result<Tensor> {
    let mut out = batched(tokens.len(), batch_size, |r| {
        let (ids, mask) = tokens.rows(r, model.device());
        Ok(vec![encode_texts(model, &ids, &mask, bf16).1])
    })?;
    Ok(out.remove(0))
}

/// The fusion layers' tokens of (image, caption) pairs, Float.
fn fuse(model: &Albef, pixels: &Tensor, ids: &Tensor, mask: &Tensor, bf16: bool) -> Tensor {
    tch::no_grad(|| {
        with_autocast(model.device(), bf16, || {
            let (image_embeds, _) = model.encode_image(pixels);
            let (text_embeds, _) = model.encode_text(ids, mask, false);
            model.fuse(&text_embeds, mask, &image_embeds, false).to_kind(Kind::Float)
        })
    })
}

/// The features of a mode (see the module's documentation), in batches, on the CPU: Float, the
/// masks Int64, rows in input order.
pub fn extract(model: &Albef, inputs: &Inputs, batch_size: usize, bf16: bool) -> Result<Vec<(&'static str, Tensor)>> {
    let dev = model.device();
    let (names, arrays, mask): (&[&str], _, _) = match inputs {
        Inputs::Image(images) => {
            let out = batched(images.names.len(), batch_size, |r| {
                let (embeds, feat) = encode_images(model, &images.pixels(model, r)?, bf16);
                Ok(vec![embeds, feat])
            })?;
            (&["image_embeds", "image_feat"], out, None)
        }
        Inputs::Text(tokens) => {
            let out = batched(tokens.len(), batch_size, |r| {
                let (ids, mask) = tokens.rows(r, dev);
                let (embeds, feat) = encode_texts(model, &ids, &mask, bf16);
                Ok(vec![embeds, feat])
            })?;
            (&["text_embeds", "text_feat"], out, Some(&tokens.mask))
        }
        Inputs::Multimodal(images, tokens) => {
            let (n, texts) = (images.names.len(), tokens.len());
            ensure!(n == texts, "{n} images but {texts} captions: multimodal features are of pairs");
            let out = batched(n, batch_size, |r| {
                let (ids, mask) = tokens.rows(r.clone(), dev);
                Ok(vec![fuse(model, &images.pixels(model, r)?, &ids, &mask, bf16)])
            })?;
            (&["multimodal_embeds"], out, Some(&tokens.mask))
        }
    };
    let mut named: Vec<_> = names.iter().copied().zip(arrays).collect();
    named.extend(mask.map(|m| ("text_mask", m.shallow_clone())));
    Ok(named)
}

/// The formats of an embeddings file, by its extension: `.npz`, else safetensors (as before
/// `.npz` existed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// NumPy's archive of `.npy` arrays (`np.load`).
    Npz,
}

impl Format {
    pub fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("npz") => Ok(Self::Npz),
            Some("npy") => bail!("{}: a .npy holds one array; name a .npz (NumPy's archive of them)", path.display()),
            _ => Ok(Self::Safetensors),
        }
    }
}

/// An embeddings file's contents.
pub struct Features {
    /// `image`, `text` or `multimodal`.
    pub kind: String,
    /// What the rows belong to, by column: image URLs, captions, or both (pairs).
    pub keys: Vec<Vec<String>>,
    pub arrays: Vec<(&'static str, Tensor)>,
    /// More metadata (model source, step).
    pub meta: Vec<(&'static str, String)>,
}

impl Features {
    /// `keys` as JSON: a list of strings, or of [image, caption] pairs.
    fn keys_json(&self) -> Result<String> {
        Ok(match self.keys.as_slice() {
            [one] => serde_json::to_string(one)?,
            columns => {
                let rows = columns.first().map_or(0, Vec::len);
                let pairs: Vec<Vec<&String>> = (0..rows).map(|i| columns.iter().map(|c| &c[i]).collect()).collect();
                serde_json::to_string(&pairs)?
            }
        })
    }

    /// Writes `path` in `format`.
    pub fn write(&self, path: &Path, format: Format) -> Result<()> {
        let write = || -> Result<()> {
            match format {
                Format::Safetensors => std::fs::write(path, self.safetensors()?)?,
                Format::Npz => write_npz(BufWriter::new(File::create(path)?), &self.npy_arrays()?)?.flush()?,
            }
            Ok(())
        };
        write().with_context(|| format!("writing {}", path.display()))
    }

    fn safetensors(&self) -> Result<Vec<u8>> {
        let mut meta = HashMap::from([("kind".to_string(), self.kind.clone()), ("keys".into(), self.keys_json()?)]);
        meta.extend(self.meta.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let data: Vec<_> = self
            .arrays
            .iter()
            .map(|(name, t)| {
                let dtype = match t.kind() {
                    Kind::Float => Dtype::F32,
                    Kind::Int64 => Dtype::I64,
                    k => bail!("{name}: no safetensors dtype for {k:?}"),
                };
                let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
                Ok((*name, dtype, shape, albef_model::weights::tensor_bytes(t)))
            })
            .collect::<Result<_>>()?;
        let views = data
            .iter()
            .map(|(name, dtype, shape, bytes)| Ok((*name, TensorView::new(*dtype, shape.clone(), bytes)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(safetensors::serialize(views, Some(meta))?)
    }

    /// The arrays, `keys` ((n,) or (n, 2) strings) and the metadata as 0-d strings.
    fn npy_arrays(&self) -> Result<Vec<(String, NpyArray)>> {
        let mut out = vec![];
        for (name, t) in &self.arrays {
            out.push((name.to_string(), NpyArray::from_tensor(t)?));
        }
        let rows = self.keys.first().map_or(0, Vec::len);
        let flat: Vec<String> = (0..rows).flat_map(|i| self.keys.iter().map(move |c| c[i].clone())).collect();
        let shape = if self.keys.len() == 1 { vec![rows] } else { vec![rows, self.keys.len()] };
        out.push(("keys".into(), NpyArray::strings(&flat, shape)));
        let meta = std::iter::once(("kind", &self.kind)).chain(self.meta.iter().map(|(k, v)| (*k, v)));
        out.extend(meta.map(|(k, v)| (k.to_string(), NpyArray::strings(std::slice::from_ref(v), vec![]))));
        Ok(out)
    }
}

/// The bytes of an embeddings file of [`embed_images`] or [`embed_texts`].
pub fn serialize_embeddings(
    embeddings: &Tensor,
    kind: &str,
    keys: &[String],
    extra: &[(&'static str, String)],
) -> Result<Vec<u8>> {
    let rows = embeddings.size2()?.0;
    ensure!(rows as usize == keys.len(), "{rows} embeddings for {} keys", keys.len());
    let features = Features {
        kind: kind.into(),
        keys: vec![keys.to_vec()],
        arrays: vec![(EMBEDDINGS, embeddings.to_kind(Kind::Float).to_device(Device::Cpu))],
        meta: extra.to_vec(),
    };
    features.safetensors()
}

/// Reads an embeddings file back: (embeddings, kind, keys).
pub fn deserialize_embeddings(bytes: &[u8]) -> Result<(Tensor, String, Vec<String>)> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
    let meta = header.metadata().clone().unwrap_or_default();
    let kind = meta.get("kind").cloned().unwrap_or_default();
    let keys: Vec<String> = serde_json::from_str(meta.get("keys").map_or("[]", String::as_str))?;
    let mut tensors = albef_model::weights::deserialize(bytes, "embeddings")?;
    let t = tensors.remove(EMBEDDINGS).ok_or_else(|| anyhow::anyhow!("no {EMBEDDINGS} tensor"))?;
    Ok((t, kind, keys))
}
