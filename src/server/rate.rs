//! The measured service rate (requests finished per second over a recent window) and the
//! `Retry-After` a 429 derives from it: the time the waiting queue needs to drain at that rate,
//! rounded up and kept within 1..=60 s.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back finished requests count.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Bounds of `Retry-After`, in seconds.
pub const RETRY_AFTER_MIN: u64 = 1;
pub const RETRY_AFTER_MAX: u64 = 60;
/// Most finish times kept (the rate saturates beyond this many per window).
const KEEP: usize = 4096;

/// Finish times of recent requests.
#[derive(Debug)]
pub struct ServiceRate {
    started: Instant,
    done: Mutex<VecDeque<Instant>>,
}

impl ServiceRate {
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    fn starting_at(started: Instant) -> Self {
        Self {
            started,
            done: Mutex::new(VecDeque::new()),
        }
    }

    /// Records one finished request (completed or failed after it was admitted).
    pub fn finished(&self) {
        self.finished_at(Instant::now());
    }

    fn finished_at(&self, t: Instant) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        d.push_back(t);
        while d.len() > KEEP {
            d.pop_front();
        }
    }

    /// Requests finished per second over the window (over the uptime while it is shorter).
    pub fn per_second_at(&self, now: Instant) -> f64 {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while d
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > WINDOW)
        {
            d.pop_front();
        }
        let span = now
            .saturating_duration_since(self.started)
            .min(WINDOW)
            .max(Duration::from_secs(1));
        d.len() as f64 / span.as_secs_f64()
    }

    /// Seconds a client refused with 429 should wait: `waiting / rate`, rounded up, within
    /// 1..=60. Nothing finished in the window: 1 s during the first window after start-up (no
    /// measurement yet), else 60 s (the queue is not moving).
    pub fn retry_after_at(&self, waiting: usize, now: Instant) -> u64 {
        let rate = self.per_second_at(now);
        if rate <= 0.0 {
            return match now.saturating_duration_since(self.started) < WINDOW {
                true => RETRY_AFTER_MIN,
                false => RETRY_AFTER_MAX,
            };
        }
        let secs = ((waiting.max(1) as f64) / rate).ceil();
        (secs as u64).clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX)
    }

    pub fn retry_after(&self, waiting: usize) -> u64 {
        self.retry_after_at(waiting, Instant::now())
    }
}

impl Default for ServiceRate {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_follows_queue_over_rate_within_bounds() {
        let t0 = Instant::now();
        let r = ServiceRate::starting_at(t0);
        // Nothing measured yet, shortly after start: 1 s.
        assert_eq!(r.retry_after_at(100, t0 + Duration::from_secs(5)), 1);
        // Nothing finished in a whole window: the queue is stuck.
        assert_eq!(r.retry_after_at(100, t0 + Duration::from_secs(100)), 60);
        // 60 finished over the last 30 s: 2/s; 10 waiting → 5 s.
        let now = t0 + Duration::from_secs(100);
        for i in 0..60 {
            r.finished_at(now - Duration::from_millis(500 * i));
        }
        assert!((r.per_second_at(now) - 2.0).abs() < 1e-9);
        assert_eq!(r.retry_after_at(10, now), 5);
        assert_eq!(r.retry_after_at(11, now), 6);
        assert_eq!(r.retry_after_at(0, now), 1);
        assert_eq!(r.retry_after_at(1_000_000, now), 60);
        // Old finishes leave the window.
        assert_eq!(r.per_second_at(now + Duration::from_secs(60)), 0.0);
        // Within the first window the rate is over the uptime.
        let r = ServiceRate::starting_at(t0);
        for _ in 0..10 {
            r.finished_at(t0 + Duration::from_secs(4));
        }
        assert!((r.per_second_at(t0 + Duration::from_secs(5)) - 2.0).abs() < 1e-9);
        assert_eq!(r.retry_after_at(40, t0 + Duration::from_secs(5)), 20);
    }
}
