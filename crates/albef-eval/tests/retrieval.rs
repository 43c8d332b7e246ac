//! Retrieval evaluation with a real (small, untrained) model on a generated split: the scores
//! follow their definition, shards add up to the single-process scores, evaluation mode is
//! deterministic, and the untrained model is the one a job starts from.

use albef_config::{AlbefConfig, Preset};
use albef_data::store::Location;
use albef_data::synth::{DatasetSpec, TEST_JSON, VOCAB_TXT, write_dataset};
use albef_data::tokenizer::{Tokenizer, TokenizerOptions};
use albef_eval::embed::{Tokens, deserialize_embeddings, embed_texts, serialize_embeddings};
use albef_eval::model::untrained;
use albef_eval::retrieval::{NOT_RERANKED, extract_features, score_shard};
use albef_eval::{EvalOptions, RetrievalSplit, Scoring, SplitOptions, evaluate};
use albef_train::Trainer;
use tch::{Device, Kind, Tensor};

/// Model construction seeds libtorch's global generator: tests that build models take turns.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn config() -> AlbefConfig {
    let mut cfg = AlbefConfig::defaults(Preset::AlbefSmall);
    cfg.train.seed = 11;
    cfg.data.max_tokens = 16;
    cfg
}

struct Fixture {
    _dir: tempfile::TempDir,
    split: RetrievalSplit,
    tokenizer: Tokenizer,
}

fn fixture(images: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let root = dir.path().to_str().unwrap();
    let spec = DatasetSpec { seed: 5, image_res: 48, train: 1, test: images, shards: 1 };
    write_dataset(&Location::open(root).unwrap(), &spec, rt.handle()).unwrap();
    let tokenizer = Tokenizer::from_file(dir.path().join(VOCAB_TXT))
        .unwrap()
        .with_options(TokenizerOptions { max_tokens: 16, add_sep: false })
        .unwrap();
    let url = dir.path().join(TEST_JSON).to_string_lossy().into_owned();
    let split = RetrievalSplit::load(&url, &tokenizer, &SplitOptions::default(), rt.handle()).unwrap();
    Fixture { _dir: dir, split, tokenizer }
}

fn opts(k: usize) -> EvalOptions {
    EvalOptions { k_test: k, batch_size: 5, itm_batch: 7, bf16: false, decode_threads: 2 }
}

#[test]
fn the_split_numbers_captions_image_by_image() {
    let f = fixture(6);
    let s = &f.split;
    assert_eq!(s.num_images(), 6);
    assert_eq!(s.truth.images(), 6);
    assert_eq!(s.num_texts(), s.truth.texts());
    // Generated pictures carry 2 (one object) or 3 (two objects) captions.
    assert!(s.truth.img2txt.iter().all(|c| c.len() == 2 || c.len() == 3));
    assert_eq!(s.input_ids.len(), s.num_texts() * s.seq_len);
    let first = &s.truth.img2txt[0];
    assert_eq!(first[0], 0, "captions are numbered in order");
    assert!(s.texts.iter().all(|t| t == &t.to_lowercase()), "captions went through pre_caption");
    let pixels = s.pixels(0..2, 32, 2).unwrap();
    assert_eq!(pixels.len(), 2 * 3 * 32 * 32);
}

/// A val row whose caption is one string is an image with one caption (the reference would
/// iterate its characters); a row with no usable caption is an error naming the file and the row.
#[test]
fn a_string_caption_is_one_caption_and_a_bad_row_is_named() {
    let f = fixture(2);
    let dir = f._dir.path();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(dir.join(TEST_JSON)).unwrap()).unwrap();
    let image = |i: usize| rows[i]["image"].clone();
    let load = |json: serde_json::Value| {
        let path = dir.join("val.json");
        std::fs::write(&path, json.to_string()).unwrap();
        RetrievalSplit::load(path.to_str().unwrap(), &f.tokenizer, &SplitOptions::default(), rt.handle())
    };
    let s = load(serde_json::json!([
        {"image": image(0), "caption": "a red square"},
        {"image": image(1), "caption": ["a blue circle", "a circle"]},
    ]))
    .unwrap();
    assert_eq!(s.truth.img2txt, [vec![0], vec![1, 2]]);
    let err = format!("{:#}", load(serde_json::json!([{"image": image(0), "caption": 7}])).err().unwrap());
    assert!(err.contains("val.json") && err.contains("#0") && err.contains("caption"), "{err}");
}

#[test]
fn scores_follow_the_definition_and_shards_add_up() {
    let _rng = serial();
    let f = fixture(9);
    let cfg = config();
    let m = untrained(&cfg, Device::Cpu).unwrap();
    let k = 4;
    let feats = extract_features(m.albef().unwrap(), &f.split, &opts(k)).unwrap();
    let (n_img, n_txt) = (f.split.num_images() as i64, f.split.num_texts() as i64);
    assert_eq!(feats.image_feat.size(), [n_img, cfg.model.embed_dim]);
    let norms = feats.text_feat.norm_scalaropt_dim(2, [1], false);
    assert!(norms.allclose(&Tensor::ones([n_txt], (Kind::Float, Device::Cpu)), 1e-5, 1e-5, false));

    let whole = score_shard(m.albef().unwrap(), &feats, &opts(k), 0, 1);
    // Exactly k candidates per query were re-ranked, the most similar ones.
    let per_row = whole.i2t_mask.sum_dim_intlist(1, false, Kind::Float);
    assert!(per_row.eq(k as f64).all().int64_value(&[]) == 1, "{per_row}");
    assert!(whole.t2i_mask.sum_dim_intlist(1, false, Kind::Float).eq(k as f64).all().int64_value(&[]) == 1);
    let kth = whole.sims.topk(k as i64, 1, true, true).0.select(1, k as i64 - 1).unsqueeze(1);
    let outside = whole.i2t_mask.lt(0.5);
    assert!(whole.sims.ge_tensor(&kth).logical_and(&outside).sum(Kind::Int64).int64_value(&[]) == 0);

    // One re-ranked entry recomputed by hand: image 2 with its best text.
    let best = whole.sims.get(2).argmax(0, false).int64_value(&[]);
    let direct = tch::no_grad(|| {
        let (te, tm) = (feats.text_embeds.narrow(0, best, 1), feats.text_mask.narrow(0, best, 1));
        m.albef().unwrap().itm_logits(&te, &tm, &feats.image_embeds.narrow(0, 2, 1), false).double_value(&[0, 1])
    });
    let ours = whole.i2t_itm.double_value(&[2, best]);
    assert!((ours - direct).abs() < 1e-4, "ITM logit {ours} vs a direct fusion forward {direct}");

    // Score matrices: ITM (+ ITC) on the top k, -100 elsewhere; ITC everywhere.
    let (itm_i2t, _) = whole.matrices(Scoring::Itm).unwrap();
    let (lavis_i2t, _) = whole.matrices(Scoring::ItmItc).unwrap();
    let (itc_i2t, itc_t2i) = whole.matrices(Scoring::Itc).unwrap();
    let sim = whole.sims.double_value(&[2, best]) as f32;
    assert_eq!(itm_i2t.row(2)[best as usize], ours as f32);
    assert!((lavis_i2t.row(2)[best as usize] - (ours as f32 + sim)).abs() < 1e-5);
    assert_eq!(itc_i2t.row(2)[best as usize], sim);
    assert_eq!(itc_t2i, itc_i2t.transpose());
    assert_eq!(itm_i2t.data.iter().filter(|&&v| v == NOT_RERANKED).count(), (n_img * (n_txt - k as i64)) as usize);

    // Three ranks' shards summed give the single-process scores.
    let mut sum = score_shard(m.albef().unwrap(), &feats, &opts(k), 0, 3);
    for rank in 1..3 {
        let mut part = score_shard(m.albef().unwrap(), &feats, &opts(k), rank, 3);
        for (total, p) in sum.reducible().into_iter().zip(part.reducible()) {
            *total += &*p;
        }
    }
    for (a, b) in sum.reducible().into_iter().zip(score_shard(m.albef().unwrap(), &feats, &opts(k), 0, 1).reducible()) {
        assert!(a.allclose(b, 1e-6, 1e-6, false), "sharded scores differ");
    }
}

#[test]
fn evaluation_is_deterministic_and_scores_all_three_ways() {
    let _rng = serial();
    let f = fixture(8);
    let m = untrained(&config(), Device::Cpu).unwrap();
    let a = evaluate(m.albef().unwrap(), &f.split, &opts(3)).unwrap();
    let b = evaluate(m.albef().unwrap(), &f.split, &opts(3)).unwrap();
    assert_eq!(a, b, "dropout must be off in evaluation");
    for s in Scoring::ALL {
        let r = a.get(s);
        assert!(r.entries().iter().all(|(_, v)| (0.0..=100.0).contains(v)), "{s:?}: {r:?}");
    }
    // With k_test >= every candidate, nothing is cut off: R@10 over 8 images is 100.
    let all = evaluate(m.albef().unwrap(), &f.split, &opts(100)).unwrap();
    assert_eq!(all.itm.img_r10, 100.0);
}

#[test]
fn the_untrained_model_is_the_one_a_job_starts_from() {
    let _rng = serial();
    let cfg = config();
    let ours = untrained(&cfg, Device::Cpu).unwrap();
    let trainer = Trainer::new(&cfg, Device::Cpu).unwrap();
    let theirs = trainer.var_store().variables();
    let mine = ours.vs.variables();
    assert_eq!(mine.len(), theirs.len());
    for (name, t) in &mine {
        assert!(t.equal(&theirs[name]), "{name} differs from Trainer::new's");
    }
}

#[test]
fn text_embeddings_round_trip_with_their_captions() {
    let _rng = serial();
    let f = fixture(2);
    let m = untrained(&config(), Device::Cpu).unwrap();
    let texts: Vec<String> = f.split.texts.clone();
    let e = embed_texts(m.albef().unwrap(), &Tokens::new(&f.tokenizer, &texts, 30), 2, false).unwrap();
    assert_eq!(e.size(), [texts.len() as i64, 64]);
    let bytes = serialize_embeddings(&e, "text", &texts, &[("model", "untrained".into())]).unwrap();
    let (back, kind, keys) = deserialize_embeddings(&bytes).unwrap();
    assert_eq!((kind.as_str(), keys), ("text", texts));
    assert!(back.equal(&e));
    // The same texts evaluated as a split have the same features.
    let feats = extract_features(m.albef().unwrap(), &f.split, &opts(1)).unwrap();
    assert!(feats.text_feat.allclose(&e, 1e-5, 1e-5, false));
}

/// An evaluation split in the reference's style, its images named by the authors' absolute
/// paths, reads as the training data does: refused with the setting that fixes it, then read
/// through `data.path_rewrite`.
#[test]
fn evaluation_splits_take_the_path_rewrites_of_the_training_data() {
    let f = fixture(3);
    let dir = f._dir.path();
    let url = dir.join(TEST_JSON);
    let mut rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&url).unwrap()).unwrap();
    for r in &mut rows {
        r["image"] = format!("/export/share/datasets/vision/coco/images/{}", r["image"].as_str().unwrap()).into();
    }
    let reference = dir.join("reference_style.json");
    std::fs::write(&reference, serde_json::to_vec(&rows).unwrap()).unwrap();
    let (url, rt) = (reference.to_str().unwrap(), tokio::runtime::Runtime::new().unwrap());
    let mut data = config().data;
    let err = RetrievalSplit::load(url, &f.tokenizer, &SplitOptions::for_data(&data, None).unwrap(), rt.handle())
        .err()
        .expect("an absolute path outside the root is refused");
    assert!(format!("{err:#}").contains("data.path_rewrite"), "{err:#}");
    data.path_rewrite = vec!["/export/share/datasets/vision/coco/images/=".into()];
    let split = RetrievalSplit::load(url, &f.tokenizer, &SplitOptions::for_data(&data, None).unwrap(), rt.handle());
    assert_eq!(split.unwrap().num_images(), 3);
}
