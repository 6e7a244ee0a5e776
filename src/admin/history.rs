//! The last ten minutes of totals, sampled every five seconds, for the status page's chart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::delivery::now_ms;
use crate::metrics::{totals, TotalsSnapshot};
use crate::store::Millis;

const EVERY: Duration = Duration::from_secs(5);
const KEEP: usize = 120;

/// Totals at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Sample {
    /// When (ms since the epoch).
    pub t: Millis,
    /// The running totals then.
    #[serde(flatten)]
    pub totals: TotalsSnapshot,
}

/// A bounded ring of samples. A std mutex: each use pushes or copies a few entries.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Adds a sample, forgetting the oldest beyond ten minutes.
    pub fn record(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The recorded samples, oldest first, followed by one taken now.
    pub fn with_now(&self) -> Vec<Sample> {
        let mut out: Vec<Sample> = self.samples.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        out.push(Sample { t: now_ms(), totals: totals() });
        out
    }

    /// Samples every five seconds until `shutdown`.
    pub async fn sample_until(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.record(Sample { t: now_ms(), totals: totals() }),
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_ten_minutes_and_ends_with_now() {
        let history = History::default();
        for t in 0..(KEEP as u64 + 5) {
            history.record(Sample { t, totals: TotalsSnapshot::default() });
        }
        let samples = history.with_now();
        assert_eq!(samples.len(), KEEP + 1);
        assert_eq!(samples[0].t, 5);
        assert!(samples[KEEP].t > 1_000_000, "the last sample is taken now");
    }
}
