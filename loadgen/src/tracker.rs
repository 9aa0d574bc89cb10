//! What every client has received. Each change carries a *marker* (the
//! `LOADGEN_CHANGE` attribute of one instance, published in the endpoint
//! metadata of the EDS); a client has a change once an EDS with its marker
//! arrives. Decoding a ClusterLoadAssignment per client would cost the load
//! generator more than the control plane, so the marker is memoised by
//! version: the control plane's versions are hashes of content.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// No EDS received yet.
const NONE: u64 = u64::MAX;

#[derive(Debug)]
pub struct Tracker {
    /// Version → marker. Read by every client on every push, written once per version.
    markers: RwLock<HashMap<Vec<u8>, u64>>,
    /// Per client: the newest marker received.
    latest: Vec<AtomicU64>,
    /// Per marker: when each client received it (Unix seconds).
    receipts: Mutex<BTreeMap<u64, Vec<f64>>>,
    with_eds: AtomicUsize,
    /// Responses of any type received by all clients (a push may be more than one response).
    responses: AtomicU64,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    /// Signalled on every receipt and failure, so [`Tracker::wait`] need not poll
    /// (a 2 ms poll cost ~30 ms of CPU per second of waiting here).
    progress: tokio::sync::Notify,
}

impl Tracker {
    pub fn new(clients: usize) -> Self {
        Tracker {
            markers: RwLock::new(HashMap::new()),
            latest: (0..clients).map(|_| AtomicU64::new(NONE)).collect(),
            receipts: Mutex::new(BTreeMap::new()),
            with_eds: AtomicUsize::new(0),
            responses: AtomicU64::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            progress: tokio::sync::Notify::new(),
        }
    }

    /// Client `client` received an EDS of `version` at `received`; `marker`
    /// decodes the resource when this version was not seen before.
    pub fn eds(
        &self,
        client: usize,
        version: &[u8],
        received: f64,
        marker: impl FnOnce() -> anyhow::Result<u64>,
    ) -> anyhow::Result<()> {
        let known = self.markers.read().unwrap_or_else(|e| e.into_inner()).get(version).copied();
        let marker = match known {
            Some(m) => m,
            None => {
                let m = marker()?;
                self.markers.write().unwrap_or_else(|e| e.into_inner()).insert(version.to_vec(), m);
                m
            }
        };
        let Some(slot) = self.latest.get(client) else {
            anyhow::bail!("client {client} out of range");
        };
        // One task per client writes its slot, so load-then-store does not race.
        let previous = slot.load(Ordering::Acquire);
        if previous == NONE {
            self.with_eds.fetch_add(1, Ordering::AcqRel);
        }
        if previous == NONE || marker > previous {
            self.receipts.lock().unwrap_or_else(|e| e.into_inner()).entry(marker).or_default().push(received);
            slot.store(marker, Ordering::Release);
            self.progress.notify_one();
        }
        Ok(())
    }

    /// A client received a response (of any type).
    pub fn response(&self) {
        self.responses.fetch_add(1, Ordering::Relaxed);
    }

    pub fn responses(&self) -> u64 {
        self.responses.load(Ordering::Relaxed)
    }

    pub fn fail(&self, client: usize, error: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::AcqRel);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(format!("client {client}: {error:#}"));
        }
        self.progress.notify_one();
    }

    /// Clients that received at least one EDS.
    pub fn with_eds(&self) -> usize {
        self.with_eds.load(Ordering::Acquire)
    }

    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Acquire)
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The newest marker any client has.
    pub fn newest(&self) -> Option<u64> {
        self.latest.iter().map(|l| l.load(Ordering::Acquire)).filter(|m| *m != NONE).max()
    }

    /// How many clients received `marker`.
    pub fn count(&self, marker: u64) -> usize {
        self.receipts.lock().unwrap_or_else(|e| e.into_inner()).get(&marker).map_or(0, Vec::len)
    }

    /// When each client received `marker`.
    pub fn receipts(&self, marker: u64) -> Vec<f64> {
        self.receipts.lock().unwrap_or_else(|e| e.into_inner()).get(&marker).cloned().unwrap_or_default()
    }

    /// Checks `done` after each receipt or failure until it holds or `timeout`
    /// passes; whether it held.
    pub async fn wait(&self, timeout: Duration, done: impl Fn(&Tracker) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            // The permit notify_one leaves when nobody waits covers a receipt between the check and here.
            let _ = tokio::time::timeout(deadline - now, self.progress.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_wakes_on_a_receipt_and_gives_up_at_the_deadline() {
        let t = std::sync::Arc::new(Tracker::new(1));
        let writer = t.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.eds(0, b"v1", 1.0, || Ok(1)).expect("ok");
        });
        let started = std::time::Instant::now();
        assert!(t.wait(Duration::from_secs(5), |t| t.count(1) == 1).await);
        assert!(started.elapsed() < Duration::from_secs(2), "woken by the receipt, not the deadline");
        assert!(!t.wait(Duration::from_millis(30), |t| t.count(2) == 1).await);
    }

    #[test]
    fn markers_are_decoded_once_per_version_and_only_newer_ones_count() {
        let t = Tracker::new(2);
        let decodes = std::sync::atomic::AtomicUsize::new(0);
        let decode = |m: u64| {
            let decodes = &decodes;
            move || {
                decodes.fetch_add(1, Ordering::SeqCst);
                Ok(m)
            }
        };
        t.eds(0, b"v0", 1.0, decode(0)).expect("ok");
        t.eds(1, b"v0", 1.5, decode(0)).expect("ok");
        assert_eq!((t.with_eds(), t.count(0), decodes.load(Ordering::SeqCst)), (2, 2, 1));
        t.eds(0, b"v1", 2.0, decode(1)).expect("ok");
        // A re-push of the same content (a census change) is not a new receipt.
        t.eds(0, b"v1-census", 2.5, decode(1)).expect("ok");
        assert_eq!(t.receipts(1), vec![2.0]);
        assert_eq!(t.newest(), Some(1));
        assert!(t.eds(5, b"v0", 1.0, decode(0)).is_err());
        t.fail(1, &anyhow::anyhow!("boom"));
        assert_eq!(t.failed(), 1);
        assert_eq!(t.first_error().as_deref(), Some("client 1: boom"));
    }
}
