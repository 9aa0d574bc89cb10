//! The State-of-the-World protocol: every response for a type carries the
//! client's whole subscribed set (LDS and CDS: a name left out is deleted),
//! versions are per type, nonces per stream, and a request whose nonce is
//! not the latest sent for its type is stale and ignored.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::Status;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::registry::TypeStatus;
use super::{ClientInfo, Nack, Outcome, Protocol};
use crate::cache::{Snapshot, stable_hash};
use crate::resources::ResourceType;

/// What a stream subscribed to for one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Every resource of the type (LDS/CDS only).
    pub wildcard: bool,
    pub names: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub version: String,
    pub nonce: String,
    /// Name → version of each resource in the response.
    pub resources: BTreeMap<String, String>,
}

/// Per-type protocol state of one stream.
#[derive(Debug, Clone, Default)]
pub struct TypeState {
    pub subscription: Subscription,
    pub sent: Option<Sent>,
    pub acked: Option<String>,
    pub nack: Option<Nack>,
    /// The client asked for something it has not been answered for yet
    /// (first request, reconnect, a newly named resource).
    must_respond: bool,
}

/// The State-of-the-World state machine of one ADS stream. No I/O: feed it
/// requests with [`on_request`](Self::on_request), ask it what to send with
/// [`responses`](Self::responses).
#[derive(Debug, Default)]
pub struct SotwState {
    pub client: Option<ClientInfo>,
    pub types: BTreeMap<ResourceType, TypeState>,
    nonce: u64,
}

impl Protocol for SotwState {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    fn client(&self) -> Option<&ClientInfo> {
        self.client.as_ref()
    }

    fn request_type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }

    fn response_type_url(response: &DiscoveryResponse) -> &str {
        &response.type_url
    }

    fn request_names(request: &DiscoveryRequest) -> usize {
        request.resource_names.len()
    }

    fn request_node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn status(&self) -> Vec<TypeStatus> {
        self.types
            .iter()
            .map(|(ty, state)| {
                let mut subscribed: Vec<String> = state.subscription.names.iter().cloned().collect();
                if state.subscription.wildcard {
                    subscribed.insert(0, "*".to_string());
                }
                TypeStatus {
                    type_url: ty.type_url().to_string(),
                    subscribed,
                    sent: state.sent.as_ref().map(|s| s.version.clone()),
                    acked: state.acked.clone(),
                    nack: state.nack.clone(),
                    resources: state.sent.as_ref().map(|s| s.resources.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    fn on_request(&mut self, request: &DiscoveryRequest) -> Result<(ResourceType, Outcome), Status> {
        if self.client.is_none() {
            // Only the first request is guaranteed to carry the Node.
            self.client = Some(ClientInfo::from_node(request.node.as_ref()));
        }
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("DiscoveryRequest.type_url is empty; ADS needs it on every request"));
        }
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            return Ok((ResourceType::Listener, Outcome::UnknownType));
        };
        let first = !self.types.contains_key(&ty);
        let state = self.types.entry(ty).or_default();
        let outcome = if request.response_nonce.is_empty() {
            state.must_respond = true;
            Outcome::Subscribe
        } else {
            match &state.sent {
                Some(sent) if sent.nonce == request.response_nonce => match &request.error_detail {
                    Some(error) => {
                        state.nack = Some(Nack { version: sent.version.clone(), message: error.message.clone() });
                        Outcome::Nack(error.message.clone())
                    }
                    None => {
                        state.acked = Some(request.version_info.clone());
                        state.nack = None;
                        Outcome::Ack
                    }
                },
                _ => return Ok((ty, Outcome::Stale)),
            }
        };

        let names: BTreeSet<String> = request.resource_names.iter().filter(|n| *n != "*").cloned().collect();
        let explicit_wildcard = request.resource_names.iter().any(|n| n == "*");
        // Legacy wildcard: an empty first LDS/CDS request, which stays wildcard
        // while the client keeps sending empty lists.
        let wildcard = ty.is_full_set()
            && (explicit_wildcard || (request.resource_names.is_empty() && (first || state.subscription.wildcard)));
        let subscription = Subscription { wildcard, names };
        let added = (subscription.wildcard && !state.subscription.wildcard)
            || !subscription.names.is_subset(&state.subscription.names);
        if added {
            state.must_respond = true;
        }
        state.subscription = subscription;
        Ok((ty, outcome))
    }

    /// Empty until the first request has told us who the client is.
    fn responses(&mut self, snapshot: &Snapshot) -> Vec<DiscoveryResponse> {
        let Some(client) = self.client.as_ref().map(ClientInfo::client) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (ty, state) in self.types.iter_mut() {
            let sub = &state.subscription;
            if !sub.wildcard && sub.names.is_empty() {
                state.must_respond = false;
                continue;
            }
            let mut names: BTreeSet<String> = sub.names.clone();
            if sub.wildcard {
                names.extend(snapshot.wildcard_names(*ty, &client));
            }
            let resources: Vec<_> = names.iter().filter_map(|n| snapshot.resolve(*ty, n, &client)).collect();
            let version =
                format!("{:016x}", stable_hash(&resources.iter().map(|r| (&r.name, &r.version)).collect::<Vec<_>>()));
            let unchanged = state.sent.as_ref().is_some_and(|s| s.version == version);
            if unchanged && !state.must_respond {
                continue;
            }
            self.nonce += 1;
            let nonce = self.nonce.to_string();
            out.push(DiscoveryResponse {
                version_info: version.clone(),
                resources: resources.iter().map(|r| r.resource.clone()).collect(),
                type_url: ty.type_url().to_string(),
                nonce: nonce.clone(),
                ..Default::default()
            });
            let sent = resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
            state.sent = Some(Sent { version, nonce, resources: sent });
            state.must_respond = false;
        }
        out
    }

    fn eds_names(&self) -> BTreeSet<String> {
        self.types.get(&ResourceType::ClusterLoadAssignment).map(|s| s.subscription.names.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::model::{ClientKind, Endpoint, Health, ServiceEndpoints, ServiceName, Zone};
    use crate::policy::Policy;
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use envoy_types::pb::google::rpc;

    fn node(zone: &str, agent: &str) -> Node {
        Node {
            id: "client-1".into(),
            user_agent_name: agent.into(),
            locality: Some(Locality { zone: zone.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn request(ty: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: ty.type_url().into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(ty: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(rpc::Status { code: 3, message: "bad".into(), ..Default::default() }),
            ..request(ty, names, version, nonce)
        }
    }

    fn cache_with(services: &[(&str, &str)]) -> Cache {
        let cache = Cache::default();
        for (i, (ns, svc)) in services.iter().enumerate() {
            let endpoint = Endpoint {
                instance_id: format!("i-{i}"),
                ip: std::net::IpAddr::from([10, 0, 0, i as u8 + 1]),
                port: 50051,
                zone: Zone::new("a"),
                region: "r".into(),
                health: Health::Healthy,
                weight: 1,
                attributes: Default::default(),
            };
            cache.update_service(
                &ServiceName::new(*ns, *svc),
                ServiceEndpoints::new(vec![endpoint], false),
                Policy::LocalFirst,
            );
        }
        cache.set_ready();
        cache
    }

    fn names(r: &DiscoveryResponse) -> Vec<String> {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
        use envoy_types::pb::envoy::config::listener::v3::Listener;
        use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
        use prost::Message;
        r.resources
            .iter()
            .map(|any| match ResourceType::from_type_url(&any.type_url) {
                Some(ResourceType::Listener) => Listener::decode(any.value.as_slice()).map(|l| l.name),
                Some(ResourceType::RouteConfiguration) => {
                    RouteConfiguration::decode(any.value.as_slice()).map(|l| l.name)
                }
                Some(ResourceType::Cluster) => Cluster::decode(any.value.as_slice()).map(|l| l.name),
                Some(ResourceType::ClusterLoadAssignment) => {
                    ClusterLoadAssignment::decode(any.value.as_slice()).map(|l| l.cluster_name)
                }
                None => panic!("unknown type {}", any.type_url),
            })
            .map(|r| r.expect("decodes"))
            .collect()
    }

    use ResourceType::{Cluster as CDS, ClusterLoadAssignment as EDS, Listener as LDS, RouteConfiguration as RDS};

    #[test]
    fn grpc_client_walk_lds_rds_cds_eds() {
        let cache = cache_with(&[("demo", "echo"), ("grpc.demo", "echo")]);
        let mut s = SotwState::default();
        let mut first = request(LDS, &["echo.grpc.demo:50051"], "", "");
        first.node = Some(node("a", "gRPC C-core"));
        assert_eq!(s.on_request(&first).ok().map(|r| r.1), Some(Outcome::Subscribe));
        let r = s.responses(&cache.snapshot());
        assert_eq!(r.len(), 1);
        assert_eq!(names(&r[0]), vec!["echo.grpc.demo:50051"]);
        let lds = r[0].clone();

        // ACK, then subscribe RDS, CDS, EDS in turn: each answered once.
        assert_eq!(
            s.on_request(&request(LDS, &["echo.grpc.demo:50051"], &lds.version_info, &lds.nonce)).ok().map(|r| r.1),
            Some(Outcome::Ack)
        );
        assert!(s.responses(&cache.snapshot()).is_empty(), "an ACK is not answered");
        for (ty, name) in [(RDS, "echo.grpc.demo:50051"), (CDS, "echo.grpc.demo"), (EDS, "echo.grpc.demo")] {
            s.on_request(&request(ty, &[name], "", "")).expect("ok");
            let r = s.responses(&cache.snapshot());
            assert_eq!(r.len(), 1, "{ty:?}");
            assert_eq!(names(&r[0]), vec![name]);
            s.on_request(&request(ty, &[name], &r[0].version_info, &r[0].nonce)).expect("ack");
            assert!(s.responses(&cache.snapshot()).is_empty());
        }
        assert_eq!(s.eds_names(), BTreeSet::from(["echo.grpc.demo".to_string()]));
        assert_eq!(s.client.as_ref().and_then(|c| c.zone.clone()), Some(Zone::new("a")));
    }

    #[test]
    fn nacked_version_is_not_resent_until_it_changes() {
        let cache = cache_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &["echo.demo"], "", "")).expect("ok");
        let r = s.responses(&cache.snapshot()).remove(0);
        assert_eq!(
            s.on_request(&nack(EDS, &["echo.demo"], "", &r.nonce)).ok().map(|r| r.1),
            Some(Outcome::Nack("bad".into()))
        );
        assert_eq!(s.types[&EDS].nack.as_ref().map(|n| n.version.clone()), Some(r.version_info.clone()));
        for _ in 0..3 {
            assert!(s.responses(&cache.snapshot()).is_empty(), "no resend loop");
        }
        // A new version is sent.
        cache.update_service(&ServiceName::new("demo", "echo"), ServiceEndpoints::default(), Policy::LocalFirst);
        let again = s.responses(&cache.snapshot());
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].version_info, r.version_info);
    }

    #[test]
    fn stale_nonce_is_ignored() {
        let cache = cache_with(&[("demo", "echo"), ("demo", "other")]);
        let mut s = SotwState::default();
        s.on_request(&request(CDS, &["echo.demo"], "", "")).expect("ok");
        let first = s.responses(&cache.snapshot()).remove(0);
        s.on_request(&request(CDS, &["echo.demo"], &first.version_info, &first.nonce)).expect("ack");
        cache.remove_service(&ServiceName::new("demo", "other"));
        // A NACK carrying an old nonce does not count as a NACK of the latest.
        assert_eq!(s.on_request(&nack(CDS, &["echo.demo"], "", "999")).ok().map(|r| r.1), Some(Outcome::Stale));
        assert!(s.types[&CDS].nack.is_none());
    }

    #[test]
    fn new_names_are_answered_at_once_with_the_whole_set() {
        let cache = cache_with(&[("demo", "echo"), ("demo", "other")]);
        let mut s = SotwState::default();
        s.on_request(&request(CDS, &["echo.demo"], "", "")).expect("ok");
        let r = s.responses(&cache.snapshot()).remove(0);
        s.on_request(&request(CDS, &["echo.demo", "other.demo"], &r.version_info, &r.nonce)).expect("ack");
        let r = s.responses(&cache.snapshot());
        assert_eq!(names(&r[0]), vec!["echo.demo", "other.demo"]);
    }

    #[test]
    fn wildcard_lds_cds_follow_services() {
        let cache = cache_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        let mut first = request(CDS, &[], "", "");
        first.node = Some(node("a", "envoy"));
        s.on_request(&first).expect("ok");
        let r = s.responses(&cache.snapshot()).remove(0);
        assert_eq!(names(&r), vec!["echo.demo"]);
        s.on_request(&request(CDS, &[], &r.version_info, &r.nonce)).expect("ack");
        assert!(s.types[&CDS].subscription.wildcard, "empty list keeps the wildcard");
        cache.update_service(&ServiceName::new("demo", "new"), ServiceEndpoints::default(), Policy::LocalFirst);
        let r = s.responses(&cache.snapshot()).remove(0);
        assert_eq!(names(&r), vec!["echo.demo", "new.demo"]);
        cache.remove_service(&ServiceName::new("demo", "echo"));
        let r = s.responses(&cache.snapshot()).remove(0);
        assert_eq!(names(&r), vec!["new.demo"], "removal = left out of the whole set");
    }

    #[test]
    fn unknown_listener_gets_an_empty_lds_response() {
        let cache = cache_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(LDS, &["nope.demo"], "", "")).expect("ok");
        let r = s.responses(&cache.snapshot());
        assert_eq!(r.len(), 1);
        assert!(r[0].resources.is_empty(), "so the client learns it does not exist");
    }

    #[test]
    fn nothing_is_sent_for_unsubscribed_types_and_unknown_types_are_ignored() {
        let cache = cache_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &[], "", "")).expect("ok");
        assert!(s.responses(&cache.snapshot()).is_empty());
        let mut unknown = request(EDS, &["x"], "", "");
        unknown.type_url = "type.googleapis.com/envoy.config.Nope".into();
        assert_eq!(s.on_request(&unknown).ok().map(|r| r.1), Some(Outcome::UnknownType));
        unknown.type_url = String::new();
        assert!(s.on_request(&unknown).is_err());
    }

    #[test]
    fn reconnect_with_known_version_is_answered() {
        let cache = cache_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &["echo.demo"], "", "")).expect("ok");
        let r = s.responses(&cache.snapshot()).remove(0);
        // A new stream (reconnect): the client sends the version it has, no nonce.
        let mut s2 = SotwState::default();
        s2.on_request(&request(EDS, &["echo.demo"], &r.version_info, "")).expect("ok");
        let r2 = s2.responses(&cache.snapshot());
        assert_eq!(r2.len(), 1, "the first request on a stream is always answered");
        assert_eq!(r2[0].version_info, r.version_info, "same content, same version after restart");
    }

    #[test]
    fn node_is_taken_from_the_first_request_only() {
        let mut s = SotwState::default();
        let mut first = request(LDS, &["a"], "", "");
        first.node = Some(node("zone-1", "gRPC Go"));
        s.on_request(&first).expect("ok");
        let mut later = request(CDS, &["a"], "", "");
        later.node = Some(node("zone-2", "envoy"));
        s.on_request(&later).expect("ok");
        let client = s.client.clone().expect("client");
        assert_eq!(client.zone, Some(Zone::new("zone-1")));
        assert_eq!(client.kind, ClientKind::Grpc);
    }
}
