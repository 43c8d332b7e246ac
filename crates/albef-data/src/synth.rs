//! Generated image-text pairs: pictures of one or two coloured shapes with captions that
//! describe them ("a small red circle left of a large blue square"). Learnable in minutes by the
//! small model, deterministic given the seed, and needing no download.

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

/// Every word a generated caption can use, for building the vocabulary.
pub fn caption_words() -> Vec<&'static str> {
    let mut words = vec!["a", "of"];
    words.extend(SHAPES);
    words.extend(COLORS.iter().map(|c| c.0));
    words.extend(SIZES.iter().map(|s| s.0));
    for (r, c) in RELATIONS {
        words.extend(r.split(' ').chain(c.split(' ')).filter(|w| *w != "of"));
    }
    words.dedup();
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
    /// The first caption is the full description; the others are paraphrases.
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
            let o = object(&mut g, (0.3, 0.7), (0.3, 0.7));
            (vec![o], vec![o.phrase(true), o.phrase(false)])
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
        let mut rgb = Vec::with_capacity(self.image_res * self.image_res * 3);
        for y in 0..self.image_res {
            for x in 0..self.image_res {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let mut c = background;
                for o in &objects {
                    if o.covers(px, py, res) {
                        c = COLORS[o.color].1;
                    }
                }
                // Mild pixel noise so that no two pictures are exactly alike.
                let noise = g.below(17) as i16 - 8;
                rgb.extend(c.iter().map(|&v| (v as i16 + noise).clamp(0, 255) as u8));
            }
        }
        Pair { key: format!("synth-{index:08}"), res: self.image_res, rgb, captions }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::Vocab;

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
        let vocab = Vocab::with_words(caption_words());
        let spec = SynthSpec { seed: 1, image_res: 16 };
        for i in 0..200 {
            for c in spec.pair(i).captions {
                for w in c.split_whitespace() {
                    assert_ne!(vocab.id(w), vocab.id(crate::vocab::UNK), "{w:?} missing");
                }
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
