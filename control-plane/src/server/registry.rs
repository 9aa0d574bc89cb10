//! Who is connected, and what each client was sent and accepted. Feeds
//! `/config_dump`, CSDS, the stream limit and the reaper of streams whose
//! client stopped reading. Off the hot path: a stream registers once and
//! leaves a [`Handle`]; status is built only when the admin or CSDS handlers
//! ask for it, never copied per request or push.

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;
use envoy_types::pb::envoy::config::core::v3::Node;
use tonic::Status;

use super::{ClientInfo, Nack};

/// The state of one resource type on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    pub type_url: String,
    /// Subscribed names; `*` for a wildcard subscription.
    pub subscribed: Vec<String>,
    /// SotW: the last version sent; Delta: the last nonce sent.
    pub sent: Option<String>,
    /// SotW: the last version ACKed; Delta: the last nonce ACKed.
    pub acked: Option<String>,
    pub nack: Option<Nack>,
    /// Resources the client was sent and holds: name → version.
    pub resources: BTreeMap<String, String>,
    /// Where each of `resources` stands, when the protocol tracks it per
    /// resource (SotW sends RDS/EDS one resource per response); when a name is
    /// missing here, the type's `acked` and `nack` speak for it.
    pub states: BTreeMap<String, ResourceState>,
}

/// Whether the client accepted the version of a resource it was last sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceState {
    /// Sent, not answered yet.
    Requested,
    Acked,
    Nacked(Nack),
}

/// One connected stream.
#[derive(Debug, Clone)]
pub struct StreamStatus {
    pub id: u64,
    pub protocol: &'static str,
    pub peer: Option<std::net::SocketAddr>,
    pub connected_at: std::time::SystemTime,
    pub node: Option<Node>,
    pub client: Option<ClientInfo>,
    pub types: Vec<TypeStatus>,
}

/// What the registry may ask of a live stream.
pub trait Handle: Send + Sync {
    /// Its per-type status, built now (briefly locks its protocol state).
    fn status(&self) -> Vec<TypeStatus>;
    /// Since when (on [`clock_ms`]) the stream's last frame waits for the
    /// client to read it; `None` when nothing waits.
    fn waiting_since(&self) -> Option<u64>;
    /// The client stopped reading: give up the stream's census votes, watch
    /// and registry slot now (its connection holds the rest until it closes).
    fn release(&self);
}

/// Milliseconds since the first call: the clock of [`Handle::waiting_since`].
pub fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

struct Entry {
    /// Everything but `types`, which comes from `handle` when asked.
    summary: StreamStatus,
    handle: Option<Arc<dyn Handle>>,
}

pub struct Registry {
    /// Boxed: the table then grows by a pointer per slot, not a whole entry.
    streams: DashMap<u64, Box<Entry>>,
    max_streams: usize,
    /// Streams open per connection (by peer address and port).
    per_connection: DashMap<std::net::SocketAddr, usize>,
    max_per_connection: usize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("streams", &self.streams.len())
            .field("max_streams", &self.max_streams)
            .finish()
    }
}

impl Registry {
    pub fn new(max_streams: usize) -> Self {
        Registry {
            streams: DashMap::new(),
            max_streams,
            per_connection: DashMap::new(),
            max_per_connection: usize::MAX,
        }
    }

    /// At most `max` streams on one connection; more are refused with RESOURCE_EXHAUSTED.
    pub fn with_max_per_connection(mut self, max: usize) -> Self {
        self.max_per_connection = max;
        self
    }

    /// Admit a new stream, or refuse it when the limit is reached.
    pub fn admit(
        self: &Arc<Self>,
        id: u64,
        protocol: &'static str,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Admission, Status> {
        if self.streams.len() >= self.max_streams {
            metrics::counter!("cloudmap_xds_streams_refused_total").increment(1);
            return Err(Status::resource_exhausted(format!(
                "this control plane serves at most {} streams (--max-streams); try another replica",
                self.max_streams
            )));
        }
        if let Some(peer) = peer {
            let mut open = self.per_connection.entry(peer).or_insert(0);
            if *open >= self.max_per_connection {
                drop(open);
                metrics::counter!("cloudmap_xds_streams_refused_total").increment(1);
                return Err(Status::resource_exhausted(format!(
                    "this connection already has {} streams open; one connection may open at most {} \
                     (--max-streams-per-connection)",
                    self.max_per_connection, self.max_per_connection
                )));
            }
            *open += 1;
        }
        let summary = StreamStatus {
            id,
            protocol,
            peer,
            connected_at: std::time::SystemTime::now(),
            node: None,
            client: None,
            types: Vec::new(),
        };
        self.streams.insert(id, Box::new(Entry { summary, handle: None }));
        Ok(Admission { registry: self.clone(), id, peer })
    }

    /// Every stream's status, built now.
    pub fn list(&self) -> Vec<StreamStatus> {
        // Take the handles first: no registry shard stays locked while streams are asked.
        let entries: Vec<(StreamStatus, Option<Arc<dyn Handle>>)> =
            self.streams.iter().map(|e| (e.summary.clone(), e.handle.clone())).collect();
        let mut all: Vec<StreamStatus> = entries
            .into_iter()
            .map(|(mut summary, handle)| {
                summary.types = handle.map(|h| h.status()).unwrap_or_default();
                summary
            })
            .collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Release every stream whose last frame has waited for its client
    /// longer than `timeout`; returns how many.
    pub fn reap(&self, timeout: std::time::Duration) -> usize {
        self.reap_at(clock_ms(), timeout)
    }

    fn reap_at(&self, now: u64, timeout: std::time::Duration) -> usize {
        let limit = timeout.as_millis() as u64;
        // Collected first: releasing removes the entry, which must not happen under a shard lock.
        let stalled: Vec<Arc<dyn Handle>> = self
            .streams
            .iter()
            .filter_map(|e| e.handle.clone())
            .filter(|h| h.waiting_since().is_some_and(|since| now.saturating_sub(since) > limit))
            .collect();
        for handle in &stalled {
            handle.release();
        }
        stalled.len()
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

/// A stream's place in the registry; removed when dropped.
#[derive(Debug)]
pub struct Admission {
    registry: Arc<Registry>,
    id: u64,
    peer: Option<std::net::SocketAddr>,
}

impl Admission {
    /// Who the client is, once known (the first request's Node).
    pub fn identify(&self, node: Option<&Node>, client: Option<&ClientInfo>) {
        if let Some(mut entry) = self.registry.streams.get_mut(&self.id) {
            if entry.summary.node.is_none() {
                // Without the extension list: an Envoy's names hundreds (~10 KB per stream),
                // and neither /config_dump nor CSDS shows it.
                entry.summary.node = node.map(|n| Node { extensions: Vec::new(), ..n.clone() });
            }
            if entry.summary.client.is_none() {
                entry.summary.client = client.cloned();
            }
        }
    }

    /// How to ask this stream for its status, and to release it.
    pub fn attach(&self, handle: Arc<dyn Handle>) {
        if let Some(mut entry) = self.registry.streams.get_mut(&self.id) {
            entry.handle = Some(handle);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.registry.streams.remove(&self.id);
        if let Some(peer) = self.peer {
            self.registry.per_connection.remove_if_mut(&peer, |_, open| {
                *open = open.saturating_sub(1);
                *open == 0
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        since: Option<u64>,
        released: std::sync::atomic::AtomicUsize,
    }

    impl Handle for Fixed {
        fn status(&self) -> Vec<TypeStatus> {
            vec![TypeStatus { type_url: "t".into(), ..Default::default() }]
        }
        fn waiting_since(&self) -> Option<u64> {
            self.since
        }
        fn release(&self) {
            self.released.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn reap_releases_only_streams_waiting_longer_than_the_timeout() {
        let registry = Arc::new(Registry::new(10));
        let now = 10_000;
        let handles: Vec<Arc<Fixed>> = [None, Some(now - 500), Some(now - 5_000)]
            .into_iter()
            .map(|since| Arc::new(Fixed { since, released: Default::default() }))
            .collect();
        let _admitted: Vec<Admission> = handles
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let a = registry.admit(i as u64, "sotw", None).expect("admitted");
                a.attach(h.clone());
                a
            })
            .collect();
        assert_eq!(registry.reap_at(now, std::time::Duration::from_secs(1)), 1);
        let released: Vec<usize> =
            handles.iter().map(|h| h.released.load(std::sync::atomic::Ordering::Relaxed)).collect();
        assert_eq!(released, vec![0, 0, 1], "idle and just-handed streams stay");
    }

    #[test]
    fn limit_and_removal_on_drop() {
        let registry = Arc::new(Registry::new(2));
        let a = registry.admit(1, "sotw", None).expect("first");
        a.attach(Arc::new(Fixed { since: None, released: Default::default() }));
        assert_eq!(registry.list()[0].types.len(), 1, "status is asked for when listed");
        let _b = registry.admit(2, "sotw", None).expect("second");
        let refused = registry.admit(3, "sotw", None).expect_err("over the limit");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(a);
        assert_eq!(registry.len(), 1);
        assert!(registry.admit(4, "delta", None).is_ok());
    }

    #[test]
    fn streams_per_connection_are_limited_and_freed() {
        let registry = Arc::new(Registry::new(10).with_max_per_connection(2));
        let (one, other): (std::net::SocketAddr, std::net::SocketAddr) =
            ("10.0.0.1:1000".parse().expect("addr"), "10.0.0.1:1001".parse().expect("addr"));
        let a = registry.admit(1, "sotw", Some(one)).expect("first");
        let _b = registry.admit(2, "sotw", Some(one)).expect("second");
        let refused = registry.admit(3, "sotw", Some(one)).expect_err("third on one connection");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-streams-per-connection"), "{}", refused.message());
        assert!(registry.admit(4, "sotw", Some(other)).is_ok(), "another connection is not limited by it");
        drop(a);
        assert!(registry.admit(5, "sotw", Some(one)).is_ok(), "a slot is freed when a stream ends");
    }
}
