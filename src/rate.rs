//! Token buckets: one per WebSocket connection, and a keyed set for HTTP callers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Holds up to `burst` tokens, refilled at `per_s`; each accepted request takes one.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    per_s: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub fn new(per_s: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        Self {
            per_s,
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    pub fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_s).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens + elapsed * self.per_s >= self.burst
    }
}

/// Buckets by key (user id, peer address), forgetting full ones when the map grows.
pub struct KeyedLimiter {
    per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

const FORGET_ABOVE: usize = 10_000;

impl KeyedLimiter {
    pub fn new(per_s: f64, burst: f64) -> Self {
        Self {
            per_s,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, key: &str) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            // A panic elsewhere poisoned the map: fail open rather than refuse everyone.
            return true;
        };
        let now = Instant::now();
        if buckets.len() > FORGET_ABOVE {
            buckets.retain(|_, bucket| !bucket.is_full_at(now));
        }
        buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(self.per_s, self.burst))
            .try_take_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0);
        bucket.refilled = start;
        assert!((0..3).all(|_| bucket.try_take_at(start)));
        assert!(!bucket.try_take_at(start));
        assert!(!bucket.try_take_at(start + Duration::from_millis(50)));
        assert!(bucket.try_take_at(start + Duration::from_millis(160)));
    }

    #[test]
    fn keys_have_separate_buckets() {
        let limiter = KeyedLimiter::new(0.0, 1.0);
        assert!(limiter.allow("a"));
        assert!(!limiter.allow("a"));
        assert!(limiter.allow("b"));
    }
}
