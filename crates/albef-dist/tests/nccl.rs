//! The NCCL backend: a clear error where CUDA or NCCL is missing, and (on a GPU machine, by hand:
//! `cargo test -p albef-dist --test nccl -- --ignored`) a world of one on CUDA tensors.

use albef_dist::{Collective, NcclCollective, ReduceOp};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

#[test]
fn without_cuda_nccl_fails_with_a_clear_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let e = format!("{:#}", NcclCollective::new(0, 1, &[0; 128], 0, Duration::from_secs(5)).err().unwrap());
    assert!(e.contains("CUDA is not available") && e.contains("nccl init (rank 0 of 1, cuda:0)"), "{e}");
    // Creating a unique id needs no GPU, only the library: it works where NCCL is linked in as
    // setup does, and otherwise says which link to create.
    if let Err(e) = NcclCollective::unique_id() {
        let e = format!("{e:#}");
        assert!(e.contains("NCCL cannot be loaded") && e.contains("libnccl.so"), "{e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn world_of_one_on_cuda() {
    let device = Device::Cuda(0);
    let id = NcclCollective::unique_id().unwrap();
    let c = NcclCollective::new(0, 1, &id, 0, Duration::from_secs(60)).unwrap();
    for kind in [Kind::Float, Kind::BFloat16] {
        let x = Tensor::arange(1_000_003, (Kind::Float, device)).to_kind(kind);
        for op in [ReduceOp::Sum, ReduceOp::Avg] {
            let mut t = x.copy();
            c.all_reduce(&mut t, op).unwrap();
            assert!(t.equal(&x), "{kind:?} {op:?}");
        }
        // A non-contiguous view is reduced in place.
        let base = x.narrow(0, 0, 1_000_000).reshape([1000, 1000]);
        let mut view = base.tr();
        c.all_reduce(&mut view, ReduceOp::Sum).unwrap();
        assert!(base.equal(&x.narrow(0, 0, 1_000_000).reshape([1000, 1000])));

        let gathered = c.all_gather(&base.tr()).unwrap();
        assert_eq!(gathered.size(), [1000, 1000]);
        assert!(gathered.equal(&base.tr()));
        let mut b = x.copy();
        c.broadcast(&mut b, 0).unwrap();
        assert!(b.equal(&x));
    }
    // Started all-reduces run on the communicator's own stream, after the kernels that made their
    // inputs; the default stream's later work sees their results once it waits for them.
    let x = Tensor::arange(1_000_003, (Kind::Float, device));
    let mut grads: Vec<Tensor> = (0..4).map(|i| &x * (i + 1) as f64).collect();
    albef_dist::all_reduce_buckets(&c, &mut grads, 1 << 20, ReduceOp::Avg).unwrap();
    for (i, g) in grads.iter().enumerate() {
        assert!(g.equal(&(&x * (i + 1) as f64)), "bucketed gradient {i}");
    }
    let mut started = &x * 3.0;
    assert!(!c.start_all_reduce(&mut started, ReduceOp::Sum).unwrap(), "NCCL reduces on its own stream");
    c.wait_started().unwrap();
    assert!((&started * 1.0).equal(&(&x * 3.0)));
    c.barrier().unwrap();
    let mut on_cpu = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    assert!(c.all_reduce(&mut on_cpu, ReduceOp::Sum).is_err(), "CPU tensors are refused");
    c.abort();
    let e = format!("{:#}", c.barrier().unwrap_err());
    assert!(e.contains("aborted"), "{e}");
}
