//! Who is connected, and what each client was sent and accepted. Feeds
//! `/config_dump`, CSDS and the stream limit. Off the hot path: a stream
//! registers once and leaves a way to ask for its status ([`StatusFn`]);
//! status is built only when the admin or CSDS handlers ask for it, never
//! copied per request or push.

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

/// Builds a stream's per-type status on demand (briefly locks its protocol state).
pub type StatusFn = Arc<dyn Fn() -> Vec<TypeStatus> + Send + Sync>;

struct Entry {
    /// Everything but `types`, which comes from `status` when asked.
    summary: StreamStatus,
    status: Option<StatusFn>,
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
        self.streams.insert(id, Box::new(Entry { summary, status: None }));
        Ok(Admission { registry: self.clone(), id, peer })
    }

    /// Every stream's status, built now.
    pub fn list(&self) -> Vec<StreamStatus> {
        // Take the handles first: no registry shard stays locked while streams are asked.
        let entries: Vec<(StreamStatus, Option<StatusFn>)> =
            self.streams.iter().map(|e| (e.summary.clone(), e.status.clone())).collect();
        let mut all: Vec<StreamStatus> = entries
            .into_iter()
            .map(|(mut summary, status)| {
                summary.types = status.map(|f| f()).unwrap_or_default();
                summary
            })
            .collect();
        all.sort_by_key(|s| s.id);
        all
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

    /// How to ask this stream for its status.
    pub fn attach(&self, status: StatusFn) {
        if let Some(mut entry) = self.registry.streams.get_mut(&self.id) {
            entry.status = Some(status);
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

    #[test]
    fn limit_and_removal_on_drop() {
        let registry = Arc::new(Registry::new(2));
        let a = registry.admit(1, "sotw", None).expect("first");
        let types = vec![TypeStatus { type_url: "t".into(), ..Default::default() }];
        a.attach(Arc::new(move || types.clone()));
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
