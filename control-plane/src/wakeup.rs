//! Which streams watch which services, and waking exactly those when a new
//! snapshot changes them. A stream registers the change keys of what it
//! subscribed ([`crate::cache::Snapshot::key_of`]), or every key for a
//! wildcard subscription; a change to one service then wakes only its
//! watchers, not every stream of the control plane.
//!
//! A wake-up is a [`Signal`]: a flag and the waker of whoever polls the
//! stream (its response body, polled by hyper). A stream that is busy when
//! woken finds the flag on its next poll, so no change is missed, and several
//! changes while it is busy cost one wake-up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use crate::resources::ResourceType;

/// One stream's wake-up: set by [`Wakeups::wake`], taken by the stream's poll.
#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready (and lowered) when raised since the last take; otherwise the
    /// task polling `cx` is woken by the next raise.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.raised.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A raise between the swap and the register would otherwise be missed.
        if self.raised.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }
}

/// What a change to one service (one change key) may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Its endpoints or their plans only (new endpoints, a census move): its
    /// EDS resources. Its listener, routes and clusters are made from its
    /// name and options, which stayed.
    Endpoints,
    /// Anything of it (new, removed, new options).
    All,
}

impl Scope {
    fn covers(self, ty: ResourceType) -> bool {
        self == Scope::All || ty == ResourceType::ClusterLoadAssignment
    }
}

/// What a snapshot changed against the one before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Changed {
    /// Anything may have changed (readiness, the first snapshot).
    #[default]
    All,
    /// Only the resources of these services (change keys), each within its scope.
    Keys(BTreeMap<String, Scope>),
}

impl Changed {
    /// Whether a resource of type `ty` under change key `key` may differ.
    pub fn touches(&self, key: &str, ty: ResourceType) -> bool {
        match self {
            Changed::All => true,
            Changed::Keys(keys) => keys.get(key).is_some_and(|scope| scope.covers(ty)),
        }
    }

    /// Whether any resource of type `ty` may differ, or the set of them (what
    /// a wildcard subscription to `ty` must look at again).
    pub fn touches_type(&self, ty: ResourceType) -> bool {
        match self {
            Changed::All => true,
            Changed::Keys(keys) => keys.values().any(|scope| scope.covers(ty)),
        }
    }
}

/// The keys one stream watches (sorted, without repeats: compact, as a
/// stream holds one or a few).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    /// Every key (a wildcard subscription).
    pub all: bool,
    keys: Vec<String>,
}

impl Watch {
    pub fn new(all: bool, keys: impl IntoIterator<Item = String>) -> Watch {
        let mut keys: Vec<String> = keys.into_iter().collect();
        keys.sort();
        keys.dedup();
        keys.shrink_to_fit();
        Watch { all, keys }
    }

    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    fn has(&self, key: &str) -> bool {
        self.keys.binary_search_by(|k| k.as_str().cmp(key)).is_ok()
    }
}

#[derive(Debug, Default)]
struct Inner {
    streams: HashMap<u64, (Arc<Signal>, Watch)>,
    by_key: HashMap<String, HashSet<u64>>,
    all: HashSet<u64>,
}

/// The registry of watches. Cheap to update: a stream changes its watch only
/// when its subscriptions change.
#[derive(Debug, Default)]
pub struct Wakeups {
    inner: Mutex<Inner>,
}

impl Wakeups {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register stream `id` (or replace its watch); `signal` is what wakes it.
    pub fn watch(&self, id: u64, signal: &Arc<Signal>, watch: Watch) {
        let mut inner = self.lock();
        let old = inner.streams.remove(&id).map(|(_, w)| w).unwrap_or_default();
        for key in old.keys.iter().filter(|k| !watch.has(k)) {
            if let Some(ids) = inner.by_key.get_mut(key) {
                ids.remove(&id);
                if ids.is_empty() {
                    inner.by_key.remove(key);
                }
            }
        }
        for key in watch.keys.iter().filter(|k| !old.has(k)) {
            inner.by_key.entry(key.clone()).or_default().insert(id);
        }
        if watch.all {
            inner.all.insert(id);
        } else {
            inner.all.remove(&id);
        }
        inner.streams.insert(id, (signal.clone(), watch));
    }

    /// Stream `id` ended.
    pub fn forget(&self, id: u64) {
        let mut inner = self.lock();
        let Some((_, watch)) = inner.streams.remove(&id) else { return };
        for key in &watch.keys {
            if let Some(ids) = inner.by_key.get_mut(key) {
                ids.remove(&id);
                if ids.is_empty() {
                    inner.by_key.remove(key);
                }
            }
        }
        inner.all.remove(&id);
    }

    /// Wake every stream that watches something in `changed`; returns how
    /// many raises that took (a stream with a wildcard and named keys may be
    /// raised twice: raising is idempotent, and cheaper than collecting ids).
    pub fn wake(&self, changed: &Changed) -> usize {
        let inner = self.lock();
        match changed {
            Changed::All => {
                inner.streams.values().for_each(|(s, _)| s.raise());
                inner.streams.len()
            }
            Changed::Keys(keys) => {
                let raise = |id: &u64| {
                    if let Some((s, _)) = inner.streams.get(id) {
                        s.raise();
                    }
                };
                inner.all.iter().for_each(raise);
                let mut raised = inner.all.len();
                for ids in keys.keys().filter_map(|key| inner.by_key.get(key)) {
                    ids.iter().for_each(raise);
                    raised += ids.len();
                }
                raised
            }
        }
    }

    /// Streams registered.
    pub fn len(&self) -> usize {
        self.lock().streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn changed(names: &[&str]) -> Changed {
        Changed::Keys(names.iter().map(|s| (s.to_string(), Scope::All)).collect())
    }

    #[test]
    fn an_endpoints_change_touches_only_eds() {
        use ResourceType::*;
        let c = Changed::Keys(
            [("echo.demo".to_string(), Scope::Endpoints), ("new.demo".to_string(), Scope::All)].into_iter().collect(),
        );
        assert!(c.touches("echo.demo", ClusterLoadAssignment));
        for ty in [Listener, RouteConfiguration, Cluster] {
            assert!(!c.touches("echo.demo", ty), "{ty:?} of echo.demo is made of its name and options");
            assert!(c.touches("new.demo", ty));
            assert!(c.touches_type(ty), "new.demo may join a wildcard set");
        }
        assert!(!c.touches("other.demo", ClusterLoadAssignment));
        let endpoints_only = Changed::Keys([("echo.demo".to_string(), Scope::Endpoints)].into_iter().collect());
        assert!(!endpoints_only.touches_type(Cluster), "no wildcard CDS set changes");
        assert!(endpoints_only.touches_type(ClusterLoadAssignment));
        assert!(Changed::All.touches("any", Listener) && Changed::All.touches_type(Cluster));
    }

    /// Whether `s` was raised (a wake-up), lowering it.
    fn woken(s: &Signal) -> bool {
        let waker = futures::task::noop_waker();
        s.poll_take(&mut Context::from_waker(&waker)).is_ready()
    }

    #[test]
    fn a_change_wakes_only_the_streams_that_watch_it() {
        let w = Wakeups::default();
        let (a, b, envoy) = (Arc::new(Signal::default()), Arc::new(Signal::default()), Arc::new(Signal::default()));
        w.watch(1, &a, Watch::new(false, keys(&["echo.demo"])));
        w.watch(2, &b, Watch::new(false, keys(&["other.demo"])));
        w.watch(3, &envoy, Watch::new(true, Vec::new()));
        assert_eq!(w.wake(&changed(&["echo.demo"])), 2);
        assert!(woken(&a) && woken(&envoy));
        assert!(!woken(&b), "a stream of another service sleeps");
        // A new watch replaces the old one.
        w.watch(1, &a, Watch::new(false, keys(&["other.demo"])));
        w.wake(&changed(&["echo.demo"]));
        assert!(!woken(&a));
        assert!(woken(&envoy));
        w.wake(&Changed::All);
        assert!(woken(&a) && woken(&b) && woken(&envoy));
        w.forget(1);
        w.forget(3);
        assert_eq!(w.len(), 1);
        assert_eq!(w.wake(&changed(&["other.demo"])), 1);
        assert!(!woken(&a) && woken(&b));
    }

    #[test]
    fn a_raise_wakes_the_task_that_polled() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(Default::default()));
        let waker = std::task::Waker::from(count.clone());
        let signal = Signal::default();
        assert!(signal.poll_take(&mut Context::from_waker(&waker)).is_pending());
        signal.raise();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "the poller is woken");
        assert!(signal.poll_take(&mut Context::from_waker(&waker)).is_ready());
        assert!(signal.poll_take(&mut Context::from_waker(&waker)).is_pending(), "taken once");
    }

    #[test]
    fn a_busy_stream_keeps_its_wake_up() {
        let w = Wakeups::default();
        let n = Arc::new(Signal::default());
        w.watch(1, &n, Watch::new(false, keys(&["echo.demo"])));
        // Two changes while the stream is not waiting: one permit, not lost.
        w.wake(&changed(&["echo.demo"]));
        w.wake(&changed(&["echo.demo"]));
        assert!(woken(&n));
        assert!(!woken(&n));
    }
}
