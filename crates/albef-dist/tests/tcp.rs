//! Correctness of the TCP collectives for worlds of 1 to 4 ranks on 127.0.0.1.

mod common;

use albef_dist::{Collective, LocalCollective, ReduceOp};
use common::{form_world, input, on_ranks, options};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const WORLDS: [usize; 4] = [1, 2, 3, 4];
/// Sizes not divisible by the world size, one of them larger than a 4 MiB chunk.
const SIZES: [usize; 3] = [1, 7, 1_000_003];
const TIMEOUT: Duration = Duration::from_secs(30);

/// (rtol, atol) against a sum in f64: bf16 results are rounded once, to bf16.
fn tolerance(kind: Kind) -> (f64, f64) {
    if kind == Kind::BFloat16 { (1e-2, 0.15) } else { (1e-5, 1e-4) }
}

fn expected_reduce(n: usize, numel: usize, kind: Kind, op: ReduceOp) -> Tensor {
    let sum = (0..n).map(|r| input(r, numel, kind).to_kind(Kind::Double)).reduce(|a, b| a + b).unwrap();
    if op == ReduceOp::Avg { sum / n as f64 } else { sum }
}

#[test]
fn all_reduce_sum_and_avg() {
    for n in WORLDS {
        let world = form_world(n, &options(1, TIMEOUT));
        for kind in [Kind::Float, Kind::BFloat16] {
            for numel in SIZES {
                for op in [ReduceOp::Sum, ReduceOp::Avg] {
                    let results = on_ranks(&world, |c| {
                        let mut t = input(c.rank(), numel, kind);
                        c.all_reduce(&mut t, op).unwrap();
                        t
                    });
                    let expected = expected_reduce(n, numel, kind, op);
                    let (rtol, atol) = tolerance(kind);
                    for (rank, t) in results.iter().enumerate() {
                        let case = format!("world {n}, {kind:?}, numel {numel}, {op:?}, rank {rank}");
                        assert_eq!((t.kind(), t.size()), (kind, vec![numel as i64]), "{case}");
                        assert!(t.to_kind(Kind::Double).allclose(&expected, rtol, atol, false), "{case}: wrong values");
                        assert!(t.equal(&results[0]), "{case}: differs from rank 0");
                    }
                }
            }
        }
    }
}

#[test]
fn all_reduce_f64_and_i64() {
    let world = form_world(3, &options(1, TIMEOUT));
    let results = on_ranks(&world, |c| {
        let mut d = input(c.rank(), 1001, Kind::Double);
        let mut i = Tensor::arange(1001, (Kind::Int64, Device::Cpu)) * (c.rank() as i64 + 1);
        c.all_reduce(&mut d, ReduceOp::Avg).unwrap();
        c.all_reduce(&mut i, ReduceOp::Sum).unwrap();
        let avg_of_ints = c.all_reduce(&mut i.shallow_clone(), ReduceOp::Avg);
        (d, i, avg_of_ints.is_err())
    });
    for (d, i, avg_of_ints_failed) in results {
        assert!(d.allclose(&expected_reduce(3, 1001, Kind::Double, ReduceOp::Avg), 1e-12, 1e-12, false));
        assert!(i.equal(&(Tensor::arange(1001, (Kind::Int64, Device::Cpu)) * 6)));
        assert!(avg_of_ints_failed, "an average of integers must be refused");
    }
}

#[test]
fn all_reduce_writes_through_a_non_contiguous_view() {
    for kind in [Kind::Float, Kind::BFloat16] {
        let world = form_world(3, &options(1, TIMEOUT));
        let results = on_ranks(&world, |c| {
            let base = input(c.rank(), 70, kind).reshape([2, 7, 5]);
            let mut view = base.select(0, 1).transpose(0, 1);
            assert!(!view.is_contiguous());
            c.all_reduce(&mut view, ReduceOp::Sum).unwrap();
            base
        });
        let sum: Tensor =
            (0..3).map(|r| input(r, 70, kind).reshape([2, 7, 5]).select(0, 1).to_kind(Kind::Double)).sum();
        let (rtol, atol) = tolerance(kind);
        for (rank, base) in results.iter().enumerate() {
            let untouched = input(rank, 70, kind).reshape([2, 7, 5]).select(0, 0);
            assert!(base.select(0, 0).equal(&untouched), "{kind:?} rank {rank}: wrote outside the view");
            assert!(base.select(0, 1).to_kind(Kind::Double).allclose(&sum, rtol, atol, false), "{kind:?} rank {rank}");
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for n in WORLDS {
        let world = form_world(n, &options(2, TIMEOUT));
        for kind in [Kind::Float, Kind::BFloat16, Kind::Int64] {
            for rows in [1, 7, 1000] {
                let own = |rank: usize| input(rank, rows * 3, kind).reshape([rows as i64, 3]);
                // Non-contiguous input: the transpose of a (3, rows) tensor.
                let strided = |rank: usize| input(rank + 10, rows * 3, kind).reshape([3, rows as i64]).tr();
                let results = on_ranks(&world, |c| {
                    (c.all_gather(&own(c.rank())).unwrap(), c.all_gather(&strided(c.rank())).unwrap())
                });
                let expected = Tensor::cat(&(0..n).map(own).collect::<Vec<_>>(), 0);
                let expected_strided = Tensor::cat(&(0..n).map(strided).collect::<Vec<_>>(), 0);
                for (rank, (got, got_strided)) in results.iter().enumerate() {
                    let case = format!("world {n}, {kind:?}, rows {rows}, rank {rank}");
                    assert!(got.equal(&expected), "{case}");
                    assert!(got_strided.equal(&expected_strided), "{case}, non-contiguous");
                }
            }
        }
        let results = on_ranks(&world, |c| {
            let scalar = Tensor::from(c.rank() as f32 + 0.5);
            (c.all_gather(&scalar).unwrap(), c.all_gather(&input(c.rank(), 1_000_003, Kind::Float)).unwrap())
        });
        let scalars = Tensor::from_slice(&(0..n).map(|r| r as f32 + 0.5).collect::<Vec<_>>());
        let large = Tensor::cat(&(0..n).map(|r| input(r, 1_000_003, Kind::Float)).collect::<Vec<_>>(), 0);
        for (scalar, big) in results {
            assert!(scalar.equal(&scalars), "world {n}: 0-dim tensors gather to shape [n]");
            assert!(big.equal(&large), "world {n}: large tensor");
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for n in WORLDS {
        let world = form_world(n, &options(3, TIMEOUT));
        for root in 0..n {
            for (numel, kind) in [(1, Kind::Float), (7, Kind::BFloat16), (1000, Kind::Int64), (1_000_003, Kind::Float)]
            {
                let results = on_ranks(&world, |c| {
                    let mut t = input(c.rank(), numel, kind);
                    c.broadcast(&mut t, root).unwrap();
                    t
                });
                for (rank, t) in results.iter().enumerate() {
                    assert!(
                        t.equal(&input(root, numel, kind)),
                        "world {n}, root {root}, {kind:?} {numel}, rank {rank}"
                    );
                }
            }
        }
        // Into a non-contiguous view, leaving the rest of its base alone.
        let root = n - 1;
        let results = on_ranks(&world, |c| {
            let base = input(c.rank(), 60, Kind::Float).reshape([3, 4, 5]);
            c.broadcast(&mut base.select(2, 1), root).unwrap();
            base
        });
        for (rank, base) in results.iter().enumerate() {
            let mine = input(rank, 60, Kind::Float).reshape([3, 4, 5]);
            let roots = input(root, 60, Kind::Float).reshape([3, 4, 5]);
            assert!(base.select(2, 1).equal(&roots.select(2, 1)), "world {n}, rank {rank}");
            assert!(base.select(2, 0).equal(&mine.select(2, 0)), "world {n}, rank {rank}: wrote outside the view");
        }
    }
}

#[test]
fn barrier_waits_for_the_last_rank() {
    for n in WORLDS {
        let world = form_world(n, &options(4, TIMEOUT));
        let start = Instant::now();
        let left = on_ranks(&world, |c| {
            std::thread::sleep(Duration::from_millis(150 * c.rank() as u64));
            c.barrier().unwrap();
            start.elapsed()
        });
        let last_entry = Duration::from_millis(150 * (n as u64 - 1));
        for (rank, t) in left.iter().enumerate() {
            assert!(
                *t >= last_entry,
                "world {n}: rank {rank} left the barrier after {t:?}, before rank {} entered",
                n - 1
            );
        }
    }
}

#[test]
fn mismatched_calls_fail_instead_of_mixing_data() {
    let world = form_world(2, &options(5, TIMEOUT));
    let errors = on_ranks(&world, |c| {
        let mut t = input(c.rank(), 10, Kind::Float);
        let r = if c.rank() == 0 { c.all_reduce(&mut t, ReduceOp::Sum) } else { c.broadcast(&mut t, 0) };
        format!("{:#}", r.unwrap_err())
    });
    assert!(errors.iter().any(|e| e.contains("different collectives")), "{errors:?}");

    let world = form_world(2, &options(6, TIMEOUT));
    let errors = on_ranks(&world, |c| {
        let mut t = input(c.rank(), 10 + 2 * c.rank(), Kind::Float);
        format!("{:#}", c.all_reduce(&mut t, ReduceOp::Sum).unwrap_err())
    });
    assert!(errors.iter().any(|e| e.contains("different sizes")), "{errors:?}");
    for e in &errors {
        assert!(e.contains("tcp all_reduce on rank"), "the error names the operation: {e}");
    }
}

#[test]
fn local_collective_is_the_identity() {
    let c = LocalCollective::new();
    let mut t = input(0, 5, Kind::Float);
    c.all_reduce(&mut t, ReduceOp::Avg).unwrap();
    assert!(t.equal(&input(0, 5, Kind::Float)));
    assert!(c.all_gather(&t).unwrap().equal(&t));
    c.broadcast(&mut t, 0).unwrap();
    c.barrier().unwrap();
    c.abort();
    assert!(c.barrier().is_err());
}
