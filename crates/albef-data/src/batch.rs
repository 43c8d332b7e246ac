//! Collation of samples into the plain arrays a batch tensor is made from.

/// CLIP normalisation constants used by ALBEF.
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// A batch on the host: images (B, 3, res, res) normalised, ids and mask (B, L) padded to the
/// longest sequence of the batch, the keys of the samples (for auditing what was trained) and,
/// as the task asks, each row's image index (retrieval) or class (SNLI-VE).
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    pub batch_size: usize,
    pub image_res: usize,
    pub seq_len: usize,
    /// (B, images_per_row, 3, res, res) row after row.
    pub images: Vec<f32>,
    /// 2 where every row has a second image (NLVR2), else 1.
    pub images_per_row: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub keys: Vec<String>,
    /// Each row's draw id (what seeds its random draws; it names the row's source and pass):
    /// what a step that is applied counts as trained, by source.
    pub draws: Vec<u64>,
    /// One per row when the task asked for them (see [`crate::sources::image_index`]), else empty.
    pub image_ids: Vec<i64>,
    /// One per row when the task asked for them, else empty.
    pub labels: Vec<i64>,
    /// The rows' answers when the task asked for them (VQA).
    pub answers: Option<HostAnswers>,
}

/// The answers of a batch's rows (VQA), row after row: ids and mask (answers, seq_len) padded to
/// the longest answer, each answer's weight, and how many answers each row has.
#[derive(Clone, Debug, PartialEq)]
pub struct HostAnswers {
    pub seq_len: usize,
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub weights: Vec<f32>,
    pub per_row: Vec<i64>,
}

impl HostAnswers {
    /// Pads the token ids of each answer to the longest.
    pub fn collate(rows: &[&[(Vec<i64>, f32)]], pad_id: i64) -> HostAnswers {
        let all = || rows.iter().flat_map(|r| r.iter());
        let seq_len = all().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        HostAnswers {
            seq_len,
            ids: all()
                .flat_map(|(ids, _)| ids.iter().copied().chain(std::iter::repeat_n(pad_id, seq_len - ids.len())))
                .collect(),
            mask: all().flat_map(|(ids, _)| (0..seq_len).map(move |i| i64::from(i < ids.len()))).collect(),
            weights: all().map(|(_, w)| *w).collect(),
            per_row: rows.iter().map(|r| r.len() as i64).collect(),
        }
    }
}

/// A decoded sample, as [`collate`] takes it.
pub struct Row<'a> {
    pub key: &'a str,
    /// The draw id (see [`HostBatch::draws`]).
    pub draw: u64,
    /// HWC RGB at the batch's resolution.
    pub rgb: &'a [u8],
    /// The row's second image (NLVR2), likewise.
    pub second_rgb: Option<&'a [u8]>,
    pub ids: &'a [i64],
    pub image_id: Option<i64>,
    pub label: Option<i64>,
    /// Token ids and weight of each answer (VQA); empty where the task asks for none.
    pub answers: &'a [(Vec<i64>, f32)],
}

/// HWC u8 RGB -> CHW f32 normalised with the CLIP mean and std.
pub fn normalize_rgb(rgb: &[u8], res: usize, out: &mut Vec<f32>) {
    assert_eq!(rgb.len(), res * res * 3, "image is not {res}x{res} RGB");
    for c in 0..3 {
        out.extend(rgb.chunks_exact(3).map(|px| (px[c] as f32 / 255.0 - MEAN[c]) / STD[c]));
    }
}

/// Collates samples; second images, image indexes, labels and answers are kept when every row
/// has them.
pub fn collate(samples: &[Row], image_res: usize, pad_id: i64) -> HostBatch {
    let seq_len = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let pairs = !samples.is_empty() && samples.iter().all(|s| s.second_rgb.is_some());
    let images_per_row = if pairs { 2 } else { 1 };
    let mut b = HostBatch {
        batch_size: samples.len(),
        image_res,
        seq_len,
        images: Vec::with_capacity(samples.len() * images_per_row * 3 * image_res * image_res),
        images_per_row,
        input_ids: Vec::with_capacity(samples.len() * seq_len),
        attention_mask: Vec::with_capacity(samples.len() * seq_len),
        keys: Vec::with_capacity(samples.len()),
        draws: samples.iter().map(|s| s.draw).collect(),
        image_ids: samples.iter().map(|s| s.image_id).collect::<Option<_>>().unwrap_or_default(),
        labels: samples.iter().map(|s| s.label).collect::<Option<_>>().unwrap_or_default(),
        answers: samples
            .iter()
            .all(|s| !s.answers.is_empty())
            .then(|| HostAnswers::collate(&samples.iter().map(|s| s.answers).collect::<Vec<_>>(), pad_id)),
    };
    for s in samples {
        normalize_rgb(s.rgb, image_res, &mut b.images);
        if let Some(second) = s.second_rgb.filter(|_| pairs) {
            normalize_rgb(second, image_res, &mut b.images);
        }
        b.input_ids.extend(s.ids.iter().copied().chain(std::iter::repeat_n(pad_id, seq_len - s.ids.len())));
        b.attention_mask.extend((0..seq_len).map(|i| i64::from(i < s.ids.len())));
        b.keys.push(s.key.to_string());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_and_masks_padding() {
        let img = vec![255u8; 2 * 2 * 3];
        let row = |key, ids, image_id| Row {
            key,
            draw: 0,
            rgb: &img,
            second_rgb: None,
            ids,
            image_id,
            label: None,
            answers: &[],
        };
        let b = collate(&[row("a", &[2, 7, 8], Some(4)), row("b", &[2, 9], Some(9))], 2, 0);
        assert_eq!(b.seq_len, 3);
        assert_eq!(b.input_ids, vec![2, 7, 8, 2, 9, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(b.images.len(), 2 * 3 * 4);
        assert!((b.images[0] - (1.0 - MEAN[0]) / STD[0]).abs() < 1e-6);
        assert_eq!(b.keys, vec!["a", "b"]);
        assert_eq!(b.image_ids, vec![4, 9]);
        let b = collate(&[row("a", &[2], Some(4)), row("b", &[2], None)], 2, 0);
        assert!(b.image_ids.is_empty(), "a row without an image index drops them all");
        assert_eq!(b.answers, None);
    }

    #[test]
    fn answers_are_padded_row_after_row() {
        let img = vec![0u8; 2 * 2 * 3];
        let (a, b) = ([(vec![2, 7, 3, 3], 0.6), (vec![2, 8, 9, 3, 3], 0.4)], [(vec![2, 5, 3, 3], 0.5)]);
        let row = |key, answers| Row {
            key,
            draw: 0,
            rgb: &img,
            second_rgb: None,
            ids: &[2, 6],
            image_id: None,
            label: None,
            answers,
        };
        let batch = collate(&[row("a", &a[..]), row("b", &b[..])], 2, 0);
        let answers = batch.answers.expect("every row is answered");
        assert_eq!(answers.seq_len, 5);
        assert_eq!(answers.ids, vec![2, 7, 3, 3, 0, 2, 8, 9, 3, 3, 2, 5, 3, 3, 0]);
        assert_eq!(answers.mask, vec![1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!(answers.weights, vec![0.6, 0.4, 0.5]);
        assert_eq!(answers.per_row, vec![2, 1]);
    }
}
