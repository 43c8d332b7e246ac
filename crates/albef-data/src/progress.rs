//! Progress of the libraries' long work (generating a dataset, indexing sources, evaluating,
//! storing a checkpoint), shown by the program that runs it. A binary installs one [`Reporter`]
//! for the process ([`show_on_stderr`]: a bar on a terminal, plain lines otherwise); without one,
//! reporting does nothing. A process-wide hook rather than a parameter: this work is reached
//! through several layers (`albef train` generates its data on first use) that have no say in how
//! it is shown.

use indicatif::{FormattedDuration, HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a piece of work counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    /// Things done (pictures, sources, samples); the work ends with a line saying how many and
    /// how long.
    Items,
    /// Bytes moved (a checkpoint's upload), shown with their rate. Its owner logs the outcome, so
    /// the display ends without a trace, and work done before the first line shows nothing.
    Bytes,
}

/// Shows pieces of work as they advance.
pub trait Reporter: Send + Sync {
    /// `what` starts, `total` units long; the meter it returns advances as units complete and is
    /// dropped when the work ends, done or not.
    fn start(&self, what: &str, total: u64, units: Units) -> Box<dyn Meter>;
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

/// Starts reporting `what`, `total` items long.
pub fn start(what: &str, total: u64) -> Progress {
    start_in(what, total, Units::Items)
}

/// Starts reporting `what`, `total` units long.
pub fn start_in(what: &str, total: u64, units: Units) -> Progress {
    Progress(REPORTER.get().map(|r| r.start(what, total, units)))
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

/// How often a plain line reports work still going on.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// Makes this process's library work show its progress on stderr: with `bars` (a terminal that
/// nothing else writes to meanwhile) a bar per piece of work, else a plain line every
/// [`LINE_EVERY`] (and one at the end of counted items).
pub fn show_on_stderr(bars: bool) {
    install(Box::new(Stderr { bars }));
}

struct Stderr {
    bars: bool,
}

impl Reporter for Stderr {
    fn start(&self, what: &str, total: u64, units: Units) -> Box<dyn Meter> {
        if self.bars {
            let template = match units {
                Units::Items => "{msg}: [{bar:30}] {pos}/{len}, elapsed {elapsed_precise}, eta {eta}",
                Units::Bytes => "{msg}: [{bar:30}] {bytes}/{total_bytes}, {bytes_per_sec}, eta {eta}",
            };
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            Box::new(Bar { bar, units })
        } else {
            Box::new(Lines::new(what, total, units, LINE_EVERY, Box::new(std::io::stderr())))
        }
    }
}

struct Bar {
    bar: ProgressBar,
    units: Units,
}

impl Meter for Bar {
    fn advance(&mut self, units: u64) {
        self.bar.inc(units);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        let done = self.bar.length().is_some_and(|len| self.bar.position() >= len);
        match (self.units, done) {
            (Units::Bytes, _) => return self.bar.finish_and_clear(),
            (Units::Items, true) => self.bar.finish(),
            // Work that failed stays where it stopped.
            (Units::Items, false) => self.bar.abandon(),
        }
        // indicatif leaves the cursor at the end of the bar: what is printed next starts below it.
        eprintln!();
    }
}

struct Lines {
    what: String,
    total: u64,
    units: Units,
    done: u64,
    every: Duration,
    started: Instant,
    printed: Instant,
    out: Box<dyn Write + Send>,
}

impl Lines {
    fn new(what: &str, total: u64, units: Units, every: Duration, out: Box<dyn Write + Send>) -> Self {
        let now = Instant::now();
        Lines { what: what.to_string(), total, units, done: 0, every, started: now, printed: now, out }
    }

    /// `n` in the work's units.
    fn amount(&self, n: u64) -> String {
        match self.units {
            Units::Items => n.to_string(),
            Units::Bytes => HumanBytes(n).to_string(),
        }
    }
}

impl Meter for Lines {
    fn advance(&mut self, units: u64) {
        self.done += units;
        if self.printed.elapsed() < self.every || !(1..self.total).contains(&self.done) {
            return;
        }
        self.printed = Instant::now();
        let elapsed = self.started.elapsed();
        let rate = match self.units {
            Units::Items => String::new(),
            Units::Bytes => format!(", {}/s", HumanBytes((self.done as f64 / elapsed.as_secs_f64()) as u64)),
        };
        let eta = elapsed.mul_f64((self.total - self.done) as f64 / self.done as f64);
        let line = format!(
            "{}: {}/{} ({:.0}%){rate}, elapsed {}, eta {}",
            self.what,
            self.amount(self.done),
            self.amount(self.total),
            100.0 * self.done as f64 / self.total as f64,
            FormattedDuration(elapsed),
            FormattedDuration(eta)
        );
        let _ = writeln!(self.out, "{line}");
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if self.units == Units::Items {
            let (done, total) = (self.amount(self.done), self.amount(self.total));
            let took = FormattedDuration(self.started.elapsed());
            let _ = writeln!(self.out, "{}: {done}/{total} in {took}", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose text the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap().lines().map(String::from).collect()
        }
    }

    /// Lines at every advance (no wait between them), and what ends each kind of work.
    fn shown(units: Units, every: Duration) -> Vec<String> {
        let out = Captured::default();
        let mut lines = Lines::new("work", 3 << 20, units, every, Box::new(out.clone()));
        lines.advance(1 << 20);
        lines.advance(1 << 20);
        lines.advance(1 << 20);
        drop(lines);
        out.lines()
    }

    #[test]
    fn byte_lines_tell_amounts_and_rate_and_end_without_a_line() {
        let lines = shown(Units::Bytes, Duration::ZERO);
        assert_eq!(lines.len(), 2, "one a period while not done, none at the end: {lines:?}");
        assert!(lines[0].starts_with("work: 1.00 MiB/3.00 MiB (33%), "), "{lines:?}");
        assert!(lines[1].starts_with("work: 2.00 MiB/3.00 MiB (67%), "), "{lines:?}");
        assert!(lines.iter().all(|l| l.contains("/s, elapsed ") && l.contains(", eta ")), "{lines:?}");
    }

    #[test]
    fn quick_work_shows_nothing_but_the_end_of_items() {
        assert!(shown(Units::Bytes, Duration::from_secs(3600)).is_empty());
        let items = shown(Units::Items, Duration::from_secs(3600));
        assert_eq!(items.len(), 1, "{items:?}");
        assert!(items[0].starts_with("work: 3145728/3145728 in "), "{items:?}");
    }
}
