//! What a request must hold before it reaches the job (INVALID_ARGUMENT otherwise): ids and
//! texts of bounded length without control characters, finite numbers, known skip reasons, few
//! and short examples.

use crate::state::{self, Heartbeat, shown};
use albef_data::bad::{EXAMPLE_FIELD_BYTES, EXAMPLES_PER_REASON, SkipExample, SkipReason};
use albef_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use tonic::Status;

pub(super) const MAX_ID: usize = 256;
pub(super) const MAX_LOCATION: usize = 4096;
pub(super) const MAX_ERROR: usize = 16 * 1024;
/// A task has a few named losses.
const MAX_LOSS_TERMS: usize = 16;
/// Configured sources a worker may count (`data.train_file` entries).
const MAX_SOURCES: usize = 256;

pub(super) fn check_id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    check_text(field, value, MAX_ID)
}

pub(super) fn check_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!("{field} is {} bytes long (at most {max})", value.len())));
    }
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!("{field} contains control characters")));
    }
    Ok(())
}

/// Skip counts name known reasons, and examples are few and short: a worker cannot grow the
/// coordinator's state or its status replies without bound.
fn check_bad_samples(
    counts: HashMap<String, u64>,
    examples: Vec<pb::SkippedSample>,
) -> Result<(BTreeMap<String, u64>, Vec<SkipExample>), Status> {
    let known = |reason: &str| {
        SkipReason::parse(reason)
            .map(SkipReason::as_str)
            .ok_or_else(|| Status::invalid_argument(format!("unknown skip reason {:?}", shown(reason))))
    };
    let mut out = BTreeMap::new();
    for (reason, n) in counts {
        out.insert(known(&reason)?.to_string(), n);
    }
    let most = EXAMPLES_PER_REASON * SkipReason::ALL.len();
    if examples.len() > most {
        return Err(Status::invalid_argument(format!("{} skip examples (at most {most})", examples.len())));
    }
    // Room for the "…" that clipping appends.
    let max = EXAMPLE_FIELD_BYTES + 4;
    let mut kept = Vec::with_capacity(examples.len());
    for e in examples {
        check_text("bad_sample_examples.source", &e.source, max)?;
        check_text("bad_sample_examples.key", &e.key, max)?;
        check_text("bad_sample_examples.detail", &e.detail, max)?;
        let reason = known(&e.reason)?.to_string();
        kept.push(SkipExample { reason, source: e.source, key: e.key, detail: e.detail });
    }
    Ok((out, kept))
}

/// Counts by source name few sources, by clipped labels, under known skip reasons.
fn check_sources(sources: HashMap<String, pb::SourceCounts>) -> Result<state::SourcesSamples, Status> {
    if sources.len() > MAX_SOURCES {
        return Err(Status::invalid_argument(format!("{} sources (at most {MAX_SOURCES})", sources.len())));
    }
    let mut out = state::SourcesSamples::new();
    for (label, counts) in sources {
        // Room for the "…" that clipping appends.
        check_text("sources", &label, albef_data::mixture::LABEL_BYTES + 4)?;
        let (skipped, _) = check_bad_samples(counts.skipped, vec![])?;
        out.insert(label, state::SourceSamples { trained: counts.trained, skipped });
    }
    Ok(out)
}

pub(super) fn check_join(r: &pb::JoinRequest) -> Result<(), Status> {
    check_id("worker_id", &r.worker_id)?;
    check_text("host", &r.host, MAX_ID)?;
    if !["cuda", "cpu"].contains(&r.device_kind.as_str()) {
        let got = shown(&r.device_kind);
        return Err(Status::invalid_argument(format!("device_kind must be cuda or cpu (got {got:?})")));
    }
    if r.device_count > 1024 {
        return Err(Status::invalid_argument(format!("device_count {} is implausible", r.device_count)));
    }
    check_id("collective_address", &r.collective_address)?;
    check_text("node_id", &r.node_id, MAX_ID)?;
    if r.local_rank > 1024 {
        return Err(Status::invalid_argument(format!("local_rank {} is implausible", r.local_rank)));
    }
    let port = r.collective_address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
    if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
        let got = shown(&r.collective_address);
        return Err(Status::invalid_argument(format!("collective_address must be host:port (got {got:?})")));
    }
    Ok(())
}

/// A heartbeat, checked, as the job takes it.
pub(super) fn heartbeat(r: pb::HeartbeatRequest) -> Result<Heartbeat, Status> {
    check_id("worker_id", &r.worker_id)?;
    check_text("params_hash", &r.params_hash, MAX_ID)?;
    if r.fatal_error.len() > MAX_ERROR {
        return Err(Status::invalid_argument(format!("fatal_error is longer than {MAX_ERROR} bytes")));
    }
    if !(r.images_per_second.is_finite() && r.images_per_second >= 0.0) {
        return Err(Status::invalid_argument(format!("images_per_second {} is not a rate", r.images_per_second)));
    }
    if !(r.busy_seconds.is_finite() && r.busy_seconds >= 0.0) {
        return Err(Status::invalid_argument(format!("busy_seconds {} is not a duration", r.busy_seconds)));
    }
    if !(0.0..=1.0).contains(&r.data_wait_share) {
        return Err(Status::invalid_argument(format!("data_wait_share {} is not in 0..=1", r.data_wait_share)));
    }
    let (bad_samples, bad_sample_examples) = check_bad_samples(r.bad_samples, r.bad_sample_examples)?;
    let l = r.losses.unwrap_or_default();
    if l.terms.len() > MAX_LOSS_TERMS {
        return Err(Status::invalid_argument(format!("{} loss terms (at most {MAX_LOSS_TERMS})", l.terms.len())));
    }
    for name in l.terms.keys() {
        check_text("losses.terms", name, MAX_ID)?;
    }
    // Workers report the losses of applied steps only: finite, as are lr, temp and the norm.
    let terms = l.terms.iter().map(|(name, v)| (format!("losses.{name}"), *v));
    let others = [("losses.total", l.total), ("lr", r.lr), ("temp", r.temp), ("grad_norm", r.grad_norm)]
        .map(|(n, v)| (n.to_string(), v));
    for (name, v) in terms.chain(others) {
        if !v.is_finite() {
            return Err(Status::invalid_argument(format!("{name} {v} is not finite")));
        }
    }
    Ok(Heartbeat {
        worker_id: r.worker_id,
        generation: r.generation,
        rank: r.rank,
        step: r.step,
        epoch: r.epoch,
        losses: state::Losses { terms: l.terms.into_iter().collect(), total: l.total },
        images_per_second: r.images_per_second,
        params_hash: r.params_hash,
        params_hash_step: r.params_hash_step,
        lr: r.lr,
        temp: r.temp,
        grad_norm: r.grad_norm,
        fatal_error: r.fatal_error,
        done: r.done,
        nonfinite_steps: r.nonfinite_steps,
        bad_samples,
        bad_sample_examples,
        sources: check_sources(r.sources)?,
        busy_seconds: r.busy_seconds,
        data_wait_share: r.data_wait_share,
    })
}
