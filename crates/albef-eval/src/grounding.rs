//! Weakly supervised grounding's evaluation on RefCOCO+, as the reference's `grounding_eval` and
//! `computeIoU` (ALBEF's dataset/utils.py): an expression's Grad-CAM map (a grid x grid square)
//! is upsampled bicubically to its image's size, every proposal box of the image scores the sum
//! of the map inside it over its area^alpha, the best box is right when its IoU with the
//! referred object's box is at least 0.5, and accuracy is counted per split (val, testA, testB).
//!
//! The pure parts live here: IoU, upsampling, box scores, the choice, the tally, the annotations
//! (the refer toolkit's `refs(unc).p` and COCO's `instances.json`), the proposals (`dets.json`)
//! and pictures of a choice. Departures from the reference, each where it is made:
//! - `box_scores`: a coordinate at or below -1 clamps to 0 (Python's slice would count it from the
//!   far end); a box with w <= 0 or h <= 0 scores -inf; sums are in f64 (the reference's in fp32).
//! - `best_box`: the argmax whatever its sign (the reference keeps the previous expression's box
//!   when no score is positive).
//! - `RefCoco::load`: a repeated id, a ref naming an annotation or image that is not there, or an
//!   image over `max_pixels` is an error (the reference keeps the last, fails later, or tries).

use albef_data::bad::clip;
use albef_data::store::Location;
use albef_model::pth::{Value, unpickle};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::Range;
use std::str::FromStr;
use tokio::runtime::Handle;

/// The reference's exponent of the box area in a box's score (`grounding_eval(alpha=0.5)`).
pub const ALPHA: f64 = 0.5;
/// A chosen box is right when its IoU with the referred object's box is at least this.
pub const CORRECT_IOU: f64 = 0.5;

/// A box as COCO and the reference give it: [x, y, w, h] in pixels of the original image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoxXywh {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl BoxXywh {
    /// The rows and columns the reference's `mask[int(y):int(y+h), int(x):int(x+w)]` covers in a
    /// (height, width) map.
    fn pixels(&self, height: usize, width: usize) -> (Range<usize>, Range<usize>) {
        (slice(self.y, self.h, height), slice(self.x, self.w, width))
    }
}

/// Python's `[int(start):int(start + len)]` on an axis of `dim`: truncation toward zero, bounds
/// clamped to [0, dim], empty when the stop is not past the start. A bound at or below -1 clamps
/// to 0 where Python would count it from the end (no real proposal has one).
fn slice(start: f64, len: f64, dim: usize) -> Range<usize> {
    // `as usize` truncates toward zero and saturates (NaN: 0).
    let at = |v: f64| (v.max(0.0) as usize).min(dim);
    let (a, b) = (at(start), at(start + len));
    a..b.max(a)
}

/// The reference's computeIoU exactly: inclusive pixel corners (x2 = x + w - 1), an
/// intersection only when x1 < x2 and y1 < y2 strictly (boxes meeting in a line of pixels have
/// none), inter = (x2 - x1 + 1)(y2 - y1 + 1), union = w1 h1 + w2 h2 - inter.
pub fn iou(a: &BoxXywh, b: &BoxXywh) -> f64 {
    let (x1, y1) = (a.x.max(b.x), a.y.max(b.y));
    let x2 = (a.x + a.w - 1.0).min(b.x + b.w - 1.0);
    let y2 = (a.y + a.h - 1.0).min(b.y + b.h - 1.0);
    let inter = if x1 < x2 && y1 < y2 { (x2 - x1 + 1.0) * (y2 - y1 + 1.0) } else { 0.0 };
    inter / (a.w * a.h + b.w * b.h - inter)
}

/// A (grid x grid) map upsampled to (height, width) as the reference's
/// `F.interpolate(mode='bicubic')` (align_corners False), in fp32 on the CPU. Row-major.
pub fn upsample(map: &[f32], grid: usize, height: usize, width: usize) -> Result<Vec<f32>> {
    ensure!(map.len() == grid * grid, "a heat map of {} values is not {grid} x {grid}", map.len());
    let t = tch::Tensor::from_slice(map).view([1, 1, grid as i64, grid as i64]);
    let up = t.f_upsample_bicubic2d([height as i64, width as i64], false, None::<f64>, None::<f64>)?;
    Ok(Vec::<f32>::try_from(up.view([-1]))?)
}

/// Each proposal's score as the reference's: `sum(map[int(y):int(y+h), int(x):int(x+w)]) /
/// (w*h)^alpha`, from a summed-area table (f64) so that thousands of boxes cost one pass over the
/// map. A box with w <= 0 or h <= 0 scores -inf: never chosen while a proper box is there (the
/// reference's 0/0 is NaN, never chosen either).
///
/// # Panics
/// When `map` is not `height * width` long.
pub fn box_scores(map: &[f32], height: usize, width: usize, proposals: &[BoxXywh], alpha: f64) -> Vec<f64> {
    assert_eq!(map.len(), height * width, "a map of {} values is not {height} x {width}", map.len());
    let sat = summed_area(map, height, width);
    let at = |y: usize, x: usize| sat[y * (width + 1) + x];
    let score = |b: &BoxXywh| {
        if !(b.w > 0.0 && b.h > 0.0) {
            return f64::NEG_INFINITY;
        }
        let (rows, cols) = b.pixels(height, width);
        let sum =
            at(rows.end, cols.end) - at(rows.start, cols.end) - at(rows.end, cols.start) + at(rows.start, cols.start);
        sum / (b.w * b.h).powf(alpha)
    };
    proposals.iter().map(score).collect()
}

/// The (height + 1) x (width + 1) table whose (y, x) entry sums the map's rows < y, columns < x.
fn summed_area(map: &[f32], height: usize, width: usize) -> Vec<f64> {
    let mut sat = vec![0f64; (height + 1) * (width + 1)];
    for y in 0..height {
        let mut row = 0f64;
        for x in 0..width {
            row += f64::from(map[y * width + x]);
            sat[(y + 1) * (width + 1) + x + 1] = sat[y * (width + 1) + x + 1] + row;
        }
    }
    sat
}

/// The index of the first highest score (None for no proposals); a NaN score loses to any other.
/// The reference starts from a best score of 0 with a strict '>', so when no score is positive it
/// silently keeps the previous expression's box; here the argmax wins whatever its sign.
pub fn best_box(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if best.is_none_or(|b| s > scores[b] || (scores[b].is_nan() && !s.is_nan())) {
            best = Some(i);
        }
    }
    best
}

/// One expression's outcome.
#[derive(Clone, Debug)]
pub struct Grounded {
    /// The heat map at the image's size (row-major, height x width), for `render`.
    pub heat: Vec<f32>,
    /// The chosen proposal: its index and box.
    pub index: usize,
    pub chosen: BoxXywh,
    /// Its IoU with the referred object's box.
    pub iou: f64,
}

impl Grounded {
    pub fn correct(&self) -> bool {
        self.iou >= CORRECT_IOU
    }
}

/// An expression's map (grid x grid) grounded among its image's proposals, as `grounding_eval`
/// does for one result: upsample, score (`ALPHA`), choose, IoU. None when there are no proposals.
pub fn ground(map: &[f32], grid: usize, referent: &Referent, proposals: &[BoxXywh]) -> Result<Option<Grounded>> {
    let (height, width) = (referent.height as usize, referent.width as usize);
    let heat = upsample(map, grid, height, width)?;
    let scores = box_scores(&heat, height, width, proposals, ALPHA);
    Ok(best_box(&scores).map(|index| {
        let chosen = proposals[index];
        Grounded { iou: iou(&referent.bbox, &chosen), heat, index, chosen }
    }))
}

/// RefCOCO+'s splits (unc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefSplit {
    Train,
    Val,
    TestA,
    TestB,
}

impl RefSplit {
    const ALL: [RefSplit; 4] = [RefSplit::Train, RefSplit::Val, RefSplit::TestA, RefSplit::TestB];
    /// The splits the reference evaluates, in the tally's order.
    const EVALUATED: [RefSplit; 3] = [RefSplit::Val, RefSplit::TestA, RefSplit::TestB];

    pub fn name(self) -> &'static str {
        match self {
            RefSplit::Train => "train",
            RefSplit::Val => "val",
            RefSplit::TestA => "testA",
            RefSplit::TestB => "testB",
        }
    }
}

impl FromStr for RefSplit {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let found = RefSplit::ALL.into_iter().find(|split| split.name() == s);
        found.with_context(|| format!("split {:?} is not one of train, val, testA, testB", clip(s, 40)))
    }
}

/// Correct choices and expressions per evaluated split (val, testA, testB), summable across ranks
/// as `to_vec`'s numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroundingTally {
    /// (correct, total) per split of `RefSplit::EVALUATED`.
    counts: [(u64, u64); 3],
}

impl GroundingTally {
    /// Counts one expression; one of the train split is not counted (as the reference's).
    pub fn add(&mut self, split: RefSplit, correct: bool) {
        if let Some(slot) = RefSplit::EVALUATED.iter().position(|s| *s == split) {
            self.counts[slot].0 += u64::from(correct);
            self.counts[slot].1 += 1;
        }
    }

    /// [val correct, val total, testA correct, testA total, testB correct, testB total]: f32
    /// holds counts exactly up to 2^24.
    pub fn to_vec(&self) -> Vec<f32> {
        self.counts.iter().flat_map(|&(c, t)| [c as f32, t as f32]).collect()
    }

    /// The tally of `to_vec`'s numbers (or their sum over ranks).
    pub fn from_vec(v: &[f32]) -> Result<Self> {
        ensure!(v.len() == 6, "a grounding tally of {} numbers, not 6", v.len());
        let count = |x: f32| {
            ensure!(x >= 0.0 && x.fract() == 0.0, "a grounding tally with the count {x}");
            Ok(x as u64)
        };
        let mut t = GroundingTally::default();
        for (slot, pair) in v.chunks_exact(2).enumerate() {
            let (c, n) = (count(pair[0])?, count(pair[1])?);
            ensure!(c <= n, "a grounding tally with {c} correct of {n}");
            t.counts[slot] = (c, n);
        }
        Ok(t)
    }

    /// Accuracy in percent of each split that has expressions: ("val" | "testA" | "testB", %).
    pub fn accuracies(&self) -> Vec<(&'static str, f64)> {
        let with_rows = RefSplit::EVALUATED.iter().zip(self.counts).filter(|(_, (_, n))| *n > 0);
        with_rows.map(|(s, (c, n))| (s.name(), 100.0 * c as f64 / n as f64)).collect()
    }
}

/// One referring expression's target: its split, the referred object's box and its image's size.
#[derive(Clone, Debug, PartialEq)]
pub struct Referent {
    pub ref_id: i64,
    pub image_id: i64,
    pub split: RefSplit,
    pub bbox: BoxXywh,
    pub height: u32,
    pub width: u32,
}

/// The referring expressions' targets by ref_id (the refer toolkit's `Refs`, `refToAnn`, `Imgs`).
#[derive(Clone, Debug)]
pub struct RefCoco {
    refs: HashMap<i64, Referent>,
}

impl RefCoco {
    /// Reads `refs`, the refer toolkit's `refs(unc).p` (a pickle of a list of dicts with ref_id,
    /// ann_id, image_id and split, Python 2's or 3's, protocols 0-5, read without running code) or
    /// the same list as JSON, and `instances`, COCO's instances.json (`images` with id, height
    /// and width, `annotations` with id and bbox). An image over `max_pixels` is refused: the heat
    /// map is upsampled to its size.
    pub fn load(refs: &str, instances: &str, max_pixels: u64, handle: &Handle) -> Result<Self> {
        let rows = parse_refs(&handle.block_on(Location::open(refs)?.read_all())?, refs)?;
        let coco = Instances::parse(&handle.block_on(Location::open(instances)?.read_all())?, instances, max_pixels)?;
        let mut out = HashMap::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let referent = coco.referent(r).with_context(|| format!("{refs}: entry {i} (ref_id {})", r.ref_id))?;
            ensure!(out.insert(r.ref_id, referent).is_none(), "{refs}: entry {i}: ref_id {} repeats", r.ref_id);
        }
        Ok(RefCoco { refs: out })
    }

    pub fn get(&self, ref_id: i64) -> Option<&Referent> {
        self.refs.get(&ref_id)
    }

    pub fn len(&self) -> usize {
        self.refs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }
}

/// The fields of a refs entry that grounding reads.
struct RefRow {
    ref_id: i64,
    ann_id: i64,
    image_id: i64,
    split: RefSplit,
}

/// A field of a refs entry, from either encoding (Python 2's strings are bytes).
enum Field {
    Int(i64),
    Text(String),
    Other,
}

/// The refs file's entries; a pickle or JSON by its first byte.
fn parse_refs(bytes: &[u8], url: &str) -> Result<Vec<RefRow>> {
    let rows: Vec<Result<RefRow>> = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => {
            let list: Vec<serde_json::Value> =
                serde_json::from_slice(bytes).with_context(|| format!("{url}: not a JSON list"))?;
            list.iter().map(|e| ref_row(|k| e.get(k).map(json_field))).collect()
        }
        Some(0x80 | b'(' | b']') => {
            let Value::List(list) = unpickle(bytes).with_context(|| format!("{url}: not a readable pickle"))? else {
                bail!("{url}: the pickle is not a list")
            };
            list.iter().map(|e| ref_row(|k| pickle_field(e, k))).collect()
        }
        _ => bail!("{url}: neither a pickle nor a JSON list (the refer toolkit's refs(unc).p)"),
    };
    ensure!(!rows.is_empty(), "{url} lists no referring expressions");
    rows.into_iter().enumerate().map(|(i, r)| r.with_context(|| format!("{url}: entry {i}"))).collect()
}

/// A refs entry from its fields (`get`: None when the entry lacks the key or is no dict).
fn ref_row(get: impl Fn(&str) -> Option<Field>) -> Result<RefRow> {
    let int = |key: &str| match get(key) {
        Some(Field::Int(v)) => Ok(v),
        Some(_) => bail!("{key} is not an integer"),
        None => bail!("no {key}"),
    };
    let (ref_id, ann_id, image_id) = (int("ref_id")?, int("ann_id")?, int("image_id")?);
    let split = match get("split") {
        Some(Field::Text(s)) => s.parse()?,
        Some(_) => bail!("split is not a string"),
        None => bail!("no split"),
    };
    Ok(RefRow { ref_id, ann_id, image_id, split })
}

fn json_field(v: &serde_json::Value) -> Field {
    match v {
        serde_json::Value::Number(n) => n.as_i64().map_or(Field::Other, Field::Int),
        serde_json::Value::String(s) => Field::Text(s.clone()),
        _ => Field::Other,
    }
}

/// The value of `key` in a pickled dict (keys and strings as text or UTF-8 bytes).
fn pickle_field(entry: &Value, key: &str) -> Option<Field> {
    let text = |v: &Value| match v {
        Value::Str(s) => Some(s.clone()),
        Value::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    };
    let Value::Dict(items) = entry else { return None };
    let (_, v) = items.iter().find(|(k, _)| text(k).as_deref() == Some(key))?;
    Some(match v {
        Value::Int(n) => Field::Int(*n),
        other => text(other).map_or(Field::Other, Field::Text),
    })
}

/// What grounding reads of COCO's instances.json; other fields (segmentations) are skipped.
#[derive(Deserialize)]
struct InstancesFile {
    images: Vec<ImageEntry>,
    annotations: Vec<AnnotationEntry>,
}

#[derive(Deserialize)]
struct ImageEntry {
    id: Option<serde_json::Value>,
    height: Option<serde_json::Value>,
    width: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct AnnotationEntry {
    id: Option<serde_json::Value>,
    bbox: Option<Vec<serde_json::Value>>,
}

/// Images' (height, width) and annotations' boxes by id.
struct Instances {
    url: String,
    sizes: HashMap<i64, (u32, u32)>,
    boxes: HashMap<i64, BoxXywh>,
}

impl Instances {
    fn parse(bytes: &[u8], url: &str, max_pixels: u64) -> Result<Self> {
        let file: InstancesFile = serde_json::from_slice(bytes)
            .with_context(|| format!("{url}: not COCO instances (images, annotations)"))?;
        let mut sizes = HashMap::with_capacity(file.images.len());
        for (i, e) in file.images.iter().enumerate() {
            let (id, size) = image_size(e, max_pixels).with_context(|| format!("{url}: images entry {i}"))?;
            ensure!(sizes.insert(id, size).is_none(), "{url}: images entry {i}: image id {id} repeats");
        }
        let mut boxes = HashMap::with_capacity(file.annotations.len());
        for (i, e) in file.annotations.iter().enumerate() {
            let at = || format!("{url}: annotations entry {i}");
            let id = integer(e.id.as_ref(), "id").with_context(at)?;
            let bbox = number_box(e.bbox.as_deref().context("no bbox").with_context(at)?).with_context(at)?;
            ensure!(boxes.insert(id, bbox).is_none(), "{url}: annotations entry {i}: annotation id {id} repeats");
        }
        Ok(Instances { url: url.to_string(), sizes, boxes })
    }

    fn referent(&self, r: &RefRow) -> Result<Referent> {
        let bbox = *self.boxes.get(&r.ann_id).with_context(|| format!("ann_id {} is not in {}", r.ann_id, self.url))?;
        let size =
            self.sizes.get(&r.image_id).with_context(|| format!("image_id {} is not in {}", r.image_id, self.url));
        let (height, width) = *size?;
        Ok(Referent { ref_id: r.ref_id, image_id: r.image_id, split: r.split, bbox, height, width })
    }
}

/// An image entry's id and (height, width), refused when empty or over `max_pixels`.
fn image_size(e: &ImageEntry, max_pixels: u64) -> Result<(i64, (u32, u32))> {
    let id = integer(e.id.as_ref(), "id")?;
    let side = |v, key| -> Result<u32> {
        let n = integer(v, key)?;
        u32::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("image {id}: {key} {n} is not a positive size"))
    };
    let (height, width) = (side(e.height.as_ref(), "height")?, side(e.width.as_ref(), "width")?);
    let pixels = u64::from(height) * u64::from(width);
    ensure!(
        pixels <= max_pixels,
        "image {id}: {width} x {height} is over max_pixels ({max_pixels}), the largest heat map made"
    );
    Ok((id, (height, width)))
}

fn integer(v: Option<&serde_json::Value>, key: &str) -> Result<i64> {
    let v = v.with_context(|| format!("no {key}"))?;
    v.as_i64().with_context(|| format!("{key} {} is not an integer", clip(&v.to_string(), 40)))
}

/// The box of [x, y, w, h, ...] (further columns, such as a detector's score, ignored).
fn number_box(v: &[serde_json::Value]) -> Result<BoxXywh> {
    ensure!(v.len() >= 4, "a box of {} numbers, not [x, y, w, h]", v.len());
    let n = |i: usize| {
        let x = v[i].as_f64().filter(|x| x.is_finite());
        x.with_context(|| format!("box coordinate {} is not a finite number", clip(&v[i].to_string(), 40)))
    };
    Ok(BoxXywh { x: n(0)?, y: n(1)?, w: n(2)?, h: n(3)? })
}

/// The proposals file (the reference's dets.json): `{"<image_id>": [[x, y, w, h, ...], ...]}`.
pub fn load_proposals(url: &str, handle: &Handle) -> Result<HashMap<i64, Vec<BoxXywh>>> {
    let bytes = handle.block_on(Location::open(url)?.read_all())?;
    let file: HashMap<String, Vec<Vec<serde_json::Value>>> = serde_json::from_slice(&bytes)
        .with_context(|| format!("{url}: not proposals ({{\"<image_id>\": [[x, y, w, h, ...], ...]}})"))?;
    let image = |(key, dets): (String, Vec<Vec<serde_json::Value>>)| {
        let id: i64 =
            key.parse().ok().with_context(|| format!("{url}: key {:?} is not an image id", clip(&key, 40)))?;
        let boxes = dets
            .iter()
            .enumerate()
            .map(|(i, d)| number_box(d).with_context(|| format!("{url}: image {id}: entry {i}")));
        Ok((id, boxes.collect::<Result<Vec<_>>>()?))
    };
    file.into_iter().map(image).collect()
}

/// The colour of the chosen box's outline.
const CHOSEN: [u8; 3] = [0, 255, 0];
/// The colour of the referred object's box's outline.
const TRUTH: [u8; 3] = [255, 0, 255];
/// Outlines' width in pixels.
const LINE: usize = 2;

/// A picture of a choice (`albef ground --visualize`): the RGB image (`rgb`, row-major, 3 bytes a
/// pixel, `width` x `height`) with `heat` (as many values, e.g. `Grounded::heat`) blended over it
/// half and half in the jet colormap (scaled by the map's maximum; negative values as 0), the
/// chosen box outlined in green and the referred object's, when given, in magenta. Returns the
/// picture in the same layout (`image::RgbImage::from_raw(width, height, ..)`).
///
/// # Panics
/// When `rgb` or `heat` does not have `width * height` pixels.
pub fn render(
    rgb: &[u8],
    (width, height): (usize, usize),
    heat: &[f32],
    chosen: &BoxXywh,
    truth: Option<&BoxXywh>,
) -> Vec<u8> {
    assert_eq!(rgb.len(), width * height * 3, "an image that is not {width} x {height} RGB");
    assert_eq!(heat.len(), width * height, "a heat map that is not {width} x {height}");
    let max = heat.iter().copied().filter(|v| v.is_finite()).fold(0f32, f32::max);
    let scale = if max > 0.0 { 1.0 / max } else { 0.0 };
    let blend = |(px, &v): (&[u8], &f32)| {
        let c = jet(v * scale);
        [0, 1, 2].map(|i| ((f32::from(px[i]) + 255.0 * c[i]) / 2.0).round() as u8)
    };
    let mut out: Vec<u8> = rgb.chunks_exact(3).zip(heat).flat_map(blend).collect();
    if let Some(t) = truth {
        outline(&mut out, (width, height), t, TRUTH);
    }
    outline(&mut out, (width, height), chosen, CHOSEN);
    out
}

/// Jet's colour of `t` in [0, 1] (clamped; NaN as 0): blue, cyan, yellow, red.
fn jet(t: f32) -> [f32; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    [3.0, 2.0, 1.0].map(|c| (1.5 - (4.0 * t - c).abs()).clamp(0.0, 1.0))
}

/// Paints the `LINE` pixels inside the edges of the pixels `b` scores (its slice of the map).
fn outline(rgb: &mut [u8], (width, height): (usize, usize), b: &BoxXywh, colour: [u8; 3]) {
    let (rows, cols) = b.pixels(height, width);
    let edge = |v: usize, r: &Range<usize>| v < r.start + LINE || v + LINE >= r.end;
    for y in rows.clone() {
        for x in cols.clone().filter(|&x| edge(y, &rows) || edge(x, &cols)) {
            rgb[(y * width + x) * 3..][..3].copy_from_slice(&colour);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: f64, y: f64, w: f64, h: f64) -> BoxXywh {
        BoxXywh { x, y, w, h }
    }

    #[test]
    fn iou_follows_compute_iou() {
        assert_eq!(iou(&b(0.0, 0.0, 10.0, 10.0), &b(20.0, 20.0, 5.0, 5.0)), 0.0);
        // Sharing the column x = 9 (inclusive corners: x2 = 9 = x1): no intersection.
        assert_eq!(iou(&b(0.0, 0.0, 10.0, 10.0), &b(9.0, 0.0, 10.0, 10.0)), 0.0);
        assert_eq!(iou(&b(3.0, 4.0, 10.0, 20.0), &b(3.0, 4.0, 10.0, 20.0)), 1.0);
        // Nested: inter = (4..=7)x(4..=7) = 16 = the inner box; union = 100 + 16 - 16.
        assert_eq!(iou(&b(0.0, 0.0, 10.0, 10.0), &b(4.0, 4.0, 4.0, 4.0)), 16.0 / 100.0);
        // x: max(0, 5) = 5 .. min(9, 14) = 9 -> 5 columns; y: max(0, 2) = 2 .. min(9, 11) = 9 ->
        // 8 rows; inter 40, union 100 + 100 - 40 = 160.
        assert_eq!(iou(&b(0.0, 0.0, 10.0, 10.0), &b(5.0, 2.0, 10.0, 10.0)), 40.0 / 160.0);
        // Fractional, as detections are: x 2.5..=min(10.5, 11.5) -> 9 wide, y 0..=min(4, 6) -> 5
        // high; inter 45, union 55 + 100 - 45.
        assert_eq!(iou(&b(0.5, 0.0, 11.0, 5.0), &b(2.5, -3.0, 10.0, 10.0)), 45.0 / 110.0);
    }

    fn close(got: &[f64], want: &[f64]) {
        let near = |(a, b): (&f64, &f64)| a == b || (a - b).abs() <= 1e-12 * b.abs();
        assert!(got.len() == want.len() && got.iter().zip(want).all(near), "{got:?} != {want:?}");
    }

    /// A 20 x 30 map, 0 but for a hot rectangle of 1s at rows 5..9, columns 10..16.
    fn hot_map() -> Vec<f32> {
        let (h, w) = (20, 30);
        let mut m = vec![0f32; h * w];
        for y in 5..9 {
            for x in 10..16 {
                m[y * w + x] = 1.0;
            }
        }
        m
    }

    #[test]
    fn the_box_of_the_hot_rectangle_wins() {
        let exact = b(10.0, 5.0, 6.0, 4.0);
        let larger = b(8.0, 3.0, 10.0, 8.0);
        let elsewhere = b(20.0, 10.0, 6.0, 4.0);
        let s = box_scores(&hot_map(), 20, 30, &[larger, elsewhere, exact], 0.5);
        // 24 / sqrt(80), 0, 24 / sqrt(24): the area's square root favours the tight box.
        close(&s, &[24.0 / 80f64.sqrt(), 0.0, 24.0 / 24f64.sqrt()]);
        assert_eq!(best_box(&s), Some(2));
    }

    #[test]
    fn box_coordinates_truncate_and_clamp_as_python_slices() {
        let m = hot_map();
        // int(9.9) = 9 .. int(9.9 + 1.2) = 11: columns 9 and 10, rows int(4.5) = 4 .. int(5.6) = 5.
        let s = box_scores(&m, 20, 30, &[b(9.9, 4.5, 1.2, 1.1), b(9.9, 4.5, 1.2, 1.6)], 1.0);
        // The second reaches row int(6.1) = 6, taking the hot pixel (5, 10).
        close(&s, &[0.0, 1.0 / (1.2 * 1.6)]);
        // Past the border: the slice stops at the map's edge, the area stays the box's; int()
        // takes -0.5 and -0.7 to 0 as Python does; -3 clamps to 0 (Python: 27, an empty slice).
        let mut ones = vec![1f32; 20 * 30];
        ones[19 * 30 + 29] = 5.0;
        let boxes = [b(28.0, 18.0, 10.0, 10.0), b(-0.5, -0.7, 2.0, 2.0), b(-3.0, 0.0, 5.0, 1.0)];
        let s = box_scores(&ones, 20, 30, &boxes, 1.0);
        close(&s, &[(3.0 + 5.0) / 100.0, 1.0 / 4.0, 2.0 / 5.0]);
        // Empty boxes never win.
        let s = box_scores(&ones, 20, 30, &[b(1.0, 1.0, 0.0, 5.0), b(1.0, 1.0, -2.0, -2.0)], 0.5);
        assert_eq!(s, vec![f64::NEG_INFINITY; 2]);
    }

    #[test]
    fn the_first_best_box_wins_whatever_its_sign() {
        assert_eq!(best_box(&[]), None);
        assert_eq!(best_box(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(best_box(&[-4.0, -1.0, -1.0]), Some(1));
        assert_eq!(best_box(&[f64::NAN, -1.0, f64::NAN, 0.5]), Some(3));
        assert_eq!(best_box(&[f64::NEG_INFINITY, f64::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn splits_parse_their_names() {
        for s in RefSplit::ALL {
            assert_eq!(s.name().parse::<RefSplit>().unwrap(), s);
        }
        let err = "testC".parse::<RefSplit>().unwrap_err().to_string();
        assert!(err.contains("\"testC\" is not one of"), "{err}");
    }

    #[test]
    fn tallies_round_trip_and_sum() {
        let mut a = GroundingTally::default();
        a.add(RefSplit::Val, true);
        a.add(RefSplit::Val, false);
        a.add(RefSplit::TestB, true);
        a.add(RefSplit::Train, true);
        assert_eq!(a.to_vec(), vec![1.0, 2.0, 0.0, 0.0, 1.0, 1.0]);
        assert_eq!(GroundingTally::from_vec(&a.to_vec()).unwrap(), a);
        assert_eq!(a.accuracies(), vec![("val", 50.0), ("testB", 100.0)]);
        let mut b = GroundingTally::default();
        b.add(RefSplit::TestA, false);
        b.add(RefSplit::Val, true);
        let sum: Vec<f32> = a.to_vec().iter().zip(b.to_vec()).map(|(x, y)| x + y).collect();
        let sum = GroundingTally::from_vec(&sum).unwrap();
        assert_eq!(sum.accuracies(), vec![("val", 100.0 * 2.0 / 3.0), ("testA", 0.0), ("testB", 100.0)]);
        for bad in [&[1.0f32, 2.0][..], &[3.0, 2.0, 0.0, 0.0, 0.0, 0.0], &[0.5, 2.0, 0.0, 0.0, 0.0, 0.0]] {
            assert!(GroundingTally::from_vec(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn upsampling_keeps_a_constant_map() {
        let up = upsample(&[0.25; 16], 4, 7, 9).unwrap();
        assert_eq!(up.len(), 63);
        assert!(up.iter().all(|v| (v - 0.25).abs() < 1e-6), "{up:?}");
        assert!(upsample(&[0.0; 15], 4, 7, 9).is_err());
    }

    #[test]
    fn render_blends_the_heat_and_outlines_the_boxes() {
        let (w, h) = (12, 10);
        let grey = vec![100u8; w * h * 3];
        let mut heat = vec![0f32; w * h];
        heat[5 * w + 6] = 2.0;
        let px = |img: &[u8], x: usize, y: usize| [0, 1, 2].map(|i| img[(y * w + x) * 3 + i]);
        let plain = render(&grey, (w, h), &heat, &b(0.0, 0.0, 0.0, 0.0), None);
        // Hot: jet's red half over grey; cold: jet's dark blue half over grey.
        assert_eq!(px(&plain, 6, 5), [114, 50, 50]);
        assert_eq!(px(&plain, 0, 0), [50, 50, 114]);
        let drawn = render(&grey, (w, h), &heat, &b(2.0, 1.0, 6.0, 5.0), Some(&b(7.0, 4.0, 5.0, 6.0)));
        // Chosen: rows 1..6, columns 2..8, its 2-pixel band green; its inside untouched.
        for (x, y) in [(2, 1), (3, 2), (7, 5), (6, 4), (4, 1), (2, 3)] {
            assert_eq!(px(&drawn, x, y), CHOSEN, "({x}, {y})");
        }
        assert_eq!(px(&drawn, 4, 3), px(&plain, 4, 3));
        // Truth: rows 4..10, columns 7..12, magenta where the chosen box is not drawn over it.
        for (x, y) in [(11, 9), (8, 9), (11, 6), (9, 4)] {
            assert_eq!(px(&drawn, x, y), TRUTH, "({x}, {y})");
        }
        assert_eq!(px(&drawn, 9, 7), px(&plain, 9, 7));
        assert_eq!(px(&drawn, 1, 8), px(&plain, 1, 8));
    }
}
