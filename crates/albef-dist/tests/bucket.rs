//! Bucketed all-reduce: the same result as one all-reduce per gradient, in fewer calls.

mod common;

use albef_dist::{
    BucketPlan, Collective, DEFAULT_BUCKET_BYTES, LocalCollective, ReduceOp, all_reduce_buckets, all_reduce_while,
};
use anyhow::Result;
use common::{form_world, input, on_ranks, options};
use std::sync::{Arc, Mutex};
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

/// Gradients reported while "the backward" runs (from another thread, in an order of its own,
/// one of them never, one twice) are reduced bucket by bucket, each bucket only after the ones
/// the plan launches before it, with the same bits as the reduce after the backward; the caller's
/// fallback stands in for a gradient that was not reported, and zeros for one it has not either
/// (which stays as it was).
#[test]
fn buckets_reduced_while_gradients_arrive_equal_the_reduce_after() {
    let world = form_world(3, &options(12, Duration::from_secs(30)));
    // Buckets of about 4 KB over the gradients packed in reverse; launched in another order.
    let results = on_ranks(&world, |c| {
        let grads = gradients(c.rank());
        let n = grads.len();
        let packing: Vec<usize> = (0..n).rev().collect();
        let plan = BucketPlan::new(&grads, &packing, 4096).unwrap();
        let launch: Vec<usize> = (0..plan.buckets()).rev().collect();
        let plan = Arc::new(plan.launching(launch).unwrap());
        let mut expected = gradients(c.rank());
        all_reduce_buckets(c, &mut expected, 4096, ReduceOp::Avg).unwrap();

        let reported: Vec<Tensor> = grads.iter().map(Tensor::shallow_clone).collect();
        let not_reported = 3;
        let fallback = |i: usize| (i == not_reported).then(|| reported[i].shallow_clone());
        let ((), completed, times) = all_reduce_while(c, &plan, ReduceOp::Avg, &fallback, |ready| {
            let ready = ready.clone();
            let order: Vec<usize> = [7, 0, 9, 0, 8, 2, 4, 5, 6].into();
            let handed: Vec<Tensor> = order.iter().map(|&i| grads[i].shallow_clone()).collect();
            std::thread::spawn(move || {
                for (i, g) in order.into_iter().zip(handed) {
                    ready.ready(i, g);
                }
            })
            .join()
            .unwrap();
        })
        .unwrap();
        assert_eq!(completed.len(), plan.buckets(), "every bucket appears in the completion order");
        assert!(times.busy_seconds > 0.0 && times.waited_seconds >= 0.0);
        (grads, expected)
    });
    let absent = 1;
    for (rank, (overlapped, expected)) in results.iter().enumerate() {
        for (i, (o, e)) in overlapped.iter().zip(expected).enumerate() {
            let e = if i == absent { &gradients(rank)[i] } else { e };
            assert!(o.equal(e), "rank {rank}, gradient {i}: {o} vs {e}");
        }
    }
}

/// The order buckets go in changes no bit: what a bucket holds decides the arithmetic.
#[test]
fn the_launch_order_changes_no_bit() {
    let world = form_world(3, &options(13, Duration::from_secs(30)));
    let results = on_ranks(&world, |c| {
        let reduce = |reverse: bool| {
            let grads = gradients(c.rank());
            let mut plan = BucketPlan::in_order(&grads, 512).unwrap();
            if reverse {
                let launch = (0..plan.buckets()).rev().collect();
                plan = plan.launching(launch).unwrap();
            }
            let plan = Arc::new(plan);
            let fallback = |i: usize| Some(grads[i].shallow_clone());
            all_reduce_while(c, &plan, ReduceOp::Avg, &fallback, |_| ()).unwrap();
            grads
        };
        (reduce(false), reduce(true))
    });
    for (forward, reversed) in results {
        for (f, r) in forward.iter().zip(&reversed) {
            assert!(f.equal(r));
        }
    }
}

#[test]
fn a_bucket_plan_refuses_an_order_that_is_not_a_permutation() {
    let grads = gradients(0);
    assert!(BucketPlan::new(&grads, &[0, 1, 1, 2, 3, 4, 5, 6, 7, 8], 4096).is_err());
    assert!(BucketPlan::new(&grads, &[0, 1], 4096).is_err());
    let plan = BucketPlan::in_order(&grads, 4096).unwrap();
    let n = plan.buckets();
    assert!(BucketPlan::in_order(&grads, 4096).unwrap().launching(vec![0; n]).is_err());
}
