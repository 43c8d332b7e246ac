//! Fine-tuning as the service runs it, from one briefly pretrained model: retrieval, NLVR2 and
//! grounding by jobs of two workers (evaluated after every epoch, the best checkpoint recorded),
//! SNLI-VE and VQA (on the easy-VQA dataset) in one process.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn albef(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_albef")).current_dir(repo()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "albef {args:?} failed:\n{text}");
    text
}

/// `albef eval` of `checkpoint` on `split`, ITM re-ranked as the task selects: its r_mean.
fn r_mean(checkpoint: &str, split: &str, report: &Path) -> f64 {
    let report_s = report.to_str().unwrap();
    albef(&[
        "eval",
        "--checkpoint",
        checkpoint,
        "--data",
        split,
        "--k-test",
        "16",
        "--score",
        "itm",
        "--out",
        report_s,
    ]);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    json["r_mean"].as_f64().unwrap()
}

/// Pretrain 200 steps on generated pairs, then from that checkpoint:
/// - fine-tune retrieval with two workers (rows carry the generated image ids; two epochs, each
///   evaluated on the held-out split): the best checkpoint's r_mean beats the pretrained model's
///   zero-shot r_mean on the same split, it is recorded as the best (best.json, albefctl), and
///   `albef eval --checkpoint <run>/best` finds it;
/// - fine-tune SNLI-VE with `albef train` on an entailment set made from the generated captions
///   (a picture's own caption entails, another picture's contradicts; one row with an unknown
///   label): its dev accuracy beats the majority class by far, and the bad row is counted;
/// - fine-tune VQA with `albef train` on easy-VQA (a real dataset from PyPI, converted to the
///   reference's layout by Python; one row without answers): its VQA accuracy on held-out
///   questions beats the majority answer by far, the bad row is counted, and the evaluation
///   server's result file lists every question.
#[test]
fn fine_tuning_retrieval_ve_and_vqa_beats_the_pretrained_model() {
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("pre");
    let (pre_s, run) = (pre.to_str().unwrap(), dir.path().join("run"));
    let data = ["--set", "data.synth_train=512", "--set", "data.synth_test=64"];
    let mut pretrain = vec!["train", "--config", "configs/small.yaml", "--out", pre_s, "--set", "train.max_steps=200"];
    pretrain.extend(data);
    albef(&pretrain);
    let split = pre.join("data/test.json");
    let split_s = split.to_str().unwrap();
    let zero_shot = r_mean(pre_s, split_s, &dir.path().join("zero-shot.json"));

    let init = format!("model.init_checkpoint={}", pre.join("final/model.safetensors").display());
    let train_file = format!("data.train_file=[{}]", pre.join("data/train.json").display());
    let (eval_data, run_dir) = (format!("job.eval_data={split_s}"), format!("job.run_dir={}", run.display()));
    // The test split beside the val split: here the same file, reported again as test/.
    let test_data = format!("job.test_data={split_s}");
    let sets = [
        "task=retrieval",
        &init,
        &train_file,
        &eval_data,
        &test_data,
        &run_dir,
        "job.eval_every_epoch=true",
        "job.eval_k_test=16",
        "job.checkpoint_every=0",
        "train.max_steps=64",
        "train.batch_size_train=8",
    ];
    let mut job = vec!["run", "--config", "configs/small.yaml", "--workers", "2"];
    job.extend(sets.iter().flat_map(|s| ["--set", s]));
    let out = albef(&job);
    assert!(out.contains("(ita ") && !out.contains(" mlm "), "retrieval trains ITC and ITM only:\n{out}");
    let evaluated = out.lines().filter(|l| l.starts_with("eval ")).collect::<Vec<_>>();
    assert!(evaluated.len() == 2 && evaluated.iter().all(|l| l.contains("| test/txt_r1 ")), "{evaluated:?}");

    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("checkpoints/best.json")).unwrap()).unwrap();
    assert_eq!(best["metric"], "itm/r_mean");
    let fine_tuned = r_mean(&format!("{}/best", run.display()), split_s, &dir.path().join("fine-tuned.json"));
    println!(
        "r_mean (ITM re-ranked) on {split_s}: pretrained {zero_shot:.1}, fine-tuned (best, step {}) {fine_tuned:.1}",
        best["step"]
    );
    assert!((fine_tuned - best["value"].as_f64().unwrap()).abs() < 1e-6, "the best is the one evaluated in training");
    assert!(fine_tuned > zero_shot + 3.0, "fine-tuning: r_mean {fine_tuned:.1} vs the pretrained {zero_shot:.1}");

    let ctl = Path::new(env!("CARGO_BIN_EXE_albef")).with_file_name("albefctl");
    let listed = Command::new(ctl).arg("--run-dir").arg(&run).arg("checkpoints").output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let location = best["location"].as_str().unwrap();
    assert!(listed.lines().any(|l| l.contains(location) && l.ends_with("best")), "{listed}");

    ve(&pre, dir.path());
    vqa(&pre, dir.path());
    nlvr(&pre, dir.path());
    grounding(&pre, dir.path());
}

/// An entailment set from a generated split: each picture with its first caption (entailment)
/// and another picture's (contradiction).
fn entailment_rows(split: &Path) -> Vec<serde_json::Value> {
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(split).unwrap()).unwrap();
    let first = |r: &serde_json::Value| r["caption"][0].as_str().unwrap().to_string();
    let n = rows.len();
    (0..n)
        .flat_map(|i| {
            let (image, other) = (rows[i]["image"].clone(), first(&rows[(i * 7 + 3) % n]));
            [
                serde_json::json!({"image": image, "sentence": first(&rows[i]), "label": "entailment"}),
                serde_json::json!({"image": image, "sentence": other, "label": "contradiction"}),
            ]
        })
        .collect()
}

fn ve(pre: &Path, dir: &Path) {
    let data = pre.join("data");
    let mut train = entailment_rows(&data.join("train.json"));
    // In place of a good row, so that every row is planned (an epoch is whole batches).
    *train.last_mut().unwrap() = serde_json::json!({"image": train[0]["image"], "sentence": "a dog", "label": "maybe"});
    let dev = entailment_rows(&data.join("test.json"));
    std::fs::write(data.join("ve_train.json"), serde_json::to_vec(&train).unwrap()).unwrap();
    std::fs::write(data.join("ve_dev.json"), serde_json::to_vec(&dev).unwrap()).unwrap();
    let out = dir.join("ve");
    let init = format!("model.init_checkpoint={}", pre.join("final/model.safetensors").display());
    let train_file = format!("data.train_file=[{}]", data.join("ve_train.json").display());
    let eval_data = format!("job.eval_data={}", data.join("ve_dev.json").display());
    let sets = [
        "task=ve",
        &init,
        &train_file,
        &eval_data,
        "job.eval_every_epoch=true",
        "schedular.alpha_warm_up=false",
        "train.max_steps=128",
    ];
    let mut cmd = vec!["train", "--config", "configs/small.yaml", "--out", out.to_str().unwrap()];
    cmd.extend(sets.iter().flat_map(|s| ["--set", s]));
    let printed = albef(&cmd);
    // Counted once per epoch it is planned in.
    let counted = printed.split("bad_label: ").nth(1).and_then(|r| r.split(',').next()?.parse::<u64>().ok());
    assert!(counted.is_some_and(|n| n >= 1) && printed.contains("\"maybe\""), "the 'maybe' row is counted:\n{printed}");
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoints/best.json")).unwrap()).unwrap();
    let entailed = dev.iter().filter(|r| r["label"] == "entailment").count();
    let majority = 100.0 * entailed.max(dev.len() - entailed) as f64 / dev.len() as f64;
    let accuracy = best["value"].as_f64().unwrap();
    println!("SNLI-VE dev accuracy {accuracy:.1}% (best, step {}), majority class {majority:.1}%", best["step"]);
    assert_eq!(best["metric"], "accuracy");
    assert!(accuracy > majority + 15.0, "VE accuracy {accuracy:.1}% vs the majority class {majority:.1}%");

    // albef eval measures the best checkpoint as the evaluation during training did.
    let (best_run, dev_s) = (format!("{}/best", out.display()), data.join("ve_dev.json"));
    let report = dir.join("ve-eval.json");
    let args =
        ["eval", "--checkpoint", &best_run, "--data", dev_s.to_str().unwrap(), "--out", report.to_str().unwrap()];
    albef(&args);
    let measured: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!((measured["accuracy"].as_f64().unwrap() - accuracy).abs() < 1e-6, "{measured}");
}

/// NLVR2 rows from a generated split: each picture beside the one `offset` further, for each of
/// `offsets`; a sentence is True of the pair when it is either picture's first caption (the
/// left's and the right's in turn), False when it is the caption of a picture half the split away.
fn nlvr_rows(split: &Path, offsets: &[usize]) -> Vec<serde_json::Value> {
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(split).unwrap()).unwrap();
    let first = |i: usize| rows[i]["caption"][0].as_str().unwrap().to_string();
    let n = rows.len();
    let pairs = (0..n).flat_map(|i| offsets.iter().map(move |o| (i, (i + o) % n)));
    pairs
        .flat_map(|(left, right)| {
            let images = serde_json::json!([rows[left]["image"], rows[right]["image"]]);
            let told = if left % 2 == 0 { left } else { right };
            [
                serde_json::json!({"images": images, "sentence": first(told), "label": "True"}),
                serde_json::json!({"images": images, "sentence": first((left + n / 2) % n), "label": "False"}),
            ]
        })
        .collect()
}

/// Text assignment from the pretrained model (`albef train`): its model has the paired blocks
/// and its head. NLVR2 fine-tuning from the pretrained model by a job of two workers: dev
/// accuracy above chance; a row with one image is counted. (Text assignment's result is what the
/// reference fine-tunes from; on this small budget it does not help, see the docs.)
/// A fine-tuning job of 2 workers in `run` with `sets` on the small preset, evaluated after every
/// epoch, with fine-tuning steps of the reference's size relative to the small preset's
/// pretraining: what it printed, and its best checkpoint's record.
fn fine_tuning_job(run: &Path, sets: &[String]) -> (String, serde_json::Value) {
    let common = [
        format!("job.run_dir={}", run.display()),
        "job.eval_every_epoch=true".into(),
        "job.checkpoint_every=0".into(),
        "train.batch_size_train=8".into(),
        "optimizer.lr=1e-4".into(),
        "schedular.lr=1e-4".into(),
        "schedular.min_lr=1e-5".into(),
        "schedular.warmup_lr=1e-5".into(),
    ];
    let mut job = vec!["run", "--config", "configs/small.yaml", "--workers", "2"];
    job.extend(sets.iter().chain(&common).flat_map(|s| ["--set", s.as_str()]));
    let out = albef(&job);
    let best = serde_json::from_slice(&std::fs::read(run.join("checkpoints/best.json")).unwrap()).unwrap();
    (out, best)
}

fn nlvr(pre: &Path, dir: &Path) {
    let data = pre.join("data");
    let init = format!("model.init_checkpoint={}", pre.join("final/model.safetensors").display());
    let assigned = dir.join("nlvr-pretrain");
    let sets = [
        "task=nlvr_pretrain".to_string(),
        init.clone(),
        format!("data.train_file=[{}]", data.join("train.json").display()),
        "train.max_steps=16".into(),
    ];
    let mut cmd = vec!["train", "--config", "configs/small.yaml", "--out", assigned.to_str().unwrap()];
    cmd.extend(sets.iter().flat_map(|s| ["--set", s.as_str()]));
    let printed = albef(&cmd);
    assert!(printed.contains("(ta "), "text assignment trains its one loss:\n{printed}");
    let model = std::fs::read(assigned.join("final/model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&model[8..8 + u64::from_le_bytes(model[..8].try_into().unwrap()) as usize])
        .into_owned();
    let last_block = "text_encoder.bert.encoder.layer.5.crossattention.self.key.weight";
    assert!(header.contains("\"ta_head.weight\"") && header.contains(last_block), "paired blocks and ta_head");

    let mut train = nlvr_rows(&data.join("train.json"), &[1]);
    // In place of a good row, so that every row is planned (an epoch is whole batches).
    *train.last_mut().unwrap() =
        serde_json::json!({"images": [train[0]["images"][0]], "sentence": "a dog", "label": "True"});
    let dev = nlvr_rows(&data.join("test.json"), &[1, 3]);
    std::fs::write(data.join("nlvr_train.json"), serde_json::to_vec(&train).unwrap()).unwrap();
    std::fs::write(data.join("nlvr_dev.json"), serde_json::to_vec(&dev).unwrap()).unwrap();
    let run = dir.join("nlvr");
    let sets = [
        "task=nlvr".to_string(),
        init,
        format!("data.train_file=[{}]", data.join("nlvr_train.json").display()),
        format!("job.eval_data={}", data.join("nlvr_dev.json").display()),
        "train.max_steps=192".into(),
    ];
    let (out, best) = fine_tuning_job(&run, &sets);
    assert!(out.contains("missing_second_image"), "the row with one image is counted:\n{out}");
    let evaluated: Vec<&str> = out.lines().filter(|l| l.starts_with("eval ")).collect();
    let accuracy = best["value"].as_f64().unwrap();
    println!("NLVR2 dev accuracy {accuracy:.1}% (best, step {}), chance 50.0%; {evaluated:?}", best["step"]);
    assert_eq!(best["metric"], "accuracy");
    assert!(accuracy > 60.0, "NLVR2 accuracy {accuracy:.1}% vs chance 50%");
}

fn vqa(pre: &Path, dir: &Path) {
    let data = dir.join("easy-vqa");
    let made = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python/make_easy_vqa.py"))
        .args([&data, &PathBuf::from("2000"), &PathBuf::from("400"), &pre.join("data/vocab.txt")])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    let mut train: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(data.join("vqa_train.json")).unwrap()).unwrap();
    // In place of a good row, so that every row is planned (an epoch is whole batches).
    *train.last_mut().unwrap() = serde_json::json!({"image": train[0]["image"], "question": "is it?", "answer": []});
    std::fs::write(data.join("vqa_train.json"), serde_json::to_vec(&train).unwrap()).unwrap();
    let out = dir.join("vqa");
    let path = |name: &str| data.join(name).display().to_string();
    let sets = [
        "task=vqa".to_string(),
        format!("model.init_checkpoint={}", pre.join("final/model.safetensors").display()),
        format!("data.train_file=[{}]", path("vqa_train.json")),
        format!("data.tokenizer={}", path("vocab.txt")),
        format!("job.eval_data={}", path("vqa_test.json")),
        format!("job.answer_list={}", path("answer_list.json")),
        "job.eval_every_epoch=true".into(),
        "train.max_steps=500".into(),
    ];
    let mut cmd = vec!["train", "--config", "configs/small.yaml", "--out", out.to_str().unwrap()];
    cmd.extend(sets.iter().flat_map(|s| ["--set", s.as_str()]));
    let printed = albef(&cmd);
    let counted = printed.split("missing_answer: ").nth(1).and_then(|r| r.split(',').next()?.parse::<u64>().ok());
    assert!(counted.is_some_and(|n| n >= 1), "the row without answers is counted:\n{printed}");
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoints/best.json")).unwrap()).unwrap();
    let (accuracy, majority) = (best["value"].as_f64().unwrap(), made["majority_share"].as_f64().unwrap());
    println!("easy-VQA accuracy {accuracy:.1}% (best, step {}), majority answer {majority:.1}%", best["step"]);
    assert_eq!(best["metric"], "vqa_accuracy");
    assert!(accuracy > majority + 20.0, "VQA accuracy {accuracy:.1}% vs the majority answer {majority:.1}%");
    let results = out.join(format!("vqa/step-{}.json", best["step"]));
    let results: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&results).unwrap()).unwrap();
    assert_eq!(results.len(), 400);
    assert!(results.iter().all(|r| r["question_id"].is_i64() && r["answer"].is_string()), "{:?}", &results[..2]);

    // albef eval answers as the evaluation during training did.
    let (best_run, report) = (format!("{}/best", out.display()), dir.join("vqa-eval.json"));
    albef(&["eval", "--checkpoint", &best_run, "--data", &path("vqa_test.json"), "--out", report.to_str().unwrap()]);
    let measured: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!((measured["vqa_accuracy"].as_f64().unwrap() - accuracy).abs() < 1e-6, "{measured}");
    let answers: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(measured["answers"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(answers, results, "the same answers");
}

/// Weakly supervised grounding on generated RefCOCO+-style data (`albef data synth-grounding`:
/// pictures of two shapes, each shape an expression; four proposals per picture, the two shapes
/// and two corner boxes), by a job of two workers from the pretrained model, one val picture
/// stripped of its proposals: the best val accuracy is well above choosing between the two
/// shapes at random (50%; 25% over all proposals), the stripped picture's expressions are
/// skipped and counted, and `albef ground --visualize` on the best checkpoint reproduces the
/// accuracy and draws a picture per grounded expression.
fn grounding(pre: &Path, dir: &Path) {
    let data = dir.join("grounding");
    let d = data.to_str().unwrap();
    albef(&["data", "synth-grounding", "--out", d, "--train", "256", "--val", "50", "--test", "50"]);
    let read =
        |name: &str| -> serde_json::Value { serde_json::from_slice(&std::fs::read(data.join(name)).unwrap()).unwrap() };
    let (val, refs, mut proposals) = (read("grounding_val.json"), read("refs.json"), read("proposals.json"));
    let first_ref = &val[0]["ref_id"];
    let stripped = refs.as_array().unwrap().iter().find(|r| &r["ref_id"] == first_ref).unwrap()["image_id"].to_string();
    proposals.as_object_mut().unwrap().remove(&stripped).unwrap();
    std::fs::write(data.join("proposals.json"), proposals.to_string()).unwrap();

    let run = dir.join("grounding-run");
    let file = |key: &str, name: &str| format!("job.{key}={}", data.join(name).display());
    let sets = [
        "task=grounding".to_string(),
        format!("model.init_checkpoint={}", pre.join("final/model.safetensors").display()),
        format!("data.train_file=[{}]", data.join("grounding_train.json").display()),
        file("eval_data", "grounding_val.json"),
        file("test_data", "grounding_test.json"),
        file("refs_file", "refs.json"),
        file("instances_file", "instances.json"),
        file("proposals_file", "proposals.json"),
        // The first of the small model's two fusion layers (the base model's is the third of six).
        "job.gradcam_block=2".into(),
        "data.train_crop=resize".into(),
        "train.max_steps=128".into(),
    ];
    let (out, best) = fine_tuning_job(&run, &sets);
    let evaluated: Vec<&str> = out.lines().filter(|l| l.starts_with("eval ")).collect();
    assert!(
        evaluated.iter().all(|l| l.contains("2 without proposals skipped") && l.contains("test/")),
        "{evaluated:?}"
    );
    let accuracy = best["value"].as_f64().unwrap();
    println!("grounding val accuracy {accuracy:.1}% (best, step {}); {evaluated:?}", best["step"]);
    assert_eq!(best["metric"], "accuracy");
    assert!(accuracy > 58.0, "grounding accuracy {accuracy:.1}% vs 50% choosing between the shapes");

    let (report, pictures) = (dir.join("grounding.json"), dir.join("grounding-pictures"));
    let best_dir = format!("{}/best", run.display());
    albef(&[
        "ground",
        "--checkpoint",
        &best_dir,
        "--out",
        report.to_str().unwrap(),
        "--visualize",
        pictures.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!((report["metrics"]["accuracy"].as_f64().unwrap() - accuracy).abs() < 1e-9, "{}", report["metrics"]);
    let expressions = report["expressions"].as_array().unwrap();
    assert_eq!(expressions.len(), 98, "every expression with proposals is reported");
    assert_eq!(std::fs::read_dir(&pictures).unwrap().count(), 98);
    let picture = pictures.join(format!("{}.png", expressions[0]["ref_id"]));
    assert_eq!(image::open(&picture).unwrap().to_rgb8().dimensions(), (96, 96));
}
