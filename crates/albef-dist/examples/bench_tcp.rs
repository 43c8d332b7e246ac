//! All-reduce and all-gather bandwidth of the TCP collectives: a world of two ranks (threads)
//! on 127.0.0.1, f32 tensors. `tests/python/bench_gloo.py` runs it beside PyTorch's gloo.
//!
//! cargo run --release -p albef-dist --example bench_tcp -- [--sizes-mib 1,16,64] [--iters 5] [--json]

use albef_dist::{Collective, PendingTcp, ReduceOp, TcpCollective, TcpOptions};
use anyhow::{Context, Result, bail};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const WORLD: usize = 2;

struct Args {
    sizes_mib: Vec<usize>,
    iters: usize,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { sizes_mib: vec![1, 16, 64], iters: 5, json: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sizes-mib" => {
                let list = it.next().context("--sizes-mib needs a value")?;
                args.sizes_mib = list.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--iters" => args.iters = it.next().context("--iters needs a value")?.parse()?,
            "--json" => args.json = true,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// Mean seconds per operation on the slower rank, after one warm-up call; each rank's tensor
/// is made once, outside the timing.
fn time_op(
    world: &[TcpCollective],
    iters: usize,
    numel: usize,
    op: impl Fn(&TcpCollective, &mut Tensor) + Sync,
) -> f64 {
    let op = &op;
    let per_rank: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = world
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let mut t = Tensor::ones([numel as i64], (Kind::Float, Device::Cpu));
                    op(c, &mut t);
                    c.barrier().unwrap();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op(c, &mut t);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    per_rank.into_iter().max().unwrap().as_secs_f64() / iters as f64
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // One intra-op thread per rank: two ranks already fill a small machine.
    tch::set_num_threads(1);
    let pending: Vec<PendingTcp> =
        (0..WORLD).map(|_| TcpCollective::bind("127.0.0.1:0".parse().unwrap())).collect::<Result<_>>()?;
    let peers: Vec<_> = pending.iter().map(PendingTcp::local_addr).collect();
    let opts = TcpOptions::new(1);
    let world: Vec<TcpCollective> = std::thread::scope(|s| {
        let handles: Vec<_> = pending
            .into_iter()
            .enumerate()
            .map(|(rank, p)| {
                let (peers, opts) = (peers.clone(), opts.clone());
                s.spawn(move || p.connect(rank, peers, opts))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Result<_>>()
    })?;
    if !args.json {
        println!("{:<11} {:>9} {:>10} {:>10}", "op", "size MiB", "ms", "GB/s");
    }
    for &mib in &args.sizes_mib {
        let numel = (mib << 20) / 4;
        let all_reduce = time_op(&world, args.iters, numel, |c, t| c.all_reduce(t, ReduceOp::Sum).unwrap());
        let all_gather = time_op(&world, args.iters, numel, |c, t| drop(c.all_gather(t).unwrap()));
        for (op, seconds) in [("all_reduce", all_reduce), ("all_gather", all_gather)] {
            let bytes = mib << 20;
            if args.json {
                println!(r#"{{"op": "{op}", "bytes": {bytes}, "seconds": {seconds}}}"#);
            } else {
                println!("{op:<11} {mib:>9} {:>10.2} {:>10.2}", seconds * 1e3, bytes as f64 / seconds / 1e9);
            }
        }
    }
    Ok(())
}
