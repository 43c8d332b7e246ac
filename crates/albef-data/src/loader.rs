//! The loader: streams a rank's planned samples from object storage, decodes and augments them
//! on a pool of threads, tokenises the captions and delivers batches in step order through a
//! bounded prefetch queue.
//!
//! Every random draw of a sample (caption choice, crop, flip, RandAugment) comes from a generator
//! seeded by (seed, epoch, global sample id), so a sample looks the same on any thread or rank
//! and a resumed run sees exactly the batches the uninterrupted one would have.

use crate::bad::{SkipCounts, SkipReason};
use crate::batch::{HostBatch, Row, collate};
use crate::budget::{Grant, MemoryBudget, Share, derived_budget};
use crate::caption::pre_caption;
use crate::index::{DatasetIndex, SourceKind};
use crate::plan::RankPlan;
use crate::rng::SplitMix64;
use crate::sources::{
    Annotation, Record, TarOptions, annotation_image, annotation_image_root, image_index, parse_annotations,
    read_tar_samples,
};
use crate::store::{Location, NotAFile, Oversized};
use crate::tokenizer::Tokenizer;
use crate::transform::{DecodeError, TrainTransform, decode_rgb_reserving, is_truncated_jpeg, resize_exact};
use albef_config::TruncatedImages;
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use tokio::runtime::Handle;

#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub image_res: u32,
    /// Decode threads.
    pub threads: usize,
    /// Batches decoded ahead of the trainer.
    pub prefetch: usize,
    /// Images whose header declares more pixels are skipped before decoding.
    pub max_pixels: u64,
    /// The train transform (crop, flip, RandAugment); None: the test transform (resize).
    pub augment: Option<TrainTransform>,
    /// Caption member and member size limit of tar shards.
    pub tar: TarOptions,
    /// Root that annotation-file image paths are relative to.
    pub image_root: String,
    /// Prefix replacements of annotation image paths, applied before the root
    /// (`data.path_rewrite`, parsed by [`crate::sources::path_rewrites`]).
    pub path_rewrite: Vec<(String, String)>,
    pub max_words: usize,
    pub seed: u64,
    /// What each row carries besides its image and text, as the task asks.
    pub needs: RowNeeds,
    /// What hostile input may cost: memory, waiting, truncated images.
    pub limits: InputLimits,
}

/// What the loader holds input to (`data.memory_budget_mb`, `data.read_timeout_s`,
/// `data.truncated_images`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputLimits {
    /// Bytes the loader holds for encoded samples and decoded pixels (see [`crate::budget`]);
    /// 0: derived from the window, the member limit, prefetch and the decode threads.
    pub memory_budget: u64,
    /// How long a read of a source may go without a byte before it is retried.
    pub read_timeout: std::time::Duration,
    pub truncated_images: TruncatedImages,
}

impl InputLimits {
    pub fn from_config(d: &albef_config::DataConfig) -> Self {
        InputLimits {
            memory_budget: d.memory_budget_mb.saturating_mul(1 << 20),
            read_timeout: std::time::Duration::from_secs(d.read_timeout_s.max(1)),
            truncated_images: d.truncated_images,
        }
    }
}

impl Default for InputLimits {
    /// The configuration's defaults.
    fn default() -> Self {
        InputLimits::from_config(&albef_config::DataConfig::default())
    }
}

/// What a task needs of each row besides its image and text; a sample without it is skipped and
/// counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowNeeds {
    /// The image index (retrieval and grounding tell images apart), and where it comes from.
    pub image_ids: ImageIds,
    /// The classes, in the order of their ids (SNLI-VE: contradiction, neutral, entailment): a
    /// row's `label` must be one. Empty: no labels.
    pub labels: Vec<String>,
    /// Each row's answers, tokenised for the answer decoder (VQA).
    pub answers: bool,
    /// Two images per row (NLVR2: an annotation's `images`).
    pub image_pairs: bool,
}

/// Where a row's image index comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageIds {
    /// The task does not tell images apart.
    #[default]
    Unused,
    /// The annotation's `image_id` (retrieval); a row without one is skipped.
    Annotated,
    /// The image's file name (grounding, as the reference's grounding_dataset: RefCOCO+ rows
    /// carry no image id, and every expression of an image is a positive of the others).
    FileName,
}

/// A batch of one step.
#[derive(Debug)]
pub struct LoadedBatch {
    pub step: u64,
    /// Fewer rows than the batch size when samples were skipped.
    pub batch: HostBatch,
}

/// One step's raw samples, as the reader hands them to a decoder.
struct StepJob {
    step: u64,
    /// (global sample id, record) in batch order; skipped samples are absent.
    samples: Vec<(u64, Record)>,
    /// The samples' bytes, held against the budget until the step is decoded.
    _held: Vec<Grant>,
    /// The budget's share for decoded pixels.
    pixels: Arc<Share>,
}

pub struct Loader {
    rx: Receiver<LoadedBatch>,
    next_step: u64,
    end_step: u64,
    reorder: BTreeMap<u64, HostBatch>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    skips: Arc<SkipCounts>,
}

impl Loader {
    /// Starts loading the steps `from_step..plan.steps` of `plan`.
    pub fn start(
        index: Arc<DatasetIndex>,
        plan: RankPlan,
        from_step: u64,
        opts: LoaderOptions,
        tokenizer: Arc<Tokenizer>,
        handle: Handle,
        skips: Arc<SkipCounts>,
    ) -> Loader {
        let stop = Arc::new(AtomicBool::new(false));
        let threads_n = opts.threads.max(1);
        let (job_tx, job_rx) = bounded::<StepJob>(threads_n * 2);
        let (out_tx, out_rx) = bounded::<LoadedBatch>(opts.prefetch.max(1));
        let mut threads = vec![];
        let budget = match opts.limits.memory_budget {
            0 => derived_budget(plan.spec.window, opts.tar.max_member_bytes, opts.prefetch, threads_n),
            bytes => bytes,
        };
        {
            let (stop, skips, opts, index, handle) = (stop.clone(), skips.clone(), opts.clone(), index.clone(), handle);
            let (plan, budget) = (plan.clone(), MemoryBudget::new(budget));
            threads.push(std::thread::spawn(move || {
                let reader = SourceReader { index: &index, opts: &opts, handle: &handle, skips: &skips };
                read_plan(&reader, &plan, from_step, &budget, &stop, job_tx);
            }));
        }
        for _ in 0..threads_n {
            let (job_rx, out_tx, stop, skips, tokenizer) =
                (job_rx.clone(), out_tx.clone(), stop.clone(), skips.clone(), tokenizer.clone());
            let (opts, epoch) = (opts.clone(), plan.spec.epoch);
            threads.push(std::thread::spawn(move || {
                for job in job_rx {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = decode_step(&job, &opts, epoch, &tokenizer, &skips);
                    if out_tx.send(LoadedBatch { step: job.step, batch }).is_err() {
                        break;
                    }
                }
            }));
        }
        Loader {
            rx: out_rx,
            next_step: from_step,
            end_step: plan.steps,
            reorder: BTreeMap::new(),
            stop,
            threads,
            skips,
        }
    }

    pub fn skips(&self) -> &Arc<SkipCounts> {
        &self.skips
    }
}

impl Iterator for Loader {
    type Item = LoadedBatch;

    /// The next step's batch, in step order (decoders may finish out of order).
    fn next(&mut self) -> Option<LoadedBatch> {
        if self.next_step >= self.end_step {
            return None;
        }
        while !self.reorder.contains_key(&self.next_step) {
            let b = self.rx.recv().ok()?;
            self.reorder.insert(b.step, b.batch);
        }
        let batch = self.reorder.remove(&self.next_step).expect("present");
        self.next_step += 1;
        Some(LoadedBatch { step: self.next_step - 1, batch })
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock producers waiting on a full queue, then wait for them.
        while self.rx.try_recv().is_ok() {}
        let threads = std::mem::take(&mut self.threads);
        let rx = self.rx.clone();
        for t in threads {
            while !t.is_finished() {
                while rx.try_recv().is_ok() {}
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}

/// The reader: fetches the plan's windows in order and hands out each step once its samples
/// are read, holding them to the budget's window and queue shares.
fn read_plan(
    reader: &SourceReader,
    plan: &RankPlan,
    from_step: u64,
    budget: &MemoryBudget,
    stop: &AtomicBool,
    jobs: Sender<StepJob>,
) {
    let first_ids = reader.index.first_ids();
    let (b, w) = (plan.spec.batch_size, plan.spec.window);
    let mut annotations = HashMap::new();
    let mut window_records = WindowRecords { held: HashMap::new(), deferred: HashSet::new() };
    let mut step = from_step;
    for window in plan.windows_from(from_step) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Positions of a window are contiguous in lease order: read them as source ranges.
        let mut pos = window.start;
        while pos < window.end {
            let (lease, ordinal) = plan.lease_at(pos);
            let take = (lease.end - ordinal).min(window.end - pos);
            let base = pos;
            reader.read(lease.source, ordinal..ordinal + take, &mut annotations, &mut |o, r| {
                window_records.put(base + (o - ordinal), r, &budget.window, reader.skips)
            });
            pos += take;
        }
        // Steps whose last order index falls in this window are complete.
        while step < plan.steps && ((step + 1) * b - 1) / w < window.end.div_ceil(w) {
            let mut job = StepJob { step, samples: vec![], _held: vec![], pixels: budget.pixels.clone() };
            for p in plan.step_positions(step) {
                let record = match window_records.take(p) {
                    Taken::Record(r) => r,
                    Taken::Deferred => {
                        // Dropped for the window's share: read again now that its step is due.
                        let (lease, ordinal) = plan.lease_at(p);
                        let mut again = None;
                        reader.read(lease.source, ordinal..ordinal + 1, &mut annotations, &mut |_, r| again = Some(r));
                        let Some(r) = again else { continue };
                        r
                    }
                    Taken::Skipped => continue,
                };
                // The reader waits for decoders to free room rather than queue more.
                let Some(grant) = budget.queued.take(record_bytes(&record), stop) else { return };
                job._held.push(grant);
                job.samples.push((plan.draw_at(p).id(&first_ids, reader.index.total()), record));
            }
            if jobs.send(job).is_err() {
                return;
            }
            step += 1;
        }
        // Records before the first window of the next step are no longer needed (a step larger
        // than the window spans several windows, all of whose records it needs).
        let keep_from = (step * b / w) * w;
        window_records.held.retain(|&p, _| p >= keep_from);
        window_records.deferred.retain(|&p| p >= keep_from);
    }
}

/// Bytes a record holds.
fn record_bytes(r: &Record) -> u64 {
    let captions: usize = r.captions.iter().map(String::len).sum();
    (r.image.len() + r.second_image.as_ref().map_or(0, Vec::len) + captions + r.key.len()) as u64
}

/// The records read for the current windows, by position, each held against the window's share;
/// those that did not fit are deferred (read again when their step is handed out).
struct WindowRecords {
    held: HashMap<u64, (Record, Grant)>,
    deferred: HashSet<u64>,
}

/// What a position's record became.
enum Taken {
    Record(Record),
    Deferred,
    /// Skipped and counted when it was read (or never delivered).
    Skipped,
}

impl WindowRecords {
    fn put(&mut self, pos: u64, r: Record, share: &Arc<Share>, skips: &SkipCounts) {
        let bytes = record_bytes(&r);
        if bytes > share.limit() {
            let detail = format!("{bytes} bytes, over the {} of data.memory_budget_mb held per sample", share.limit());
            skips.record(SkipReason::OverBudget, "read", &r.key, &detail);
            return;
        }
        match share.try_take(bytes) {
            Some(grant) => drop(self.held.insert(pos, (r, grant))),
            None => drop(self.deferred.insert(pos)),
        }
    }

    fn take(&mut self, pos: u64) -> Taken {
        match self.held.remove(&pos) {
            Some((r, _grant)) => Taken::Record(r),
            None if self.deferred.remove(&pos) => Taken::Deferred,
            None => Taken::Skipped,
        }
    }
}

/// Reads sample ranges of the index's sources.
struct SourceReader<'a> {
    index: &'a DatasetIndex,
    opts: &'a LoaderOptions,
    handle: &'a Handle,
    skips: &'a SkipCounts,
}

impl SourceReader<'_> {
    /// Reads `wanted` of `source`, handing each good record to `put` (annotation files parsed
    /// once, kept in `annotations`).
    fn read(
        &self,
        source: u32,
        wanted: std::ops::Range<u64>,
        annotations: &mut HashMap<u32, Arc<Vec<Option<Annotation>>>>,
        put: &mut impl FnMut(u64, Record),
    ) {
        let (opts, handle, skips) = (self.opts, self.handle, self.skips);
        let entry = &self.index.sources[source as usize];
        match entry.kind {
            SourceKind::WebDataset => read_tar_range(entry, wanted, opts, handle, skips, put),
            SourceKind::Annotation => {
                let list = annotations
                    .entry(source)
                    .or_insert_with(|| load_annotations(&entry.url, opts, handle, skips))
                    .clone();
                read_annotation_range(&entry.url, &list, wanted, opts, handle, skips, put);
            }
        }
    }
}

fn read_tar_range(
    entry: &crate::index::SourceEntry,
    wanted: std::ops::Range<u64>,
    opts: &LoaderOptions,
    handle: &Handle,
    skips: &SkipCounts,
    put: &mut impl FnMut(u64, Record),
) {
    // Start at the indexed offset of the first wanted sample when the index has offsets.
    let (offset, first) = match entry.offsets.get(wanted.start as usize) {
        Some(&o) => (o, wanted.start),
        None => (0, 0),
    };
    let reader = Location::open(&entry.url).and_then(|loc| loc.stream_within(handle, offset, opts.limits.read_timeout));
    match reader {
        Ok(reader) => {
            read_tar_samples(reader, &entry.url, first, wanted, &opts.tar, skips, put);
        }
        Err(e) => {
            // The shard is gone or unreachable: its samples are skipped, the epoch goes on.
            for _ in wanted {
                skips.record(SkipReason::UnreadableShard, &entry.url, "", &format!("{e:#}"));
            }
        }
    }
}

fn load_annotations(
    url: &str,
    opts: &LoaderOptions,
    handle: &Handle,
    skips: &SkipCounts,
) -> Arc<Vec<Option<Annotation>>> {
    let parsed = Location::open(url)
        .and_then(|loc| loc.read_at_most_within(handle, u64::MAX, opts.limits.read_timeout))
        .and_then(|bytes| parse_annotations(&bytes, url, skips));
    match parsed {
        Ok(list) => Arc::new(list),
        Err(e) => {
            skips.record(SkipReason::UnreadableShard, url, "", &format!("{e:#}"));
            Arc::new(vec![])
        }
    }
}

fn read_annotation_range(
    url: &str,
    list: &[Option<Annotation>],
    wanted: std::ops::Range<u64>,
    opts: &LoaderOptions,
    handle: &Handle,
    skips: &SkipCounts,
    put: &mut impl FnMut(u64, Record),
) {
    let root = Location::open(&annotation_image_root(url, &opts.image_root));
    for ordinal in wanted {
        let key = format!("#{ordinal}");
        let Some(Some(a)) = list.get(ordinal as usize) else {
            if list.len() as u64 <= ordinal {
                skips.record(SkipReason::UnreadableShard, url, &key, "annotation missing");
            }
            continue; // bad entries were counted when the file was parsed
        };
        let Some(image) = read_annotation_image(url, root.as_ref(), &a.image, opts, handle, skips) else { continue };
        let second_image = match (&a.second_image, opts.needs.image_pairs) {
            (Some(path), true) => match read_annotation_image(url, root.as_ref(), path, opts, handle, skips) {
                Some(bytes) => Some(bytes),
                None => continue,
            },
            _ => None,
        };
        let (key, captions) = (a.image.clone(), a.captions.clone());
        let (image_id, label, answers) = (a.image_id.clone(), a.label.clone(), a.weighted_answers());
        put(ordinal, Record { key, image, second_image, captions, image_id, label, answers })
    }
}

/// The bytes of the image an annotation of `url` names at `path`; None (counted) when it cannot
/// be read. An image file is held to the member limit of tar shards (`data.max_member_mb`).
fn read_annotation_image(
    url: &str,
    root: Result<&Location, &anyhow::Error>,
    path: &str,
    opts: &LoaderOptions,
    handle: &Handle,
    skips: &SkipCounts,
) -> Option<Vec<u8>> {
    let loc = match root.map(|r| annotation_image(r, path, &opts.path_rewrite)) {
        Ok(Ok(loc)) => Ok(loc),
        Ok(Err(outside)) => {
            skips.record(SkipReason::AbsolutePath, url, path, &outside);
            return None;
        }
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    let stall = opts.limits.read_timeout;
    match loc.and_then(|loc| loc.read_at_most_within(handle, opts.tar.max_member_bytes, stall)) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            skips.record(unread_image_reason(&e), url, path, &format!("{e:#}"));
            None
        }
    }
}

/// A sample of a step, decoded, augmented and tokenised.
struct DecodedRow<'a> {
    key: &'a str,
    draw: u64,
    rgb: Vec<u8>,
    second_rgb: Option<Vec<u8>>,
    ids: Vec<i64>,
    image_id: Option<i64>,
    label: Option<i64>,
    answers: Vec<(Vec<i64>, f32)>,
}

/// An image decoded, with its pixels held against the budget's share; None (counted) when it
/// cannot be. A truncated JPEG is counted, and trained (grey where data is missing) or skipped
/// as `data.truncated_images` says.
fn decoded(
    bytes: &[u8],
    (origin, key): (&str, &str),
    opts: &LoaderOptions,
    pixels: &Arc<Share>,
    skips: &SkipCounts,
) -> Option<(image::RgbImage, Grant)> {
    if is_truncated_jpeg(bytes) {
        let skip = opts.limits.truncated_images == TruncatedImages::Skip;
        let detail = match skip {
            true => "the JPEG ends before its end marker: skipped (data.truncated_images: skip)",
            false => "the JPEG ends before its end marker: trained, grey where data is missing",
        };
        skips.record(SkipReason::TruncatedImage, origin, key, detail);
        if skip {
            return None;
        }
    }
    // Decoders never wait on one another for long: the pixels they hold are freed per image.
    static NEVER: AtomicBool = AtomicBool::new(false);
    let reserve =
        |bytes: u64| pixels.take(bytes, &NEVER).ok_or(DecodeError::OverBudget { bytes, budget: pixels.limit() });
    match decode_rgb_reserving(bytes, opts.max_pixels, reserve) {
        Ok(decoded) => Some(decoded),
        Err(e) => {
            skips.record(skip_reason(e.reason()), origin, key, &e.to_string());
            None
        }
    }
}

/// The training transform (or, without augmentation, the resize to the model's resolution).
fn augmented(image: &image::RgbImage, opts: &LoaderOptions, rng: &mut SplitMix64) -> image::RgbImage {
    match &opts.augment {
        Some(t) => t.apply(image, rng),
        None => resize_exact(image, opts.image_res),
    }
}

/// What the task reads of a record besides its image and caption, each where it asks for it.
struct TaskFields {
    image_id: Option<i64>,
    label: Option<i64>,
    answers: Vec<(Vec<i64>, f32)>,
}

/// A record's [`TaskFields`]; or why the record cannot serve the task.
fn task_fields(record: &Record, needs: &RowNeeds, tokenizer: &Tokenizer) -> Result<TaskFields, (SkipReason, String)> {
    let image_id = match needs.image_ids {
        ImageIds::Unused => None,
        ImageIds::Annotated => record.image_id.as_deref().map(image_index),
        ImageIds::FileName => record.key.rsplit('/').next().map(image_index),
    };
    if needs.image_ids != ImageIds::Unused && image_id.is_none() {
        return Err((SkipReason::MissingImageId, "the task needs an image_id".into()));
    }
    let label = record.label.as_ref().and_then(|l| needs.labels.iter().position(|c| c == l)).map(|i| i as i64);
    if !needs.labels.is_empty() && label.is_none() {
        let got = record.label.as_deref().unwrap_or("none");
        return Err((SkipReason::BadLabel, format!("label {got:?} is not one of {:?}", needs.labels)));
    }
    let answers = match needs.answers.then(|| encode_answers(record, tokenizer)) {
        None => vec![],
        Some(answers) => answers.map_err(|detail| (SkipReason::MissingAnswer, detail))?,
    };
    if needs.image_pairs && record.second_image.is_none() {
        return Err((SkipReason::MissingSecondImage, "the task reads two images per row".into()));
    }
    Ok(TaskFields { image_id, label, answers })
}

/// Decodes, augments and tokenises one step's samples.
fn decode_step(
    job: &StepJob,
    opts: &LoaderOptions,
    epoch: u64,
    tokenizer: &Tokenizer,
    skips: &SkipCounts,
) -> HostBatch {
    let mut rows = vec![];
    for (id, record) in &job.samples {
        let (needs, origin) = (&opts.needs, skips.origin(*id));
        let TaskFields { image_id, label, answers } = match task_fields(record, needs, tokenizer) {
            Ok(fields) => fields,
            Err((reason, detail)) => {
                skips.record(reason, origin, &record.key, &detail);
                continue;
            }
        };
        let mut rng = sample_rng(opts.seed, epoch, *id);
        let Some((full, pixels)) = decoded(&record.image, (origin, &record.key), opts, &job.pixels, skips) else {
            continue;
        };
        let caption = &record.captions[rng.below(record.captions.len())];
        let image = augmented(&full, opts, &mut rng);
        release(full, pixels);
        let second_rgb = match record.second_image.as_ref().filter(|_| needs.image_pairs) {
            Some(bytes) => match decoded(bytes, (origin, &record.key), opts, &job.pixels, skips) {
                Some((second, pixels)) => {
                    let augmented = augmented(&second, opts, &mut rng).into_raw();
                    release(second, pixels);
                    Some(augmented)
                }
                None => continue,
            },
            None => None,
        };
        let text = pre_caption(caption, opts.max_words);
        if text.is_empty() {
            skips.record(SkipReason::EmptyCaption, origin, &record.key, "nothing left after pre_caption");
            continue;
        }
        let ids = tokenizer.encode(&text);
        rows.push(DecodedRow {
            key: &record.key,
            draw: *id,
            rgb: image.into_raw(),
            second_rgb,
            ids,
            image_id,
            label,
            answers,
        });
    }
    let samples: Vec<Row> = rows
        .iter()
        .map(|r| Row {
            key: r.key,
            draw: r.draw,
            rgb: &r.rgb,
            second_rgb: r.second_rgb.as_deref(),
            ids: &r.ids,
            image_id: r.image_id,
            label: r.label,
            answers: &r.answers,
        })
        .collect();
    collate(&samples, opts.image_res as usize, tokenizer.pad_id())
}

/// Decoded pixels from which a freed image's pages are handed back to the system at once.
const HAND_BACK_BYTES: usize = 8 << 20;

/// Frees a decoded image, then its pixels' grant (no other decoder allocates before the memory
/// is free). glibc keeps freed memory in the arena of the thread that freed it, so each decode
/// thread would go on holding the largest image it ever decoded (four threads of 27 MB images
/// peaked at 121 MiB of RSS under a 32 MiB share): a large image's pages are handed back first.
fn release(image: image::RgbImage, grant: Grant) {
    let mut pixels = image.into_raw();
    if pixels.len() >= HAND_BACK_BYTES {
        hand_back_pages(&mut pixels);
    }
    drop(pixels);
    drop(grant);
}

/// Hands the whole pages of a buffer about to be freed back to the system (madvise
/// MADV_DONTNEED: they read as zeros if touched again), whatever the allocator then keeps of it.
/// Only this buffer's pages: none of another allocation, no trim of the process's heaps.
fn hand_back_pages(buf: &mut [u8]) {
    unsafe extern "C" {
        fn getpagesize() -> std::ffi::c_int;
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: std::ffi::c_int) -> std::ffi::c_int;
    }
    const MADV_DONTNEED: std::ffi::c_int = 4;
    // SAFETY: getpagesize has no preconditions.
    let page = unsafe { getpagesize() } as usize;
    let (at, len) = (buf.as_mut_ptr() as usize, buf.len());
    let (start, end) = (at.next_multiple_of(page), (at + len) / page * page);
    if start < end {
        // SAFETY: [start, end) lies inside `buf`, which this function borrows exclusively and its
        // caller frees next: zeroing its pages changes nothing anyone reads. A failure (EINVAL)
        // leaves the pages as they were.
        unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_DONTNEED) };
    }
}

/// A row's answers, tokenised for the decoder with their weights; why not, when it has none.
fn encode_answers(record: &Record, tokenizer: &Tokenizer) -> Result<Vec<(Vec<i64>, f32)>, String> {
    if record.answers.is_empty() {
        return Err("the task needs an answer".into());
    }
    record
        .answers
        .iter()
        .map(|a| Ok((tokenizer.encode_answer(&a.text).map_err(|e| format!("{e:#}"))?, a.weight)))
        .collect()
}

/// The generator of a sample's random draws in an epoch.
pub fn sample_rng(seed: u64, epoch: u64, global_id: u64) -> SplitMix64 {
    SplitMix64::for_item(SplitMix64::for_item(seed, epoch).next_u64(), global_id)
}

/// Why an image file could not be read: a path that is no regular file is refused unopened.
pub(crate) fn unread_image_reason(e: &anyhow::Error) -> SkipReason {
    if e.downcast_ref::<NotAFile>().is_some() {
        SkipReason::NotAFile
    } else if e.downcast_ref::<Oversized>().is_some() {
        SkipReason::OversizedMember
    } else {
        SkipReason::MissingImage
    }
}

pub(crate) fn skip_reason(reason: &str) -> SkipReason {
    match reason {
        "not_an_image" => SkipReason::NotAnImage,
        "too_many_pixels" => SkipReason::TooManyPixels,
        "empty" => SkipReason::EmptyImage,
        "over_budget" => SkipReason::OverBudget,
        _ => SkipReason::CorruptImage,
    }
}
