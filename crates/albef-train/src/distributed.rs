//! Data parallelism over a collective: the model's feature gather (every rank's momentum
//! features in rank order, also when ranks hold different numbers of rows) and the gradient
//! average.

use crate::Trainer;
use albef_dist::{Collective, ReduceOp, bucket::all_reduce_buckets};
use albef_model::{FeatureGather, Gathered};
use anyhow::Result;
use tch::Tensor;

pub struct CollectiveGather<'a> {
    pub collective: &'a dyn Collective,
}

impl FeatureGather for CollectiveGather<'_> {
    fn all_gather(&self, t: &Tensor) -> Result<Gathered> {
        let c = self.collective;
        let rows = t.size()[0];
        let sizes = c.all_gather(&Tensor::from_slice(&[rows as f32]).to_device(t.device()))?;
        let sizes: Vec<i64> =
            Vec::<f32>::try_from(sizes.to_device(tch::Device::Cpu))?.iter().map(|&s| s as i64).collect();
        let max = sizes.iter().copied().max().unwrap_or(rows);
        let offset = sizes[..c.rank()].iter().sum();
        if sizes.iter().all(|&s| s == max) {
            return Ok(Gathered { all: c.all_gather(t)?, offset });
        }
        // Pad to the largest block, gather, then keep each rank's real rows.
        let mut shape = t.size();
        shape[0] = max - rows;
        let padded = Tensor::cat(&[t.shallow_clone(), Tensor::zeros(&shape, (t.kind(), t.device()))], 0);
        let all = c.all_gather(&padded)?;
        let blocks: Vec<Tensor> = sizes.iter().enumerate().map(|(r, &n)| all.narrow(0, r as i64 * max, n)).collect();
        Ok(Gathered { all: Tensor::cat(&blocks, 0), offset })
    }
}

/// Averages every gradient of the trainer across ranks, in buckets of `bucket_bytes`.
pub fn average_gradients(trainer: &Trainer, collective: &dyn Collective, bucket_bytes: usize) -> Result<()> {
    let mut grads: Vec<Tensor> = trainer.optimizer().gradients().into_iter().map(|(_, g)| g).collect();
    all_reduce_buckets(collective, &mut grads, bucket_bytes, ReduceOp::Avg)
}
