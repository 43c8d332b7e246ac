//! A rank's micro-batches in a job: each epoch's leases for each of its virtual ranks come from
//! the coordinator (the plan of the whole world), the batches from the task's dataset.

use crate::client::{self, Client};
use crate::faults::Faults;
use albef_config::AlbefConfig;
use albef_data::dataset::Dataset;
use albef_data::loader::LoadedBatch;
use albef_data::plan::{Lease, PlanSpec, RankPlan};
use albef_proto::v1::GetLeasesRequest;
use albef_train::VirtualRanks;
use albef_train::train_loop::{BatchSource, MicroBatches};
use anyhow::{Result, ensure};
use std::sync::Arc;
use tokio::runtime::Handle;

pub struct LeasedBatches<'a> {
    pub cfg: &'a AlbefConfig,
    pub client: Client,
    pub handle: Handle,
    pub generation: u64,
    pub rank: u32,
    pub ranks: VirtualRanks,
    pub steps_per_epoch: u64,
    pub faults: Arc<Faults>,
}

impl LeasedBatches<'_> {
    /// The share of `epoch` of `virtual_rank`, one of this rank's.
    fn leases(&mut self, virtual_rank: u32, epoch: u64) -> Result<RankPlan> {
        let req = GetLeasesRequest { generation: self.generation, rank: self.rank, epoch, virtual_rank };
        let client = &self.client;
        let r = client::retry(&self.handle, None, || {
            let mut c = client.clone();
            async move { c.get_leases(req).await }
        })
        .map_err(|s| anyhow::anyhow!("leases refused: {s}"))?;
        let spec = PlanSpec {
            seed: r.seed,
            epoch: r.epoch,
            world_size: u64::from(r.world_size),
            batch_size: r.batch_size,
            window: r.window,
        };
        let leases =
            r.leases.iter().map(|l| Lease { source: l.source, start: l.start, end: l.end, pass: l.pass }).collect();
        Ok(RankPlan { spec, rank: u64::from(virtual_rank), steps: r.steps, leases })
    }
}

impl BatchSource for LeasedBatches<'_> {
    fn epoch(&mut self, dataset: &Dataset, epoch: u64, from: u64) -> Result<MicroBatches> {
        // The virtual ranks of this rank share its decode threads.
        let sharing = self.ranks.local().count();
        let mut batches: Vec<Box<dyn Iterator<Item = LoadedBatch>>> = vec![];
        for v in self.ranks.local() {
            let plan = self.leases(v as u32, epoch)?;
            ensure!(
                plan.steps == self.steps_per_epoch,
                "the coordinator planned {} steps, this worker expects {}",
                plan.steps,
                self.steps_per_epoch
            );
            batches.push(Box::new(dataset.loader(self.cfg, plan, from, sharing, &self.handle)));
        }
        if let Some(first) = batches.first_mut() {
            let taken = std::mem::replace(first, Box::new(std::iter::empty()));
            *first = self.faults.poison(taken, epoch * self.steps_per_epoch);
        }
        Ok(MicroBatches(batches))
    }
}
