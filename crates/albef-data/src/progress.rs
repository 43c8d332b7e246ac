//! Progress of the libraries' long work (generating a dataset, indexing sources, evaluating),
//! shown by the program that runs it. A binary installs one [`Reporter`] for the process (the
//! `albef` CLI: a bar on a terminal, log lines otherwise); without one, reporting does nothing.
//! A process-wide hook rather than a parameter: this work is reached through several layers
//! (`albef train` generates its data on first use) that have no say in how it is shown.

use std::sync::OnceLock;

/// Shows pieces of work as they advance.
pub trait Reporter: Send + Sync {
    /// `what` starts, `total` units long; the meter it returns advances as units complete and is
    /// dropped when the work ends, done or not.
    fn start(&self, what: &str, total: u64) -> Box<dyn Meter>;
}

/// One piece of work being shown.
pub trait Meter: Send {
    fn advance(&mut self, units: u64);
}

static REPORTER: OnceLock<Box<dyn Reporter>> = OnceLock::new();

/// Installs the process's reporter; false when one is installed already.
pub fn install(reporter: Box<dyn Reporter>) -> bool {
    REPORTER.set(reporter).is_ok()
}

/// Starts reporting `what`, `total` units long.
pub fn start(what: &str, total: u64) -> Progress {
    Progress(REPORTER.get().map(|r| r.start(what, total)))
}

/// A piece of work being reported; it ends when dropped.
pub struct Progress(Option<Box<dyn Meter>>);

impl Progress {
    pub fn advance(&mut self, units: u64) {
        if let Some(meter) = &mut self.0 {
            meter.advance(units);
        }
    }
}
