//! CSDS (`envoy.service.status.v3.ClientStatusDiscoveryService`): which
//! client holds which resource at which version, and whether it ACKed or
//! NACKed it — what `grpcdebug`-style tools ask. It tells whoever asks every
//! client's node and what it holds, so it is served on the admin address
//! (loopback by default; see `admin`), and on the xDS port only with
//! `--csds-on-xds-port`. A response larger than [`CsdsServer::max_response`]
//! is refused with RESOURCE_EXHAUSTED rather than built: asking without
//! `exclude_resource_contents` copies every resource every client holds.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryService;
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus, client_config::GenericXdsConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{NodeMatcher, string_matcher};
use futures::{Stream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::registry::{Registry, ResourceState, StreamStatus};
use crate::cache::Cache;
use crate::resources::ResourceType;

#[derive(Debug, Clone)]
pub struct CsdsServer {
    pub cache: Arc<Cache>,
    pub registry: Arc<Registry>,
    /// Largest response, in bytes (`--csds-max-response-size`).
    pub max_response: usize,
    /// On the xDS port with `[authz]`: only identities whose rule says `csds = true` may ask.
    pub authz: Option<Arc<crate::authz::Authz>>,
}

fn matches(matchers: &[NodeMatcher], node_id: &str) -> bool {
    matchers.is_empty()
        || matchers.iter().any(|m| match m.node_id.as_ref().and_then(|s| s.match_pattern.as_ref()) {
            None => true,
            Some(string_matcher::MatchPattern::Exact(id)) => id == node_id,
            Some(string_matcher::MatchPattern::Prefix(p)) => node_id.starts_with(p.as_str()),
            Some(string_matcher::MatchPattern::Suffix(s)) => node_id.ends_with(s.as_str()),
            Some(string_matcher::MatchPattern::Contains(c)) => node_id.contains(c.as_str()),
            // Regexes are not evaluated here: match nothing rather than everything.
            Some(_) => false,
        })
}

impl CsdsServer {
    /// PERMISSION_DENIED unless `[authz]` is off here or lets the caller's certificate ask.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(authz) = &self.authz else { return Ok(()) };
        let leaf = request.peer_certs().and_then(|certs| certs.first().cloned());
        let identities = leaf.map(|c| crate::authz::identities(c.as_ref())).unwrap_or_default();
        if authz.allows_csds(&identities) {
            return Ok(());
        }
        metrics::counter!("cloudmap_xds_authz_denied_total").increment(1);
        Err(Status::permission_denied("CSDS needs an [authz] rule with csds = true for this client certificate"))
    }

    /// The status of every client the request's matchers select; an error
    /// once the response would exceed [`max_response`](Self::max_response).
    pub fn status(&self, request: &ClientStatusRequest) -> Result<ClientStatusResponse, Status> {
        let snapshot = self.cache.snapshot();
        let mut size = 0usize;
        let mut config = Vec::new();
        for stream in self.registry.list() {
            if !matches(&request.node_matchers, stream.node.as_ref().map(|n| n.id.as_str()).unwrap_or("")) {
                continue;
            }
            let client = client_config(&stream, &snapshot, request.exclude_resource_contents);
            // The field's tag and length prefix are a few bytes more: the bound is approximate by that.
            size += client.encoded_len();
            if size > self.max_response {
                metrics::counter!("cloudmap_xds_csds_refused_total").increment(1);
                return Err(Status::resource_exhausted(format!(
                    "the CSDS response would exceed {} bytes (--csds-max-response-size); ask for fewer \
                     clients (node_matchers) or set exclude_resource_contents",
                    self.max_response
                )));
            }
            config.push(client);
        }
        Ok(ClientStatusResponse { config })
    }
}

fn client_config(stream: &StreamStatus, snapshot: &crate::cache::Snapshot, exclude: bool) -> ClientConfig {
    let client = stream.client.as_ref().map(|c| c.client());
    let mut generic = Vec::new();
    for ty in &stream.types {
        let acked = ty.acked.is_some() && ty.acked == ty.sent;
        for (name, version) in &ty.resources {
            let state = match ty.states.get(name) {
                Some(state) => state.clone(),
                None => match (&ty.nack, acked) {
                    (Some(nack), _) => ResourceState::Nacked(nack.clone()),
                    (None, true) => ResourceState::Acked,
                    (None, false) => ResourceState::Requested,
                },
            };
            let (config_status, client_status, nack) = match state {
                ResourceState::Nacked(nack) => (ConfigStatus::Error, ClientResourceStatus::Nacked, Some(nack)),
                ResourceState::Acked => (ConfigStatus::Synced, ClientResourceStatus::Acked, None),
                ResourceState::Requested => (ConfigStatus::Stale, ClientResourceStatus::Requested, None),
            };
            let contents = match (exclude, &client, ResourceType::from_type_url(&ty.type_url)) {
                (false, Some(client), Some(rt)) => {
                    snapshot.resolve(rt, name, client).filter(|r| *r.version == **version).map(|r| r.resource())
                }
                _ => None,
            };
            generic.push(GenericXdsConfig {
                type_url: ty.type_url.clone(),
                name: name.clone(),
                version_info: version.clone(),
                xds_config: contents,
                config_status: config_status as i32,
                client_status: client_status as i32,
                error_state: nack.map(|n| UpdateFailureState {
                    details: n.message.clone(),
                    version_info: n.version.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    ClientConfig { node: stream.node.clone(), generic_xds_configs: generic, ..Default::default() }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for CsdsServer {
    type StreamClientStatusStream = BoxStream<ClientStatusResponse>;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        self.authorize(&request)?;
        let this = self.clone();
        let responses = request.into_inner().map(move |r| r.and_then(|r| this.status(&r)));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        self.authorize(&request)?;
        self.status(request.get_ref()).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Nack;
    use crate::server::registry::TypeStatus;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use std::collections::BTreeMap;

    #[test]
    fn responses_above_the_bound_are_refused() {
        let registry = Arc::new(Registry::new(10));
        let admissions: Vec<_> = (0..3)
            .map(|i| {
                let a = registry.admit(i, "sotw", None).expect("admit");
                let node = Node { id: format!("client-{i}-{}", "x".repeat(100)), ..Default::default() };
                a.identify(Some(&node), None);
                a
            })
            .collect();
        let csds = |max_response| CsdsServer {
            cache: Arc::new(Cache::default()),
            registry: registry.clone(),
            max_response,
            authz: None,
        };
        assert_eq!(csds(4096).status(&ClientStatusRequest::default()).expect("fits").config.len(), 3);
        let refused = csds(250).status(&ClientStatusRequest::default()).expect_err("three nodes of ~110 bytes");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--csds-max-response-size"), "{}", refused.message());
        drop(admissions);
    }

    #[test]
    fn per_resource_states_win_over_the_type_summary() {
        let nack = Nack { version: "v2".into(), message: "bad".into() };
        let eds = TypeStatus {
            type_url: ResourceType::ClusterLoadAssignment.type_url().into(),
            subscribed: vec!["a.demo".into(), "b.demo".into(), "c.demo".into()],
            sent: Some("v3".into()),
            acked: Some("v1".into()),
            nack: Some(nack.clone()),
            resources: BTreeMap::from([
                ("a.demo".into(), "v1".into()),
                ("b.demo".into(), "v2".into()),
                ("c.demo".into(), "v3".into()),
            ]),
            states: BTreeMap::from([
                ("a.demo".into(), ResourceState::Acked),
                ("b.demo".into(), ResourceState::Nacked(nack)),
                ("c.demo".into(), ResourceState::Requested),
            ]),
        };
        let stream = StreamStatus {
            id: 1,
            protocol: "sotw",
            peer: None,
            connected_at: std::time::SystemTime::now(),
            node: None,
            client: None,
            types: vec![eds],
        };
        let config = client_config(&stream, &crate::cache::Snapshot::default(), true);
        let got: Vec<(String, i32, bool)> = config
            .generic_xds_configs
            .iter()
            .map(|g| (g.name.clone(), g.client_status, g.error_state.is_some()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.demo".into(), ClientResourceStatus::Acked as i32, false),
                ("b.demo".into(), ClientResourceStatus::Nacked as i32, true),
                ("c.demo".into(), ClientResourceStatus::Requested as i32, false),
            ]
        );
    }
}
