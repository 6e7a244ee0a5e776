//! Per-site rate limits on `POST /send`: a token bucket per site, refilled at
//! `rate_limit_per_sec` up to `rate_limit_burst`. A request without a token gets `429` with
//! `Retry-After`. Settings are read from the site at each request, so a reload applies them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SiteConfig;

/// The buckets, by site. A std mutex: each check is a few arithmetic operations.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// Takes a token for `site` at `now`, or says how long until one is available.
    pub fn check(&self, site: &SiteConfig, now: Instant) -> Result<(), Duration> {
        if site.rate_limit_per_sec == 0 {
            return Ok(());
        }
        let (rate, burst) = (f64::from(site.rate_limit_per_sec), f64::from(site.rate_limit_burst));
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(site.name.clone()).or_insert(Bucket { tokens: burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn site(rate: u32, burst: u32) -> SiteConfig {
        let text = format!(
            "[sites.s]\nauth_url = \"http://a.test\"\napi_key = \"k\"\nrate_limit_per_sec = {rate}\nrate_limit_burst = {burst}\n"
        );
        Config::from_toml(&text).unwrap().sites["s"].clone()
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies() {
        let limiter = RateLimiter::default();
        let (s, t0) = (site(10, 3), Instant::now());
        for _ in 0..3 {
            assert!(limiter.check(&s, t0).is_ok());
        }
        let wait = limiter.check(&s, t0).unwrap_err();
        assert!(wait > Duration::from_millis(99) && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.check(&s, t0 + Duration::from_millis(100)).is_ok());
        assert!(limiter.check(&s, t0 + Duration::from_millis(100)).is_err());
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check(&s, later).is_ok());
        }
        assert!(limiter.check(&s, later).is_err());
    }

    #[test]
    fn zero_means_unlimited_and_sites_have_their_own_buckets() {
        let limiter = RateLimiter::default();
        let now = Instant::now();
        for _ in 0..10_000 {
            assert!(limiter.check(&site(0, 1), now).is_ok());
        }
        let mut other = site(1, 1);
        assert!(limiter.check(&other, now).is_ok());
        other.name = "t".into();
        assert!(limiter.check(&other, now).is_ok());
    }
}
