//! `albef data prepare`: image-caption pairs (the reference's annotation JSON, or a folder of
//! `name.jpg` + `name.txt`) to WebDataset shards of resized JPEGs in the layout the loader reads
//! (`key.jpg`, `key.txt`, `key.json`), and the dataset index of the shards.
//!
//! Resizing is img2dataset's: `keep_ratio` scales the short side to the image size,
//! `center_crop` then keeps the centre square; sizes round as albumentations rounds them; area
//! averaging (a box filter) when shrinking and Lanczos when enlarging, img2dataset's default
//! interpolations. Input rows are cut into shards of `rows_per_shard` in input order, so a shard
//! holds the same rows whatever ran before: one whose report (`<shard>_prepare.json`, written
//! after the shard) exists is complete, and a later run with the same settings keeps it. Every
//! row is written or dropped under the loader's skip reason, counted per shard and in total.

use crate::bad::{SkipCounts, SkipExample, SkipReason};
use crate::index::{DatasetIndex, INDEX_FILE, INDEX_VERSION, SourceEntry, SourceKind};
use crate::loader::{InputLimits, skip_reason, unread_image_reason};
use crate::sources::{
    IMAGE_EXTENSIONS, TarOptions, annotation_image, annotation_image_root, is_junk_member, parse_annotations, scan_tar,
    split_key,
};
use crate::store::{Location, Oversized};
use crate::synth::tar_append;
use crate::transform::{decode_rgb, resize_view};
use anyhow::{Context, Result, ensure};
use fast_image_resize::images::ImageRef;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::runtime::Handle;

/// How images are fitted to the image size (img2dataset's `resize_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// The short side becomes the image size, the aspect ratio is kept.
    KeepRatio,
    /// As `KeepRatio`, then the centre square of the image size.
    CenterCrop,
}

impl std::str::FromStr for ResizeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "keep_ratio" => Ok(ResizeMode::KeepRatio),
            "center_crop" => Ok(ResizeMode::CenterCrop),
            _ => Err(format!("{s:?} is not keep_ratio or center_crop")),
        }
    }
}

/// What a shard is made with; a kept shard must have been made with the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub image_size: u32,
    pub resize_mode: ResizeMode,
    /// JPEG quality, 1-100.
    pub quality: u8,
    pub rows_per_shard: u64,
}

/// What `albef data prepare` reads.
#[derive(Clone, Debug)]
pub enum Input {
    /// Annotation files; image paths are relative to `image_root`, else to each file's folder.
    Annotations { files: Vec<String>, image_root: String },
    /// A local folder of images and captions sharing a name (`a/b.jpg` + `a/b.txt`).
    Folder(String),
}

/// One shard's report, stored beside it as `<shard>_prepare.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    /// The shard's file name (no tar is written when every row was dropped).
    pub shard: String,
    /// The input rows it holds, `[first, end)`.
    pub rows: [u64; 2],
    pub samples: u64,
    /// Where each sample starts in the tar (what the dataset index stores).
    pub offsets: Vec<u64>,
    /// Rows dropped, by skip reason.
    pub dropped: BTreeMap<String, u64>,
    pub settings: Settings,
}

/// What a run did: every shard's report (kept ones too), in order.
#[derive(Debug)]
pub struct PrepareReport {
    pub shards: Vec<ShardReport>,
    /// Shards complete from an earlier run, kept as they were.
    pub kept: usize,
    /// Rows this run read (those of kept shards not counted).
    pub rows_prepared: u64,
    pub seconds: f64,
    pub threads: usize,
    /// The first few drops of each reason this run saw.
    pub examples: Vec<SkipExample>,
    /// Where the dataset index was written.
    pub index: String,
    /// The shards that hold samples, as `data.train_file` names them.
    pub train_file: String,
}

impl PrepareReport {
    pub fn samples(&self) -> u64 {
        self.shards.iter().map(|s| s.samples).sum()
    }

    /// Drops of every shard, by reason.
    pub fn dropped(&self) -> BTreeMap<String, u64> {
        let mut total = BTreeMap::new();
        for (reason, n) in self.shards.iter().flat_map(|s| &s.dropped) {
            *total.entry(reason.clone()).or_default() += n;
        }
        total
    }
}

/// An input row to write, or why it cannot be.
type Row = std::result::Result<Pair, Dropped>;

struct Pair {
    /// The annotation file or folder the row is from.
    source: Arc<str>,
    image: Location,
    /// The image as the input names it (reports, the `.json` member).
    name: String,
    captions: Captions,
    image_id: Option<String>,
    label: Option<String>,
}

enum Captions {
    Given(Vec<String>),
    File(Location),
}

struct Dropped {
    reason: SkipReason,
    source: String,
    key: String,
    detail: String,
    /// In the run's skips already (a malformed annotation, counted by the parser with why).
    recorded: bool,
}

/// Prepares `input` into shards under `out` (kept where complete), then writes the index.
/// `threads` 0: one per core.
pub fn prepare(
    input: &Input,
    out: &str,
    settings: &Settings,
    threads: usize,
    max_pixels: u64,
    handle: &Handle,
) -> Result<PrepareReport> {
    ensure!(settings.image_size > 0 && settings.rows_per_shard > 0, "image size and rows per shard must be positive");
    ensure!((1..=100).contains(&settings.quality), "JPEG quality must be 1-100");
    let skips = SkipCounts::default();
    let rows = match input {
        Input::Annotations { files, image_root } => annotation_rows(files, image_root, handle, &skips)?,
        Input::Folder(dir) => folder_rows(dir)?,
    };
    ensure!(!rows.is_empty(), "the input holds no row");
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let threads = threads.min(rows.len().div_ceil(settings.rows_per_shard as usize));
    let out = Location::open(out)?;
    let started = Instant::now();
    let job = Job { rows: &rows, out: &out, settings, max_pixels, handle, skips: &skips };
    let done = job.run(threads)?;
    let seconds = started.elapsed().as_secs_f64();
    let kept = done.iter().filter(|(_, kept)| *kept).count();
    let rows_prepared = done.iter().filter(|(_, kept)| !kept).map(|(r, _)| r.rows[1] - r.rows[0]).sum();
    let shards: Vec<ShardReport> = done.into_iter().map(|(r, _)| r).collect();
    let (index, train_file) = write_index(&out, &shards, handle)?;
    Ok(PrepareReport { shards, kept, rows_prepared, seconds, threads, examples: skips.examples(), index, train_file })
}

/// The rows of annotation files, in order; a malformed entry keeps its place as a drop.
fn annotation_rows(files: &[String], image_root: &str, handle: &Handle, skips: &SkipCounts) -> Result<Vec<Row>> {
    let mut rows = vec![];
    for file in files {
        let bytes = read_source(&Location::open(file)?, handle, u64::MAX)?;
        let root = Location::open(&annotation_image_root(file, image_root))?;
        let source: Arc<str> = file.as_str().into();
        for (i, entry) in parse_annotations(&bytes, file, skips)?.into_iter().enumerate() {
            // The loader's image-path rule (with no rewrites: prepare takes none).
            let image = entry.as_ref().map(|a| annotation_image(&root, &a.image, &[]));
            rows.push(match (entry, image) {
                (Some(a), Some(Ok(image))) => Ok(Pair {
                    source: source.clone(),
                    image,
                    name: a.image,
                    captions: Captions::Given(a.captions),
                    image_id: a.image_id,
                    label: a.label,
                }),
                (Some(a), Some(Err(outside))) => Err(Dropped::new(SkipReason::AbsolutePath, file, &a.image, &outside)),
                _ => Err(Dropped {
                    recorded: true,
                    ..Dropped::new(SkipReason::BadAnnotation, file, &format!("#{i}"), "")
                }),
            });
        }
    }
    Ok(rows)
}

/// The rows of a folder: its files grouped by WebDataset's key rule (`a/b.jpg` + `a/b.txt`), in
/// key order; a key without an image or a caption, and leftovers such as `.DS_Store`, are drops.
fn folder_rows(dir: &str) -> Result<Vec<Row>> {
    let root = Location::open(dir)?;
    let source: Arc<str> = dir.into();
    let mut files = vec![];
    list_files(Path::new(dir), "", &mut files)?;
    // Listing order is the file system's: rows must come in the same order every run.
    files.sort();
    let mut keys: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut rows = vec![];
    for file in files {
        if is_junk_member(&file) {
            rows.push(Err(Dropped::new(SkipReason::JunkMember, dir, &file, "")));
            continue;
        }
        let (key, ext) = split_key(&file);
        let (image, caption) = keys.entry(key).or_default();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            image.get_or_insert(file);
        } else if ext == "txt" {
            *caption = Some(file);
        }
    }
    for (key, members) in keys {
        rows.push(match members {
            (Some(image), Some(caption)) => Ok(Pair {
                source: source.clone(),
                image: root.join(&image),
                name: image,
                captions: Captions::File(root.join(&caption)),
                image_id: None,
                label: None,
            }),
            (None, _) => {
                Err(Dropped::new(SkipReason::MissingImage, dir, &key, "no .jpg/.jpeg/.png/.webp/.gif/.bmp file"))
            }
            (Some(_), None) => Err(Dropped::new(SkipReason::MissingCaption, dir, &key, "no .txt file")),
        });
    }
    Ok(rows)
}

/// Every file under `dir` (recursively), as paths relative to the listed root.
fn list_files(dir: &Path, prefix: &str, files: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        // A name that is not UTF-8 cannot be opened as written: its row is counted, not lost.
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        if entry.file_type()?.is_dir() {
            list_files(&entry.path(), &format!("{rel}/"), files)?;
        } else {
            files.push(rel);
        }
    }
    Ok(())
}

impl Dropped {
    fn new(reason: SkipReason, source: &str, key: &str, detail: &str) -> Self {
        Dropped { reason, source: source.into(), key: key.into(), detail: detail.into(), recorded: false }
    }
}

/// One run's shards, shared by its threads.
struct Job<'a> {
    rows: &'a [Row],
    out: &'a Location,
    settings: &'a Settings,
    max_pixels: u64,
    handle: &'a Handle,
    skips: &'a SkipCounts,
}

impl Job<'_> {
    /// Every shard's report and whether it was kept, in shard order; threads take shards in turn.
    fn run(&self, threads: usize) -> Result<Vec<(ShardReport, bool)>> {
        let count = self.rows.len().div_ceil(self.settings.rows_per_shard as usize);
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let progress = Mutex::new(crate::progress::start("preparing images", self.rows.len() as u64));
        let done: Mutex<Vec<(usize, ShardReport, bool)>> = Mutex::new(vec![]);
        let worker = || -> Result<()> {
            while !failed.load(Ordering::Relaxed) {
                let shard = next.fetch_add(1, Ordering::Relaxed);
                if shard >= count {
                    break;
                }
                let result = self.shard(shard, &progress);
                failed.fetch_or(result.is_err(), Ordering::Relaxed);
                let (report, kept) = result?;
                done.lock().unwrap_or_else(|e| e.into_inner()).push((shard, report, kept));
            }
            Ok(())
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
            handles.into_iter().map(|h| h.join().expect("prepare thread")).collect::<Result<Vec<()>>>()
        })?;
        let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
        done.sort_by_key(|(shard, _, _)| *shard);
        Ok(done.into_iter().map(|(_, report, kept)| (report, kept)).collect())
    }

    /// Shard `shard`: kept when complete, else written, tar first, then its report.
    fn shard(&self, shard: usize, progress: &Mutex<crate::progress::Progress>) -> Result<(ShardReport, bool)> {
        let per = self.settings.rows_per_shard as usize;
        let (first, end) = (shard * per, ((shard + 1) * per).min(self.rows.len()));
        let name = format!("{shard:06}.tar");
        let report_loc = self.out.join(&format!("{shard:06}_prepare.json"));
        let rows = [first as u64, end as u64];
        let advance = |n| progress.lock().unwrap_or_else(|e| e.into_inner()).advance(n);
        if let Some(report) = self.kept(&report_loc, &name, rows)? {
            advance((end - first) as u64);
            return Ok((report, true));
        }
        let settings = self.settings.clone();
        let mut report =
            ShardReport { shard: name.clone(), rows, samples: 0, offsets: vec![], dropped: BTreeMap::new(), settings };
        let mut tar = tar::Builder::new(Vec::new());
        for (i, row) in self.rows[first..end].iter().enumerate() {
            let made = row.as_ref().map_err(|d| self.count(d, &mut report.dropped)).map(|p| (p, self.sample(p)));
            match made {
                Ok((pair, Ok(sample))) => report.samples += append_sample(&mut tar, first + i, pair, &sample)?,
                Ok((_, Err(d))) => self.count(&d, &mut report.dropped),
                Err(()) => {}
            }
            advance(1);
        }
        let bytes = tar.into_inner()?;
        // The offsets the index stores, found as the index's own scan finds them.
        let scan = scan_tar(&bytes[..]);
        ensure!(scan.samples == report.samples && scan.error.is_none(), "{name} does not read back whole");
        report.offsets = scan.offsets;
        if report.samples > 0 {
            self.handle.block_on(self.out.join(&name).write_all(bytes))?;
        }
        self.handle.block_on(report_loc.write_all(serde_json::to_vec_pretty(&report)?))?;
        Ok((report, false))
    }

    /// The report of the shard an earlier run completed here, if any (with its tar).
    fn kept(&self, loc: &Location, name: &str, rows: [u64; 2]) -> Result<Option<ShardReport>> {
        if !self.handle.block_on(loc.exists())? {
            return Ok(None);
        }
        let bytes = self.handle.block_on(loc.read_all())?;
        let report: ShardReport =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not a shard report", loc.url))?;
        ensure!(
            report.settings == *self.settings && report.rows == rows,
            "{} holds rows {:?} made with {:?}; this run puts rows {rows:?} there with {:?}: prepare into another \
             folder, or empty this one",
            loc.url,
            report.rows,
            report.settings,
            self.settings
        );
        // A tar lost after its report is written again.
        let whole = report.samples == 0 || self.handle.block_on(self.out.join(name).exists())?;
        Ok(whole.then_some(report))
    }

    /// Counts a dropped row in its shard's report and, with why, in the run's skips.
    fn count(&self, d: &Dropped, dropped: &mut BTreeMap<String, u64>) {
        if !d.recorded {
            self.skips.record(d.reason, &d.source, &d.key, &d.detail);
        }
        *dropped.entry(d.reason.as_str().to_string()).or_default() += 1;
    }

    /// A row's image resized and re-encoded, and its captions; or why it is dropped.
    fn sample(&self, pair: &Pair) -> std::result::Result<Sample, Dropped> {
        let drop = |reason, detail: &str| Dropped::new(reason, &pair.source, &pair.name, detail);
        let captions = match &pair.captions {
            Captions::Given(captions) => captions.clone(),
            Captions::File(loc) => {
                let bytes = read_source(loc, self.handle, TarOptions::default().max_member_bytes);
                let bytes = bytes.map_err(|e| {
                    let reason =
                        if e.is::<Oversized>() { SkipReason::OversizedMember } else { SkipReason::MissingCaption };
                    drop(reason, &format!("{e:#}"))
                })?;
                let text =
                    String::from_utf8(bytes).map_err(|_| drop(SkipReason::InvalidUtf8, "caption is not UTF-8"))?;
                if text.trim().is_empty() {
                    return Err(drop(SkipReason::EmptyCaption, ""));
                }
                vec![text]
            }
        };
        let bytes = read_source(&pair.image, self.handle, TarOptions::default().max_member_bytes);
        let bytes = bytes.map_err(|e| drop(unread_image_reason(&e), &format!("{e:#}")))?;
        let img = decode_rgb(&bytes, self.max_pixels).map_err(|e| drop(skip_reason(e.reason()), &e.to_string()))?;
        let resized = resize(&img, self.settings.image_size, self.settings.resize_mode);
        let (width, height) = resized.dimensions();
        let jpg = encode_jpeg(&resized, self.settings.quality).map_err(|e| drop(SkipReason::TooManyPixels, &e))?;
        Ok(Sample { jpg, size: (width, height), original: img.dimensions(), captions })
    }
}

/// A source's bytes read as the loader reads them, with the defaults of `data.read_timeout_s` (a
/// read that gets no byte for that long is retried, then fails) and, for an image or caption
/// file, `data.max_member_mb` (a larger file is dropped by its size, unread).
fn read_source(loc: &Location, handle: &Handle, max_bytes: u64) -> Result<Vec<u8>> {
    loc.read_at_most_within(handle, max_bytes, InputLimits::default().read_timeout)
}

/// A row ready to write.
struct Sample {
    jpg: Vec<u8>,
    size: (u32, u32),
    original: (u32, u32),
    captions: Vec<String>,
}

/// Appends row `row`'s samples: one per caption (a row of several captions, as COCO's, gives
/// several samples of the one image, as the reference's fine-tuning datasets expand them).
/// Returns how many.
fn append_sample(tar: &mut tar::Builder<Vec<u8>>, row: usize, pair: &Pair, sample: &Sample) -> Result<u64> {
    let many = sample.captions.len() > 1;
    for (i, caption) in sample.captions.iter().enumerate() {
        let key = if many { format!("{row:09}_{i}") } else { format!("{row:09}") };
        let mut meta = serde_json::json!({
            "key": key,
            "image": pair.name,
            "caption": caption,
            "width": sample.size.0,
            "height": sample.size.1,
            "original_width": sample.original.0,
            "original_height": sample.original.1,
        });
        for (field, value) in [("image_id", &pair.image_id), ("label", &pair.label)] {
            if let Some(v) = value {
                meta[field] = v.as_str().into();
            }
        }
        tar_append(tar, &format!("{key}.jpg"), &sample.jpg)?;
        tar_append(tar, &format!("{key}.txt"), caption.as_bytes())?;
        tar_append(tar, &format!("{key}.json"), meta.to_string().as_bytes())?;
    }
    Ok(sample.captions.len() as u64)
}

/// img2dataset's resize of `img` to `size` (see the module's note).
pub fn resize(img: &RgbImage, size: u32, mode: ResizeMode) -> RgbImage {
    let (w, h) = (f64::from(img.width()), f64::from(img.height()));
    let scale = f64::from(size) / w.min(h);
    // albumentations' SmallestMaxSize: Python's round (half to even), at least 1.
    let scaled = |d: f64| ((d * scale).round_ties_even() as u32).max(1);
    let (rw, rh) = (scaled(w), scaled(h));
    let filter = if w.min(h) > f64::from(size) { FilterType::Box } else { FilterType::Lanczos3 };
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    let src = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3).expect("RgbImage buffer");
    match mode {
        ResizeMode::KeepRatio => resize_view(&src, rw, rh, &options),
        ResizeMode::CenterCrop => {
            // albumentations' CenterCrop of the resized image, as the source box it covers: one
            // resize of only the pixels kept.
            let side = size.min(rw).min(rh);
            let (x0, y0) = (f64::from((rw - side) / 2), f64::from((rh - side) / 2));
            let (sx, sy) = (w / f64::from(rw), h / f64::from(rh));
            let options = options.crop(x0 * sx, y0 * sy, f64::from(side) * sx, f64::from(side) * sy);
            resize_view(&src, side, side, &options)
        }
    }
}

/// JPEG at `quality` with 4:2:0 chroma, OpenCV's default and so img2dataset's.
fn encode_jpeg(img: &RgbImage, quality: u8) -> std::result::Result<Vec<u8>, String> {
    let side = |n: u32| u16::try_from(n).map_err(|_| format!("{n} pixels: a JPEG side is at most 65,535"));
    let (width, height) = (side(img.width())?, side(img.height())?);
    let mut out = vec![];
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    encoder.encode(img.as_raw(), width, height, jpeg_encoder::ColorType::Rgb).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Writes the index of the shards that hold samples beside them; returns its URL and those
/// shards as a `data.train_file` pattern.
fn write_index(out: &Location, shards: &[ShardReport], handle: &Handle) -> Result<(String, String)> {
    let written: Vec<&ShardReport> = shards.iter().filter(|s| s.samples > 0).collect();
    ensure!(!written.is_empty(), "every row was dropped: no shard was written");
    let sources = written
        .iter()
        .map(|s| SourceEntry {
            url: out.join(&s.shard).url,
            kind: SourceKind::WebDataset,
            samples: s.samples,
            offsets: s.offsets.clone(),
        })
        .collect();
    let loc = out.join(INDEX_FILE);
    DatasetIndex { version: INDEX_VERSION, sources }.save(&loc, handle)?;
    let stems: Vec<&str> = written.iter().map(|s| s.shard.trim_end_matches(".tar")).collect();
    let pattern = match (stems.as_slice(), written.len() == shards.len()) {
        ([one], _) => one.to_string(),
        ([first, .., last], true) => format!("{{{first}..{last}}}"),
        _ => format!("{{{}}}", stems.join(",")),
    };
    Ok((loc.url, out.join(&format!("{pattern}.tar")).url))
}
