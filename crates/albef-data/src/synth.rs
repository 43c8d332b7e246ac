//! Generated image-text pairs: pictures of one or two coloured shapes with captions that
//! describe them ("a small red circle left of a large blue square", "a large green triangle at
//! the top left"). Learnable in minutes by the small model, deterministic given the seed, and
//! needing no download.
//!
//! Every caption of a picture names all of it (shape, colour and size of each object, and where
//! a single object stands), so that few pictures share a description: in a retrieval split the
//! right image is identifiable, and in a training batch a hard negative is rarely a picture that
//! the caption describes just as well.

use crate::rng::SplitMix64;

const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [50, 80, 230]),
    ("yellow", [235, 220, 50]),
    ("purple", [150, 60, 190]),
    ("white", [245, 245, 245]),
];
const SIZES: [(&str, f64); 2] = [("small", 0.11), ("large", 0.2)];
/// (relation, its converse): the first object is left of / above the second.
const RELATIONS: [(&str, &str); 2] = [("left of", "right of"), ("above", "below")];
/// A range of object centres, as fractions of the picture's side.
type Span = (f64, f64);
/// Where a single object stands: (phrase, centre range x, centre range y).
const PLACES: [(&str, Span, Span); 5] = [
    ("at the top left", (0.25, 0.35), (0.25, 0.35)),
    ("at the top right", (0.65, 0.75), (0.25, 0.35)),
    ("at the bottom left", (0.25, 0.35), (0.65, 0.75)),
    ("at the bottom right", (0.65, 0.75), (0.65, 0.75)),
    ("in the middle", (0.45, 0.55), (0.45, 0.55)),
];

/// The WordPiece vocabulary of generated captions (`vocab.txt` order): BERT's special tokens
/// at ids 0-4 ([PAD], [UNK], [CLS], [SEP], [MASK]), then every caption word once.
pub fn vocab_tokens() -> Vec<String> {
    use crate::tokenizer::{CLS, MASK, PAD, SEP, UNK};
    let mut tokens: Vec<String> = [PAD, UNK, CLS, SEP, MASK].map(String::from).to_vec();
    for w in caption_words() {
        if !tokens.iter().any(|t| t == w) {
            tokens.push(w.to_string());
        }
    }
    tokens
}

/// Every word a generated caption can use.
fn caption_words() -> Vec<&'static str> {
    let mut words = vec!["a", "of"];
    words.extend(SHAPES);
    words.extend(COLORS.iter().map(|c| c.0));
    words.extend(SIZES.iter().map(|s| s.0));
    for (r, c) in RELATIONS {
        words.extend(r.split(' ').chain(c.split(' ')).filter(|w| *w != "of"));
    }
    for (place, _, _) in PLACES {
        words.extend(place.split(' '));
    }
    words
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Object {
    shape: usize,
    color: usize,
    size: usize,
    cx: f64,
    cy: f64,
}

impl Object {
    fn phrase(&self, with_size: bool) -> String {
        let size = if with_size { format!("{} ", SIZES[self.size].0) } else { String::new() };
        format!("a {size}{} {}", COLORS[self.color].0, SHAPES[self.shape])
    }

    fn covers(&self, x: f64, y: f64, res: f64) -> bool {
        let r = SIZES[self.size].1 * res;
        let (dx, dy) = (x - self.cx, y - self.cy);
        match SHAPES[self.shape] {
            "circle" => dx * dx + dy * dy <= r * r,
            "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
            _ => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
        }
    }
}

/// One generated sample: an RGB picture (HWC, u8) and the captions that describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub key: String,
    pub res: usize,
    pub rgb: Vec<u8>,
    /// The first caption is the full description; the others are paraphrases (a picture of two
    /// objects also gets one without sizes).
    pub captions: Vec<String>,
}

/// A generated dataset: `pair(i)` is a pure function of (seed, i, image_res).
#[derive(Clone, Copy, Debug)]
pub struct SynthSpec {
    pub seed: u64,
    pub image_res: usize,
}

impl SynthSpec {
    pub fn pair(&self, index: u64) -> Pair {
        let scene = self.scene(index);
        let captions = scene.captions.clone();
        Pair { key: format!("synth-{index:08}"), res: self.image_res, rgb: self.paint(scene), captions }
    }

    /// Picture `index`'s layout and captions, before it is painted.
    pub fn scene(&self, index: u64) -> Scene {
        let mut g = SplitMix64::for_item(self.seed, index);
        let res = self.image_res as f64;
        let object = |g: &mut SplitMix64, x: (f64, f64), y: (f64, f64)| Object {
            shape: g.below(SHAPES.len()),
            color: g.below(COLORS.len()),
            size: g.below(SIZES.len()),
            cx: res * (x.0 + (x.1 - x.0) * g.next_f64()),
            cy: res * (y.0 + (y.1 - y.0) * g.next_f64()),
        };
        let (objects, captions) = if g.below(2) == 0 {
            let (place, x, y) = PLACES[g.below(PLACES.len())];
            let o = object(&mut g, x, y);
            (vec![o], vec![format!("{} {place}", o.phrase(true)), format!("{place} {}", o.phrase(true))])
        } else {
            let rel = g.below(RELATIONS.len());
            let (first, second) = if rel == 0 {
                (object(&mut g, (0.2, 0.3), (0.3, 0.7)), object(&mut g, (0.7, 0.8), (0.3, 0.7)))
            } else {
                (object(&mut g, (0.3, 0.7), (0.2, 0.3)), object(&mut g, (0.3, 0.7), (0.7, 0.8)))
            };
            let (r, converse) = RELATIONS[rel];
            let captions = vec![
                format!("{} {r} {}", first.phrase(true), second.phrase(true)),
                format!("{} {converse} {}", second.phrase(true), first.phrase(true)),
                format!("{} {r} {}", first.phrase(false), second.phrase(false)),
            ];
            (vec![first, second], captions)
        };
        let background = [60 + g.below(40) as u8, 60 + g.below(40) as u8, 60 + g.below(40) as u8];
        Scene { objects, captions, background, res: self.image_res, noise: g }
    }

    /// The scene's pixels (HWC, u8), with mild noise so that no two pictures are exactly alike.
    pub(crate) fn paint(&self, scene: Scene) -> Vec<u8> {
        let Scene { objects, background, res, noise: mut g, .. } = scene;
        let mut rgb = Vec::with_capacity(res * res * 3);
        for y in 0..res {
            for x in 0..res {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let mut c = background;
                for o in &objects {
                    if o.covers(px, py, res as f64) {
                        c = COLORS[o.color].1;
                    }
                }
                let noise = g.below(17) as i16 - 8;
                rgb.extend(c.iter().map(|&v| (v as i16 + noise).clamp(0, 255) as u8));
            }
        }
        rgb
    }
}

/// A generated picture's layout: its objects, the captions that describe it, its background.
#[derive(Clone, Debug)]
pub struct Scene {
    objects: Vec<Object>,
    pub captions: Vec<String>,
    background: [u8; 3],
    res: usize,
    /// The generator, where the layout left it: it draws the pixel noise next.
    noise: SplitMix64,
}

impl Scene {
    /// Each object's description ("a small red circle") and the box around it, `[x, y, w, h]`
    /// in pixels (COCO's convention).
    pub fn referents(&self) -> Vec<(String, [f64; 4])> {
        let res = self.res as f64;
        self.objects
            .iter()
            .map(|o| {
                let r = SIZES[o.size].1 * res;
                // A square's half side is 0.85 r (see `covers`); circles and triangles reach r.
                let half = if SHAPES[o.shape] == "square" { 0.85 * r } else { r };
                (o.phrase(true), [o.cx - half, o.cy - half, 2.0 * half, 2.0 * half])
            })
            .collect()
    }
}

/// A 500x375 picture with photo-like content, for decode benchmarks (`albef bench`, the transform
/// bench): smooth colour waves at two scales, a few flat shapes and fine noise, so
/// JPEG sizes and decode costs resemble real photos (about 60-100 KB at quality 90).
pub fn photo(seed: u64) -> image::RgbImage {
    let mut rng = SplitMix64::new(seed);
    let shapes: Vec<[f64; 6]> = (0..6).map(|_| std::array::from_fn(|_| rng.next_f64())).collect();
    let phase = rng.next_f64() * 6.0;
    image::RgbImage::from_fn(500, 375, |x, y| {
        let (xf, yf) = (f64::from(x), f64::from(y));
        let shape = shapes.iter().find(|s| {
            let (cx, cy, r) = (s[0] * 500.0, s[1] * 375.0, 20.0 + s[2] * 60.0);
            (xf - cx).powi(2) + (yf - cy).powi(2) < r * r
        });
        image::Rgb(std::array::from_fn(|c| {
            let v = match shape {
                Some(s) => 40.0 + 180.0 * s[3 + c],
                None => {
                    let p = phase + c as f64;
                    128.0
                        + 50.0 * (xf * 0.013 + p).sin() * (yf * 0.021 - p).cos()
                        + 25.0 * (xf * 0.11 + yf * 0.07 + p).sin()
                }
            };
            (v + (rng.next_f64() - 0.5) * 16.0).clamp(0.0, 255.0) as u8
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn pairs_are_deterministic_and_varied() {
        let spec = SynthSpec { seed: 3, image_res: 32 };
        assert_eq!(spec.pair(5), spec.pair(5));
        assert_ne!(spec.pair(5).rgb, spec.pair(6).rgb);
        assert_ne!(SynthSpec { seed: 4, image_res: 32 }.pair(5).captions, spec.pair(5).captions);
        assert_eq!(spec.pair(0).rgb.len(), 32 * 32 * 3);
    }

    #[test]
    fn every_caption_word_is_in_the_vocabulary() {
        let tok = Tokenizer::from_vocab_tokens(vocab_tokens()).unwrap();
        assert_eq!((tok.pad_id(), tok.cls_id(), tok.mask_id()), (0, 2, 4));
        let spec = SynthSpec { seed: 1, image_res: 16 };
        for i in 0..200 {
            for c in spec.pair(i).captions {
                let ids = tok.encode(&c);
                assert!(!ids.contains(&tok.unk_id()), "a word of {c:?} is missing");
                assert_eq!(ids.len(), c.split_whitespace().count() + 1, "{c:?} splits into whole words");
            }
        }
    }

    #[test]
    fn the_named_colour_is_painted() {
        let spec = SynthSpec { seed: 9, image_res: 64 };
        for i in 0..20 {
            let p = spec.pair(i);
            let (name, rgb) = COLORS.iter().find(|(n, _)| p.captions[0].contains(&format!(" {n} "))).unwrap();
            let hits = p
                .rgb
                .chunks(3)
                .filter(|px| px.iter().zip(rgb).all(|(a, b)| (*a as i16 - *b as i16).abs() <= 8))
                .count();
            assert!(hits > 20, "{name} barely visible in {:?}", p.captions[0]);
        }
    }
}

/// What `albef data synth` writes.
#[derive(Clone, Debug)]
pub struct DatasetSpec {
    pub seed: u64,
    /// Side of the generated pictures (the train transform crops and resizes them).
    pub image_res: usize,
    pub train: u64,
    pub test: u64,
    pub shards: u64,
}

/// File names inside a generated dataset.
pub const TRAIN_JSON: &str = "train.json";
pub const TEST_JSON: &str = "test.json";
pub const VOCAB_TXT: &str = "vocab.txt";

/// The brace pattern naming the train shards of a generated dataset under `root`.
pub fn train_shards_pattern(root: &str, shards: u64) -> String {
    format!("{}/train-{{000000..{:06}}}.tar", root.trim_end_matches('/'), shards.saturating_sub(1))
}

pub(crate) fn jpeg(rgb: &[u8], res: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = vec![];
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92);
    image::ImageEncoder::write_image(enc, rgb, res as u32, res as u32, image::ExtendedColorType::Rgb8)?;
    Ok(out)
}

/// Appends a member as WebDataset shards hold them (a plain file, no timestamp).
pub(crate) fn tar_append(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, name, data)?;
    Ok(())
}

/// Writes a learnable dataset under `out`: the train split as WebDataset shards of uneven sizes
/// (`.jpg`, `.txt` with one caption, `.json` with the image id and all captions) and as ALBEF
/// annotation JSON with image files (each row an image id and its captions: retrieval
/// fine-tuning reads either), a held-out retrieval split (`test.json`: image_id and every caption of each
/// image), and a WordPiece vocabulary covering the captions. Deterministic given the spec.
pub fn write_dataset(
    out: &crate::store::Location,
    spec: &DatasetSpec,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    use anyhow::ensure;
    ensure!(spec.shards > 0 && spec.train >= spec.shards, "need at least one training pair per shard");
    let train = SynthSpec { seed: spec.seed, image_res: spec.image_res };
    // The test split draws from another stream, so it never repeats a training picture.
    let test = SynthSpec { seed: spec.seed ^ 0x7E57_7E57, image_res: spec.image_res };

    // Uneven shard sizes: cut points drawn around the even split.
    let mut g = SplitMix64::for_item(spec.seed, u64::MAX);
    let even = spec.train as f64 / spec.shards as f64;
    let mut cuts: Vec<u64> =
        (1..spec.shards).map(|i| ((i as f64 + (g.next_f64() - 0.5) * 0.6) * even).round() as u64).collect();
    cuts.insert(0, 0);
    cuts.push(spec.train);
    for i in 1..cuts.len() {
        cuts[i] = cuts[i].clamp(cuts[i - 1] + 1, spec.train - (cuts.len() - 1 - i) as u64);
    }

    let mut progress = crate::progress::start("generating pictures", spec.train + spec.test);
    let mut annotations = vec![];
    for shard in 0..spec.shards {
        let mut b = tar::Builder::new(Vec::new());
        for i in cuts[shard as usize]..cuts[shard as usize + 1] {
            let pair = train.pair(i);
            let image = jpeg(&pair.rgb, pair.res)?;
            let pick = SplitMix64::for_item(spec.seed, i).below(pair.captions.len());
            tar_append(&mut b, &format!("{}.jpg", pair.key), &image)?;
            tar_append(&mut b, &format!("{}.txt", pair.key), pair.captions[pick].as_bytes())?;
            let meta = serde_json::json!({"key": pair.key, "image_id": pair.key, "captions": pair.captions});
            tar_append(&mut b, &format!("{}.json", pair.key), meta.to_string().as_bytes())?;
            let path = format!("images/train/{}.jpg", pair.key);
            handle.block_on(out.join(&path).write_all(image))?;
            annotations.push(serde_json::json!({"image": path, "image_id": pair.key, "caption": pair.captions}));
            progress.advance(1);
        }
        handle.block_on(out.join(&format!("train-{shard:06}.tar")).write_all(b.into_inner()?))?;
    }
    handle.block_on(out.join(TRAIN_JSON).write_all(serde_json::to_vec(&annotations)?))?;

    let mut test_items = vec![];
    for i in 0..spec.test {
        let pair = test.pair(i);
        let path = format!("images/test/{}.jpg", pair.key);
        handle.block_on(out.join(&path).write_all(jpeg(&pair.rgb, pair.res)?))?;
        test_items.push(serde_json::json!({"image": path, "image_id": i, "caption": pair.captions}));
        progress.advance(1);
    }
    handle.block_on(out.join(TEST_JSON).write_all(serde_json::to_vec(&test_items)?))?;

    let text: String = vocab_tokens().into_iter().map(|t| t + "\n").collect();
    handle.block_on(out.join(VOCAB_TXT).write_all(text.into_bytes()))?;
    Ok(())
}
