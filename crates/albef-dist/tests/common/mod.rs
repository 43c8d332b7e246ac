//! Worlds of TCP collectives on 127.0.0.1, one thread per rank.

use albef_dist::{PendingTcp, TcpCollective, TcpOptions};
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Options with a timeout that bounds every test, whatever goes wrong.
pub fn options(token: u64, timeout: Duration) -> TcpOptions {
    TcpOptions { timeout, ..TcpOptions::new(token) }
}

pub fn bind() -> PendingTcp {
    TcpCollective::bind("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Binds `n` listeners, relays their addresses and forms the ring, each rank on its thread.
pub fn form_world(n: usize, opts: &TcpOptions) -> Vec<TcpCollective> {
    let pending: Vec<PendingTcp> = (0..n).map(|_| bind()).collect();
    let peers: Vec<SocketAddr> = pending.iter().map(PendingTcp::local_addr).collect();
    thread::scope(|s| {
        let handles: Vec<_> = pending
            .into_iter()
            .enumerate()
            .map(|(rank, p)| {
                let (peers, opts) = (peers.clone(), opts.clone());
                s.spawn(move || p.connect(rank, peers, opts))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    })
}

/// Runs `f` on every rank at once and returns the results in rank order.
pub fn on_ranks<T: Send>(world: &[TcpCollective], f: impl Fn(&TcpCollective) -> T + Sync) -> Vec<T> {
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> = world.iter().map(|c| s.spawn(move || f(c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Distinct, deterministic, non-integer values for each rank.
pub fn input(rank: usize, numel: usize, kind: Kind) -> Tensor {
    let x = Tensor::arange(numel as i64, (Kind::Double, Device::Cpu));
    ((x * 0.37 + rank as f64 * 1.3).sin() * 10.0).to_kind(kind)
}
