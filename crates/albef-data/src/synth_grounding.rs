//! Generated grounding data in RefCOCO+'s files: pictures of two coloured shapes, each shape a
//! referring expression ("a small red circle") with its box. What the grounding task's tests
//! train and evaluate on, without a download.
//!
//! Files under the output folder: `grounding_train.json` (`{image, text}` rows, as the
//! reference's refcoco+_train.json), `grounding_val.json` and `grounding_test.json` (`{image,
//! text, ref_id}`), `refs.json` (the refer toolkit's refs as JSON: ref_id, ann_id, image_id,
//! split), `instances.json` (COCO's: images with their sizes, annotations with their boxes),
//! `proposals.json` (the reference's dets.json: per image the two shapes' boxes and two
//! object-sized boxes in opposite corners), the pictures, and `vocab.txt`.

use crate::store::Location;
use crate::synth::{SynthSpec, VOCAB_TXT, jpeg, vocab_tokens};
use anyhow::Result;
use serde_json::{Value, json};
use tokio::runtime::Handle;

/// File names inside a generated grounding dataset.
pub const TRAIN_JSON: &str = "grounding_train.json";
pub const VAL_JSON: &str = "grounding_val.json";
pub const TEST_JSON: &str = "grounding_test.json";
pub const REFS_JSON: &str = "refs.json";
pub const INSTANCES_JSON: &str = "instances.json";
pub const PROPOSALS_JSON: &str = "proposals.json";

/// What [`write_grounding`] writes: pictures per split, their side, the seed.
#[derive(Clone, Copy, Debug)]
pub struct GroundingSpec {
    pub seed: u64,
    pub image_res: usize,
    pub train: u64,
    pub val: u64,
    pub test: u64,
}

/// The files' contents, gathered picture by picture.
#[derive(Default)]
struct Files {
    rows: [Vec<Value>; 3],
    refs: Vec<Value>,
    images: Vec<Value>,
    annotations: Vec<Value>,
    proposals: serde_json::Map<String, Value>,
}

/// Writes the dataset under `out`; deterministic given the spec. Only pictures of two shapes
/// with different descriptions are used, so that every expression names one of them.
pub fn write_grounding(out: &Location, spec: &GroundingSpec, handle: &Handle) -> Result<()> {
    let synth = SynthSpec { seed: spec.seed, image_res: spec.image_res };
    let mut files = Files::default();
    let mut index = 0u64;
    for (split_index, count) in [spec.train, spec.val, spec.test].into_iter().enumerate() {
        for n in 0..count {
            let (image_id, referents, rgb) = loop {
                index += 1;
                let scene = synth.scene(index);
                let referents = scene.referents();
                if referents.len() == 2 && referents[0].0 != referents[1].0 {
                    break (index, referents, synth.paint(scene));
                }
            };
            let file = format!("images/{image_id:08}.jpg");
            handle.block_on(out.join(&file).write_all(jpeg(&rgb, spec.image_res)?))?;
            // RefCOCO+'s testA and testB hold different kinds of referents; here, alternate pictures.
            let split = ["train", "val", ["testA", "testB"][n as usize % 2]][split_index];
            files.add_picture(&file, image_id, spec.image_res, &referents, split, split_index);
        }
    }
    let Files { rows, refs, images, annotations, proposals } = files;
    let writes = [
        (TRAIN_JSON, json!(rows[0])),
        (VAL_JSON, json!(rows[1])),
        (TEST_JSON, json!(rows[2])),
        (REFS_JSON, json!(refs)),
        (INSTANCES_JSON, json!({"images": images, "annotations": annotations})),
        (PROPOSALS_JSON, Value::Object(proposals)),
    ];
    for (name, value) in writes {
        handle.block_on(out.join(name).write_all(serde_json::to_vec(&value)?))?;
    }
    let vocab: String = vocab_tokens().into_iter().map(|t| t + "\n").collect();
    handle.block_on(out.join(VOCAB_TXT).write_all(vocab.into_bytes()))?;
    Ok(())
}

impl Files {
    /// One picture's rows, refs, annotations and proposals; ref and annotation ids derive from
    /// the image id (two per picture).
    fn add_picture(
        &mut self,
        file: &str,
        image_id: u64,
        res: usize,
        referents: &[(String, [f64; 4])],
        split: &str,
        split_index: usize,
    ) {
        let side = res as f64;
        self.images.push(json!({"id": image_id, "file_name": file, "height": res, "width": res}));
        let mut boxes: Vec<[f64; 4]> = referents.iter().map(|r| r.1).collect();
        let [_, _, w, h] = boxes[0];
        boxes.extend([[0.0, 0.0, w, h], [side - w, side - h, w, h]]);
        self.proposals.insert(image_id.to_string(), json!(boxes));
        for (k, (text, bbox)) in referents.iter().enumerate() {
            let id = image_id * 2 + k as u64;
            self.annotations.push(json!({"id": id, "image_id": image_id, "bbox": bbox, "category_id": 1}));
            self.refs.push(json!({"ref_id": id, "ann_id": id, "image_id": image_id, "split": split}));
            let row = match split_index {
                0 => json!({"image": file, "text": text}),
                _ => json!({"image": file, "text": text, "ref_id": id}),
            };
            self.rows[split_index].push(row);
        }
    }
}
