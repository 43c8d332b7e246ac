//! `albef embed --mode image | text | multimodal` as a user runs it on the untrained small model:
//! NumPy reads the `.npz` files with the shapes expected, the projections are unit-norm, and the
//! safetensors files hold the same numbers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn albef(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_albef"));
    cmd.args(args).current_dir(repo());
    for (key, _) in std::env::vars() {
        if key.starts_with("ALBEF__") {
            cmd.env_remove(key);
        }
    }
    cmd.output().expect("albef runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads every file back with NumPy alone (safetensors parsed by hand) and checks them.
const CHECK: &str = r#"
import json, sys
import numpy as np
d = sys.argv[1]
def st(name):
    b = open(f"{d}/{name}.safetensors", "rb").read()
    n = int.from_bytes(b[:8], "little")
    h = json.loads(b[8:8 + n])
    dt = {"F32": "<f4", "I64": "<i8"}
    arrays = {k: np.frombuffer(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], dt[v["dtype"]]).reshape(v["shape"])
              for k, v in h.items() if k != "__metadata__"}
    return arrays, h["__metadata__"]
npz = lambda name: np.load(f"{d}/{name}.npz")
unit = lambda x: np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
images = [f"{d}/{i}.png" for i in range(3)]
captions = ["a red circle", "a large blue square", "a small circle"]

i, (s, meta) = npz("image"), st("image")
assert set(i.files) == {"image_embeds", "image_feat", "keys", "kind", "model", "step"}, i.files
assert i["image_embeds"].shape == (3, 65, 128) and i["image_embeds"].dtype == np.float32
assert i["image_feat"].shape == (3, 64) and unit(i["image_feat"])
assert not unit(i["image_embeds"][:, 0]), "the tokens are not normalised"
assert np.array_equal(i["image_embeds"], s["image_embeds"]) and np.array_equal(i["image_feat"], s["image_feat"])
assert list(i["keys"]) == images == json.loads(meta["keys"]) and str(i["kind"]) == meta["kind"] == "image"
assert str(i["model"]) == "untrained" and str(i["step"]) == "0"

t = npz("text")
L = t["text_embeds"].shape[1]
assert t["text_embeds"].shape == (3, L, 128) and t["text_mask"].shape == (3, L) and t["text_mask"].dtype == np.int64
assert sorted(t["text_mask"].sum(1)) == [4, 4, 5] and L == 5, t["text_mask"]
assert t["text_feat"].shape == (3, 64) and unit(t["text_feat"]) and list(t["keys"]) == captions
legacy, meta = st("legacy")
assert np.array_equal(legacy["embeddings"], t["text_feat"]), "without --mode: the same normalised projections"

m, m1 = npz("multimodal"), npz("multimodal-1")
assert m["multimodal_embeds"].shape == (3, L, 128) and np.array_equal(m["text_mask"], t["text_mask"])
assert m["keys"].tolist() == [list(p) for p in zip(images, captions)] and str(m["kind"]) == "multimodal"
on = m["text_mask"][..., None] == 1
assert np.allclose(m["multimodal_embeds"] * on, m1["multimodal_embeds"] * on, atol=1e-5), "batching changes nothing"
assert not np.allclose(m["multimodal_embeds"], t["text_embeds"], atol=1e-3), "fused, not the text encoder's"
print("ok")
"#;

#[test]
fn features_of_each_mode_read_back_by_numpy_equal_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, rgb) in [[220, 30, 30], [30, 30, 220], [30, 160, 30]].into_iter().enumerate() {
        let img = image::RgbImage::from_pixel(48 + 8 * i as u32, 40, image::Rgb(rgb));
        img.save(d.join(format!("{i}.png"))).unwrap();
    }
    std::fs::write(
        d.join("vocab.txt"),
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\nblue\ncircle\nsquare\nlarge\nsmall\n",
    )
    .unwrap();
    std::fs::write(d.join("captions.txt"), "a red circle\n\na large blue square\na small circle\n").unwrap();
    let (vocab, captions) = (d.join("vocab.txt"), d.join("captions.txt"));
    let images = format!("{}/{{0,1,2}}.png", d.display());
    let model = ["embed", "--untrained", "--config", "configs/small.yaml", "--tokenizer", vocab.to_str().unwrap()];
    let run = |extra: &[&str], out: &str| {
        let out = d.join(out);
        let mut args = model.to_vec();
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        let done = albef(&args);
        assert!(done.status.success(), "{args:?}\n{}", text(&done.stderr));
        text(&done.stdout)
    };
    let (image, texts) = (["--images", images.as_str()], ["--texts", captions.to_str().unwrap()]);
    let batch = ["--batch-size", "2"];
    for out in ["image.npz", "image.safetensors"] {
        let stdout = run(&[&["--mode", "image"][..], &image, &batch].concat(), out);
        assert!(stdout.contains("3 image embeddings") && stdout.contains("image_embeds [3, 65, 128]"), "{stdout}");
    }
    run(&[&["--mode", "text"][..], &texts, &batch].concat(), "text.npz");
    run(&[&texts[..], &batch].concat(), "legacy.safetensors");
    run(&[&["--mode", "multimodal"][..], &image, &texts, &batch].concat(), "multimodal.npz");
    run(&[&["--mode", "multimodal"][..], &image, &texts, &["--batch-size", "1"]].concat(), "multimodal-1.npz");

    let check =
        Command::new(repo().join(".venv/bin/python")).args(["-c", CHECK, d.to_str().unwrap()]).output().unwrap();
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));

    // Inputs that do not fit the mode, and a .npy for several arrays, are refused before any work.
    let refused = |extra: &[&str], out: &str, what: &str| {
        let mut args = model.to_vec();
        args.extend(extra);
        args.extend(["--out", out]);
        let done = albef(&args);
        assert!(!done.status.success() && text(&done.stderr).contains(what), "{args:?}\n{}", text(&done.stderr));
    };
    refused(&[&["--mode", "text"][..], &image, &texts].concat(), "x.npz", "--mode text reads --texts only");
    refused(&[&image[..], &texts].concat(), "x.npz", "add --mode multimodal");
    refused(&image, "x.npy", "name a .npz");
}
