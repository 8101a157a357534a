//! Latency histograms (microseconds), shipped between worker processes as (value, count) pairs.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Hist {
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn to_pairs(&self) -> Value {
        let pairs: Vec<(u64, u64)> = self
            .0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        json!(pairs)
    }

    pub fn merge_pairs(&mut self, pairs: &Value) {
        if let Some(list) = pairs.as_array() {
            for pair in list {
                if let (Some(v), Some(c)) = (pair[0].as_u64(), pair[1].as_u64()) {
                    let _ = self.0.record_n(v.max(1), c);
                }
            }
        }
    }

    /// count, p50, p99, p999, max, mean: in milliseconds.
    pub fn summary_ms(&self) -> Value {
        if self.0.is_empty() {
            return json!({"count": 0});
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "count": self.0.len(),
            "p50_ms": ms(self.0.value_at_quantile(0.50)),
            "p90_ms": ms(self.0.value_at_quantile(0.90)),
            "p99_ms": ms(self.0.value_at_quantile(0.99)),
            "p999_ms": ms(self.0.value_at_quantile(0.999)),
            "max_ms": ms(self.0.max()),
            "mean_ms": (self.0.mean() / 1000.0 * 1000.0).round() / 1000.0,
        })
    }
}
