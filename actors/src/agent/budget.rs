//! Trigger rate limits: triggers per minute per user and per room, counted on this node in a
//! sliding window (a cluster of N nodes allows up to N times the limit; token budgets per day
//! are counted in the store's usage ledger and hold cluster-wide).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct TriggerLimiter {
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl TriggerLimiter {
    /// Records a trigger for every key if each is under its limit; otherwise records nothing
    /// and names the first key over its limit.
    pub fn try_acquire(&self, keys: &[(&str, u32)]) -> Result<(), String> {
        self.try_acquire_at(keys, Instant::now())
    }

    fn try_acquire_at(&self, keys: &[(&str, u32)], now: Instant) -> Result<(), String> {
        let Ok(mut hits) = self.hits.lock() else {
            return Ok(()); // poisoned by a panic elsewhere: do not block every trigger
        };
        for (key, limit) in keys {
            let window = hits.entry((*key).to_owned()).or_default();
            while window
                .front()
                .is_some_and(|at| now.duration_since(*at) >= WINDOW)
            {
                window.pop_front();
            }
            if window.len() as u32 >= *limit {
                return Err((*key).to_owned());
            }
        }
        for (key, _) in keys {
            hits.entry((*key).to_owned()).or_default().push_back(now);
        }
        if hits.len() > 10_000 {
            hits.retain(|_, window| {
                window
                    .back()
                    .is_some_and(|at| now.duration_since(*at) < WINDOW)
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_window_and_a_refusal_records_nothing() {
        let limiter = TriggerLimiter::default();
        let start = Instant::now();
        assert!(limiter
            .try_acquire_at(&[("user:a", 2), ("room:r", 3)], start)
            .is_ok());
        assert!(limiter
            .try_acquire_at(&[("user:a", 2), ("room:r", 3)], start)
            .is_ok());
        assert_eq!(
            limiter.try_acquire_at(&[("user:a", 2), ("room:r", 3)], start),
            Err("user:a".into())
        );
        assert!(limiter
            .try_acquire_at(&[("user:b", 2), ("room:r", 3)], start)
            .is_ok());
        assert_eq!(
            limiter.try_acquire_at(&[("user:c", 2), ("room:r", 3)], start),
            Err("room:r".into())
        );
        assert!(limiter
            .try_acquire_at(&[("user:a", 2), ("room:r", 3)], start + WINDOW)
            .is_ok());
    }
}
