use super::*;
use std::io::Write;

fn yaml(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn sources(file: Option<&tempfile::NamedTempFile>, overrides: &[&str]) -> ConfigSources {
    ConfigSources {
        file: file.map(|f| f.path().to_path_buf()),
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        environment: false,
    }
}

#[test]
fn defaults_are_the_reference_pretraining_setup() {
    let cfg = load(&sources(None, &[])).unwrap();
    assert_eq!(cfg, AlbefConfig::defaults(Preset::AlbefBase));
    assert_eq!(cfg.model.queue_size, 65536);
    assert_eq!(cfg.model.image_res, 256);
    assert_eq!(cfg.optimizer.lr, 1e-4);
    assert_eq!(cfg.optimizer.weight_decay, 0.02);
    assert_eq!(cfg.schedular.warmup_steps, 2000);
}

#[test]
fn file_preset_then_overrides_layer_in_order() {
    let f = yaml("model:\n  preset: albef-small\n  queue_size: 1024\noptimizer:\n  lr: 0.001\n");
    let cfg = load(&sources(Some(&f), &["optimizer.lr=0.002", "model.itc_negatives=global"])).unwrap();
    let small = ModelConfig::albef_small();
    assert_eq!(cfg.model.vision, small.vision, "preset from the file chooses the defaults");
    assert_eq!(cfg.model.queue_size, 1024, "file beats defaults");
    assert_eq!(cfg.optimizer.lr, 0.002, "--set beats file");
    assert_eq!(cfg.model.itc_negatives, ItcNegatives::Global);
}

#[test]
fn overrides_parse_lists_and_bools() {
    let cfg = load(&sources(None, &["optimizer.betas=[0.9, 0.98]", "train.bf16=false"])).unwrap();
    assert_eq!(cfg.optimizer.betas, [0.9, 0.98]);
    assert!(!cfg.train.bf16);
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let f = yaml("model:\n  queue_sise: 10\n");
    let err = format!("{:#}", load(&sources(Some(&f), &[])).unwrap_err());
    assert!(err.contains("queue_sise"), "{err}");

    let err = format!("{:#}", load(&sources(None, &["optimiser.lr=1"])).unwrap_err());
    assert!(err.contains("optimiser"), "{err}");
}

#[test]
fn invalid_relations_are_reported() {
    let err = format!("{:#}", load(&sources(None, &["model.image_res=250"])).unwrap_err());
    assert!(err.contains("image_res"), "{err}");
    let err = format!("{:#}", load(&sources(None, &["model.preset=albef-huge"])).unwrap_err());
    assert!(err.contains("albef-huge"), "{err}");
    for (setting, named) in [
        ("job.scale_up=sometimes", "job.scale_up"),
        ("job.collective_backend=gloo", "job.collective_backend"),
        ("job.straggler_factor=0.9", "job.straggler_factor"),
        ("job.straggler_window=0", "job.straggler_window"),
    ] {
        let err = format!("{:#}", load(&sources(None, &[setting])).unwrap_err());
        assert!(err.contains(named), "{setting}: {err}");
    }
    let err = format!("{:#}", load(&sources(None, &["job.max_workers=4", "job.virtual_ranks=2"])).unwrap_err());
    assert!(err.contains("job.virtual_ranks"), "{err}");
}

#[test]
fn closed_sets_keep_their_spellings() {
    let cfg = load(&sources(None, &["job.scale_up=immediately", "job.collective_backend=nccl"])).unwrap();
    assert_eq!((cfg.job.scale_up, cfg.job.collective_backend), (ScaleUp::Immediately, CollectiveBackend::Nccl));
    let f = yaml("job:\n  scale_up: never\n  collective_backend: tcp\n");
    let cfg = load(&sources(Some(&f), &[])).unwrap();
    assert_eq!((cfg.job.scale_up, cfg.job.collective_backend), (ScaleUp::Never, CollectiveBackend::Tcp));
    let printed: serde_json::Value = serde_json::from_str(&cfg.to_pretty_json()).unwrap();
    assert_eq!((&printed["job"]["scale_up"], &printed["job"]["collective_backend"]), (&"never".into(), &"tcp".into()));
    let defaults = AlbefConfig::defaults(Preset::AlbefSmall).job;
    assert_eq!((defaults.scale_up, defaults.collective_backend), (ScaleUp::AtCheckpoint, CollectiveBackend::Auto));
    // A value outside the set names the key and the valid values.
    let err = format!("{:#}", load(&sources(None, &["train.device=gpu"])).unwrap_err());
    assert!(err.contains("train.device") && err.contains("`cpu`") && err.contains("`cuda`"), "{err}");
    let err = format!("{:#}", load(&sources(None, &["job.scale_up=sometimes"])).unwrap_err());
    assert!(err.contains("job.scale_up") && err.contains("`at_checkpoint`"), "{err}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = load(&ConfigSources::file("/nonexistent/x.yaml")).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/x.yaml"), "{err}");
}

#[test]
fn effective_config_round_trips_through_its_printout_and_its_file() {
    let cfg = load(&sources(None, &["model.preset=albef-small", "optimizer.lr=3e-4"])).unwrap();
    let back: AlbefConfig = serde_json::from_str(&cfg.to_pretty_json()).unwrap();
    assert_eq!(back, cfg);
    let file = yaml(&cfg.to_config_file());
    assert_eq!(load(&sources(Some(&file), &[])).unwrap(), cfg, "--config reads the written file back");
}

#[test]
fn repository_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 7, "every file of configs/: {names:?}");
    for name in &names {
        let path = root.join(name);
        let cfg = load(&ConfigSources { file: Some(path.clone()), overrides: vec![], environment: false })
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        if name == "pretrain.yaml" {
            assert_eq!(cfg, AlbefConfig::defaults(Preset::AlbefBase), "pretrain.yaml mirrors the reference");
        }
    }
}

fn plain(patterns: &[&str]) -> Vec<TrainSource> {
    patterns.iter().map(|p| TrainSource::plain(*p)).collect()
}

#[test]
fn set_takes_yaml_lists_and_a_single_path_where_a_list_is_expected() {
    let cfg = load(&sources(None, &[r#"data.train_file=[a.json, "b/{0..3}.tar", "c,d.json"]"#])).unwrap();
    assert_eq!(cfg.data.train_file, plain(&["a.json", "b/{0..3}.tar", "c,d.json"]));
    let cfg = load(&sources(None, &["data.train_file=s3://bucket/train-{000000..000127}.tar"])).unwrap();
    assert_eq!(cfg.data.train_file, plain(&["s3://bucket/train-{000000..000127}.tar"]));
    let cfg = load(&sources(None, &["optimizer.betas=[0.9, 0.98]", "optimizer.lr=3e-4", "job.run_dir="])).unwrap();
    assert_eq!((cfg.optimizer.betas, cfg.optimizer.lr, cfg.job.run_dir.as_str()), ([0.9, 0.98], 3e-4, ""));
    let cfg =
        load(&sources(None, &["data.train_file=[/d/train-{000000..000003}.tar, '{x,y}.json', {a,b}.tar]"])).unwrap();
    assert_eq!(
        cfg.data.train_file,
        plain(&["/d/train-{000000..000003}.tar", "{x,y}.json", "{a,b}.tar"]),
        "braces need no quotes"
    );
    let cfg = load(&sources(None, &["data.train_file={a,b}.tar"])).unwrap();
    assert_eq!(cfg.data.train_file, plain(&["{a,b}.tar"]));
    let err = format!("{:#}", load(&sources(None, &[r#"data.train_file=["a.json]"#])).unwrap_err());
    assert!(err.contains("unclosed quote"), "{err}");
}

/// The two forms of a `data.train_file` entry, mixed in one list, from a YAML file, from `--set`
/// and from the environment (which takes the list as `--set` does, brackets optional).
#[test]
fn train_file_entries_are_patterns_or_weighted_sources() {
    let expected = vec![
        TrainSource::plain("coco.json"),
        TrainSource { source: "cc3m/{00000..00331}.tar".into(), weight: Some(0.5) },
        TrainSource { source: "sbu/*.tar".into(), weight: Some(2.0) },
    ];
    let file = yaml(
        "data:\n  train_file:\n    - coco.json\n    - {source: \"cc3m/{00000..00331}.tar\", weight: 0.5}\n    \
         - source: sbu/*.tar\n      weight: 2\n",
    );
    assert_eq!(load(&sources(Some(&file), &[])).unwrap().data.train_file, expected, "YAML");
    let list = r#"[coco.json, {source: "cc3m/{00000..00331}.tar", weight: 0.5}, {source: sbu/*.tar, weight: 2}]"#;
    let set = format!("data.train_file={list}");
    assert_eq!(load(&sources(None, &[&set])).unwrap().data.train_file, expected, "--set");
    let env = |value: &str| {
        let vars = config::Map::from([("ALBEF__DATA__TRAIN_FILE".to_string(), value.to_string())]);
        load_with_environment(&ConfigSources { environment: true, ..sources(None, &[]) }, vars)
    };
    assert_eq!(env(list).unwrap().data.train_file, expected, "the environment");
    assert_eq!(env("a.json,b/{0,1}.tar").unwrap().data.train_file, plain(&["a.json", "b/{0,1}.tar"]));
    // A weighted entry is printed as one and read back.
    let cfg = load(&sources(Some(&file), &[])).unwrap();
    assert_eq!(load(&sources(Some(&yaml(&cfg.to_config_file())), &[])).unwrap(), cfg);
    for bad in ["{source: a.tar, weight: 0}", "{source: a.tar, weight: -1}"] {
        let err = format!("{:#}", load(&sources(None, &[&format!("data.train_file=[{bad}]")])).unwrap_err());
        assert!(err.contains("a.tar: the weight must be positive"), "{err}");
    }
    assert!(load(&sources(None, &["data.train_file=[{source: a.tar, wieght: 1}]"])).is_err(), "a misspelt key");
}
