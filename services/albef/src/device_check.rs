//! `albef device-check`: the forward a CUDA worker runs (bf16 autocast when `train.bf16`, TF32
//! as `train.tf32` says) against the CPU fp32 forward of the same weights on the same batch:
//! image and text features, ITC similarities and loss, ITM logits and MLM logits, each as a
//! relative L2 error, checked against a tolerance; and that a checkpoint snapshot, whose copies
//! from the device are queued rather than waited for, holds the values of its moment. With
//! `--device cpu` both sides run on the CPU (a dry run of the check itself: every error is 0).

use crate::bench::{fixed_batch, load_config};
use albef_config::ConfigArgs;
use albef_model::albef::{diagonal_positives, distill_targets, soft_cross_entropy};
use albef_model::{Albef, device, weights};
use anyhow::{Context, Result, ensure};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct DeviceCheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Model preset (albef-small, albef-base): short for --set model.preset=P.
    #[arg(long)]
    preset: Option<String>,
    /// cuda (default) or cpu (a dry run).
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value_t = 4)]
    batch: i64,
    /// The largest relative L2 error accepted for any output (bf16 keeps about 3 significant
    /// digits; errors grow over the layers).
    #[arg(long, default_value_t = 0.05)]
    tolerance: f64,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: DeviceCheckArgs) -> Result<()> {
    let cfg = load_config(&args.config, args.preset.as_deref(), Some(&args.device))?;
    let target = device::resolve(cfg.train.device)?;
    device::configure_cuda(cfg.train.tf32)?;
    // Both models are built on the CPU from the seed (CUDA's generator draws other numbers),
    // then one moves to the device.
    let (_reference_vs, reference, _) = Albef::fresh(&cfg.model, cfg.task, cfg.train.seed, Device::Cpu)?;
    let (mut vs, model, _) = Albef::fresh(&cfg.model, cfg.task, cfg.train.seed, Device::Cpu)?;
    vs.set_device(target);
    let (image, ids, mask) = fixed_batch(&cfg, args.batch, cfg.data.max_tokens as i64, Device::Cpu);
    let expected = outputs(&reference, [&image, &ids, &mask]);
    let on = |t: &Tensor| t.to_device(target);
    let bf16 = cfg.train.bf16 && target.is_cuda();
    let got = device::with_autocast(target, bf16, || outputs(&model, [&on(&image), &on(&ids), &on(&mask)]));
    let mut errors = serde_json::Map::new();
    let mut worst = 0.0f64;
    for ((name, e), (_, g)) in expected.iter().zip(&got) {
        let g = g.to_device(Device::Cpu).to_kind(Kind::Double);
        let e = e.to_kind(Kind::Double);
        let err = (&g - &e).norm().double_value(&[]) / e.norm().double_value(&[]).max(1e-30);
        ensure!(err.is_finite(), "{name}: the {target:?} output is not finite");
        println!("{name:<14} relative L2 error {err:.2e}");
        worst = worst.max(err);
        errors.insert(name.to_string(), err.into());
    }
    let snapshot_ok = snapshot_holds_the_values_of_its_moment(&vs)?;
    let ok = worst <= args.tolerance && snapshot_ok;
    let report = serde_json::json!({
        "preset": cfg.model.preset,
        "device": format!("{target:?}"),
        "bf16": bf16,
        "tf32": cfg.train.tf32,
        "batch": args.batch,
        "relative_l2_errors": errors,
        "tolerance": args.tolerance,
        "snapshot_holds_its_moment": snapshot_ok,
        "ok": ok,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    ensure!(snapshot_ok, "a checkpoint snapshot on {target:?} took values written after it");
    ensure!(ok, "the {target:?} forward differs from the CPU fp32 one by {worst:.2e} (tolerance {})", args.tolerance);
    println!("{target:?} forward (bf16 {bf16}) matches the CPU fp32 forward within {}", args.tolerance);
    Ok(())
}

/// A checkpoint snapshot's copies from a GPU are queued, not waited for: updates queued after them
/// (as the next step's are) must not reach the snapshot. Checks it on the model's weights (which
/// it changes) and says so.
fn snapshot_holds_the_values_of_its_moment(vs: &tch::nn::VarStore) -> Result<bool> {
    let named = weights::state_dict(vs);
    // A copy of its own (on the CPU, to_device would return the tensor itself).
    let before: Vec<(String, Tensor)> =
        named.iter().map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).copy())).collect();
    let snapshot = weights::HostPool::default().copy(&named)?;
    tch::no_grad(|| {
        for t in named.values() {
            let _ = t.shallow_clone().g_add_scalar_(1);
        }
    });
    let saved = weights::deserialize(&weights::serialize(&snapshot)?, "the snapshot")?;
    let ok = before.iter().all(|(n, t)| saved.get(n).is_some_and(|s| s.equal(t)));
    let outcome = if ok { "holds" } else { "does NOT hold" };
    println!("checkpoint snapshot {outcome} the values of its moment ({} tensors)", before.len());
    Ok(ok)
}

/// The deterministic outputs of a forward (no dropout, no masking draws), in fp32.
fn outputs(model: &Albef, [image, ids, mask]: [&Tensor; 3]) -> Vec<(&'static str, Tensor)> {
    tch::no_grad(|| {
        let (image_embeds, image_feat) = model.encode_image(image);
        let (text_embeds, text_feat) = model.encode_text(ids, mask, false);
        let sim = image_feat.matmul(&text_feat.tr()).to_kind(Kind::Float) / model.temp();
        let (rows, columns) = (sim.size()[0], sim.size()[1]);
        let targets = distill_targets(&sim, &diagonal_positives(rows, columns, 0, sim.device()), 0.0);
        let ita = (soft_cross_entropy(&sim, &targets) + soft_cross_entropy(&sim.tr(), &targets)) / 2.0;
        let itm = model.itm_logits(&text_embeds, mask, &image_embeds, false);
        let mlm = model.mlm_logits(ids, mask, &image_embeds, false);
        [
            ("image_feat", image_feat),
            ("text_feat", text_feat),
            ("itc_sim", sim),
            ("itc_loss", ita),
            ("itm_logits", itm),
            ("mlm_logits", mlm),
        ]
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(Kind::Float)))
        .collect()
    })
}
