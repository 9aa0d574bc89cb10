//! The State-of-the-World protocol. Versions are per type, nonces per
//! stream.
//!
//! - **LDS and CDS** responses carry the client's whole subscribed set (a
//!   name left out is deleted by the client), one response per change of
//!   that set.
//! - **RDS and EDS** responses carry only what changed, **one resource per
//!   response**: a client subscribed to many large services never gets a
//!   response the size of all of them (grpc-go and tonic refuse messages over
//!   4 MiB by default), and a change to one service re-sends only that one.
//!   A resource is sent when its version differs from the last one sent to
//!   this stream, or when it is newly named; the response's `version_info`
//!   is the resource's own version (a hash of its encoded bytes, as in Delta), which
//!   is what Envoy's config dump then shows for it.
//!
//! ACK and NACK. With several responses of one type in flight, the client
//! answers each in turn (grpc-go), or, when responses arrive faster than it
//! can send, one request with the newest nonce it processed (gRPC C-core
//! coalesces queued requests of a type). So a request carrying the nonce of
//! any response still outstanding is current, not stale: it resolves that
//! response **and every earlier outstanding one** of the type. Without
//! `error_detail` they are all ACKed; with it, the response it names is
//! NACKed and the earlier ones are taken as accepted (their fate is not in
//! the request; it changes nothing sent: a rejected version is never sent
//! again either way, and the next version of that resource is). A request
//! repeating the nonce last resolved (how clients change subscriptions
//! between responses) updates the subscription. Any other nonce is stale and
//! ignored, subscription included. A plain ACK sends nothing.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tonic::Status;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::names::{NameMap, NameSet};
use super::registry::{ResourceState, TypeStatus};
use super::wire::{self, Frame, Reply};
use super::{ADD_ORDER, ClientInfo, Nack, Outcome, PerType, Protocol, remove_rank, watch_of};
use crate::cache::{Encoded, Snapshot, stable_hash};
use crate::resources::ResourceType;
use crate::wakeup::{Changed, Watch};
use std::sync::Arc;

/// What a stream subscribed to for one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Every resource of the type (LDS/CDS only).
    pub wildcard: bool,
    pub names: NameSet,
}

/// A response not yet ACKed or NACKed.
#[derive(Debug, Clone)]
struct Outstanding {
    version: Arc<str>,
    /// The resources in it (their names and versions; shared with the cache).
    resources: Vec<Arc<Encoded>>,
}

/// Per-type protocol state of one stream.
#[derive(Debug, Clone, Default)]
pub struct TypeState {
    pub subscription: Subscription,
    /// `version_info` of the last response sent.
    pub version: Option<Arc<str>>,
    /// `version_info` of the last ACK.
    pub acked_version: Option<String>,
    /// The NACK in force: the latest one, while a version it rejected is
    /// still the last sent of its resource.
    pub nack: Option<Nack>,
    /// Name → the last version sent (ACKed or not). Never sent again as is.
    pub sent: NameMap<Arc<str>>,
    /// Name → the last version the client ACKed.
    pub acked: NameMap<Arc<str>>,
    /// Name → the last version the client rejected, and why.
    pub rejected: NameMap<Nack>,
    /// Responses sent and not yet answered, by nonce, oldest first.
    outstanding: Vec<(u64, Outstanding)>,
    /// The nonce of the newest answered response.
    resolved: Option<u64>,
    /// The client asked for something it has not been answered for yet
    /// (first request, reconnect, a newly named resource): LDS/CDS only, as
    /// RDS/EDS send every named resource not yet sent anyway.
    must_respond: bool,
}

impl TypeState {
    /// Apply the answer to outstanding responses up to `nonce`.
    fn resolve(&mut self, nonce: u64, request: &DiscoveryRequest) -> Outcome {
        let split = self.outstanding.partition_point(|(n, _)| *n <= nonce);
        let later = self.outstanding.split_off(split);
        let answered = std::mem::replace(&mut self.outstanding, if later.is_empty() { Vec::new() } else { later });
        self.resolved = Some(nonce);
        let mut outcome = Outcome::Ack;
        for (n, response) in answered {
            match &request.error_detail {
                Some(error) if n == nonce => {
                    let nack = Nack { version: response.version.to_string(), message: error.message.clone() };
                    for r in &response.resources {
                        if self.sent.contains_key(&r.name) {
                            self.rejected
                                .set(&r.name, Nack { version: r.version.to_string(), message: error.message.clone() });
                        }
                    }
                    self.nack = Some(nack);
                    outcome = Outcome::Nack(error.message.clone());
                }
                _ => {
                    for r in &response.resources {
                        if self.sent.contains_key(&r.name) {
                            // Accepted at this version: an earlier rejection no longer stands.
                            if self.rejected.get(&r.name).is_some_and(|n| *n.version == *r.version) {
                                self.rejected.remove(&r.name);
                            }
                            self.acked.set(&r.name, r.version.clone());
                        }
                    }
                }
            }
        }
        if request.error_detail.is_none() {
            self.acked_version = Some(request.version_info.clone());
        }
        self.forget_superseded_nack();
        outcome
    }

    /// A rejection stops mattering once a newer version was sent in its place.
    fn forget_superseded_nack(&mut self) {
        let sent = &self.sent;
        self.rejected.retain(|name, nack| sent.get(name).is_some_and(|v| **v == *nack.version));
        if self.rejected.is_empty() {
            self.nack = None;
        }
    }

    fn state_of(&self, name: &str, version: &str) -> ResourceState {
        match (self.rejected.get(name), self.acked.get(name)) {
            (Some(nack), _) if nack.version == version => ResourceState::Nacked(nack.clone()),
            (_, Some(acked)) if **acked == *version => ResourceState::Acked,
            _ => ResourceState::Requested,
        }
    }

    /// Record a response about to be sent with `nonce`.
    fn record(&mut self, nonce: u64, version: Arc<str>, resources: Vec<Arc<Encoded>>, whole_set: bool) {
        if whole_set {
            self.sent = resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
            let sent = &self.sent;
            self.acked.retain(|name, _| sent.contains_key(name));
        } else {
            for r in &resources {
                self.sent.set(&r.name, r.version.clone());
            }
        }
        self.version = Some(version.clone());
        self.outstanding.push((nonce, Outstanding { version, resources }));
        self.forget_superseded_nack();
    }
}

/// The State-of-the-World state machine of one ADS stream. No I/O: feed it
/// requests with [`on_request`](Self::on_request), ask it what to send with
/// [`responses`](Self::responses).
#[derive(Debug, Default)]
pub struct SotwState {
    pub client: Option<ClientInfo>,
    /// What the client may read (`[authz]`); `None`: everything.
    pub access: Option<std::sync::Arc<crate::authz::Access>>,
    /// The cache's view of the client (zone, kind, access), made once.
    view: Option<crate::cache::Client>,
    pub types: PerType<TypeState>,
    nonce: u64,
    /// A request since the last [`Protocol::take_changed`] may need an answer.
    changed: bool,
}

impl Protocol for SotwState {
    type Request = DiscoveryRequest;
    const NAME: &'static str = "sotw";

    fn client(&self) -> Option<&ClientInfo> {
        self.client.as_ref()
    }

    fn request_type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }

    fn request_names(request: &DiscoveryRequest) -> usize {
        request.resource_names.len()
    }

    fn held_names(&self) -> usize {
        self.types.values().map(|t| t.subscription.names.len()).sum()
    }

    fn request_node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn status(&self) -> Vec<TypeStatus> {
        self.types
            .iter()
            .map(|(ty, state)| {
                let mut subscribed: Vec<String> = state.subscription.names.keys().cloned().collect();
                if state.subscription.wildcard {
                    subscribed.insert(0, "*".to_string());
                }
                TypeStatus {
                    type_url: ty.type_url().to_string(),
                    subscribed,
                    sent: state.version.as_deref().map(str::to_string),
                    acked: state.acked_version.clone(),
                    nack: state.nack.clone(),
                    resources: state.sent.iter().map(|(name, v)| (name.clone(), v.to_string())).collect(),
                    states: state.sent.iter().map(|(name, v)| (name.clone(), state.state_of(name, v))).collect(),
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
        let state = self.types.entry(ty);
        let outcome = if request.response_nonce.is_empty() {
            // No response of the type seen: the start of the stream, or the
            // client started the type over. In the latter case it holds
            // nothing we know of, so everything named is sent again.
            if state.outstanding.is_empty() {
                state.sent.clear();
                state.acked.clear();
                state.rejected.clear();
                state.nack = None;
            }
            state.must_respond = true;
            Outcome::Subscribe
        } else {
            match request.response_nonce.parse::<u64>() {
                Ok(nonce) if state.outstanding.iter().any(|(n, _)| *n == nonce) => state.resolve(nonce, request),
                // Repeating the last answered nonce: a subscription change.
                Ok(nonce) if state.resolved == Some(nonce) => match &request.error_detail {
                    Some(error) => Outcome::Nack(error.message.clone()),
                    None => Outcome::Ack,
                },
                _ => return Ok((ty, Outcome::Stale)),
            }
        };

        let names: NameSet = request.resource_names.iter().filter(|n| *n != "*").cloned().collect();
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
        if !ty.is_full_set() {
            // An unsubscribed RDS/EDS resource is dropped by the client: send
            // it again if it is named again.
            for gone in state.subscription.names.difference(&subscription.names) {
                state.sent.remove(gone);
                state.acked.remove(gone);
                state.rejected.remove(gone);
            }
            state.forget_superseded_nack();
        }
        let changed = state.subscription != subscription || outcome == Outcome::Subscribe;
        state.subscription = subscription;
        self.changed |= changed;
        Ok((ty, outcome))
    }

    fn set_access(&mut self, access: std::sync::Arc<crate::authz::Access>) {
        self.access = Some(access);
        self.view = None;
    }

    fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Empty until the first request has told us who the client is.
    fn responses(&mut self, snapshot: &Snapshot, changed: &Changed) -> Vec<Reply> {
        let Some(client) = super::client_view(&mut self.view, self.client.as_ref(), &self.access) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // Whole sets that only lose names: sent after everything else.
        let mut removals = Vec::new();
        for ty in ADD_ORDER {
            let Some(state) = self.types.get_mut(&ty) else { continue };
            let sub = &state.subscription;
            if !sub.wildcard && sub.names.is_empty() {
                state.must_respond = false;
                continue;
            }
            // Nothing of this type moved (an endpoints change for LDS, RDS, CDS): no name to look at.
            if !state.must_respond && !changed.touches_type(ty) {
                continue;
            }
            let touched = |name: &String| changed.touches(Snapshot::key_of(name), ty);
            if ty.is_full_set() {
                // A wildcard set may gain or lose a member with any change.
                let stale =
                    state.must_respond || (sub.wildcard && changed.touches_type(ty)) || sub.names.keys().any(touched);
                if !stale {
                    continue;
                }
                let mut names: Vec<&String> = sub.names.keys().collect();
                let wildcard_names = if sub.wildcard { snapshot.wildcard_names(ty, client) } else { Vec::new() };
                names.extend(wildcard_names.iter().filter(|n| !sub.names.contains(n)));
                names.sort();
                let resources: Vec<_> = names.iter().filter_map(|n| snapshot.resolve(ty, n, client)).collect();
                let version: Arc<str> = format!(
                    "{:016x}",
                    stable_hash(&resources.iter().map(|r| (&r.name, &*r.version)).collect::<Vec<_>>())
                )
                .into();
                let unchanged = state.version.as_ref() == Some(&version);
                if unchanged && !state.must_respond {
                    continue;
                }
                let shrinks_only = resources.len() < state.sent.len()
                    && resources.iter().all(|r| state.sent.get(&r.name) == Some(&r.version));
                self.nonce += 1;
                state.record(self.nonce, version.clone(), resources.clone(), true);
                let reply = Reply { ty, version, nonce: self.nonce, resources, removed: Vec::new() };
                if shrinks_only { removals.push(reply) } else { out.push(reply) }
            } else {
                let due: Vec<_> = sub
                    .names
                    .keys()
                    .filter(|n| touched(n))
                    .filter_map(|n| snapshot.resolve(ty, n, client))
                    .filter(|r| state.sent.get(&r.name) != Some(&r.version))
                    .collect();
                for r in due {
                    self.nonce += 1;
                    let version = r.version.clone();
                    let resources = vec![r];
                    state.record(self.nonce, version.clone(), resources.clone(), false);
                    out.push(Reply { ty, version, nonce: self.nonce, resources, removed: Vec::new() });
                }
            }
            state.must_respond = false;
        }
        removals.sort_by_key(|r| remove_rank(r.ty));
        out.extend(removals);
        out
    }

    fn encode(reply: &Reply) -> Frame {
        wire::sotw(reply)
    }

    fn watch(&self) -> Watch {
        watch_of(self.types.values().map(|s| (s.subscription.wildcard, s.subscription.names.keys())))
    }

    fn eds_names(&self) -> BTreeSet<String> {
        self.types
            .get(&ResourceType::ClusterLoadAssignment)
            .map(|s| s.subscription.names.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use prost::Message;

    /// The responses due, as the client decodes them off the wire.
    fn sent(s: &mut SotwState, snapshot: &Snapshot) -> Vec<DiscoveryResponse> {
        s.responses(snapshot, &Changed::All)
            .iter()
            .map(|r| DiscoveryResponse::decode(SotwState::encode(r).message().as_slice()).expect("decodes"))
            .collect()
    }
    use crate::builder::Builder;
    use crate::model::{ClientKind, Endpoint, Health, ServiceEndpoints, ServiceName, Zone};
    use crate::policy::Policy;
    use crate::server::registry::ResourceState;
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

    /// One healthy endpoint in zone a at 10.0.0.`ip`.
    fn endpoint(ip: u8) -> Endpoint {
        Endpoint {
            instance_id: format!("i-{ip}"),
            ip: std::net::IpAddr::from([10, 0, 0, ip]),
            port: 50051,
            zone: Zone::new("a"),
            region: "r".into(),
            health: Health::Healthy,
            weight: 1,
            attributes: Default::default(),
            metadata: Default::default(),
        }
    }

    fn builder_with(services: &[(&str, &str)]) -> Builder {
        let mut builder = Builder::default();
        for (i, (ns, svc)) in services.iter().enumerate() {
            builder.update_service(
                &ServiceName::new(*ns, *svc),
                ServiceEndpoints::new(vec![endpoint(i as u8 + 1)], false),
                Policy::LocalFirst,
            );
        }
        builder.set_ready();
        builder
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
    fn make_before_break_order_for_envoy() {
        let mut builder = Builder::standalone(Some("127.0.0.1:15001".parse().expect("addr")));
        let one = |ip: u8| ServiceEndpoints::new(vec![endpoint(ip)], false);
        builder.update_service(&ServiceName::new("demo", "echo"), one(1), Policy::ZoneAware);
        builder.set_ready();
        let mut s = SotwState::default();
        let mut first = request(LDS, &[], "", "");
        first.node = Some(node("a", "envoy"));
        s.on_request(&first).expect("lds");
        s.on_request(&request(RDS, &[crate::resources::EGRESS], "", "")).expect("rds");
        s.on_request(&request(CDS, &[], "", "")).expect("cds");
        s.on_request(&request(EDS, &["echo.demo"], "", "")).expect("eds");
        let types = |r: &[DiscoveryResponse]| -> Vec<ResourceType> {
            r.iter().map(|r| ResourceType::from_type_url(&r.type_url).expect("type")).collect()
        };
        assert_eq!(types(&sent(&mut s, &builder.snapshot())), vec![CDS, EDS, LDS, RDS]);

        // A new service: the whole CDS set (with it) before the routes naming it.
        builder.update_service(&ServiceName::new("demo", "new"), one(2), Policy::ZoneAware);
        assert_eq!(types(&sent(&mut s, &builder.snapshot())), vec![CDS, RDS]);
        // Removed: the routes lose it before the CDS set does.
        builder.remove_service(&ServiceName::new("demo", "new"));
        assert_eq!(types(&sent(&mut s, &builder.snapshot())), vec![RDS, CDS]);
    }

    #[test]
    fn grpc_client_walk_lds_rds_cds_eds() {
        let builder = builder_with(&[("demo", "echo"), ("grpc.demo", "echo")]);
        let mut s = SotwState::default();
        let mut first = request(LDS, &["echo.grpc.demo:50051"], "", "");
        first.node = Some(node("a", "gRPC C-core"));
        assert_eq!(s.on_request(&first).ok().map(|r| r.1), Some(Outcome::Subscribe));
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.len(), 1);
        assert_eq!(names(&r[0]), vec!["echo.grpc.demo:50051"]);
        let lds = r[0].clone();

        // ACK, then subscribe RDS, CDS, EDS in turn: each answered once.
        assert_eq!(
            s.on_request(&request(LDS, &["echo.grpc.demo:50051"], &lds.version_info, &lds.nonce)).ok().map(|r| r.1),
            Some(Outcome::Ack)
        );
        assert!(sent(&mut s, &builder.snapshot()).is_empty(), "an ACK is not answered");
        for (ty, name) in [(RDS, "echo.grpc.demo:50051"), (CDS, "echo.grpc.demo"), (EDS, "echo.grpc.demo")] {
            s.on_request(&request(ty, &[name], "", "")).expect("ok");
            let r = sent(&mut s, &builder.snapshot());
            assert_eq!(r.len(), 1, "{ty:?}");
            assert_eq!(names(&r[0]), vec![name]);
            s.on_request(&request(ty, &[name], &r[0].version_info, &r[0].nonce)).expect("ack");
            assert!(sent(&mut s, &builder.snapshot()).is_empty());
        }
        assert_eq!(s.eds_names(), BTreeSet::from(["echo.grpc.demo".to_string()]));
        assert_eq!(s.client.as_ref().and_then(|c| c.zone.clone()), Some(Zone::new("a")));
    }

    #[test]
    fn nacked_version_is_not_resent_until_it_changes() {
        let mut builder = builder_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &["echo.demo"], "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot()).remove(0);
        assert_eq!(
            s.on_request(&nack(EDS, &["echo.demo"], "", &r.nonce)).ok().map(|r| r.1),
            Some(Outcome::Nack("bad".into()))
        );
        assert_eq!(s.types[&EDS].nack.as_ref().map(|n| n.version.clone()), Some(r.version_info.clone()));
        for _ in 0..3 {
            assert!(sent(&mut s, &builder.snapshot()).is_empty(), "no resend loop");
        }
        // A new version is sent.
        builder.update_service(&ServiceName::new("demo", "echo"), ServiceEndpoints::default(), Policy::LocalFirst);
        let again = sent(&mut s, &builder.snapshot());
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].version_info, r.version_info);
    }

    #[test]
    fn stale_nonce_is_ignored() {
        let mut builder = builder_with(&[("demo", "echo"), ("demo", "other")]);
        let mut s = SotwState::default();
        s.on_request(&request(CDS, &["echo.demo"], "", "")).expect("ok");
        let first = sent(&mut s, &builder.snapshot()).remove(0);
        s.on_request(&request(CDS, &["echo.demo"], &first.version_info, &first.nonce)).expect("ack");
        builder.remove_service(&ServiceName::new("demo", "other"));
        // A NACK carrying an old nonce does not count as a NACK of the latest.
        assert_eq!(s.on_request(&nack(CDS, &["echo.demo"], "", "999")).ok().map(|r| r.1), Some(Outcome::Stale));
        assert!(s.types[&CDS].nack.is_none());
    }

    #[test]
    fn new_names_are_answered_at_once_with_the_whole_set() {
        let builder = builder_with(&[("demo", "echo"), ("demo", "other")]);
        let mut s = SotwState::default();
        s.on_request(&request(CDS, &["echo.demo"], "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot()).remove(0);
        s.on_request(&request(CDS, &["echo.demo", "other.demo"], &r.version_info, &r.nonce)).expect("ack");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["echo.demo", "other.demo"]);
    }

    #[test]
    fn wildcard_lds_cds_follow_services() {
        let mut builder = builder_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        let mut first = request(CDS, &[], "", "");
        first.node = Some(node("a", "envoy"));
        s.on_request(&first).expect("ok");
        let r = sent(&mut s, &builder.snapshot()).remove(0);
        assert_eq!(names(&r), vec!["echo.demo"]);
        s.on_request(&request(CDS, &[], &r.version_info, &r.nonce)).expect("ack");
        assert!(s.types[&CDS].subscription.wildcard, "empty list keeps the wildcard");
        builder.update_service(&ServiceName::new("demo", "new"), ServiceEndpoints::default(), Policy::LocalFirst);
        let r = sent(&mut s, &builder.snapshot()).remove(0);
        assert_eq!(names(&r), vec!["echo.demo", "new.demo"]);
        builder.remove_service(&ServiceName::new("demo", "echo"));
        let r = sent(&mut s, &builder.snapshot()).remove(0);
        assert_eq!(names(&r), vec!["new.demo"], "removal = left out of the whole set");
    }

    #[test]
    fn unknown_listener_gets_an_empty_lds_response() {
        let builder = builder_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(LDS, &["nope.demo"], "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.len(), 1);
        assert!(r[0].resources.is_empty(), "so the client learns it does not exist");
    }

    #[test]
    fn nothing_is_sent_for_unsubscribed_types_and_unknown_types_are_ignored() {
        let builder = builder_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &[], "", "")).expect("ok");
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
        let mut unknown = request(EDS, &["x"], "", "");
        unknown.type_url = "type.googleapis.com/envoy.config.Nope".into();
        assert_eq!(s.on_request(&unknown).ok().map(|r| r.1), Some(Outcome::UnknownType));
        unknown.type_url = String::new();
        assert!(s.on_request(&unknown).is_err());
    }

    #[test]
    fn reconnect_with_known_version_is_answered() {
        let builder = builder_with(&[("demo", "echo")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &["echo.demo"], "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot()).remove(0);
        // A new stream (reconnect): the client sends the version it has, no nonce.
        let mut s2 = SotwState::default();
        s2.on_request(&request(EDS, &["echo.demo"], &r.version_info, "")).expect("ok");
        let r2 = sent(&mut s2, &builder.snapshot());
        assert_eq!(r2.len(), 1, "the first request on a stream is always answered");
        assert_eq!(r2[0].version_info, r.version_info, "same content, same version after restart");
    }

    fn outcome(s: &mut SotwState, r: &DiscoveryRequest) -> Outcome {
        s.on_request(r).expect("valid request").1
    }

    fn states(s: &SotwState, ty: ResourceType) -> BTreeMap<String, ResourceState> {
        s.status().into_iter().find(|t| t.type_url == ty.type_url()).map(|t| t.states).unwrap_or_default()
    }

    #[test]
    fn eds_is_sent_one_resource_per_response_and_only_what_changed() {
        let mut builder = builder_with(&[("demo", "a"), ("demo", "b"), ("demo", "c")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &["a.demo", "b.demo", "c.demo"], "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.iter().map(names).collect::<Vec<_>>(), vec![vec!["a.demo"], vec!["b.demo"], vec!["c.demo"]]);
        let last = r.last().expect("three");
        assert_eq!(
            outcome(&mut s, &request(EDS, &["a.demo", "b.demo", "c.demo"], &last.version_info, &last.nonce)),
            Outcome::Ack
        );
        assert!(sent(&mut s, &builder.snapshot()).is_empty(), "an ACK is not answered");
        // One service changes: only it is sent.
        builder.update_service(&ServiceName::new("demo", "b"), ServiceEndpoints::default(), Policy::LocalFirst);
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.iter().map(names).collect::<Vec<_>>(), vec![vec!["b.demo"]]);
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
    }

    #[test]
    fn earlier_outstanding_nonces_are_answers_not_stale() {
        let mut builder = builder_with(&[("demo", "a"), ("demo", "b")]);
        let mut s = SotwState::default();
        let all = ["a.demo", "b.demo"];
        s.on_request(&request(EDS, &all, "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.len(), 2);
        // grpc-go answers each response in turn: the first ACK is not stale.
        assert_eq!(outcome(&mut s, &request(EDS, &all, &r[0].version_info, &r[0].nonce)), Outcome::Ack);
        let st = states(&s, EDS);
        assert_eq!((st["a.demo"].clone(), st["b.demo"].clone()), (ResourceState::Acked, ResourceState::Requested));
        assert_eq!(outcome(&mut s, &nack(EDS, &all, &r[0].version_info, &r[1].nonce)), Outcome::Nack("bad".into()));
        let st = states(&s, EDS);
        assert_eq!(st["a.demo"], ResourceState::Acked);
        assert_eq!(
            st["b.demo"],
            ResourceState::Nacked(Nack { version: r[1].version_info.clone(), message: "bad".into() })
        );
        assert!(sent(&mut s, &builder.snapshot()).is_empty(), "a NACKed version is not re-sent");
        // An answer already given is stale; so is a nonce never sent.
        assert_eq!(outcome(&mut s, &request(EDS, &all, "", &r[0].nonce)), Outcome::Stale);
        assert_eq!(outcome(&mut s, &request(EDS, &all, "", "77")), Outcome::Stale);

        // Both change; C-core answers both with one request carrying the newer nonce.
        for svc in ["a", "b"] {
            builder.update_service(&ServiceName::new("demo", svc), ServiceEndpoints::default(), Policy::LocalFirst);
        }
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.len(), 2, "the new version of the rejected resource is sent");
        assert_eq!(outcome(&mut s, &request(EDS, &all, &r[1].version_info, &r[1].nonce)), Outcome::Ack);
        assert!(states(&s, EDS).values().all(|st| *st == ResourceState::Acked));
        assert!(s.types[&EDS].nack.is_none(), "no NACK in force any more");
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
    }

    #[test]
    fn a_subscription_change_repeating_the_last_nonce_sends_only_the_new_name() {
        let builder = builder_with(&[("demo", "a"), ("demo", "b")]);
        let mut s = SotwState::default();
        s.on_request(&request(EDS, &["a.demo"], "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot()).remove(0);
        s.on_request(&request(EDS, &["a.demo"], &r.version_info, &r.nonce)).expect("ack");
        // The client names b with the nonce it already ACKed.
        assert_eq!(outcome(&mut s, &request(EDS, &["a.demo", "b.demo"], &r.version_info, &r.nonce)), Outcome::Ack);
        let r2 = sent(&mut s, &builder.snapshot());
        assert_eq!(r2.iter().map(names).collect::<Vec<_>>(), vec![vec!["b.demo"]]);
        // Dropping a and naming it again sends it again (the client forgot it).
        s.on_request(&request(EDS, &["b.demo"], &r2[0].version_info, &r2[0].nonce)).expect("ok");
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
        s.on_request(&request(EDS, &["a.demo", "b.demo"], &r2[0].version_info, &r2[0].nonce)).expect("ok");
        let r3 = sent(&mut s, &builder.snapshot());
        assert_eq!(r3.iter().map(names).collect::<Vec<_>>(), vec![vec!["a.demo"]]);
        assert_eq!(r3[0].version_info, r.version_info, "same content, same version");
    }

    #[test]
    fn a_nacked_whole_set_is_not_resent_and_its_resources_show_nacked() {
        let mut builder = builder_with(&[("demo", "a"), ("demo", "b")]);
        let mut s = SotwState::default();
        let all = ["a.demo", "b.demo", "c.demo"];
        s.on_request(&request(CDS, &all, "", "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.len(), 1);
        assert_eq!(names(&r[0]), vec!["a.demo", "b.demo"], "CDS stays a whole set");
        s.on_request(&nack(CDS, &all, "", &r[0].nonce)).expect("nack");
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
        assert!(states(&s, CDS).values().all(|st| matches!(st, ResourceState::Nacked(_))));
        // c appears; the new set (a and b unchanged) is accepted: nothing stands NACKed.
        builder.update_service(&ServiceName::new("demo", "c"), ServiceEndpoints::default(), Policy::None);
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["a.demo", "b.demo", "c.demo"]);
        s.on_request(&request(CDS, &all, &r[0].version_info, &r[0].nonce)).expect("ack");
        assert!(states(&s, CDS).values().all(|st| *st == ResourceState::Acked), "{:?}", states(&s, CDS));
        assert!(s.types[&CDS].nack.is_none());
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

    #[test]
    fn a_change_to_another_service_is_not_looked_at() {
        let mut builder = builder_with(&[("demo", "echo"), ("demo", "other")]);
        let mut s = SotwState::default();
        s.on_request(&DiscoveryRequest {
            node: Some(node("a", "gRPC Python")),
            ..request(EDS, &["echo.demo"], "", "")
        })
        .expect("ok");
        let first = s.responses(&builder.snapshot(), &Changed::All);
        assert_eq!(first.len(), 1);
        s.on_request(&request(EDS, &["echo.demo"], &first[0].version, &first[0].nonce.to_string())).expect("ack");
        builder.update_service(
            &ServiceName::new("demo", "echo"),
            ServiceEndpoints::new(vec![endpoint(9)], false),
            Policy::LocalFirst,
        );
        let snapshot = builder.snapshot();
        let other = Changed::Keys([("other.demo".to_string(), crate::wakeup::Scope::All)].into_iter().collect());
        assert!(s.responses(&snapshot, &other).is_empty(), "echo.demo is not re-resolved for other.demo");
        let r = s.responses(&snapshot, &snapshot.changed);
        assert_eq!(r.len(), 1, "the change of echo.demo is sent");
        assert_eq!(r[0].resources[0].name, "echo.demo");
    }
}
