//! The Cloud Map call budget of this replica: a token bucket every Cloud Map
//! call draws from, and the poll cadence that keeps the steady load under it.
//!
//! Cloud Map's quotas are per account and Region and shared with every other
//! user of the account (DiscoverInstances: 1,000/s steady, 2,000 burst;
//! DiscoverInstancesRevision: 3,000/s). Without a budget the calls grow as
//! services × replicas, all polling in step. With one, each replica spends at
//! most `rate` calls per second: the watchers stretch their poll intervals
//! as the service count grows ([`Budget::stretch`]) so the steady load stays
//! at [`STEADY_SHARE`] of the budget, and the remaining headroom absorbs reads
//! on change, listings and first reads. When calls still queue, those for
//! services with subscribers go first ([`Priority::Subscribed`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Fraction of the budget the steady polling of all services may use.
pub const STEADY_SHARE: f64 = 0.8;

/// Who a call is for, when calls have to wait for the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A service some client subscribes to: what clients see depends on it.
    Subscribed,
    /// Listings and services nobody subscribes to.
    Background,
}

#[derive(Debug)]
struct Bucket {
    /// May go below 0 when a call turned out to cost several requests (pages).
    tokens: f64,
    refilled: Instant,
    /// Subscribed callers waiting now; background callers let them go first.
    waiting_subscribed: usize,
}

/// A token bucket of `rate` calls per second, holding at most one second's worth.
#[derive(Debug)]
pub struct Budget {
    rate: f64,
    bucket: Mutex<Bucket>,
    /// Services watched now, for [`Budget::stretch`].
    services: AtomicUsize,
}

impl Budget {
    /// `rate`: calls per second for this replica (positive).
    pub fn new(rate: f64) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 { rate } else { 1.0 };
        Budget {
            rate,
            bucket: Mutex::new(Bucket { tokens: rate.max(1.0), refilled: Instant::now(), waiting_subscribed: 0 }),
            services: AtomicUsize::new(0),
        }
    }

    /// No limit in practice (tests that are not about the budget).
    pub fn unlimited() -> Self {
        Budget::new(1e9)
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Wait for one call's worth of budget.
    pub async fn acquire(&self, priority: Priority) {
        let mut counted = false;
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
                b.tokens = (b.tokens + elapsed * self.rate).min(self.rate.max(1.0));
                b.refilled = now;
                let my_turn = priority == Priority::Subscribed || b.waiting_subscribed == 0;
                if b.tokens >= 1.0 && my_turn {
                    b.tokens -= 1.0;
                    if counted {
                        b.waiting_subscribed -= 1;
                    }
                    return;
                }
                if priority == Priority::Subscribed && !counted {
                    b.waiting_subscribed += 1;
                    counted = true;
                }
                let missing = (1.0 - b.tokens).max(0.0);
                // A background caller blocked only by subscribed waiters checks back after one token's time.
                Duration::from_secs_f64((missing / self.rate).max(1.0 / self.rate))
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Account for requests a call made beyond the one it acquired (pages).
    pub fn charge(&self, extra_calls: u32) {
        if extra_calls == 0 {
            return;
        }
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        b.tokens -= f64::from(extra_calls);
    }

    /// A watcher for one more service started (`+1`) or ended (`-1`).
    pub fn service_started(&self) {
        self.services.fetch_add(1, Ordering::Relaxed);
    }

    pub fn service_ended(&self) {
        let _ = self.services.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
    }

    pub fn services(&self) -> usize {
        self.services.load(Ordering::Relaxed)
    }

    /// `interval` (a per-service poll interval) stretched so that every
    /// watched service polling once per result stays within
    /// [`STEADY_SHARE`] of the budget.
    pub fn stretch(&self, interval: Duration) -> Duration {
        stretched(interval, self.services(), self.rate)
    }
}

/// The pure rule behind [`Budget::stretch`]: `services` polls per interval
/// must fit in `STEADY_SHARE × rate` calls per second.
pub fn stretched(interval: Duration, services: usize, rate: f64) -> Duration {
    let floor = services as f64 / (STEADY_SHARE * rate);
    if floor.is_finite() && floor > interval.as_secs_f64() { Duration::from_secs_f64(floor) } else { interval }
}

/// Stretch `refresh` by the same factor as `revision` was stretched, so the
/// mix of cheap revision polls and full reads stays the same.
pub fn stretched_refresh(refresh: Duration, revision: Duration, stretched_revision: Duration) -> Duration {
    if revision.is_zero() {
        return refresh;
    }
    refresh.mul_f64(stretched_revision.as_secs_f64() / revision.as_secs_f64()).max(refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_stretch_only_when_the_budget_binds() {
        let one = Duration::from_secs(1);
        // 200 calls/s, 80 % steady = 160 polls/s.
        assert_eq!(stretched(one, 10, 200.0), one);
        assert_eq!(stretched(one, 160, 200.0), one);
        assert_eq!(stretched(one, 1_000, 200.0), Duration::from_secs_f64(6.25));
        assert_eq!(stretched(one, 0, 200.0), one);
        let five = Duration::from_secs(5);
        assert_eq!(stretched_refresh(five, one, Duration::from_secs_f64(6.25)), Duration::from_secs_f64(31.25));
        assert_eq!(stretched_refresh(five, one, one), five);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_paced_to_the_rate() {
        let budget = Budget::new(10.0);
        let start = Instant::now();
        for _ in 0..30 {
            budget.acquire(Priority::Background).await;
        }
        // 10 in the bucket, then 20 more at 10/s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1_900) && took <= Duration::from_millis(2_200), "{took:?}");
        // Pages charged after the fact are repaid before the next call.
        budget.charge(10);
        let before = Instant::now();
        budget.acquire(Priority::Background).await;
        assert!(before.elapsed() >= Duration::from_millis(1_000), "{:?}", before.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn subscribed_services_go_first() {
        let budget = std::sync::Arc::new(Budget::new(10.0));
        for _ in 0..10 {
            budget.acquire(Priority::Background).await;
        }
        // Bucket empty: 20 background callers queue, then 5 subscribed ones arrive.
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (b, o) = (budget.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                b.acquire(Priority::Background).await;
                o.lock().expect("lock").push(("bg", i));
            }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        for i in 0..5 {
            let (b, o) = (budget.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                b.acquire(Priority::Subscribed).await;
                o.lock().expect("lock").push(("sub", i));
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let order = order.lock().expect("lock").clone();
        let last_sub = order.iter().rposition(|(k, _)| *k == "sub").expect("sub ran");
        // At most the one background call already due can slip in before them.
        assert!(last_sub <= 6, "subscribed calls waited behind background ones: {order:?}");
    }
}
