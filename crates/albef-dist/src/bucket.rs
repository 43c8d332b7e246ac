//! DDP-style gradient bucketing: many small all-reduces cost a round trip each, so gradients of
//! the same dtype and device are flattened into buckets of about `bucket_bytes` and reduced
//! together.

use crate::{Collective, ReduceOp};
use anyhow::{Context, Result, ensure};
use tch::{Device, Kind, Tensor};

/// PyTorch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// All-reduces `grads` in place, in buckets of about `bucket_bytes`.
///
/// Gradients are grouped by (dtype, device) in order of first appearance and packed in order
/// within a group; a gradient larger than `bucket_bytes` forms its own bucket, and a bucket of
/// one gradient is reduced in place without a copy. The order of the all-reduces depends only on
/// the list, so every rank issues the same sequence.
pub fn all_reduce_buckets(c: &dyn Collective, grads: &mut [Tensor], bucket_bytes: usize, op: ReduceOp) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    let mut groups: Vec<((Kind, Device), Vec<usize>)> = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        ensure!(g.defined(), "all_reduce_buckets: gradient {i} is undefined");
        let key = (g.kind(), g.device());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    for (_, members) in groups {
        let mut bucket = Vec::new();
        let mut bytes = 0;
        for i in members {
            let size = grads[i].numel() * grads[i].kind().elt_size_in_bytes();
            if !bucket.is_empty() && bytes + size > bucket_bytes {
                reduce_bucket(c, grads, &bucket, op)?;
                bucket.clear();
                bytes = 0;
            }
            bucket.push(i);
            bytes += size;
        }
        if !bucket.is_empty() {
            reduce_bucket(c, grads, &bucket, op)?;
        }
    }
    Ok(())
}

fn reduce_bucket(c: &dyn Collective, grads: &mut [Tensor], bucket: &[usize], op: ReduceOp) -> Result<()> {
    let context = || format!("all-reducing the bucket of gradients {bucket:?}");
    if let [i] = bucket {
        return c.all_reduce(&mut grads[*i], op).with_context(context);
    }
    let flat: Vec<Tensor> = bucket.iter().map(|&i| grads[i].f_reshape([-1])).collect::<Result<_, _>>()?;
    let mut flat = Tensor::f_cat(&flat, 0)?;
    c.all_reduce(&mut flat, op).with_context(context)?;
    let mut offset = 0;
    for &i in bucket {
        let numel = grads[i].numel() as i64;
        let part = flat.f_narrow(0, offset, numel)?.f_view(grads[i].size().as_slice())?;
        grads[i].f_copy_(&part)?;
        offset += numel;
    }
    Ok(())
}
