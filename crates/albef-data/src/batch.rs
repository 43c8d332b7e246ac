//! Collation of samples into the plain arrays a batch tensor is made from.

/// CLIP normalisation constants used by ALBEF.
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// A batch on the host: images (B, 3, res, res) normalised, ids and mask (B, L) padded to the
/// longest sequence of the batch, and the keys of the samples (for auditing what was trained).
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    pub batch_size: usize,
    pub image_res: usize,
    pub seq_len: usize,
    pub images: Vec<f32>,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub keys: Vec<String>,
}

/// HWC u8 RGB -> CHW f32 normalised with the CLIP mean and std.
pub fn normalize_rgb(rgb: &[u8], res: usize, out: &mut Vec<f32>) {
    assert_eq!(rgb.len(), res * res * 3, "image is not {res}x{res} RGB");
    for c in 0..3 {
        out.extend(rgb.chunks_exact(3).map(|px| (px[c] as f32 / 255.0 - MEAN[c]) / STD[c]));
    }
}

/// Collates (key, HWC RGB, token ids) samples.
pub fn collate(samples: &[(String, &[u8], Vec<i64>)], image_res: usize, pad_id: i64) -> HostBatch {
    let seq_len = samples.iter().map(|s| s.2.len()).max().unwrap_or(0);
    let mut b = HostBatch {
        batch_size: samples.len(),
        image_res,
        seq_len,
        images: Vec::with_capacity(samples.len() * 3 * image_res * image_res),
        input_ids: Vec::with_capacity(samples.len() * seq_len),
        attention_mask: Vec::with_capacity(samples.len() * seq_len),
        keys: Vec::with_capacity(samples.len()),
    };
    for (key, rgb, ids) in samples {
        normalize_rgb(rgb, image_res, &mut b.images);
        b.input_ids.extend(ids.iter().copied().chain(std::iter::repeat_n(pad_id, seq_len - ids.len())));
        b.attention_mask.extend((0..seq_len).map(|i| i64::from(i < ids.len())));
        b.keys.push(key.clone());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_and_masks_padding() {
        let img = vec![255u8; 2 * 2 * 3];
        let b = collate(&[("a".into(), &img, vec![2, 7, 8]), ("b".into(), &img, vec![2, 9])], 2, 0);
        assert_eq!(b.seq_len, 3);
        assert_eq!(b.input_ids, vec![2, 7, 8, 2, 9, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(b.images.len(), 2 * 3 * 4);
        assert!((b.images[0] - (1.0 - MEAN[0]) / STD[0]).abs() < 1e-6);
        assert_eq!(b.keys, vec!["a", "b"]);
    }
}
