//! Learning rate and distillation weight as functions of the position in training.

use albef_config::ScheduleConfig;

#[derive(Clone, Debug)]
pub struct Schedule {
    cfg: ScheduleConfig,
    alpha: f64,
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig, alpha: f64) -> Self {
        Schedule { cfg: cfg.clone(), alpha }
    }

    /// Linear warm-up from warmup_lr to lr over the first warmup_steps iterations, then the
    /// reference's per-epoch cosine from lr (epoch 0) towards min_lr (epoch `epochs`).
    pub fn lr(&self, step: u64, epoch: u64) -> f64 {
        let c = &self.cfg;
        if step < c.warmup_steps {
            return c.warmup_lr + (c.lr - c.warmup_lr) * step as f64 / c.warmup_steps as f64;
        }
        let progress = (epoch as f64 / c.epochs.max(1) as f64).min(1.0);
        c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// alpha ramps up linearly over the first epoch, then stays (reference: alpha * min(1, i/len)),
    /// unless `alpha_warm_up` is off.
    pub fn alpha(&self, epoch: u64, step_in_epoch: u64, steps_per_epoch: u64) -> f64 {
        if epoch > 0 || !self.cfg.alpha_warm_up {
            self.alpha
        } else {
            self.alpha * (step_in_epoch as f64 / steps_per_epoch.max(1) as f64).min(1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Schedule {
        Schedule::new(&ScheduleConfig::default(), 0.4)
    }

    #[test]
    fn warms_up_linearly_then_follows_the_cosine_by_epoch() {
        let s = reference();
        assert_eq!(s.lr(0, 0), 1e-5);
        assert!((s.lr(1000, 0) - 5.5e-5).abs() < 1e-12);
        assert_eq!(s.lr(2000, 0), 1e-4);
        assert_eq!(s.lr(5000, 0), 1e-4, "the rest of epoch 0 stays at the peak");
        assert!((s.lr(9999, 15) - 5.5e-5).abs() < 1e-12, "half-way down at half the epochs");
        assert!((s.lr(9999, 30) - 1e-5).abs() < 1e-12);
        assert!((s.lr(9999, 40) - 1e-5).abs() < 1e-12, "no rebound past the last epoch");
        let mut last = f64::INFINITY;
        for e in 0..=30 {
            assert!(s.lr(1_000_000, e) <= last);
            last = s.lr(1_000_000, e);
        }
    }

    #[test]
    fn alpha_ramps_over_the_first_epoch() {
        let s = reference();
        assert_eq!(s.alpha(0, 0, 100), 0.0);
        let flat = Schedule::new(&ScheduleConfig { alpha_warm_up: false, ..ScheduleConfig::default() }, 0.4);
        assert_eq!(flat.alpha(0, 0, 100), 0.4, "no warm-up: alpha from the first step");
        assert!((s.alpha(0, 50, 100) - 0.2).abs() < 1e-12);
        assert_eq!(s.alpha(0, 100, 100), 0.4);
        assert_eq!(s.alpha(3, 0, 100), 0.4);
    }
}
