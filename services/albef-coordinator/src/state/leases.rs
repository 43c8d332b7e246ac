//! Each rank's share of an epoch: the plan a single process would compute over the job's
//! virtual ranks, whatever the world's size.

use super::Job;
use super::types::{JobError, Result, invalid};
use albef_data::plan::{PlanSpec, RankPlan, plan_rank, steps_per_epoch};

impl Job {
    /// The share of `epoch` in `generation` of `virtual_rank`, one of `rank`'s (rank, rank +
    /// world, ...): the same plan a single process would compute.
    pub fn leases(&self, generation: u64, rank: u32, virtual_rank: u32, epoch: u64) -> Result<RankPlan> {
        let g = self.current_checked(generation, rank)?;
        let virtual_ranks = self.cfg.job.virtual_rank_count();
        if virtual_rank >= virtual_ranks || virtual_rank % g.world() != rank {
            return invalid(format!(
                "virtual rank {virtual_rank} is not one of rank {rank}'s ({virtual_ranks} virtual ranks over {})",
                g.world()
            ));
        }
        let spec = PlanSpec {
            seed: self.cfg.train.seed,
            epoch,
            world_size: u64::from(virtual_ranks),
            batch_size: self.batch_size(),
            window: self.cfg.data.shuffle_window,
        };
        plan_rank(&self.mixture, &spec, u64::from(virtual_rank))
            .map_err(|e| JobError::FailedPrecondition(format!("{e:#}")))
    }

    /// Steps of the job: an epoch is planned over the virtual ranks, whatever the world's size.
    pub(super) fn total_steps(&self) -> u64 {
        let virtual_ranks = u64::from(self.cfg.job.virtual_rank_count());
        self.cfg.total_steps(steps_per_epoch(self.mixture.total(), virtual_ranks, self.batch_size()))
    }

    fn batch_size(&self) -> u64 {
        self.cfg.train.batch_size_train as u64
    }
}
