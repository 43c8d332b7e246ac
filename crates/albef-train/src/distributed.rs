//! Data parallelism over a collective: `DataParallel` (a rank's place in its world and the
//! collectives of a step), the model's feature gather (every rank's momentum features in rank
//! order, also when ranks hold different numbers of rows) and the gradient average, overlapped
//! with the backward.

use crate::VirtualRanks;
use albef_dist::{BucketPlan, Collective, OverlapTimes, ReduceOp, all_reduce_while};
use albef_model::{FeatureGather, Gathered};
use albef_torch_ext::GradReadyHooks;
use anyhow::{Context, Result, ensure};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// A rank's part in data-parallel training: its collective, the virtual ranks it computes and
/// the gradient average of its steps. One per generation; a single process is a world of one
/// (`albef_dist::LocalCollective`).
pub struct DataParallel<'c> {
    collective: &'c dyn Collective,
    ranks: VirtualRanks,
    averager: GradientAverager<'c>,
}

impl<'c> DataParallel<'c> {
    /// `bucket_bytes` and `overlap`: see [`GradientAverager::new`].
    pub fn new(collective: &'c dyn Collective, ranks: VirtualRanks, bucket_bytes: usize, overlap: bool) -> Self {
        DataParallel { collective, ranks, averager: GradientAverager::new(collective, bucket_bytes, overlap) }
    }

    pub fn collective(&self) -> &'c dyn Collective {
        self.collective
    }

    pub fn ranks(&self) -> VirtualRanks {
        self.ranks
    }

    pub(crate) fn averager(&mut self) -> &mut GradientAverager<'c> {
        &mut self.averager
    }

    /// Whether this rank's `finite` holds on every rank (one all-reduce; none in a world of one).
    pub(crate) fn all_finite(&self, finite: bool, device: tch::Device) -> Result<bool> {
        if self.collective.world_size() == 1 {
            return Ok(finite);
        }
        let mut bad = Tensor::from_slice(&[f32::from(u8::from(!finite))]).to_device(device);
        self.collective.all_reduce(&mut bad, ReduceOp::Sum).context("the vote on the step's finiteness")?;
        Ok(bad.double_value(&[0]) == 0.0)
    }
}

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

/// Averages the gradients of a step over the ranks of a collective, DDP's way: gradients are
/// packed into buckets of about `bucket_bytes`, and a bucket is all-reduced on a thread of its own
/// as soon as the backward has completed all its gradients (post-accumulate-gradient hooks),
/// while the backward goes on.
///
/// What a bucket holds is fixed by the parameters' names (deepest layers first, see
/// [`packing_order`]), so the arithmetic is the same in every step, generation and process; the
/// order in which buckets go is the order in which rank 0's buckets were complete in the first
/// step (broadcast once; buckets go in packing order until then), which every rank must follow.
/// One per generation (its collective).
pub struct GradientAverager<'c> {
    collective: &'c dyn Collective,
    bucket_bytes: usize,
    overlap: bool,
    plan: Option<Arc<BucketPlan>>,
    /// The launch order is agreed on (after the first step).
    agreed: bool,
}

impl<'c> GradientAverager<'c> {
    /// `overlap: false` reduces every bucket after the backward (for comparison and debugging).
    pub fn new(collective: &'c dyn Collective, bucket_bytes: usize, overlap: bool) -> Self {
        GradientAverager { collective, bucket_bytes, overlap, plan: None, agreed: false }
    }

    /// Whether there is anything to average: more than one rank.
    pub fn averages(&self) -> bool {
        self.collective.world_size() > 1
    }

    /// Runs `backward` and averages the gradients of `params` (those that have one; zeros stand
    /// in for the others) over the ranks; returns the exposed and the total time of the
    /// communication.
    pub(crate) fn backward_and_average(
        &mut self,
        params: &[(&str, Tensor)],
        hooks: &GradReadyHooks,
        backward: impl FnOnce(),
    ) -> Result<OverlapTimes> {
        let c = self.collective;
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
        let packed = || BucketPlan::new(&tensors, &packing_order(&names), self.bucket_bytes);
        let plan = match &self.plan {
            Some(plan) => plan.clone(),
            None => Arc::new(packed()?),
        };
        let grad_of = |i: usize| Some(tensors[i].grad()).filter(Tensor::defined);
        let ((), completed, times) = all_reduce_while(c, &plan, ReduceOp::Avg, &grad_of, |ready| {
            let armed = self.overlap.then(|| {
                let ready = ready.clone();
                hooks.arm(Arc::new(move |i, grad| ready.ready(i, grad)))
            });
            backward();
            drop(armed);
        })?;
        if self.overlap && !self.agreed {
            let launch = self.agree_on_launch_order(&tensors, completed)?;
            self.plan = Some(Arc::new(packed()?.launching(launch)?));
            self.agreed = true;
        } else {
            self.plan = Some(plan);
        }
        Ok(times)
    }

    /// Rank 0's order of completed buckets, on every rank.
    fn agree_on_launch_order(&self, tensors: &[Tensor], completed: Vec<usize>) -> Result<Vec<usize>> {
        let device = tensors.first().map_or(tch::Device::Cpu, Tensor::device);
        let order: Vec<i64> = completed.iter().map(|&b| b as i64).collect();
        let mut agreed = Tensor::from_slice(&order).to_device(device);
        self.collective.broadcast(&mut agreed, 0).context("agreeing on the order of the gradient buckets")?;
        let order = Vec::<i64>::try_from(agreed.to_device(tch::Device::Cpu).to_kind(Kind::Int64))?;
        ensure!(order.iter().all(|&b| b >= 0), "rank 0 sent a bucket order with negative indices: {order:?}");
        Ok(order.into_iter().map(|b| b as usize).collect())
    }
}

/// The order in which parameters are packed into buckets: by name with numbers compared as
/// numbers, reversed, so that the deepest layers (whose gradients a backward completes first)
/// come first and a layer's parameters lie together.
pub fn packing_order(names: &[&str]) -> Vec<usize> {
    /// A name as runs of text and numbers.
    fn key(name: &str) -> Vec<(String, u64)> {
        let mut parts = vec![];
        let mut rest = name;
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits > 0 {
                parts.push((String::new(), rest[..digits].parse().unwrap_or(u64::MAX)));
                rest = &rest[digits..];
            } else {
                let text = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
                parts.push((rest[..text].to_string(), 0));
                rest = &rest[text..];
            }
        }
        parts
    }
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_cached_key(|&i| std::cmp::Reverse(key(names[i])));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deeper_layers_are_packed_first() {
        let names = ["enc.layer.2.w", "enc.layer.10.w", "enc.layer.10.b", "enc.embed", "head.w"];
        let packed: Vec<&str> = packing_order(&names).into_iter().map(|i| names[i]).collect();
        assert_eq!(packed, ["head.w", "enc.layer.10.w", "enc.layer.10.b", "enc.layer.2.w", "enc.embed"]);
    }
}
