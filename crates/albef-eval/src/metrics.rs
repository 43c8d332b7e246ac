//! Recall@K of image-text retrieval from score matrices, without libtorch.
//!
//! As the reference's `itm_eval`: for each image, the texts ranked by score; the image counts as
//! retrieved at K when any of its captions ranks below K (`txt_r*`, image -> text). For each
//! text, the images ranked; the text counts when its one image ranks below K (`img_r*`, text ->
//! image). Values are percentages; `r_mean` averages the six recalls.
//!
//! Ties are broken against the model, deterministically: a ground-truth candidate's rank is the
//! number of wrong candidates that score at least as high as the best-scoring right one (NaN
//! counts as minus infinity). Without ties this is the position in any descending sort; with
//! ties it never depends on the order of the candidates, and a scorer that gives everything the
//! same score retrieves nothing (the reference's `np.argsort` instead lets ties fall by index).

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

/// A dense row-major score matrix: one row per query, one column per candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl ScoreMatrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        ensure!(
            data.len() == rows * cols,
            "a {rows}x{cols} score matrix needs {} values, got {}",
            rows * cols,
            data.len()
        );
        Ok(ScoreMatrix { rows, cols, data })
    }

    /// A matrix from rows of equal length (tests, small examples).
    pub fn from_rows(rows: &[Vec<f32>]) -> Result<Self> {
        let cols = rows.first().map_or(0, Vec::len);
        ensure!(rows.iter().all(|r| r.len() == cols), "rows of a score matrix differ in length");
        Self::new(rows.len(), cols, rows.concat())
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn transpose(&self) -> ScoreMatrix {
        let mut data = Vec::with_capacity(self.data.len());
        for j in 0..self.cols {
            data.extend((0..self.rows).map(|i| self.data[i * self.cols + j]));
        }
        ScoreMatrix { rows: self.cols, cols: self.rows, data }
    }
}

/// Which texts describe which image (image i's captions are `img2txt[i]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroundTruth {
    pub img2txt: Vec<Vec<usize>>,
    pub txt2img: Vec<usize>,
}

impl GroundTruth {
    /// From each image's caption indices; every text must belong to exactly one image.
    pub fn from_img2txt(img2txt: Vec<Vec<usize>>) -> Result<Self> {
        let texts: usize = img2txt.iter().map(Vec::len).sum();
        let mut txt2img = vec![usize::MAX; texts];
        for (i, caps) in img2txt.iter().enumerate() {
            ensure!(!caps.is_empty(), "image {i} has no caption");
            for &t in caps {
                ensure!(t < texts, "image {i} names text {t}, but there are {texts} texts");
                ensure!(txt2img[t] == usize::MAX, "text {t} belongs to images {} and {i}", txt2img[t]);
                txt2img[t] = i;
            }
        }
        Ok(GroundTruth { img2txt, txt2img })
    }

    /// Images with their captions numbered in order: image i has `counts[i]` consecutive texts.
    pub fn consecutive(counts: &[usize]) -> Result<Self> {
        let mut next = 0;
        let img2txt = counts
            .iter()
            .map(|&c| {
                next += c;
                (next - c..next).collect()
            })
            .collect();
        Self::from_img2txt(img2txt)
    }

    pub fn images(&self) -> usize {
        self.img2txt.len()
    }

    pub fn texts(&self) -> usize {
        self.txt2img.len()
    }
}

fn key(score: f32) -> f32 {
    if score.is_nan() { f32::NEG_INFINITY } else { score }
}

/// 0-based rank of the best right candidate of a row: how many wrong candidates score at least
/// as high as the best-scoring right one. `right` must be non-empty.
pub fn best_rank(row: &[f32], right: &[usize]) -> usize {
    let best = right.iter().map(|&j| key(row[j])).fold(f32::NEG_INFINITY, f32::max);
    row.iter().enumerate().filter(|&(j, &s)| key(s) >= best && !right.contains(&j)).count()
}

/// The rank of every row's best right candidate.
pub fn ranks(scores: &ScoreMatrix, right: impl Fn(usize) -> Vec<usize>) -> Vec<usize> {
    (0..scores.rows).map(|i| best_rank(scores.row(i), &right(i))).collect()
}

/// Percentage of ranks below `k`.
pub fn recall_at(ranks: &[usize], k: usize) -> f64 {
    if ranks.is_empty() {
        return 0.0;
    }
    100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
}

/// The reference's retrieval metrics, in percent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct RetrievalMetrics {
    /// Image -> text: an image counts when any of its captions ranks below K.
    pub txt_r1: f64,
    pub txt_r5: f64,
    pub txt_r10: f64,
    pub txt_r_mean: f64,
    /// Text -> image: a text counts when its image ranks below K.
    pub img_r1: f64,
    pub img_r5: f64,
    pub img_r10: f64,
    pub img_r_mean: f64,
    pub r_mean: f64,
}

impl RetrievalMetrics {
    fn from_recalls(txt: [f64; 3], img: [f64; 3]) -> Self {
        let txt_r_mean = txt.iter().sum::<f64>() / 3.0;
        let img_r_mean = img.iter().sum::<f64>() / 3.0;
        RetrievalMetrics {
            txt_r1: txt[0],
            txt_r5: txt[1],
            txt_r10: txt[2],
            txt_r_mean,
            img_r1: img[0],
            img_r5: img[1],
            img_r10: img[2],
            img_r_mean,
            r_mean: (txt_r_mean + img_r_mean) / 2.0,
        }
    }

    /// (name, value) in the reference's order.
    pub fn entries(&self) -> [(&'static str, f64); 9] {
        [
            ("txt_r1", self.txt_r1),
            ("txt_r5", self.txt_r5),
            ("txt_r10", self.txt_r10),
            ("txt_r_mean", self.txt_r_mean),
            ("img_r1", self.img_r1),
            ("img_r5", self.img_r5),
            ("img_r10", self.img_r10),
            ("img_r_mean", self.img_r_mean),
            ("r_mean", self.r_mean),
        ]
    }
}

const KS: [usize; 3] = [1, 5, 10];

/// Metrics of image->text scores `i2t` (images x texts) and text->image scores `t2i`
/// (texts x images).
pub fn retrieval_metrics(i2t: &ScoreMatrix, t2i: &ScoreMatrix, truth: &GroundTruth) -> Result<RetrievalMetrics> {
    let (n_img, n_txt) = (truth.images(), truth.texts());
    ensure!(
        (i2t.rows, i2t.cols) == (n_img, n_txt),
        "image->text scores are {}x{}, the split has {n_img} images and {n_txt} texts",
        i2t.rows,
        i2t.cols
    );
    ensure!(
        (t2i.rows, t2i.cols) == (n_txt, n_img),
        "text->image scores are {}x{}, the split has {n_txt} texts and {n_img} images",
        t2i.rows,
        t2i.cols
    );
    let txt_ranks = ranks(i2t, |i| truth.img2txt[i].clone());
    let img_ranks = ranks(t2i, |t| vec![truth.txt2img[t]]);
    Ok(RetrievalMetrics::from_recalls(KS.map(|k| recall_at(&txt_ranks, k)), KS.map(|k| recall_at(&img_ranks, k))))
}

/// What a uniformly random ranking scores on average: text -> image R@K = K / images; image ->
/// text R@K = 1 - C(texts - m, K) / C(texts, K) for an image with m captions, averaged.
pub fn chance(truth: &GroundTruth) -> RetrievalMetrics {
    let n_txt = truth.texts() as f64;
    let n_img = truth.images() as f64;
    let none_in_top = |m: usize, k: usize| -> f64 {
        (0..k).map(|j| ((n_txt - m as f64 - j as f64) / (n_txt - j as f64)).max(0.0)).product()
    };
    let txt = KS.map(|k| {
        let per_image: f64 = truth.img2txt.iter().map(|caps| 1.0 - none_in_top(caps.len(), k)).sum();
        100.0 * per_image / n_img.max(1.0)
    });
    let img = KS.map(|k| 100.0 * (k as f64 / n_img.max(1.0)).min(1.0));
    RetrievalMetrics::from_recalls(txt, img)
}

/// A table with one column per labelled set of metrics.
pub fn table(columns: &[(&str, &RetrievalMetrics)]) -> String {
    let width = columns.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0).max(8) + 2;
    let mut out = format!("{:<12}", "");
    for (label, _) in columns {
        out.push_str(&format!("{label:>width$}"));
    }
    out.push('\n');
    for (i, (name, _)) in columns.first().map(|c| c.1.entries()).unwrap_or_default().iter().enumerate() {
        out.push_str(&format!("{name:<12}"));
        for (_, m) in columns {
            out.push_str(&format!("{:>width$.2}", m.entries()[i].1));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition: sort every candidate (score descending; on equal scores the wrong
    /// ones first, so that ties count against the model), then the first right one's position.
    fn sorted_rank(row: &[f32], right: &[usize]) -> usize {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| {
            key(row[b]).total_cmp(&key(row[a])).then(right.contains(&a).cmp(&right.contains(&b))).then(a.cmp(&b))
        });
        order.iter().position(|j| right.contains(j)).unwrap()
    }

    /// Recall@K computed the slow way, from explicit sorted lists.
    fn direct(i2t: &ScoreMatrix, t2i: &ScoreMatrix, truth: &GroundTruth) -> [f64; 6] {
        let recall = |ranks: &[usize], k| 100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64;
        let txt: Vec<usize> = (0..i2t.rows).map(|i| sorted_rank(i2t.row(i), &truth.img2txt[i])).collect();
        let img: Vec<usize> = (0..t2i.rows).map(|t| sorted_rank(t2i.row(t), &[truth.txt2img[t]])).collect();
        [recall(&txt, 1), recall(&txt, 5), recall(&txt, 10), recall(&img, 1), recall(&img, 5), recall(&img, 10)]
    }

    fn ours(m: &RetrievalMetrics) -> [f64; 6] {
        [m.txt_r1, m.txt_r5, m.txt_r10, m.img_r1, m.img_r5, m.img_r10]
    }

    /// A small deterministic generator for the random matrices.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    #[test]
    fn a_hand_made_example() {
        // 3 images with 2 captions each: texts 0,1 -> image 0; 2,3 -> 1; 4,5 -> 2.
        let truth = GroundTruth::consecutive(&[2, 2, 2]).unwrap();
        let i2t = ScoreMatrix::from_rows(&[
            vec![0.1, 0.9, 0.3, 0.2, 0.0, 0.0], // caption 1 first: rank 0
            vec![0.8, 0.1, 0.5, 0.7, 0.2, 0.3], // text 0 beats both captions; caption 3 second: rank 1
            vec![0.5, 0.5, 0.5, 0.5, 0.5, 0.4], // four wrong texts tie above: rank 4
        ])
        .unwrap();
        assert_eq!(ranks(&i2t, |i| truth.img2txt[i].clone()), vec![0, 1, 4]);
        let t2i = ScoreMatrix::from_rows(&[
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0], // image 1 above, image 2 ties with the right one: rank 2
            vec![0.2, 0.9, 0.1],
            vec![0.3, 0.3, 0.3], // tie with both wrong images: rank 2
            vec![0.0, 0.0, 1.0],
            vec![0.0, 0.5, f32::NAN], // NaN is the lowest score: rank 2
        ])
        .unwrap();
        let m = retrieval_metrics(&i2t, &t2i, &truth).unwrap();
        assert!((m.txt_r1 - 100.0 / 3.0).abs() < 1e-9);
        assert!((m.txt_r5 - 100.0).abs() < 1e-9);
        assert!((m.img_r1 - 50.0).abs() < 1e-9, "texts 0, 2, 4 rank first: {m:?}");
        assert!((m.img_r5 - 100.0).abs() < 1e-9);
        assert!((m.txt_r_mean - (100.0 / 3.0 + 200.0) / 3.0).abs() < 1e-9);
        assert!((m.r_mean - (m.txt_r_mean + m.img_r_mean) / 2.0).abs() < 1e-12);
        assert_eq!(ours(&m), direct(&i2t, &t2i, &truth));
    }

    #[test]
    fn five_captions_per_image_match_the_direct_implementation() {
        let mut g = Lcg(7);
        for trial in 0..20 {
            let n_img = 3 + trial % 9;
            let truth = GroundTruth::consecutive(&vec![5; n_img]).unwrap();
            let n_txt = truth.texts();
            // Coarse values make ties common: scores from {0, 0.25, ..., 1}.
            let coarse = trial % 2 == 0;
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n).map(|_| if coarse { (g.next() * 5.0).floor() / 4.0 } else { g.next() }).collect()
            };
            let i2t = ScoreMatrix::new(n_img, n_txt, draw(n_img * n_txt)).unwrap();
            let t2i = ScoreMatrix::new(n_txt, n_img, draw(n_txt * n_img)).unwrap();
            let m = retrieval_metrics(&i2t, &t2i, &truth).unwrap();
            assert_eq!(ours(&m), direct(&i2t, &t2i, &truth), "trial {trial}");
        }
    }

    #[test]
    fn perfect_constant_and_reversed_scores() {
        let truth = GroundTruth::consecutive(&[5, 5, 5, 5]).unwrap();
        let (n_img, n_txt) = (4, 20);
        let perfect: Vec<f32> =
            (0..n_img * n_txt).map(|x| f32::from(u8::from(truth.txt2img[x % n_txt] == x / n_txt))).collect();
        let i2t = ScoreMatrix::new(n_img, n_txt, perfect).unwrap();
        let m = retrieval_metrics(&i2t, &i2t.transpose(), &truth).unwrap();
        assert!(m.entries().iter().all(|(_, v)| *v == 100.0), "{m:?}");
        // Ties everywhere: nothing is retrieved at 1 (no wrong candidate may be outranked by luck).
        let flat = ScoreMatrix::new(n_img, n_txt, vec![0.5; n_img * n_txt]).unwrap();
        let m = retrieval_metrics(&flat, &flat.transpose(), &truth).unwrap();
        assert_eq!((m.txt_r1, m.img_r1), (0.0, 0.0));
        // 3 wrong images tie with the right one: rank 3, inside 5 and 10.
        assert_eq!((m.img_r5, m.img_r10), (100.0, 100.0));
        // Image->text: 15 wrong texts tie: rank 15.
        assert_eq!((m.txt_r5, m.txt_r10), (0.0, 0.0));
        // Reversed: the right texts score lowest.
        let reversed = ScoreMatrix::new(
            n_img,
            n_txt,
            (0..n_img * n_txt).map(|x| f32::from(u8::from(truth.txt2img[x % n_txt] != x / n_txt))).collect(),
        )
        .unwrap();
        let m = retrieval_metrics(&reversed, &reversed.transpose(), &truth).unwrap();
        assert_eq!((m.txt_r10, m.img_r1), (0.0, 0.0));
    }

    #[test]
    fn shapes_and_ground_truth_are_checked() {
        assert!(GroundTruth::from_img2txt(vec![vec![0], vec![0, 1]]).is_err(), "text 0 in two images");
        assert!(GroundTruth::from_img2txt(vec![vec![0], vec![]]).is_err(), "an image without captions");
        assert!(GroundTruth::from_img2txt(vec![vec![0], vec![5]]).is_err(), "text index out of range");
        let truth = GroundTruth::consecutive(&[1, 2]).unwrap();
        assert_eq!(truth.txt2img, vec![0, 1, 1]);
        let wrong = ScoreMatrix::new(3, 2, vec![0.0; 6]).unwrap();
        assert!(retrieval_metrics(&wrong, &wrong, &truth).is_err());
        assert!(ScoreMatrix::new(2, 2, vec![0.0; 3]).is_err());
    }

    #[test]
    fn chance_matches_the_expected_recall_of_random_scores() {
        let truth = GroundTruth::consecutive(&[5; 10]).unwrap();
        let c = chance(&truth);
        assert!((c.img_r1 - 10.0).abs() < 1e-9 && (c.img_r10 - 100.0).abs() < 1e-9);
        // One of 50 texts at random: P(any of 5 right texts first) = 5/50.
        assert!((c.txt_r1 - 10.0).abs() < 1e-9, "{c:?}");
        // Average over many random score matrices approaches it.
        let mut g = Lcg(3);
        let (mut sum_txt5, trials) = (0.0, 400);
        for _ in 0..trials {
            let i2t = ScoreMatrix::new(10, 50, (0..500).map(|_| g.next()).collect()).unwrap();
            let t2i = ScoreMatrix::new(50, 10, (0..500).map(|_| g.next()).collect()).unwrap();
            sum_txt5 += retrieval_metrics(&i2t, &t2i, &truth).unwrap().txt_r5;
        }
        let mean = sum_txt5 / trials as f64;
        assert!((mean - c.txt_r5).abs() < 3.0, "random txt_r5 {mean} vs chance {}", c.txt_r5);
    }

    #[test]
    fn tables_put_metrics_side_by_side() {
        let truth = GroundTruth::consecutive(&[2, 2]).unwrap();
        let c = chance(&truth);
        let t = table(&[("before", &c), ("after", &c)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 10);
        assert!(lines[0].contains("before") && lines[0].contains("after"));
        assert!(lines[9].starts_with("r_mean"));
    }
}
