//! Bucketed all-reduce: the same result as one all-reduce per gradient, in fewer calls.

mod common;

use albef_dist::{Collective, DEFAULT_BUCKET_BYTES, LocalCollective, ReduceOp, all_reduce_buckets};
use anyhow::Result;
use common::{form_world, input, on_ranks, options};
use std::sync::Mutex;
use std::time::Duration;
use tch::{Kind, Tensor};

/// Gradients of mixed sizes and dtypes, a scalar, an empty one and a non-contiguous one; integer
/// values, so that sums are exact whatever the bucket boundaries.
fn gradients(rank: usize) -> Vec<Tensor> {
    let specs: [(&[i64], Kind); 10] = [
        (&[1], Kind::Float),
        (&[7, 3], Kind::Float),
        (&[3, 3, 3], Kind::BFloat16),
        (&[1000], Kind::Float),
        (&[], Kind::Float),
        (&[50_000], Kind::Float),
        (&[0], Kind::Float),
        (&[10], Kind::Double),
        (&[300], Kind::BFloat16),
        (&[5, 4], Kind::Float),
    ];
    let mut grads: Vec<Tensor> = specs
        .iter()
        .enumerate()
        .map(|(i, (shape, kind))| {
            let numel = shape.iter().product::<i64>() as usize;
            input(rank * 31 + i, numel, Kind::Double).round().to_kind(*kind).reshape(*shape)
        })
        .collect();
    let last = grads.len() - 1;
    grads[last] = grads[last].tr();
    grads
}

#[test]
fn buckets_match_per_tensor_all_reduce() {
    let world = form_world(3, &options(11, Duration::from_secs(30)));
    for bucket_bytes in [1, 4096, DEFAULT_BUCKET_BYTES] {
        for op in [ReduceOp::Sum, ReduceOp::Avg] {
            let results = on_ranks(&world, |c| {
                let mut bucketed = gradients(c.rank());
                all_reduce_buckets(c, &mut bucketed, bucket_bytes, op).unwrap();
                let mut reference = gradients(c.rank());
                for g in &mut reference {
                    c.all_reduce(g, op).unwrap();
                }
                (bucketed, reference)
            });
            for (rank, (bucketed, reference)) in results.iter().enumerate() {
                for (i, (b, r)) in bucketed.iter().zip(reference).enumerate() {
                    let case = format!("bucket {bucket_bytes} B, {op:?}, rank {rank}, gradient {i}");
                    assert_eq!((b.kind(), b.size()), (r.kind(), r.size()), "{case}");
                    assert!(b.equal(r), "{case}");
                }
            }
        }
    }
}

/// Records the all-reduces it is asked for.
#[derive(Default)]
struct Recorder {
    inner: LocalCollective,
    calls: Mutex<Vec<(usize, Kind)>>,
}

impl Collective for Recorder {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.calls.lock().unwrap().push((t.numel(), t.kind()));
        self.inner.all_reduce(t, op)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.inner.all_gather(t)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.inner.broadcast(t, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self) {
        self.inner.abort()
    }
}

#[test]
fn buckets_group_by_dtype_in_order() {
    let recorder = Recorder::default();
    // f32: 400 B, bf16: 100 B, f32: 400 B, 8000 B, 400 B, with 1000-byte buckets.
    let mut grads: Vec<Tensor> = [(100, Kind::Float), (50, Kind::BFloat16), (100, Kind::Float), (2000, Kind::Float)]
        .into_iter()
        .chain([(100, Kind::Float)])
        .map(|(n, kind)| input(0, n, kind))
        .collect();
    let before: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
    all_reduce_buckets(&recorder, &mut grads, 1000, ReduceOp::Sum).unwrap();
    let calls = recorder.calls.into_inner().unwrap();
    assert_eq!(calls, [(200, Kind::Float), (2000, Kind::Float), (100, Kind::Float), (50, Kind::BFloat16)]);
    for (g, b) in grads.iter().zip(&before) {
        assert!(g.equal(b), "the identity collective must leave gradients unchanged");
    }
}
