//! The loader's memory budget (`data.memory_budget_mb`): what the input makes it hold is counted
//! against it, whatever the input.
//!
//! A quarter holds encoded samples kept for the shuffle window (a sample that does not fit is
//! dropped after reading and read again when its step is handed out), a quarter the samples of
//! steps queued to or being decoded (the reader waits for room), and half the decoded pixels on
//! the decode threads (a decoder waits for room before it allocates an image). A sample whose
//! encoded bytes exceed its quarter, or whose decoded pixels exceed the half, is skipped as
//! `over_budget`: it could never fit, and waiting for it would hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Encoded bytes assumed per sample of the shuffle window when the budget is derived (a web
/// JPEG of a few hundred pixels and its caption, with room to spare).
const WINDOW_SAMPLE_BYTES: u64 = 128 << 10;

/// The derived budget (`data.memory_budget_mb: 0`): twice the larger of a window of typical
/// samples and `max_member_bytes` for each step queued or decoded (`prefetch` + 2 per thread);
/// the same again for decoded pixels.
pub fn derived_budget(window: u64, max_member_bytes: u64, prefetch: usize, threads: usize) -> u64 {
    let in_flight = (prefetch as u64 + 2 * threads as u64).saturating_mul(max_member_bytes);
    window.saturating_mul(WINDOW_SAMPLE_BYTES).max(in_flight).saturating_mul(2)
}

/// The three shares of a loader's budget.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    /// Encoded samples held for the shuffle window.
    pub window: Arc<Share>,
    /// Encoded samples of steps queued to decoders or being decoded.
    pub queued: Arc<Share>,
    /// Decoded pixels on the decode threads.
    pub pixels: Arc<Share>,
}

impl MemoryBudget {
    pub fn new(total: u64) -> Self {
        MemoryBudget { window: Share::new(total / 4), queued: Share::new(total / 4), pixels: Share::new(total / 2) }
    }
}

/// Bytes counted against a limit.
#[derive(Debug)]
pub struct Share {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Share {
    pub fn new(limit: u64) -> Arc<Share> {
        Arc::new(Share { limit, used: Mutex::new(0), freed: Condvar::new() })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// `bytes` now if they fit beside what is held; None otherwise.
    pub fn try_take(self: &Arc<Self>, bytes: u64) -> Option<Grant> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        (*used + bytes <= self.limit).then(|| {
            *used += bytes;
            Grant { share: self.clone(), bytes }
        })
    }

    /// `bytes`, once they fit (held ones are released as their steps are decoded); None when
    /// they never can (over the limit) or `stop` is set while waiting.
    pub fn take(self: &Arc<Self>, bytes: u64, stop: &AtomicBool) -> Option<Grant> {
        if bytes > self.limit {
            return None;
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + bytes > self.limit {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            used = self.freed.wait_timeout(used, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
        *used += bytes;
        Some(Grant { share: self.clone(), bytes })
    }
}

/// Bytes held against a share until dropped.
#[derive(Debug)]
pub struct Grant {
    share: Arc<Share>,
    bytes: u64,
}

impl Drop for Grant {
    fn drop(&mut self) {
        *self.share.used.lock().unwrap_or_else(|e| e.into_inner()) -= self.bytes;
        self.share.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_wait_for_room_and_refuse_what_never_fits() {
        let share = Share::new(100);
        let stop = AtomicBool::new(false);
        let a = share.try_take(60).unwrap();
        assert!(share.try_take(50).is_none(), "60 + 50 is over 100");
        assert!(share.take(101, &stop).is_none(), "never fits: refused, not waited on");
        let waiter = {
            let share = share.clone();
            std::thread::spawn(move || share.take(50, &AtomicBool::new(false)).map(|g| g.bytes))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "waits while 60 are held");
        drop(a);
        assert_eq!(waiter.join().unwrap(), Some(50));
        assert_eq!(*share.used.lock().unwrap(), 0, "released with the grant");
        stop.store(true, Ordering::Relaxed);
        let _held = share.try_take(100).unwrap();
        assert!(share.take(1, &stop).is_none(), "a stopped loader does not wait");
    }
}
