//! Readers of the two dataset layouts ALBEF users have: WebDataset / img2dataset tar shards
//! (files sharing a basename form a sample) and ALBEF annotation JSON (a list of
//! `{"image": path, "caption": str | [str]}`). Both yield samples by ordinal, so that epoch plans
//! can name `(source, sample range)`; a bad sample keeps its ordinal and is skipped and counted.

use crate::bad::{SkipCounts, SkipReason};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::ops::{ControlFlow, Range};

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// A sample ready for decoding: image bytes and its captions (one is sampled per fetch).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub key: String,
    pub image: Vec<u8>,
    pub captions: Vec<String>,
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

/// The members of one sample as found in the tar.
#[derive(Default)]
struct Members {
    key: String,
    image: Option<Vec<u8>>,
    txt: Option<Vec<u8>>,
    json: Option<Vec<u8>>,
}

/// What a tar read saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TarScan {
    /// Samples (keys) seen, good or bad.
    pub samples: u64,
    /// Byte offset of each sample's first header, relative to the start of the stream.
    pub offsets: Vec<u64>,
    /// The stream ended in the middle of an entry.
    pub truncated: bool,
}

/// Splits `dir/name.ext.more` into (`dir/name`, `ext.more`), WebDataset's key rule.
fn split_key(path: &str) -> (String, String) {
    let (dir, base) = match path.rsplit_once('/') {
        Some((d, b)) => (format!("{d}/"), b),
        None => (String::new(), path),
    };
    match base.split_once('.') {
        Some((stem, ext)) => (format!("{dir}{stem}"), ext.to_ascii_lowercase()),
        None => (format!("{dir}{base}"), String::new()),
    }
}

/// Reads a tar stream sample by sample. `first` is the ordinal of the first sample in the stream
/// (non-zero when the stream starts at an indexed offset); `on_sample(ordinal, members)` may stop
/// the read early. With `want_members` false only headers are read (indexing).
fn read_tar(
    reader: impl Read,
    first: u64,
    want_members: bool,
    mut on_sample: impl FnMut(u64, Members) -> ControlFlow<()>,
) -> TarScan {
    let mut archive = tar::Archive::new(reader);
    let mut scan = TarScan::default();
    let Ok(entries) = archive.entries() else {
        scan.truncated = true;
        return scan;
    };
    let mut current: Option<Members> = None;
    let mut flush = |m: Members, scan: &mut TarScan| on_sample(first + scan.samples - 1, m);
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(_) => {
                // The group being read may be incomplete: it is dropped with the rest.
                scan.truncated = true;
                return scan;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let (key, ext) = split_key(&path);
        if key.rsplit('/').next().is_some_and(|b| b.starts_with('.')) {
            continue; // hidden files (._ resource forks and the like) are no samples
        }
        let offset = entry.raw_header_position();
        if current.as_ref().is_none_or(|m| m.key != key) {
            if let Some(done) = current.take()
                && flush(done, &mut scan).is_break()
            {
                return scan;
            }
            scan.samples += 1;
            scan.offsets.push(offset);
            current = Some(Members { key, ..Default::default() });
        }
        if !want_members {
            continue;
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        if entry.read_to_end(&mut data).is_err() {
            scan.truncated = true;
            return scan;
        }
        let m = current.as_mut().expect("a group is open");
        match ext.as_str() {
            e if IMAGE_EXTENSIONS.contains(&e) => m.image = Some(data),
            "txt" => m.txt = Some(data),
            "json" => m.json = Some(data),
            _ => {}
        }
    }
    if let Some(done) = current.take() {
        let _ = flush(done, &mut scan);
    }
    scan
}

/// Counts the samples of a tar stream and where each starts (for the shard index).
pub fn scan_tar(reader: impl Read) -> TarScan {
    read_tar(reader, 0, false, |_, _| ControlFlow::Continue(()))
}

/// Reads the samples with ordinals in `wanted` from a tar stream whose first sample has ordinal
/// `first`, calling `on_record` for each good one; bad ones are counted in `skips`.
pub fn read_tar_samples(
    reader: impl Read,
    shard: &str,
    first: u64,
    wanted: Range<u64>,
    caption: &CaptionSource,
    skips: &SkipCounts,
    mut on_record: impl FnMut(u64, Record),
) -> TarScan {
    let scan = read_tar(reader, first, true, |ordinal, m| {
        if ordinal >= wanted.end {
            return ControlFlow::Break(());
        }
        if ordinal >= wanted.start {
            match record_of(m, caption) {
                Ok(r) => on_record(ordinal, r),
                Err((reason, key, detail)) => skips.record(reason, shard, &key, &detail),
            }
        }
        ControlFlow::Continue(())
    });
    if scan.truncated {
        skips.record(SkipReason::TruncatedShard, shard, "", "the tar stream ends inside an entry");
    }
    scan
}

type Rejection = (SkipReason, String, String);

fn record_of(m: Members, caption: &CaptionSource) -> std::result::Result<Record, Rejection> {
    let key = m.key;
    let reject = |reason, detail: &str| Err((reason, key.clone(), detail.to_string()));
    let Some(image) = m.image else { return reject(SkipReason::MissingImage, "no .jpg/.jpeg/.png/.webp member") };
    let text = match caption {
        CaptionSource::Txt => match m.txt {
            Some(t) => t,
            None => return reject(SkipReason::MissingCaption, "no .txt member"),
        },
        CaptionSource::JsonField(field) => {
            let Some(json) = m.json else { return reject(SkipReason::MissingCaption, "no .json member") };
            match serde_json::from_slice::<serde_json::Value>(&json) {
                Ok(v) => match v.get(field).and_then(|c| c.as_str()) {
                    Some(c) => c.as_bytes().to_vec(),
                    None => return reject(SkipReason::MissingCaption, &format!("no string field {field:?} in .json")),
                },
                Err(e) => return reject(SkipReason::BadJson, &e.to_string()),
            }
        }
    };
    let Ok(text) = String::from_utf8(text) else { return reject(SkipReason::InvalidUtf8, "caption is not UTF-8") };
    if text.trim().is_empty() {
        return reject(SkipReason::EmptyCaption, "");
    }
    Ok(Record { key, image, captions: vec![text] })
}

/// One entry of an ALBEF annotation file.
#[derive(Clone, Debug, PartialEq)]
pub struct Annotation {
    /// Image path relative to the configured image root.
    pub image: String,
    pub captions: Vec<String>,
    /// Retrieval splits identify images.
    pub image_id: Option<String>,
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

fn annotation_of(item: &serde_json::Value) -> std::result::Result<Annotation, String> {
    let image = item.get("image").and_then(|v| v.as_str()).ok_or("\"image\" is not a string")?;
    let captions: Vec<String> = match item.get("caption") {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("a caption is not a string")?,
        _ => return Err("\"caption\" is neither a string nor a list of strings".into()),
    };
    let captions: Vec<String> = captions.into_iter().filter(|c| !c.trim().is_empty()).collect();
    if captions.is_empty() {
        return Err("no non-empty caption".into());
    }
    let image_id = item.get("image_id").map(|v| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    Ok(Annotation { image: image.to_string(), captions, image_id })
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
        let scan = read_tar_samples(&tar[..], "s.tar", 0, 0..100, &CaptionSource::Txt, &skips, |o, r| got.push((o, r)));
        assert_eq!(scan.samples, 5);
        assert!(!scan.truncated);
        assert_eq!(got.iter().map(|(o, r)| (*o, r.key.as_str())).collect::<Vec<_>>(), vec![(0, "d/000"), (4, "d/004")]);
        assert_eq!(got[1].1.captions, vec!["a dog"]);
        assert_eq!(skips.get(SkipReason::MissingCaption), 1);
        assert_eq!(skips.get(SkipReason::EmptyCaption), 1);
        assert_eq!(skips.get(SkipReason::InvalidUtf8), 1);
        // Offsets let a reader start at any sample: start at #4.
        let from = scan_tar(&tar[..]).offsets[4] as usize;
        let mut again = vec![];
        read_tar_samples(&tar[from..], "s.tar", 4, 4..5, &CaptionSource::Txt, &skips, |o, r| again.push((o, r.key)));
        assert_eq!(again, vec![(4, "d/004".to_string())]);
    }

    #[test]
    fn json_captions_and_ranges() {
        let tar = tar_of(&[("a.jpg", b"1"), ("a.json", br#"{"text": "hello"}"#), ("b.jpg", b"2"), ("b.json", b"{")]);
        let skips = SkipCounts::default();
        let mut got = vec![];
        let field = CaptionSource::JsonField("text".into());
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
        let scan = read_tar_samples(cut, "s", 0, 0..10, &CaptionSource::Txt, &skips, |_, r| keys.push(r.key));
        assert!(scan.truncated);
        assert_eq!(keys, vec!["a"]);
        assert_eq!(skips.get(SkipReason::TruncatedShard), 1);
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
}
