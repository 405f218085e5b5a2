//! The learning rate of each optimizer step, as NeMo's schedulers (`nemo/core/optim/lr_scheduler.py`) compute it
//! for `model.optim.sched`. Step `k` (0-based) is the scheduler's `last_epoch`: PyTorch Lightning steps the scheduler
//! after every optimizer step, so the k-th update uses the rate computed at `last_epoch = k`.
//!
//! - Warmup (every policy): for `k <= warmup` (when warmup > 0) the rate is `lr * (k + 1) / (warmup + 1)`.
//! - Past `trainer.max_steps` (when set) every policy gives `min_lr`.
//! - `WarmupPolicy`, `WarmupHoldPolicy`: `lr` after the warmup (the hold keeps `lr`, which a constant policy keeps
//!   anyway).
//! - `CosineAnnealing`: `min_lr + (lr - min_lr) * (1 + cos(pi * (k - warmup) / (max_steps - warmup))) / 2`.
//! - `warmup_ratio` / `hold_ratio` are `int(ratio * max_steps)` steps; `hold_steps` counts after the warmup.

use crate::error::{Error, Result};
use crate::io::config::{SchedConfig, SchedulerName};

/// A validated schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    base: f64,
    name: Option<SchedulerName>,
    warmup: u64,
    hold_end: u64,
    max_steps: Option<u64>,
    min_lr: f64,
}

fn steps_of(what: &str, steps: Option<u64>, ratio: Option<f64>, max_steps: Option<u64>) -> Result<u64> {
    match (steps, ratio) {
        (Some(_), Some(_)) => Err(Error::msg(format!(
            "model.optim.sched: give {what}_steps or {what}_ratio, not both (NeMo refuses both)"
        ))),
        (Some(s), None) => Ok(s),
        (None, Some(r)) => {
            let max = max_steps.ok_or_else(|| {
                Error::msg(format!("model.optim.sched.{what}_ratio needs trainer.max_steps (a ratio of what?)"))
            })?;
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::msg(format!("model.optim.sched.{what}_ratio is {r}; it must be within [0, 1]")));
            }
            // Python's int() of a non-negative float truncates.
            Ok((r * max as f64) as u64)
        }
        (None, None) => Ok(0),
    }
}

impl LrSchedule {
    /// The schedule of `model.optim` (`sched: null` is the constant rate `lr`).
    pub fn new(lr: f64, sched: Option<&SchedConfig>, max_steps: Option<u64>) -> Result<LrSchedule> {
        let Some(s) = sched else {
            return Ok(LrSchedule { base: lr, name: None, warmup: 0, hold_end: 0, max_steps, min_lr: 0.0 });
        };
        let warmup = steps_of("warmup", s.warmup_steps, s.warmup_ratio, max_steps)?;
        let hold = steps_of("hold", s.hold_steps, s.hold_ratio, max_steps)?;
        if s.name == SchedulerName::CosineAnnealing {
            let max = max_steps.ok_or_else(|| {
                Error::msg("model.optim.sched.name CosineAnnealing needs trainer.max_steps (the step it decays to)")
            })?;
            if max <= warmup {
                return Err(Error::msg(format!(
                    "model.optim.sched: CosineAnnealing's warmup ({warmup} steps) must end before trainer.max_steps \
                     ({max})"
                )));
            }
            if lr < s.min_lr {
                return Err(Error::msg(format!(
                    "model.optim.sched.min_lr ({}) is above model.optim.lr ({lr}); NeMo's CosineAnnealing refuses it",
                    s.min_lr
                )));
            }
        }
        if hold > 0 && s.name != SchedulerName::WarmupHoldPolicy {
            return Err(Error::msg(format!(
                "model.optim.sched.hold_steps / hold_ratio belong to WarmupHoldPolicy, not {:?}",
                s.name
            )));
        }
        Ok(LrSchedule {
            base: lr,
            name: Some(s.name),
            warmup,
            hold_end: if hold > 0 { hold + warmup } else { 0 },
            max_steps,
            min_lr: s.min_lr,
        })
    }

    /// The rate of optimizer step `k` (0-based).
    pub fn at(&self, k: u64) -> f64 {
        let Some(name) = self.name else { return self.base };
        if self.warmup > 0 && k <= self.warmup {
            return self.base * (k + 1) as f64 / (self.warmup + 1) as f64;
        }
        if name == SchedulerName::WarmupHoldPolicy && k < self.hold_end {
            return self.base;
        }
        match self.max_steps {
            Some(max) if k > max => self.min_lr,
            Some(max) if name == SchedulerName::CosineAnnealing => {
                let t = (k - self.warmup) as f64 / (max - self.warmup) as f64;
                self.min_lr + (self.base - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            _ => self.base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(name: SchedulerName, warmup: Option<u64>, min_lr: f64) -> SchedConfig {
        SchedConfig { name, warmup_steps: warmup, min_lr, ..Default::default() }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-12)
    }

    /// Values worked out by hand from NeMo's formulas (lr 1e-3, warmup 2, max_steps 10, min_lr 1e-4).
    #[test]
    fn cosine_annealing_follows_nemo() {
        let s = LrSchedule::new(1e-3, Some(&sched(SchedulerName::CosineAnnealing, Some(2), 1e-4)), Some(10)).unwrap();
        let want = [
            (0, 1e-3 / 3.0),
            (1, 2e-3 / 3.0),
            (2, 1e-3),
            // k = 3: 1e-4 + 9e-4 * (1 + cos(pi / 8)) / 2
            (3, 1e-4 + 9e-4 * (1.0 + 0.923_879_532_511_286_7) / 2.0),
            (6, 1e-4 + 9e-4 * 0.5),
            (10, 1e-4),
            (11, 1e-4),
        ];
        for (k, v) in want {
            assert!(close(s.at(k), v), "step {k}: {} vs {v}", s.at(k));
        }
    }

    #[test]
    fn warmup_policies_follow_nemo() {
        let w = LrSchedule::new(1e-3, Some(&sched(SchedulerName::WarmupPolicy, Some(4), 0.0)), Some(100)).unwrap();
        assert!(close(w.at(0), 1e-3 / 5.0) && close(w.at(4), 1e-3) && close(w.at(5), 1e-3));
        assert_eq!(w.at(101), 0.0, "past max_steps: min_lr");
        let mut c = sched(SchedulerName::WarmupHoldPolicy, None, 0.0);
        c.warmup_ratio = Some(0.05);
        c.hold_steps = Some(10);
        let h = LrSchedule::new(2e-4, Some(&c), Some(100)).unwrap();
        // int(0.05 * 100) = 5 warmup steps.
        assert!(close(h.at(0), 2e-4 / 6.0) && close(h.at(5), 2e-4) && close(h.at(14), 2e-4) && close(h.at(50), 2e-4));
        let none = LrSchedule::new(3e-5, None, None).unwrap();
        assert_eq!(none.at(12345), 3e-5);
    }

    #[test]
    fn contradictions_are_refused() {
        let mut both = sched(SchedulerName::WarmupPolicy, Some(3), 0.0);
        both.warmup_ratio = Some(0.1);
        assert!(LrSchedule::new(1e-3, Some(&both), Some(10)).unwrap_err().to_string().contains("not both"));
        let ratio = SchedConfig { warmup_ratio: Some(0.1), ..Default::default() };
        assert!(LrSchedule::new(1e-3, Some(&ratio), None).unwrap_err().to_string().contains("max_steps"));
        let cos = sched(SchedulerName::CosineAnnealing, None, 1e-2);
        assert!(LrSchedule::new(1e-3, Some(&cos), Some(10)).unwrap_err().to_string().contains("min_lr"));
        assert!(LrSchedule::new(1e-3, Some(&sched(SchedulerName::CosineAnnealing, None, 0.0)), None).is_err());
        let mut hold = sched(SchedulerName::CosineAnnealing, None, 0.0);
        hold.hold_steps = Some(3);
        assert!(LrSchedule::new(1e-3, Some(&hold), Some(10)).unwrap_err().to_string().contains("WarmupHoldPolicy"));
    }
}
