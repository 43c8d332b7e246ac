//! `albef bench`: times the training step a worker runs, on fixed batches already on the device,
//! and reports it in the fields `tests/python/torch_step.py` (the same step in eager PyTorch)
//! reports, so that `make bench` can print the two side by side.
//!
//! The step is the worker's, `Trainer::step`: forward/backward (EMA, momentum features, the
//! feature gather, the three losses of every micro-batch, backward with the gradient average
//! overlapped), the vote on finiteness and the update (fused AdamW). `--world N` runs N ranks as processes on
//! 127.0.0.1 over the TCP ring (this process is rank 0 and reports; a world of one has nothing to
//! average), so that the communication's share of the step, and how much of it the backward
//! hides, can be seen. Step times come from steps that wait for the device once, at the end; on
//! CUDA the phases come from as many further steps that wait at the end of each phase.
//! `--activation-checkpointing none,vit,text,all` runs it once per setting, each in a process of
//! its own, and compares their step times and peak memory (host RSS; CUDA allocated and reserved).

use albef_config::{AlbefConfig, ConfigArgs};
use albef_data::rng::SplitMix64;
use albef_data::transform::{decode_rgb, to_normalized_chw};
use albef_dist::{Collective, LocalCollective, TcpCollective, TcpOptions};
use albef_model::{Batch, device, flops};
use albef_train::{DataParallel, StepOutcome, Trainer, VirtualRanks};
use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Model preset (albef-small, albef-base): short for --set model.preset=P.
    #[arg(long)]
    preset: Option<String>,
    /// Pairs per step.
    #[arg(long, default_value_t = 64)]
    batch: i64,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Steps run first and not timed.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// cpu or cuda: short for --set train.device=D.
    #[arg(long)]
    device: Option<String>,
    /// libtorch's intra-op threads (0: its default, one per core).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// The accelerator's dense bf16 peak in TFLOP/s from its datasheet, for the MFU against it
    /// (H100/H200 SXM: 989.4).
    #[arg(long)]
    datasheet_tflops: Option<f64>,
    /// Also time the checkpoint snapshot (what a step waits for when it saves) every K steps.
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
    /// Ranks, as processes on this machine joined by the TCP ring (the job's CPU collective).
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// Runs the benchmark once for each listed `train.activation_checkpointing` setting (e.g.
    /// none,vit,text,all), each in a process of its own (peak RSS is a process's high-water mark),
    /// and prints their step times and peak memory side by side.
    #[arg(long, value_delimiter = ',')]
    activation_checkpointing: Vec<String>,
    /// Write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Set by rank 0 for the ranks it starts: this process is that rank, prints its ring address
    /// and reads the ring's addresses from its standard input.
    #[arg(long, hide = true)]
    rank: Option<usize>,
}

/// Every rank's TCP ring, formed through rank 0: the other ranks are its children, each telling
/// the address it bound on its standard output and learning everyone's on its standard input.
fn form_ring(args: &BenchArgs, seed: u64) -> Result<(Box<dyn Collective>, Vec<Child>)> {
    let world = args.world;
    if world == 1 {
        return Ok((Box::new(LocalCollective::new()), vec![]));
    }
    let pending = TcpCollective::bind("127.0.0.1:0".parse()?)?;
    // Long enough for the slowest rank to build its model and reach the first collective.
    let opts = TcpOptions { timeout: Duration::from_secs(600), ..TcpOptions::new(seed) };
    if let Some(rank) = args.rank {
        println!("{}", pending.local_addr());
        std::io::stdout().flush()?;
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let peers = line.split_whitespace().map(str::parse).collect::<Result<Vec<SocketAddr>, _>>()?;
        return Ok((Box::new(pending.connect(rank, peers, opts)?), vec![]));
    }
    let mut children = vec![];
    let mut peers = vec![pending.local_addr()];
    for rank in 1..world {
        let child_args: Vec<String> = std::env::args().skip(1).chain(["--rank".into(), rank.to_string()]).collect();
        let mut child = Command::new(std::env::current_exe()?)
            .args(child_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a rank")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("a rank's output")?).read_line(&mut line)?;
        peers.push(line.trim().parse().with_context(|| format!("rank {rank} told no address: {line:?}"))?);
        children.push(child);
    }
    let list = peers.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(" ");
    for child in &mut children {
        writeln!(child.stdin.take().context("a rank's input")?, "{list}")?;
    }
    Ok((Box::new(pending.connect(0, peers, opts)?), children))
}

/// The step in numbers: what `albef bench` and `torch_step.py` both report.
pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.batch >= 2 && args.steps >= 1, "--batch must be at least 2 and --steps at least 1");
    ensure!(args.world >= 1, "--world must be at least 1");
    ensure!(args.rank.is_none_or(|r| r < args.world), "--rank must be below --world");
    if !args.activation_checkpointing.is_empty() {
        return compare_activation_checkpointing(&args);
    }
    let cfg = load_config(&args.config, args.preset.as_deref(), args.device.as_deref())?;
    let dev = device::resolve(cfg.train.device)?;
    device::configure_cuda(cfg.train.tf32)?;
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let (collective, children) = form_ring(&args, cfg.train.seed)?;
    let outcome = run_rank(&args, &cfg, dev, collective.as_ref());
    // Closed first: a rank still waiting on this one fails at once instead of at the timeout.
    drop(collective);
    let statuses = children.into_iter().map(|mut child| child.wait()).collect::<Result<Vec<_>, _>>()?;
    // This rank's own error first: the others fail because it left.
    let report = outcome?;
    if let Some(status) = statuses.iter().find(|s| !s.success()) {
        anyhow::bail!("a rank of the benchmark failed: {status}");
    }
    let Some(report) = report else { return Ok(()) };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One rank's steps; rank 0's report.
fn run_rank(
    args: &BenchArgs,
    cfg: &AlbefConfig,
    dev: Device,
    collective: &dyn Collective,
) -> Result<Option<serde_json::Value>> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut trainer = Trainer::new(cfg, dev)?;
    if rank == 0 && args.checkpoint_every > 0 {
        trainer.reserve_snapshot_memory();
    }
    let text_len = cfg.data.max_tokens as i64;
    let (image, ids, mask) = fixed_batch(cfg, args.batch, text_len, dev);
    let batch = Batch::new(&image, &ids, &mask);
    let bucket_bytes = (cfg.job.bucket_mb as usize) << 20;
    let overlap = cfg.job.overlap_grad_reduce.enabled(dev.is_cuda());
    let ranks = VirtualRanks::one_per_rank(rank as u64, world as u64);
    let mut dp = DataParallel::new(collective, ranks, bucket_bytes, overlap);
    device::reset_memory_peaks(dev)?;

    // Far from the end of an epoch, as most steps are.
    let steps_per_epoch = 1 << 40;
    // [step, forward, backward, communication waited, optimizer, all-reduces]
    let mut step = |trainer: &mut Trainer| -> Result<([f64; 6], f64)> {
        let started = Instant::now();
        let micro = std::slice::from_ref(&batch);
        let stats = match trainer.step(micro, &mut dp, steps_per_epoch, &mut |_| Ok(()))? {
            StepOutcome::Applied(stats) => stats,
            StepOutcome::NonFinite(s) => bail!("step {}: the loss is {}", s.step, s.loss),
        };
        device::synchronize(dev);
        let total = started.elapsed().as_secs_f64();
        let phases = [stats.forward_seconds, stats.backward_seconds, stats.communication_seconds];
        Ok(([total, phases[0], phases[1], phases[2], stats.optimizer_seconds, stats.reduce_seconds], stats.loss))
    };
    let measured = measure(args, (rank, dev, steps_per_epoch), &mut trainer, &mut step)?;
    if rank != 0 {
        return Ok(None);
    }
    Ok(Some(report(args, cfg, (dev, world, overlap), &trainer, measured)?))
}

/// The timed steps of a rank: each step's [total, forward, backward, communication waited,
/// optimizer, all-reduces] seconds, the same from steps that wait at each phase's end (CUDA),
/// the losses, and rank 0's snapshot times.
struct Measured {
    timed: Vec<[f64; 6]>,
    phased: Vec<[f64; 6]>,
    losses: Vec<f64>,
    snapshots: Vec<f64>,
}

type TimedStep<'a> = dyn FnMut(&mut Trainer) -> Result<([f64; 6], f64)> + 'a;

/// `args.warmup` steps, then `args.steps` timed (rank 0 snapshotting every
/// `args.checkpoint_every`), then on CUDA as many again with each phase synchronised.
fn measure(
    args: &BenchArgs,
    (rank, dev, steps_per_epoch): (usize, Device, u64),
    trainer: &mut Trainer,
    step: &mut TimedStep,
) -> Result<Measured> {
    for _ in 0..args.warmup {
        step(trainer)?;
    }
    let mut timed = Vec::with_capacity(args.steps);
    let mut losses = Vec::with_capacity(args.steps);
    let mut snapshots = Vec::new();
    for i in 1..=args.steps {
        let (times, loss) = step(trainer)?;
        timed.push(times);
        losses.push(loss);
        if rank == 0 && args.checkpoint_every > 0 && i % args.checkpoint_every == 0 {
            let started = Instant::now();
            drop(trainer.snapshot(1, steps_per_epoch)?);
            snapshots.push(started.elapsed().as_secs_f64());
        }
    }
    // CUDA phases from steps that wait at each phase's end; on the CPU they are the same steps.
    let phased = if dev.is_cuda() {
        trainer.synchronize_phases(true);
        (0..args.steps).map(|_| step(trainer).map(|(times, _)| times)).collect::<Result<Vec<_>>>()?
    } else {
        timed.clone()
    };
    Ok(Measured { timed, phased, losses, snapshots })
}

/// Rank 0's report of the measured steps.
fn report(
    args: &BenchArgs,
    cfg: &AlbefConfig,
    (dev, world, overlap): (Device, usize, bool),
    trainer: &Trainer,
    m: Measured,
) -> Result<serde_json::Value> {
    let Measured { timed, phased, losses, snapshots } = m;
    let text_len = cfg.data.max_tokens as i64;
    // Measured after the steps: the other ranks are done by now.
    let peak_tflops = matmul_peak_tflops(dev);
    let column = |rows: &[[f64; 6]], i: usize| rows.iter().map(|r| r[i]).collect::<Vec<_>>();
    let step_times = column(&timed, 0);
    let p50 = percentile(&step_times, 0.5);
    let flops_per_step = flops::step_flops(&cfg.model, args.batch, text_len, world as i64);
    let achieved = flops_per_step / p50 / 1e12;
    let parameters: i64 = trainer.var_store().trainable_variables().iter().map(Tensor::numel).map(|n| n as i64).sum();
    let (allocated, reserved) = device::memory_peaks(dev)?.unzip();
    let images_per_second = args.batch as f64 / p50;
    let per_core = loader_images_per_core(cfg)?;
    let report = json!({
        "implementation": "albef",
        "preset": cfg.model.preset,
        "device": if dev.is_cuda() { "cuda" } else { "cpu" },
        "threads": tch::get_num_threads(),
        "world": world,
        "overlap_grad_reduce": overlap,
        "batch": args.batch,
        "text_len": text_len,
        "image_res": cfg.model.image_res,
        "steps": args.steps,
        "warmup": args.warmup,
        "parameters": parameters,
        "flops_per_step": flops_per_step,
        "step_seconds": {
            "p50": p50,
            "p90": percentile(&step_times, 0.9),
            "mean": step_times.iter().sum::<f64>() / step_times.len() as f64,
            "min": step_times.iter().copied().fold(f64::INFINITY, f64::min),
        },
        "images_per_second": images_per_second,
        "phases_seconds": {
            "forward": percentile(&column(&phased, 1), 0.5),
            "backward": percentile(&column(&phased, 2), 0.5),
            "communication": percentile(&column(&phased, 3), 0.5),
            "optimizer": percentile(&column(&phased, 4), 0.5),
            "all_reduce_busy": percentile(&column(&phased, 5), 0.5),
        },
        "achieved_tflops": achieved,
        "mfu": {
            "datasheet_peak_tflops": args.datasheet_tflops,
            "datasheet": args.datasheet_tflops.map(|peak| achieved / peak),
            "measured_peak_tflops": peak_tflops,
            "measured": achieved / peak_tflops,
        },
        "peak_memory_bytes": {
            "cuda_allocated": allocated,
            "cuda_reserved": reserved,
            "host_rss": host_peak_rss(),
        },
        "losses": losses,
        "loader_images_per_core": per_core,
        "decode_threads_to_keep_up": (images_per_second / per_core).ceil(),
        "checkpoint_snapshot_seconds": snapshots,
    });
    Ok(report)
}

/// `--activation-checkpointing`: this benchmark once per setting, each in a child process, then
/// their step times and peak memory side by side (the first setting is the baseline).
fn compare_activation_checkpointing(args: &BenchArgs) -> Result<()> {
    let overrides: Vec<String> =
        args.activation_checkpointing.iter().map(|s| format!("train.activation_checkpointing={s}")).collect();
    // Every setting is checked before the first run.
    for set in &overrides {
        let mut config = args.config.clone();
        config.overrides.push(set.clone());
        load_config(&config, args.preset.as_deref(), args.device.as_deref())?;
    }
    let dir = tempfile::tempdir()?;
    let mut runs = vec![];
    for (setting, set) in args.activation_checkpointing.iter().zip(&overrides) {
        let json = dir.path().join(format!("{setting}.json"));
        let status = Command::new(std::env::current_exe()?)
            .args(args_of_one_run())
            .args(["--set", set, "--json"])
            .arg(&json)
            .status()
            .context("starting a run of the benchmark")?;
        ensure!(status.success(), "the benchmark with {set} failed: {status}");
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
        runs.push(json!({ "activation_checkpointing": setting, "report": report }));
    }
    print_activation_checkpointing(&runs);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json!({ "activation_checkpointing": runs }))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// This process's arguments but those `compare_activation_checkpointing` sets for each run.
fn args_of_one_run() -> Vec<String> {
    let mut kept = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--activation-checkpointing" | "--json" => drop(args.next()),
            _ if arg.starts_with("--activation-checkpointing=") || arg.starts_with("--json=") => {}
            _ => kept.push(arg),
        }
    }
    kept
}

/// The configuration with `--preset` and `--device` applied (they beat the file and `--set`).
pub fn load_config(config: &ConfigArgs, preset: Option<&str>, device: Option<&str>) -> Result<AlbefConfig> {
    let mut config = config.clone();
    config.overrides.extend(preset.map(|p| format!("model.preset={p}")));
    config.overrides.extend(device.map(|d| format!("train.device={d}")));
    config.load()
}

/// Generated pairs of the preset's shapes: normal pixels, captions of random words after [CLS]
/// with a few to no trailing [PAD]s (at least 3 real tokens each).
pub fn fixed_batch(cfg: &AlbefConfig, batch: i64, text_len: i64, dev: Device) -> (Tensor, Tensor, Tensor) {
    let b = &cfg.model.bert;
    tch::manual_seed(cfg.train.seed as i64);
    let r = cfg.model.image_res;
    let image = Tensor::randn([batch, 3, r, r], (Kind::Float, dev));
    let words = Tensor::randint_low(5, b.vocab_size, [batch, text_len], (Kind::Int64, dev));
    let lengths = Tensor::randint_low(3.min(text_len), text_len + 1, [batch, 1], (Kind::Int64, dev));
    let positions = Tensor::arange(text_len, (Kind::Int64, dev)).unsqueeze(0);
    let ids = words.where_self(&positions.lt_tensor(&lengths), &Tensor::full_like(&words, b.pad_token_id));
    let _ = ids.narrow(1, 0, 1).fill_(b.cls_token_id);
    let mask = ids.ne(b.pad_token_id).to_kind(Kind::Int64);
    (image, ids, mask)
}

/// TFLOP/s of a square matmul in this process (bf16 8192 on CUDA, fp32 2048 on the CPU): the
/// fastest of several timed ones, so that a busy moment of the machine does not lower the peak.
fn matmul_peak_tflops(dev: Device) -> f64 {
    let (n, kind, reps) = if dev.is_cuda() { (8192, Kind::BFloat16, 20) } else { (2048, Kind::Float, 6) };
    let (a, b) = (Tensor::randn([n, n], (kind, dev)), Tensor::randn([n, n], (kind, dev)));
    let _ = a.matmul(&b);
    device::synchronize(dev);
    let fastest = (0..reps)
        .map(|_| {
            let started = Instant::now();
            let _ = a.matmul(&b);
            device::synchronize(dev);
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (n as f64).powi(3) / fastest / 1e12
}

/// Images per second one loader thread decodes, augments and normalises at the preset's size
/// (photo-like 500x375 JPEGs, the training transform).
fn loader_images_per_core(cfg: &AlbefConfig) -> Result<f64> {
    let jpegs = (0..8)
        .map(|i| {
            let mut bytes = Vec::new();
            albef_data::synth::photo(i)
                .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90))?;
            Ok(bytes)
        })
        .collect::<Result<Vec<_>>>()?;
    let transform = albef_data::dataset::train_transform(cfg);
    let (started, mut done) = (Instant::now(), 0u64);
    while done < 3 * jpegs.len() as u64 || started.elapsed() < Duration::from_millis(500) {
        let bytes = &jpegs[done as usize % jpegs.len()];
        let img = decode_rgb(bytes, cfg.data.max_pixels).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        std::hint::black_box(to_normalized_chw(&transform.apply(&img, &mut SplitMix64::for_item(7, done))));
        done += 1;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// This process's peak resident memory (VmHWM), in bytes.
fn host_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn print_activation_checkpointing(runs: &[serde_json::Value]) {
    let gib = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |b| format!("{:.2} GiB", b / (1u64 << 30) as f64));
    let first = &runs[0]["report"];
    println!(
        "activation checkpointing, each setting in a process of its own: {} on {}, batch {}, {} px, {} tokens",
        first["preset"].as_str().unwrap_or(""),
        first["device"].as_str().unwrap_or(""),
        first["batch"],
        first["image_res"],
        first["text_len"]
    );
    println!(
        "  {:<8} {:>10} {:>9} {:>15} {:>17} {:>16}",
        "setting", "step p50", "x first", "host peak RSS", "CUDA allocated", "CUDA reserved"
    );
    let baseline = first["step_seconds"]["p50"].as_f64().unwrap_or(f64::NAN);
    for run in runs {
        let (r, mem) = (&run["report"], &run["report"]["peak_memory_bytes"]);
        let p50 = r["step_seconds"]["p50"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:<8} {:>8.2} s {:>8.2}x {:>15} {:>17} {:>16}",
            run["activation_checkpointing"].as_str().unwrap_or(""),
            p50,
            p50 / baseline,
            gib(&mem["host_rss"]),
            gib(&mem["cuda_allocated"]),
            gib(&mem["cuda_reserved"])
        );
    }
}

fn print_table(r: &serde_json::Value) {
    let ms = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |s| format!("{:.1} ms", s * 1e3));
    let num = |v: &serde_json::Value, scale: f64, digits: usize| {
        v.as_f64().map_or("-".into(), |x| format!("{:.*}", digits, x * scale))
    };
    println!(
        "{} {} on {} (world {}, {} threads each): batch {}, {} px, {} tokens, {} parameters",
        r["implementation"].as_str().unwrap_or(""),
        r["preset"].as_str().unwrap_or(""),
        r["device"].as_str().unwrap_or(""),
        r["world"],
        r["threads"],
        r["batch"],
        r["image_res"],
        r["text_len"],
        r["parameters"]
    );
    let (s, p) = (&r["step_seconds"], &r["phases_seconds"]);
    println!(
        "  step          p50 {}  p90 {}  ({} images/s)",
        ms(&s["p50"]),
        ms(&s["p90"]),
        num(&r["images_per_second"], 1.0, 1)
    );
    println!(
        "  phases        forward {}  backward {}  communication {}  optimizer {}",
        ms(&p["forward"]),
        ms(&p["backward"]),
        ms(&p["communication"]),
        ms(&p["optimizer"])
    );
    if r["world"].as_u64().unwrap_or(1) > 1 {
        println!(
            "  all-reduces   {} in all, {} of it after the backward (overlap {})",
            ms(&p["all_reduce_busy"]),
            ms(&p["communication"]),
            if r["overlap_grad_reduce"].as_bool().unwrap_or(false) { "on" } else { "off" }
        );
    }
    let m = &r["mfu"];
    println!(
        "  compute       {} GFLOP/step, {} TFLOP/s; MFU {}% of the measured matmul peak ({} TFLOP/s), {}% of the datasheet's",
        num(&r["flops_per_step"], 1e-9, 1),
        num(&r["achieved_tflops"], 1.0, 3),
        num(&m["measured"], 100.0, 1),
        num(&m["measured_peak_tflops"], 1.0, 3),
        num(&m["datasheet"], 100.0, 1)
    );
    let mem = &r["peak_memory_bytes"];
    println!(
        "  peak memory   host RSS {} GiB; CUDA allocated {} GiB, reserved {} GiB",
        num(&mem["host_rss"], 1.0 / (1u64 << 30) as f64, 2),
        num(&mem["cuda_allocated"], 1.0 / (1u64 << 30) as f64, 2),
        num(&mem["cuda_reserved"], 1.0 / (1u64 << 30) as f64, 2)
    );
    println!(
        "  data          one loader thread makes {} images/s: {} decode threads keep this step fed",
        num(&r["loader_images_per_core"], 1.0, 0),
        r["decode_threads_to_keep_up"]
    );
    if let Some(snaps) = r["checkpoint_snapshot_seconds"].as_array().filter(|s| !s.is_empty()) {
        let list: Vec<String> = snaps.iter().map(ms).collect();
        println!("  checkpoint    the step waits {} (snapshot to host memory, first one first)", list.join(", "));
    }
}
