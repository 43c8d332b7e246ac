//! Normalised ITC embeddings of images or texts, written as safetensors: one (n, embed_dim)
//! float tensor `embeddings`, and in the header's metadata what each row belongs to (`keys`, a
//! JSON list of image URLs or captions, in row order), `kind` (`image` or `text`), the model
//! source and step.

use crate::retrieval::{encode_images, encode_texts};
use crate::split::decode_images;
use albef_data::pre_caption;
use albef_data::tokenizer::Tokenizer;
use albef_model::{Albef, TaskModel};
use anyhow::{Result, ensure};
use bytes::Bytes;
use safetensors::{Dtype, tensor::TensorView};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The name of the tensor in an embeddings file.
pub const EMBEDDINGS: &str = "embeddings";

/// Embeddings of encoded images (any format the loader decodes), test transform, in batches.
pub fn embed_images(
    model: &Albef,
    images: &[Bytes],
    names: &[String],
    batch_size: usize,
    bf16: bool,
    max_pixels: u64,
) -> Result<Tensor> {
    ensure!(images.len() == names.len(), "{} images but {} names", images.len(), names.len());
    let res = model.config().image_res;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = vec![];
    for (imgs, names) in images.chunks(batch_size.max(1)).zip(names.chunks(batch_size.max(1))) {
        let pixels = decode_images(imgs, names, res as usize, max_pixels, threads)?;
        let pixels = Tensor::from_slice(&pixels).view([imgs.len() as i64, 3, res, res]).to_device(model.device());
        out.push(encode_images(model, &pixels, bf16).1.to_device(Device::Cpu));
    }
    Ok(cat_or_empty(out, model))
}

/// Embeddings of captions (pre_caption, then the tokenizer), in batches.
pub fn embed_texts(
    model: &Albef,
    tokenizer: &Tokenizer,
    texts: &[String],
    max_words: usize,
    batch_size: usize,
    bf16: bool,
) -> Result<Tensor> {
    let mut out = vec![];
    for chunk in texts.chunks(batch_size.max(1)) {
        let cleaned: Vec<String> = chunk.iter().map(|t| pre_caption(t, max_words)).collect();
        let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
        let (ids, mask, len) = tokenizer.encode_batch(&refs);
        let shape = [chunk.len() as i64, len as i64];
        let dev = model.device();
        let ids = Tensor::from_slice(&ids).view(shape).to_device(dev);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(dev);
        out.push(encode_texts(model, &ids, &mask, bf16).1.to_device(Device::Cpu));
    }
    Ok(cat_or_empty(out, model))
}

fn cat_or_empty(parts: Vec<Tensor>, model: &Albef) -> Tensor {
    if parts.is_empty() {
        Tensor::zeros([0, model.config().embed_dim], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// The bytes of an embeddings file.
pub fn serialize_embeddings(
    embeddings: &Tensor,
    kind: &str,
    keys: &[String],
    extra: &[(&str, String)],
) -> Result<Vec<u8>> {
    let (rows, dim) = embeddings.size2()?;
    ensure!(rows as usize == keys.len(), "{rows} embeddings for {} keys", keys.len());
    let t = embeddings.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let data = albef_model::weights::tensor_bytes(&t);
    let view = TensorView::new(Dtype::F32, vec![rows as usize, dim as usize], &data)?;
    let mut meta =
        HashMap::from([("kind".to_string(), kind.to_string()), ("keys".to_string(), serde_json::to_string(keys)?)]);
    for (k, v) in extra {
        meta.insert(k.to_string(), v.clone());
    }
    Ok(safetensors::serialize([(EMBEDDINGS, view)], Some(meta))?)
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
