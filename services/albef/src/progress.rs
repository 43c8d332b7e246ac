//! How `albef` shows the libraries' long work (`albef_data::progress`: generating and indexing
//! data, evaluating): a bar on a terminal; otherwise (logs, CI) a plain line every
//! [`LINE_EVERY`] and one at the end.

use albef_data::progress::{Meter, Reporter};
use indicatif::{FormattedDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a plain line reports work still going on.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// Makes this process's library work show its progress on stderr.
pub fn install() {
    albef_data::progress::install(Box::new(Stderr { terminal: std::io::stderr().is_terminal() }));
}

struct Stderr {
    terminal: bool,
}

impl Reporter for Stderr {
    fn start(&self, what: &str, total: u64) -> Box<dyn Meter> {
        if self.terminal {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{msg}: [{bar:30}] {pos}/{len}, elapsed {elapsed_precise}, eta {eta}")
                    .expect("a valid template")
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            Box::new(Bar(bar))
        } else {
            let now = Instant::now();
            Box::new(Lines { what: what.to_string(), total, done: 0, started: now, printed: now })
        }
    }
}

struct Bar(ProgressBar);

impl Meter for Bar {
    fn advance(&mut self, units: u64) {
        self.0.inc(units);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // Work that failed stays where it stopped.
        if self.0.length().is_some_and(|len| self.0.position() >= len) {
            self.0.finish()
        } else {
            self.0.abandon()
        }
        // indicatif leaves the cursor at the end of the bar: what is printed next starts below it.
        eprintln!();
    }
}

struct Lines {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    printed: Instant,
}

impl Meter for Lines {
    fn advance(&mut self, units: u64) {
        self.done += units;
        if self.printed.elapsed() >= LINE_EVERY && (1..self.total).contains(&self.done) {
            self.printed = Instant::now();
            let elapsed = self.started.elapsed();
            let eta = elapsed.mul_f64((self.total - self.done) as f64 / self.done as f64);
            eprintln!(
                "{}: {}/{} ({:.0}%), elapsed {}, eta {}",
                self.what,
                self.done,
                self.total,
                100.0 * self.done as f64 / self.total as f64,
                FormattedDuration(elapsed),
                FormattedDuration(eta)
            );
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        eprintln!("{}: {}/{} in {}", self.what, self.done, self.total, FormattedDuration(self.started.elapsed()));
    }
}
