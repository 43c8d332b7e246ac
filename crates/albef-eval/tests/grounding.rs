//! Grounding's scoring against the reference's own (tests/python/make_refcoco.py runs ALBEF's
//! grounding_eval and computeIoU in PyTorch on a small RefCOCO+ written by Python's pickle, as
//! Python 3 and Python 2 write it): the same annotations, upsampled maps, scores, choices, IoUs
//! and accuracies; bad annotation files are errors naming the file and the entry.

use albef_eval::grounding::{
    BoxXywh, GroundingTally, RefCoco, RefSplit, Referent, box_scores, ground, load_proposals, upsample,
};
use serde::Deserialize;
use std::path::Path;
use tokio::runtime::Runtime;

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
    accuracies: Vec<(String, f64)>,
}

#[derive(Deserialize)]
struct Case {
    ref_id: i64,
    image_id: i64,
    split: String,
    bbox: [f64; 4],
    height: u32,
    width: u32,
    grid: usize,
    map: Vec<f32>,
    scores: Vec<f64>,
    chosen: usize,
    #[serde(rename = "box")]
    chosen_box: [f64; 4],
    iou: f64,
}

fn xywh(b: [f64; 4]) -> BoxXywh {
    BoxXywh { x: b[0], y: b[1], w: b[2], h: b[3] }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The script's files in a temporary folder, and what it expects.
fn reference_files() -> (tempfile::TempDir, Expected) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run make setup", python.display());
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python)
        .arg(root.join("tests/python/make_refcoco.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = serde_json::from_slice(&std::fs::read(dir.path().join("expected.json")).unwrap()).unwrap();
    (dir, expected)
}

fn url(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn load(dir: &Path, refs: &str, rt: &Runtime) -> RefCoco {
    RefCoco::load(&url(dir, refs), &url(dir, "instances.json"), 1 << 20, rt.handle()).unwrap()
}

fn upsampled(dir: &Path, ref_id: i64) -> Vec<f32> {
    let bytes = std::fs::read(dir.join(format!("up_{ref_id}.f32"))).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn assert_near(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-4 * b.abs() + 1e-7, "{what}: value {i}: {a} != {b}");
    }
}

#[test]
fn every_refs_encoding_gives_the_same_referents() {
    let (dir, expected) = reference_files();
    let rt = runtime();
    for refs in ["refs_p2.p", "refs_p0_py2.p", "refs_p2_py2.p", "refs.json"] {
        let coco = load(dir.path(), refs, &rt);
        assert_eq!(coco.len(), expected.cases.len(), "{refs}");
        for c in &expected.cases {
            let want = Referent {
                ref_id: c.ref_id,
                image_id: c.image_id,
                split: c.split.parse().unwrap(),
                bbox: xywh(c.bbox),
                height: c.height,
                width: c.width,
            };
            assert_eq!(coco.get(c.ref_id), Some(&want), "{refs}");
        }
        assert_eq!(coco.get(1), None);
    }
}

#[test]
fn scores_choices_and_accuracies_are_the_reference_s() {
    let (dir, expected) = reference_files();
    let rt = runtime();
    let coco = load(dir.path(), "refs_p0_py2.p", &rt);
    let proposals = load_proposals(&url(dir.path(), "dets.json"), rt.handle()).unwrap();
    let mut tally = GroundingTally::default();
    for c in &expected.cases {
        let what = format!("ref {}", c.ref_id);
        let referent = coco.get(c.ref_id).unwrap();
        let boxes = &proposals[&c.image_id];
        let (h, w) = (c.height as usize, c.width as usize);
        let heat = upsample(&c.map, c.grid, h, w).unwrap();
        assert_near(&heat, &upsampled(dir.path(), c.ref_id), &what);
        let scores = box_scores(&heat, h, w, boxes, 0.5);
        let narrowed: Vec<f32> = scores.iter().map(|&s| s as f32).collect();
        let want: Vec<f32> = c.scores.iter().map(|&s| s as f32).collect();
        assert_near(&narrowed, &want, &what);
        let g = ground(&c.map, c.grid, referent, boxes).unwrap().unwrap();
        assert_eq!((g.index, g.chosen), (c.chosen, xywh(c.chosen_box)), "{what}");
        assert!((g.iou - c.iou).abs() <= 1e-12, "{what}: IoU {} != {}", g.iou, c.iou);
        assert_eq!(g.heat, heat);
        tally.add(referent.split, g.correct());
    }
    let accuracies: Vec<(String, f64)> = tally.accuracies().into_iter().map(|(s, a)| (s.to_string(), a)).collect();
    assert_eq!(accuracies, expected.accuracies);
    assert!(expected.cases.iter().any(|c| c.iou >= 0.5) && expected.cases.iter().any(|c| c.iou < 0.5));
}

/// A folder with `files` written, and the error of loading refs and instances from it.
fn load_error(files: &[(&str, &[u8])], max_pixels: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let (refs, instances) = (url(dir.path(), "refs.p"), url(dir.path(), "instances.json"));
    let err = RefCoco::load(&refs, &instances, max_pixels, runtime().handle()).unwrap_err();
    format!("{err:#}")
}

const INSTANCES: &[u8] = br#"{"images": [{"id": 5, "height": 40, "width": 60}, {"id": 6, "height": 400, "width": 600}],
    "annotations": [{"id": 9, "image_id": 5, "bbox": [1, 2, 3, 4], "segmentation": [[1, 2]]}]}"#;

/// A protocol 0 pickle (Python 2's default) of [{ref_id: 1, ann_id, image_id, split: 'val'}].
fn refs_pickle(ann_id: i64, image_id: i64) -> Vec<u8> {
    format!(
        "(lp0\n(dp1\nS'ref_id'\np2\nI1\nsS'ann_id'\np3\nI{ann_id}\nsS'image_id'\nI{image_id}\nsS'split'\nS'val'\nsa."
    )
    .into_bytes()
}

#[test]
fn the_small_files_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("refs.p"), refs_pickle(9, 5)).unwrap();
    std::fs::write(dir.path().join("instances.json"), INSTANCES).unwrap();
    let coco =
        RefCoco::load(&url(dir.path(), "refs.p"), &url(dir.path(), "instances.json"), 240_000, runtime().handle());
    let coco = coco.unwrap();
    assert_eq!(coco.len(), 1);
    assert_eq!(coco.get(1).map(|r| (r.split, r.bbox.w, r.height, r.width)), Some((RefSplit::Val, 3.0, 40, 60)));
}

#[test]
fn refs_naming_what_instances_lack_are_errors() {
    let err = load_error(&[("refs.p", &refs_pickle(10, 5)), ("instances.json", INSTANCES)], 1 << 20);
    assert!(err.contains("refs.p: entry 0 (ref_id 1): ann_id 10 is not in") && err.contains("instances.json"), "{err}");
    let err = load_error(&[("refs.p", &refs_pickle(9, 7)), ("instances.json", INSTANCES)], 1 << 20);
    assert!(err.contains("refs.p: entry 0 (ref_id 1): image_id 7 is not in"), "{err}");
    let twice = br#"[{"ref_id": 1, "ann_id": 9, "image_id": 5, "split": "val"},
                     {"ref_id": 1, "ann_id": 9, "image_id": 5, "split": "testA"}]"#;
    let err = load_error(&[("refs.p", twice), ("instances.json", INSTANCES)], 1 << 20);
    assert!(err.contains("refs.p: entry 1: ref_id 1 repeats"), "{err}");
}

#[test]
fn malformed_refs_are_errors_naming_the_entry() {
    let whole = refs_pickle(9, 5);
    let cases: [(&[u8], &str); 6] = [
        (&whole[..whole.len() / 2], "refs.p: not a readable pickle"),
        (b"\x80\x02cos\nsystem\n(S'true'\ntR.", "refused"),
        (b"(lp0\n(dp1\nS'ref_id'\nI1\nsS'split'\nS'val'\nsa.", "refs.p: entry 0: no ann_id"),
        (b"(lp0\n(dp1\nS'ref_id'\nS'one'\nsa.", "refs.p: entry 0: ref_id is not an integer"),
        (br#"[{"ref_id": 1, "ann_id": 9, "image_id": 5, "split": "testC"}]"#, "refs.p: entry 0: split \"testC\""),
        (b"{\"refs\": []}", "neither a pickle nor a JSON list"),
    ];
    for (refs, says) in cases {
        let err = load_error(&[("refs.p", refs), ("instances.json", INSTANCES)], 1 << 20);
        assert!(err.contains(says), "{err} does not say {says}");
    }
}

#[test]
fn images_over_max_pixels_and_bad_instances_are_errors() {
    let refs = refs_pickle(9, 5);
    let err = load_error(&[("refs.p", &refs), ("instances.json", INSTANCES)], 200_000);
    assert!(err.contains("instances.json: images entry 1: image 6: 600 x 400 is over max_pixels (200000)"), "{err}");
    let zero = br#"{"images": [{"id": 5, "height": 0, "width": 60}], "annotations": []}"#;
    let err = load_error(&[("refs.p", &refs), ("instances.json", zero)], 1 << 20);
    assert!(err.contains("images entry 0: image 5: height 0 is not a positive size"), "{err}");
    let bbox = br#"{"images": [], "annotations": [{"id": 9, "bbox": [1, 2, "3", 4]}]}"#;
    let err = load_error(&[("refs.p", &refs), ("instances.json", bbox)], 1 << 20);
    assert!(err.contains("annotations entry 0: box coordinate \"3\" is not a finite number"), "{err}");
}

#[test]
fn malformed_proposals_are_errors_naming_the_image_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let path = dir.path().join("dets.json");
    let cases: [(&str, &str); 3] = [
        (r#"{"5": [[1, 2, 3, 4, 0.9], [1, 2, 3]]}"#, "dets.json: image 5: entry 1: a box of 3 numbers"),
        (r#"{"five": [[1, 2, 3, 4]]}"#, "dets.json: key \"five\" is not an image id"),
        (r#"[[1, 2, 3, 4]]"#, "dets.json: not proposals"),
    ];
    for (text, says) in cases {
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", load_proposals(&url(dir.path(), "dets.json"), rt.handle()).unwrap_err());
        assert!(err.contains(says), "{err} does not say {says}");
    }
    std::fs::write(&path, r#"{"5": [[1.5, 2, 3, 4, 0.9]], "6": []}"#).unwrap();
    let p = load_proposals(&url(dir.path(), "dets.json"), rt.handle()).unwrap();
    assert_eq!(p[&5], vec![BoxXywh { x: 1.5, y: 2.0, w: 3.0, h: 4.0 }]);
    assert!(p[&6].is_empty());
}
