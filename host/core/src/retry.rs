//! Exponential backoff with full jitter, for transient faults (a publish that fails, a
//! server that went away, a store that cannot write).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

/// The first retry waits up to this long.
const FIRST_DELAY: Duration = Duration::from_millis(50);
/// No retry waits longer than this: a healed fault (a cluster that elected a new leader, a
/// disk with room again) is noticed within a second. A retry costs the server one request.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Delays for successive retries: each up to twice the last, capped, chosen uniformly at
/// random below that ceiling so that many hosts do not retry in lockstep.
pub struct Backoff {
    ceiling: Duration,
    rng_state: u64,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Backoff {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Backoff {
            ceiling: FIRST_DELAY,
            // xorshift must not start at zero.
            rng_state: seed | 1,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.rng_state ^= self.rng_state << 13;
        self.rng_state ^= self.rng_state >> 7;
        self.rng_state ^= self.rng_state << 17;
        let fraction = (self.rng_state >> 11) as f64 / (1u64 << 53) as f64;
        let delay = self.ceiling.mul_f64(0.5 + fraction / 2.0);
        self.ceiling = (self.ceiling * 2).min(MAX_DELAY);
        delay
    }
}

/// Sleeps for `delay`; returns false, early, if `shutdown` fires first.
pub async fn sleep_unless_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_jittered_and_capped() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= FIRST_DELAY / 2 && delays[0] <= FIRST_DELAY);
        assert!(delays[3] >= FIRST_DELAY * 4 && delays[3] <= FIRST_DELAY * 8);
        assert!(delays.iter().all(|d| *d <= MAX_DELAY));
        assert!(delays[19] >= MAX_DELAY / 2);
    }
}
