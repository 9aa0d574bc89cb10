//! Who is connected, and what each client was sent and accepted. Feeds
//! `/config_dump`, CSDS and the stream limit; written by the stream tasks
//! after each request and push, read by the admin and CSDS handlers.

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

#[derive(Debug)]
pub struct Registry {
    streams: DashMap<u64, StreamStatus>,
    max_streams: usize,
}

impl Registry {
    pub fn new(max_streams: usize) -> Self {
        Registry { streams: DashMap::new(), max_streams }
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
        self.streams.insert(
            id,
            StreamStatus {
                id,
                protocol,
                peer,
                connected_at: std::time::SystemTime::now(),
                node: None,
                client: None,
                types: Vec::new(),
            },
        );
        Ok(Admission { registry: self.clone(), id })
    }

    pub fn list(&self) -> Vec<StreamStatus> {
        let mut all: Vec<StreamStatus> = self.streams.iter().map(|s| s.value().clone()).collect();
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
}

impl Admission {
    pub fn update(&self, node: Option<&Node>, client: Option<&ClientInfo>, types: Vec<TypeStatus>) {
        if let Some(mut status) = self.registry.streams.get_mut(&self.id) {
            if status.node.is_none() {
                status.node = node.cloned();
            }
            if status.client.is_none() {
                status.client = client.cloned();
            }
            status.types = types;
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.registry.streams.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_and_removal_on_drop() {
        let registry = Arc::new(Registry::new(2));
        let a = registry.admit(1, "sotw", None).expect("first");
        let _b = registry.admit(2, "sotw", None).expect("second");
        let refused = registry.admit(3, "sotw", None).expect_err("over the limit");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(a);
        assert_eq!(registry.len(), 1);
        assert!(registry.admit(4, "delta", None).is_ok());
    }
}
