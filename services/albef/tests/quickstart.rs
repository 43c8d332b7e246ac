//! The README's "Quick start with your own data", run as written: the commands of its `sh` blocks,
//! in order, in a folder laid out as the repository root (`configs/`) with a user's own data in
//! `mydata/` (pictures made with Pillow by tests/python/make_own_data.py). One thing differs from
//! the README: `ALBEF__TRAIN__MAX_STEPS` in the environment keeps each run to a few steps (the
//! commands set no `train.max_steps`, which would override it). `albef run` needs the
//! coordinator and worker binaries beside `albef` (build the workspace first).

use std::path::{Path, PathBuf};
use std::process::Command;

const SECTION: &str = "## Quick start with your own data";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The commands of the `sh` blocks of the README section (a line ending in `\` goes on).
fn quick_start_commands(readme: &str) -> Vec<String> {
    let start = readme.find(&format!("\n{SECTION}\n")).expect("the quick start section") + 1;
    let section = &readme[start..];
    let end = section[SECTION.len()..].find("\n## ").map_or(section.len(), |i| i + SECTION.len());
    let (mut commands, mut in_sh) = (Vec::<String>::new(), false);
    for line in section[..end].lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            l if l.starts_with("```") => in_sh = false,
            l if in_sh && !l.is_empty() => match commands.last_mut().filter(|c| c.ends_with('\\')) {
                Some(open) => {
                    open.pop();
                    open.push_str(l);
                }
                None => commands.push(l.to_string()),
            },
            _ => {}
        }
    }
    commands
}

#[test]
fn the_readme_quick_start_works_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let commands = quick_start_commands(&readme);
    let programs: Vec<&str> = commands.iter().filter_map(|c| c.split_whitespace().next()).collect();
    assert_eq!(programs, ["albef", "albef", "albef", "albef", "albefctl"], "{commands:#?}");

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::os::unix::fs::symlink(repo().join("configs"), root.join("configs")).unwrap();
    let made = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python/make_own_data.py"))
        .arg(root.join("mydata"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made.stderr));

    let bin = Path::new(env!("CARGO_BIN_EXE_albef")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut outputs = vec![];
    for command in &commands {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(command).current_dir(root).env("PATH", &path);
        // Only what the README says (and the short run) may reach the configuration and albefctl.
        for (key, _) in std::env::vars() {
            if key.starts_with("ALBEF") {
                cmd.env_remove(key);
            }
        }
        let out = cmd.env("ALBEF__TRAIN__MAX_STEPS", "4").output().unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{command}\n{stdout}\n{stderr}");
        outputs.push((stdout, stderr));
    }

    // Trained on every sample: the relative image paths resolve beside train.json.
    let trained = &outputs[0].0;
    assert!(trained.contains("state saved in runs/mine/final"), "{trained}");
    assert!(!trained.contains("skipped input"), "{trained}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("runs/mine/eval/final.json")).unwrap()).unwrap();
    assert_eq!((report["images"].as_u64(), report["texts"].as_u64()), (Some(16), Some(32)), "{report}");
    // Off a terminal, the evaluation's progress is plain lines.
    assert!(outputs[1].1.contains("re-ranking texts per image: 512/512 in "), "{}", outputs[1].1);
    assert!(root.join("runs/mine/albef.safetensors").exists());
    assert!(outputs[3].0.contains("step     3/4"), "{}", outputs[3].0);
    let status = &outputs[4].0;
    assert!(status.contains("state               finished"), "{status}");
    assert!(status.contains("step 4 at runs/mine-job/checkpoints/step-4"), "{status}");
}
