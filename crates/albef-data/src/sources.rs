//! Readers of the two dataset layouts ALBEF users have: WebDataset / img2dataset tar shards
//! (files sharing a basename form a sample) and ALBEF annotation JSON (a list of
//! `{"image": path, "caption": str | [str]}`). Both yield samples by ordinal, so that epoch plans
//! can name `(source, sample range)`; a bad sample keeps its ordinal and is skipped and counted.

use crate::bad::{SkipCounts, SkipReason};
use crate::store::{Location, local_path};
use crate::tar_entries::TarEntries;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::ops::{ControlFlow, Range};
use std::path::Path;

pub(crate) const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "gif", "bmp"];

/// A sample ready for decoding: image bytes and its captions (one is sampled per fetch).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub key: String,
    pub image: Vec<u8>,
    /// The row's second image (NLVR2), read when the task asks for it.
    pub second_image: Option<Vec<u8>>,
    pub captions: Vec<String>,
    /// The image's id, from an annotation's `image_id` or the `.json` member's (retrieval).
    pub image_id: Option<String>,
    /// The row's class, from an annotation's `label` or the `.json` member's (SNLI-VE).
    pub label: Option<String>,
    /// The row's answers and their weights (VQA); empty where none are given.
    pub answers: Vec<WeightedAnswer>,
}

/// One distinct answer of a VQA row and its weight in the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedAnswer {
    pub text: String,
    pub weight: f32,
}

/// A row's answers as the reference's vqa_dataset weighs them: a Visual Genome row (`dataset:
/// "vg"`) has one answer of weight 0.5; otherwise (VQA v2's ten human answers) each distinct
/// answer weighs its share of the list, in order of first appearance.
pub fn weighted_answers(answers: &[String], dataset: Option<&str>) -> Vec<WeightedAnswer> {
    if dataset == Some("vg") {
        return answers.first().map(|a| WeightedAnswer { text: a.clone(), weight: 0.5 }).into_iter().collect();
    }
    let mut out: Vec<WeightedAnswer> = vec![];
    for a in answers {
        let share = 1.0 / answers.len() as f32;
        match out.iter_mut().find(|w| w.text == *a) {
            Some(w) => w.weight += share,
            None => out.push(WeightedAnswer { text: a.clone(), weight: share }),
        }
    }
    out
}

/// An annotation's `answer`: a string or a list of strings; empty ones are dropped.
fn answers_of(answer: &serde_json::Value) -> std::result::Result<Vec<String>, String> {
    let list: Vec<&str> = match answer {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(items) => {
            items.iter().map(|a| a.as_str()).collect::<Option<_>>().ok_or("an answer is not a string")?
        }
        _ => return Err("\"answer\" is neither a string nor a list of strings".into()),
    };
    Ok(list.into_iter().filter(|a| !a.trim().is_empty()).map(str::to_string).collect())
}

/// The index of an image id in batches and the retrieval queues: a hash, so that every rank
/// and every source maps an id alike without a table (the reference numbers ids by first
/// appearance; only equality matters). 53 bits, exact in the f64 the queues are gathered in.
pub fn image_index(id: &str) -> i64 {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    (hash & ((1 << 53) - 1)) as i64
}

/// An `image_id` or `label` as JSON gives it: a string, or any other value by its JSON text
/// (COCO's ids are numbers).
fn image_id_of(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Where a WebDataset sample's caption comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaptionSource {
    /// The `.txt` member (img2dataset's default).
    #[default]
    Txt,
    /// A string field of the `.json` member.
    JsonField(String),
}

/// How tar shards are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarOptions {
    pub caption: CaptionSource,
    /// A member declaring more bytes is skipped unread (its sample counts as `oversized_member`).
    pub max_member_bytes: u64,
}

impl TarOptions {
    /// The options `data.caption_field` and `data.max_member_mb` configure.
    pub fn from_config(d: &albef_config::DataConfig) -> Self {
        let caption = match d.caption_field.as_str() {
            "" => CaptionSource::Txt,
            field => CaptionSource::JsonField(field.to_string()),
        };
        TarOptions { caption, max_member_bytes: d.max_member_mb.saturating_mul(1 << 20) }
    }
}

impl Default for TarOptions {
    /// The configuration's defaults.
    fn default() -> Self {
        TarOptions::from_config(&albef_config::DataConfig::default())
    }
}

/// The members of one sample as found in the tar.
#[derive(Default)]
struct Members {
    /// The key as shown (lossy where the name is not UTF-8); `raw_key` tells samples apart.
    key: String,
    raw_key: Vec<u8>,
    image: Option<Vec<u8>>,
    txt: Option<Vec<u8>>,
    json: Option<Vec<u8>>,
    /// A member that was too large to read: (name, declared size).
    oversized: Option<(String, u64)>,
    /// A member whose header extension (long name, PAX records) was over its bound.
    oversized_header: Option<String>,
}

/// What a tar read saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TarScan {
    /// Samples (keys) seen, good or bad.
    pub samples: u64,
    /// Byte offset of each sample's first header, relative to the start of the (decompressed)
    /// stream.
    pub offsets: Vec<u64>,
    /// Why the stream could not be read to its end (ends inside an entry, a corrupt header, a
    /// corrupt gzip stream); None when it was read to its end.
    pub error: Option<String>,
    /// The stream was gzip-compressed (offsets then do not address the stored object).
    pub gzip: bool,
    /// macOS / Windows leftovers passed over, by member name.
    pub junk: Vec<String>,
}

impl TarScan {
    pub fn truncated(&self) -> bool {
        self.error.is_some()
    }
}

/// The length of a member name's key, WebDataset's rule: up to the first `.` of its last path
/// component. On the raw bytes, so that names that are not UTF-8 keep apart.
fn key_len(path: &[u8]) -> usize {
    let base = path.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    path[base..].iter().position(|&b| b == b'.').map_or(path.len(), |i| base + i)
}

/// Splits `dir/name.ext.more` into (`dir/name`, `ext.more`, lower case), WebDataset's key rule.
pub(crate) fn split_key(path: &str) -> (String, String) {
    let n = key_len(path.as_bytes());
    (path[..n].to_string(), path.get(n + 1..).unwrap_or("").to_ascii_lowercase())
}

/// Files that archivers on macOS and Windows add beside the real ones: AppleDouble `._name`
/// resource forks, `.DS_Store`, anything under `__MACOSX/`, `Thumbs.db`, `desktop.ini`. Hidden
/// files in general are no samples either (their key would be empty).
pub fn is_junk_member(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with('.')
        || base.eq_ignore_ascii_case("thumbs.db")
        || base.eq_ignore_ascii_case("desktop.ini")
        || path.split('/').any(|part| part == "__MACOSX")
}

/// The stream with gzip undone when it starts with gzip's magic bytes (`.tar.gz`, `.tgz`, or a
/// gzip stream in a file named `.tar`); concatenated gzip members are read as one stream.
fn decompressed<'a>(mut reader: impl Read + 'a) -> (Box<dyn Read + 'a>, bool) {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match reader.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break, // the tar reader sees the same error on its first read
        }
    }
    let stream = std::io::Cursor::new(magic[..got].to_vec()).chain(reader);
    if magic[..got] == [0x1f, 0x8b] {
        (Box::new(flate2::read::MultiGzDecoder::new(stream)), true)
    } else {
        (Box::new(stream), false)
    }
}

/// Reads a tar stream sample by sample. `first` is the ordinal of the first sample in the stream
/// (non-zero when the stream starts at an indexed offset); `on_sample(ordinal, members)` may stop
/// the read early.
/// With `options` None only headers are read (indexing). No allocation is sized from a header:
/// members above `max_member_bytes` are passed over unread, header extensions are bounded
/// ([`crate::tar_entries`]).
fn read_tar(
    reader: impl Read,
    first: u64,
    options: Option<&TarOptions>,
    mut on_sample: impl FnMut(u64, Members) -> ControlFlow<()>,
) -> TarScan {
    let (reader, gzip) = decompressed(reader);
    let mut entries = TarEntries::new(reader);
    let mut scan = TarScan { gzip, ..TarScan::default() };
    let mut current: Option<Members> = None;
    let ordinal = |scan: &TarScan| first + scan.samples - 1;
    loop {
        let entry = match entries.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => {
                // A corrupt or cut header: every member of the open sample was read whole, so
                // it is complete as far as this shard goes (the index counted it too).
                scan.error = Some(format!("{e}"));
                break;
            }
        };
        if !entry.is_file {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path).into_owned();
        if entry.oversized_header.is_none() && is_junk_member(&path) {
            scan.junk.push(path);
            continue;
        }
        let (key, ext) = split_key(&path);
        let mut raw_key = entry.path[..key_len(&entry.path)].to_vec();
        if entry.oversized_header.is_some() {
            // A NUL, which no tar name holds: the kept part of a name never joins a whole one.
            raw_key.push(0);
        }
        if current.as_ref().is_none_or(|m| m.raw_key != raw_key) {
            if let Some(done) = current.take()
                && on_sample(ordinal(&scan), done).is_break()
            {
                return scan;
            }
            scan.samples += 1;
            scan.offsets.push(entry.header_pos);
            current = Some(Members { key, raw_key, ..Default::default() });
        }
        let Some(options) = options else { continue };
        let m = current.as_mut().expect("a group is open");
        if let Some(what) = entry.oversized_header {
            m.oversized_header.get_or_insert(what);
            continue;
        }
        let size = entry.size;
        if size > options.max_member_bytes {
            // Left unread: the next entry is found past its declared size (or the stream ends).
            m.oversized.get_or_insert((path, size));
            continue;
        }
        let wanted = IMAGE_EXTENSIONS.contains(&ext.as_str()) || ext == "txt" || ext == "json";
        if !wanted {
            continue;
        }
        let data = match member_data(&mut entries, &path, size) {
            Ok(data) => data,
            Err(e) => {
                scan.error = Some(e);
                return scan;
            }
        };
        match ext.as_str() {
            e if IMAGE_EXTENSIONS.contains(&e) => m.image = Some(data),
            "txt" => m.txt = Some(data),
            _ => m.json = Some(data),
        }
    }
    if let Some(done) = current.take() {
        let _ = on_sample(ordinal(&scan), done);
    }
    scan
}

/// The `size` bytes of the member `path` the reader stands at; why not, when the stream fails or
/// ends inside it (its sample is then incomplete and is not delivered).
fn member_data<R: Read>(entries: &mut TarEntries<R>, path: &str, size: u64) -> Result<Vec<u8>, String> {
    // Grown by what is actually there, never reserved from the declared size alone.
    let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
    match entries.read_data(&mut data, size) {
        Err(e) => Err(format!("{path}: {e}")),
        Ok(n) if n < size => Err(format!("{path}: the stream ends after {n} of its {size} bytes")),
        Ok(_) => Ok(data),
    }
}

/// Counts the samples of a tar stream and where each starts (for the shard index).
pub fn scan_tar(reader: impl Read) -> TarScan {
    read_tar(reader, 0, None, |_, _| ControlFlow::Continue(()))
}

/// Reads the samples with ordinals in `wanted` from a tar stream whose first sample has ordinal
/// `first`, calling `on_record` for each good one. Every wanted sample is either delivered or
/// counted once in `skips`: bad ones by their reason, ones the stream never reached as
/// `truncated_shard`. (Junk members are counted by the index, once.)
pub fn read_tar_samples(
    reader: impl Read,
    shard: &str,
    first: u64,
    wanted: Range<u64>,
    options: &TarOptions,
    skips: &SkipCounts,
    mut on_record: impl FnMut(u64, Record),
) -> TarScan {
    let mut next = wanted.start; // the first wanted ordinal not yet accounted for
    let scan = read_tar(reader, first, Some(options), |ordinal, m| {
        if ordinal >= wanted.end {
            return ControlFlow::Break(());
        }
        if ordinal >= wanted.start {
            next = ordinal + 1;
            match record_of(m, &options.caption) {
                Ok(r) => on_record(ordinal, r),
                Err((reason, key, detail)) => skips.record(reason, shard, &key, &detail),
            }
        }
        ControlFlow::Continue(())
    });
    if next < wanted.end {
        let why = scan.error.clone().unwrap_or_else(|| "the shard holds fewer samples than its index says".into());
        for ordinal in next..wanted.end {
            skips.record(SkipReason::TruncatedShard, shard, &format!("#{ordinal}"), &why);
        }
    }
    scan
}

type Rejection = (SkipReason, String, String);

fn record_of(m: Members, caption: &CaptionSource) -> std::result::Result<Record, Rejection> {
    let key = m.key;
    let reject = |reason, detail: &str| Err((reason, key.clone(), detail.to_string()));
    if let Some(what) = m.oversized_header {
        return reject(SkipReason::OversizedHeader, &what);
    }
    if std::str::from_utf8(&m.raw_key).is_err() {
        return reject(SkipReason::NonUtf8Key, "the member name is not UTF-8");
    }
    if let Some((name, size)) = m.oversized {
        return reject(SkipReason::OversizedMember, &format!("{name} declares {size} bytes"));
    }
    let Some(image) = m.image else {
        return reject(SkipReason::MissingImage, "no .jpg/.jpeg/.png/.webp/.gif/.bmp member");
    };
    // A bad .json member matters only where the caption comes from it (a missing image id is
    // counted as such by a task that needs one).
    let meta = m.json.as_ref().map(|json| serde_json::from_slice::<serde_json::Value>(json));
    let field = |name: &str| meta.as_ref().and_then(|v| v.as_ref().ok()?.get(name)).map(image_id_of);
    let (image_id, label) = (field("image_id"), field("label"));
    let text = match caption {
        CaptionSource::Txt => match m.txt {
            Some(t) => t,
            None => return reject(SkipReason::MissingCaption, "no .txt member"),
        },
        CaptionSource::JsonField(field) => {
            let meta = match meta {
                Some(Ok(v)) => v,
                Some(Err(e)) => return reject(SkipReason::BadJson, &e.to_string()),
                None => return reject(SkipReason::MissingCaption, "no .json member"),
            };
            match meta.get(field).and_then(|c| c.as_str()) {
                Some(c) => c.as_bytes().to_vec(),
                None => return reject(SkipReason::MissingCaption, &format!("no string field {field:?} in .json")),
            }
        }
    };
    let Ok(text) = String::from_utf8(text) else { return reject(SkipReason::InvalidUtf8, "caption is not UTF-8") };
    if text.trim().is_empty() {
        return reject(SkipReason::EmptyCaption, "");
    }
    Ok(Record { key, image, second_image: None, captions: vec![text], image_id, label, answers: vec![] })
}

/// One entry of an ALBEF annotation file.
#[derive(Clone, Debug, PartialEq)]
pub struct Annotation {
    /// Image path relative to the configured image root.
    pub image: String,
    /// The second image of an NLVR2 row (`"images": [first, second]`).
    pub second_image: Option<String>,
    pub captions: Vec<String>,
    /// Retrieval splits identify images.
    pub image_id: Option<String>,
    /// SNLI-VE rows are labelled.
    pub label: Option<String>,
    /// VQA rows are answered (every human answer, repeats kept; none in a test split), and
    /// numbered for the evaluation server; `dataset` says whose they are ("vqa", "vg").
    pub answers: Vec<String>,
    pub question_id: Option<String>,
    pub dataset: Option<String>,
}

impl Annotation {
    /// The answers a VQA row trains on, weighted (see [`weighted_answers`]).
    pub fn weighted_answers(&self) -> Vec<WeightedAnswer> {
        weighted_answers(&self.answers, self.dataset.as_deref())
    }
}

/// Where the image paths of the annotation file `url` start: `image_root` (`data.image_root`),
/// else the file's folder.
pub fn annotation_image_root(url: &str, image_root: &str) -> String {
    match image_root {
        "" => crate::store::parent_of(url),
        root => root.to_string(),
    }
}

/// `data.path_rewrite` parsed: each item `prefix=replacement` (the first `=` splits it).
pub fn path_rewrites(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((from, to)) if !from.is_empty() => Ok((from.to_string(), to.to_string())),
            _ => bail!("data.path_rewrite item {item:?}: expected prefix=replacement"),
        })
        .collect()
}

/// Where an annotation's image is: `image` with the first matching prefix of `rewrites`
/// replaced, then below `root`. An absolute path lying under a local root is read from there;
/// any other is refused with why (`absolute_path`): the reference's files name the authors'
/// machines, and joined below the root such a path would only be missing.
pub fn annotation_image(
    root: &Location,
    image: &str,
    rewrites: &[(String, String)],
) -> std::result::Result<Location, String> {
    let image = match rewrites.iter().find(|(from, _)| image.starts_with(from.as_str())) {
        Some((from, to)) => format!("{to}{}", &image[from.len()..]),
        None => image.to_string(),
    };
    if !image.starts_with('/') {
        return Ok(root.join(&image));
    }
    let root_path = local_path(&root.url).and_then(|r| std::path::absolute(r).ok());
    match root_path.as_ref().and_then(|r| Path::new(&image).strip_prefix(r).ok()) {
        Some(below) => Ok(root.join(&below.to_string_lossy())),
        None => Err(format!("{image} is an absolute path outside the image root {}", root.url)),
    }
}

/// Parses an annotation file. The file must be a JSON list; an entry of the wrong shape stays
/// in place as `None` (its ordinal is kept) and is counted.
pub fn parse_annotations(bytes: &[u8], file: &str, skips: &SkipCounts) -> Result<Vec<Option<Annotation>>> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).with_context(|| format!("{file} is not valid JSON"))?;
    let serde_json::Value::Array(items) = value else { bail!("{file}: expected a JSON list of annotations") };
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match annotation_of(&item) {
            Ok(a) => Some(a),
            Err(detail) => {
                skips.record(SkipReason::BadAnnotation, file, &format!("#{i}"), &detail);
                None
            }
        })
        .collect())
}

/// An entry: `image` (or NLVR2's `images`, one or two), the text as `caption` (a string or a
/// list), `sentence` (SNLI-VE, NLVR2), `question` (VQA) or `text` (grounding), and optionally
/// `image_id`, `label`, `answer` (with `dataset`) and `question_id`.
fn annotation_of(item: &serde_json::Value) -> std::result::Result<Annotation, String> {
    let (image, second_image) = images_of(item)?;
    let text = ["caption", "sentence", "question", "text"].into_iter().find_map(|field| item.get(field));
    let captions: Vec<String> = match text {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("a caption is not a string")?,
        _ => {
            let why = "\"caption\" (or \"sentence\", \"question\", \"text\") is neither a string nor a list of strings";
            return Err(why.into());
        }
    };
    let captions: Vec<String> = captions.into_iter().filter(|c| !c.trim().is_empty()).collect();
    if captions.is_empty() {
        return Err("no non-empty caption".into());
    }
    let (image_id, label) = (item.get("image_id").map(image_id_of), item.get("label").map(image_id_of));
    let answers = item.get("answer").map(answers_of).transpose()?.unwrap_or_default();
    let question_id = item.get("question_id").map(image_id_of);
    let dataset = item.get("dataset").and_then(|d| d.as_str()).map(str::to_string);
    Ok(Annotation { image, second_image, captions, image_id, label, answers, question_id, dataset })
}

/// An entry's `image`, or the one or two paths of its `images` list.
fn images_of(item: &serde_json::Value) -> std::result::Result<(String, Option<String>), String> {
    if let Some(image) = item.get("image") {
        return Ok((image.as_str().ok_or("\"image\" is not a string")?.to_string(), None));
    }
    let list = item.get("images").and_then(|v| v.as_array()).ok_or("no \"image\" (nor an \"images\" list)")?;
    let paths: Vec<&str> =
        list.iter().map(|p| p.as_str()).collect::<Option<_>>().ok_or("an image path is not a string")?;
    match paths[..] {
        [one] => Ok((one.to_string(), None)),
        [first, second] => Ok((first.to_string(), Some(second.to_string()))),
        _ => Err(format!("\"images\" lists {} paths: one or two are read", paths.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn keys_group_members_and_ordinals_include_bad_samples() {
        let tar = tar_of(&[
            ("d/000.jpg", b"img0"),
            ("d/000.txt", b"a cat"),
            ("d/001.jpg", b"img1"),
            ("d/002.png", b"img2"),
            ("d/002.txt", b"  "),
            ("d/003.webp", b"img3"),
            ("d/003.txt", &[0xff, 0xfe]),
            ("d/004.jpg", b"img4"),
            ("d/004.json", br#"{"caption": "x"}"#),
            ("d/004.txt", b"a dog"),
        ]);
        let skips = SkipCounts::default();
        let mut got = vec![];
        let scan =
            read_tar_samples(&tar[..], "s.tar", 0, 0..5, &TarOptions::default(), &skips, |o, r| got.push((o, r)));
        assert_eq!(scan.samples, 5);
        assert!(!scan.truncated());
        assert_eq!(got.iter().map(|(o, r)| (*o, r.key.as_str())).collect::<Vec<_>>(), vec![(0, "d/000"), (4, "d/004")]);
        assert_eq!(got[1].1.captions, vec!["a dog"]);
        assert_eq!(skips.get(SkipReason::MissingCaption), 1);
        assert_eq!(skips.get(SkipReason::EmptyCaption), 1);
        assert_eq!(skips.get(SkipReason::InvalidUtf8), 1);
        // Offsets let a reader start at any sample: start at #4.
        let from = scan_tar(&tar[..]).offsets[4] as usize;
        let mut again = vec![];
        read_tar_samples(&tar[from..], "s.tar", 4, 4..5, &TarOptions::default(), &skips, |o, r| again.push((o, r.key)));
        assert_eq!(again, vec![(4, "d/004".to_string())]);
    }

    /// Two samples whose names are not UTF-8 and decode alike (`x\u{FFFD}`) stay two samples, both
    /// skipped as `non_utf8_key`; none takes the other's caption.
    #[test]
    fn keys_that_are_not_utf8_are_told_apart_by_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let mut b = tar::Builder::new(Vec::new());
        let files: [(&[u8], &[u8]); 6] = [
            (b"d/x\xfe.jpg", b"img0"),
            (b"d/x\xfe.txt", b"a cat"),
            (b"d/x\xff.jpg", b"img1"),
            (b"d/x\xff.txt", b"a dog"),
            (b"d/y.jpg", b"img2"),
            (b"d/y.txt", b"a bird"),
        ];
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, std::ffi::OsStr::from_bytes(name), data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let skips = SkipCounts::default();
        let mut got = vec![];
        let scan =
            read_tar_samples(&tar[..], "s.tar", 0, 0..3, &TarOptions::default(), &skips, |o, r| got.push((o, r)));
        assert_eq!(scan.samples, 3);
        assert_eq!(
            got.iter().map(|(o, r)| (*o, r.key.as_str(), r.captions[0].as_str())).collect::<Vec<_>>(),
            [(2, "d/y", "a bird")]
        );
        assert_eq!(skips.get(SkipReason::NonUtf8Key), 2);
    }

    #[test]
    fn json_captions_and_ranges() {
        let tar = tar_of(&[("a.jpg", b"1"), ("a.json", br#"{"text": "hello"}"#), ("b.jpg", b"2"), ("b.json", b"{")]);
        let skips = SkipCounts::default();
        let mut got = vec![];
        let field = TarOptions { caption: CaptionSource::JsonField("text".into()), ..TarOptions::default() };
        read_tar_samples(&tar[..], "s", 0, 0..2, &field, &skips, |_, r| got.push(r));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].captions, vec!["hello"]);
        assert_eq!(skips.get(SkipReason::BadJson), 1);
    }

    #[test]
    fn truncated_tars_keep_what_was_complete() {
        let tar = tar_of(&[("a.jpg", &[1; 600]), ("a.txt", b"x"), ("b.jpg", &[2; 2000]), ("b.txt", b"y")]);
        // a.jpg (512 + 1024) and a.txt (512 + 512) are whole; b.jpg is cut in its data.
        let cut = &tar[..3200];
        let skips = SkipCounts::default();
        let mut keys = vec![];
        let scan = read_tar_samples(cut, "s", 0, 0..2, &TarOptions::default(), &skips, |_, r| keys.push(r.key));
        assert!(scan.truncated());
        assert_eq!(keys, vec!["a"]);
        assert_eq!(skips.get(SkipReason::TruncatedShard), 1, "b, the one sample the cut lost");
    }

    /// A header block for `name` declaring `size` bytes, whatever follows it.
    fn header_block(name: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn read_all(tar: &[u8], options: &TarOptions) -> (Vec<String>, SkipCounts, TarScan) {
        let skips = SkipCounts::default();
        let mut keys = vec![];
        // The range an index of this same stream would give.
        let samples = scan_tar(tar).samples;
        let scan = read_tar_samples(tar, "s.tar", 0, 0..samples, options, &skips, |_, r| keys.push(r.key));
        (keys, skips, scan)
    }

    #[test]
    fn a_member_declaring_a_petabyte_is_counted_not_allocated() {
        let good = tar_of(&[("a.jpg", b"1"), ("a.txt", b"x")]);
        // A member that claims 2^50 bytes while a few hundred follow: the stream ends inside it.
        let mut tar = good[..good.len() - 1024].to_vec();
        tar.extend(header_block("b.jpg", 1 << 50));
        tar.extend([7u8; 700]);
        let (keys, skips, scan) = read_all(&tar, &TarOptions::default());
        assert_eq!(keys, vec!["a"]);
        assert_eq!(skips.get(SkipReason::OversizedMember), 1);
        assert_eq!(scan.samples, 2);
        assert!(scan.truncated());
        assert_eq!(scan_tar(&tar[..]).samples, 2, "the index counts the same samples");
        // A real member over the limit is passed over and the rest of the shard is read.
        let tar = tar_of(&[("a.jpg", &[1; 3000]), ("a.txt", b"x"), ("b.jpg", b"2"), ("b.txt", b"y")]);
        let (keys, skips, scan) = read_all(&tar, &TarOptions { max_member_bytes: 2048, ..TarOptions::default() });
        assert_eq!(keys, vec!["b"]);
        assert_eq!(skips.get(SkipReason::OversizedMember), 1);
        assert!(!scan.truncated());
    }

    #[test]
    fn a_sample_read_whole_before_a_corrupt_header_is_delivered() {
        let tar = tar_of(&[("a.jpg", b"1"), ("a.txt", b"x"), ("b.jpg", b"2"), ("b.txt", b"y"), ("c.jpg", b"3")]);
        let mut broken = tar.clone();
        broken[4 * 1024 + 10] = b'A'; // inside c.jpg's name (5th member, 1 KiB each): checksum off
        let (keys, skips, scan) = read_all(&broken, &TarOptions::default());
        assert_eq!(keys, vec!["a", "b"]);
        assert!(scan.error.as_deref().unwrap().contains("checksum"), "{scan:?}");
        assert_eq!(scan_tar(&broken[..]).samples, 2, "index and reader agree");
        assert_eq!(skips.total(), 0, "{:?}", skips.snapshot());
    }

    #[test]
    fn gzip_streams_are_read_whatever_the_name() {
        use std::io::Write;
        let tar = tar_of(&[("a.jpg", b"1"), ("a.txt", b"x"), ("b.jpg", b"2"), ("b.txt", b"y")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let (keys, _, scan) = read_all(&gz, &TarOptions::default());
        assert_eq!(keys, vec!["a", "b"]);
        assert!(scan.gzip && !scan.truncated());
        let cut = &gz[..gz.len() / 2];
        let (keys, skips, scan) = read_all(cut, &TarOptions::default());
        assert!(scan.truncated() && keys.len() < 2, "{scan:?}");
        assert_eq!(skips.get(SkipReason::TruncatedShard) + keys.len() as u64, scan_tar(cut).samples);
    }

    #[test]
    fn macos_and_windows_leftovers_are_junk_not_samples() {
        let tar = tar_of(&[
            ("._a.jpg", b"fork"),
            ("a.jpg", b"1"),
            ("a.txt", b"x"),
            (".DS_Store", b"ds"),
            ("__MACOSX/._a.jpg", b"fork"),
            ("__MACOSX/d/._b.txt", b"fork"),
            ("d/Thumbs.db", b"t"),
            ("b.jpg", b"2"),
            ("b.txt", b"y"),
        ]);
        let (keys, skips, scan) = read_all(&tar, &TarOptions::default());
        assert_eq!(keys, vec!["a", "b"]);
        assert_eq!(scan.samples, 2);
        assert_eq!(skips.total(), 0, "no sample is lost: {:?}", skips.snapshot());
        let junk = ["._a.jpg", ".DS_Store", "__MACOSX/._a.jpg", "__MACOSX/d/._b.txt", "d/Thumbs.db"];
        assert_eq!(scan_tar(&tar[..]).junk, junk, "the index counts them");
    }

    #[test]
    fn annotations_keep_ordinals_of_bad_entries() {
        let json = br#"[{"image": "a.jpg", "caption": "one"},
                       {"image": 3, "caption": "x"},
                       {"image": "c.jpg", "caption": ["two", "three"], "image_id": 7},
                       {"image": "d.jpg", "caption": "   "}]"#;
        let skips = SkipCounts::default();
        let a = parse_annotations(json, "ann.json", &skips).unwrap();
        assert_eq!(a.len(), 4);
        assert!(a[1].is_none() && a[3].is_none());
        assert_eq!(a[2].as_ref().unwrap().captions, vec!["two", "three"]);
        assert_eq!(a[2].as_ref().unwrap().image_id.as_deref(), Some("7"));
        assert_eq!(skips.get(SkipReason::BadAnnotation), 2);
        assert!(parse_annotations(br#"{"image": "a"}"#, "x.json", &skips).is_err());
        assert!(parse_annotations(b"[", "y.json", &skips).unwrap_err().to_string().contains("y.json"));
    }

    #[test]
    fn image_paths_are_rewritten_then_found_below_the_root() {
        let rewrites = path_rewrites(&["/export/coco/=coco/".into(), "/export/=other/".into()]).unwrap();
        let root = Location::open("/data/sets").unwrap();
        let at = |image: &str| annotation_image(&root, image, &rewrites).map(|l| l.url);
        assert_eq!(at("/export/coco/a.jpg").unwrap(), "/data/sets/coco/a.jpg", "the first matching prefix");
        assert_eq!(at("/export/vg/b.jpg").unwrap(), "/data/sets/other/vg/b.jpg");
        assert_eq!(at("c/d.jpg").unwrap(), "/data/sets/c/d.jpg");
        assert_eq!(at("/data/sets/e.jpg").unwrap(), "/data/sets/e.jpg", "absolute, under the root");
        assert!(at("/data/setsx/e.jpg").unwrap_err().contains("outside the image root /data/sets"));
        let s3 = Location::open("s3://bucket/sets").unwrap();
        assert!(annotation_image(&s3, "/data/sets/e.jpg", &[]).is_err(), "no local path is under a bucket");
        let err = path_rewrites(&["no-equals".into()]).unwrap_err().to_string();
        assert!(err.contains("data.path_rewrite") && err.contains("prefix=replacement"), "{err}");
        assert!(path_rewrites(&["=x".into()]).is_err(), "an empty prefix would match everything");
    }

    #[test]
    fn vqa_rows_weigh_their_answers_as_the_reference() {
        let json = br#"[
            {"image": "a.jpg", "question": "What color?", "question_id": 7, "dataset": "vqa",
             "answer": ["red", "red", "blue", "red", "red", "red", "blue", "red", "dark red", "red"]},
            {"image": "b.jpg", "question": "How many?", "dataset": "vg", "answer": "two"},
            {"image": "c.jpg", "question": "Why?", "question_id": "q9"},
            {"image": "d.jpg", "question": "Which?", "answer": [3]}
        ]"#;
        let skips = SkipCounts::default();
        let rows = parse_annotations(json, "vqa.json", &skips).unwrap();
        let [Some(a), Some(b), Some(c), None] = &rows[..] else { panic!("{rows:?}") };
        assert_eq!((a.captions[0].as_str(), a.question_id.as_deref()), ("What color?", Some("7")));
        let weighted = a.weighted_answers();
        let weights: Vec<(&str, f32)> = weighted.iter().map(|w| (w.text.as_str(), w.weight)).collect();
        assert_eq!(weights.len(), 3);
        for ((text, weight), (want, share)) in weights.iter().zip([("red", 0.7), ("blue", 0.2), ("dark red", 0.1)]) {
            assert_eq!(*text, want);
            assert!((weight - share).abs() < 1e-6, "{text}: {weight}");
        }
        assert_eq!(a.answers.len(), 10, "every human answer is kept for the accuracy");
        let vg = b.weighted_answers();
        assert_eq!((vg[0].text.as_str(), vg[0].weight), ("two", 0.5));
        assert!(c.answers.is_empty() && c.weighted_answers().is_empty(), "a test question has none");
        assert_eq!(skips.get(SkipReason::BadAnnotation), 1, "an answer that is not a string");
    }
}
