//! The Delta (incremental) protocol, as Envoy speaks it with `DELTA_GRPC`:
//! subscriptions change by `resource_names_subscribe`/`_unsubscribe`, each
//! resource has its own version, only changed resources are sent, deletions
//! go in `removed_resources`, and on reconnect the client's
//! `initial_resource_versions` say what it already has — so it is sent only
//! what changed while it was away. Versions are hashes of content, stable
//! across control-plane restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::Status;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::names::{NameMap, NameSet};
use super::registry::TypeStatus;
use super::wire::{self, Frame, Reply};
use super::{ADD_ORDER, ClientInfo, Nack, Outcome, PerType, Protocol, remove_rank, watch_of};
use crate::cache::{Snapshot, stable_hash};
use crate::resources::ResourceType;
use crate::wakeup::{Changed, Watch};

/// Per-type Delta state of one stream.
#[derive(Debug, Clone, Default)]
pub struct DeltaTypeState {
    pub wildcard: bool,
    /// Explicitly subscribed names.
    pub names: NameSet,
    /// What the client holds: name → version (from `initial_resource_versions`
    /// and from what was sent).
    pub known: NameMap<Arc<str>>,
    /// Explicitly subscribed names already reported as not existing.
    absent_reported: NameSet,
    pub last_nonce: Option<String>,
    pub acked_nonce: Option<String>,
    pub nack: Option<Nack>,
    must_respond: bool,
}

#[derive(Debug, Default)]
pub struct DeltaState {
    pub client: Option<ClientInfo>,
    /// What the client may read (`[authz]`); `None`: everything.
    pub access: Option<std::sync::Arc<crate::authz::Access>>,
    /// The cache's view of the client (zone, kind, access), made once.
    view: Option<crate::cache::Client>,
    pub types: PerType<DeltaTypeState>,
    nonce: u64,
    /// A request since the last [`Protocol::take_changed`] may need an answer.
    changed: bool,
}

impl Protocol for DeltaState {
    type Request = DeltaDiscoveryRequest;
    const NAME: &'static str = "delta";

    fn client(&self) -> Option<&ClientInfo> {
        self.client.as_ref()
    }

    fn request_type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }

    fn request_names(request: &DeltaDiscoveryRequest) -> usize {
        request.resource_names_subscribe.len()
            + request.resource_names_unsubscribe.len()
            + request.initial_resource_versions.len()
    }

    fn held_names(&self) -> usize {
        self.types.values().map(|t| t.names.len()).sum()
    }

    fn request_node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn status(&self) -> Vec<TypeStatus> {
        self.types
            .iter()
            .map(|(ty, state)| {
                let mut subscribed: Vec<String> = state.names.keys().cloned().collect();
                if state.wildcard {
                    subscribed.insert(0, "*".to_string());
                }
                TypeStatus {
                    type_url: ty.type_url().to_string(),
                    subscribed,
                    sent: state.last_nonce.clone(),
                    acked: state.acked_nonce.clone(),
                    nack: state.nack.clone(),
                    resources: state.known.iter().map(|(name, v)| (name.clone(), v.to_string())).collect(),
                    states: BTreeMap::new(),
                }
            })
            .collect()
    }

    fn on_request(&mut self, request: &DeltaDiscoveryRequest) -> Result<(ResourceType, Outcome), Status> {
        if self.client.is_none() {
            self.client = Some(ClientInfo::from_node(request.node.as_ref()));
        }
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "DeltaDiscoveryRequest.type_url is empty; ADS needs it on every request",
            ));
        }
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            return Ok((ResourceType::Listener, Outcome::UnknownType));
        };
        let first = !self.types.contains_key(&ty);
        let state = self.types.entry(ty);

        let outcome = if request.response_nonce.is_empty() {
            Outcome::Subscribe
        } else if let Some(error) = &request.error_detail {
            // The client kept its previous resources. The rejected versions stay
            // recorded as "known", so they are not re-sent; a new version is.
            let version = state.last_nonce.clone().unwrap_or_default();
            state.nack = Some(Nack { version, message: error.message.clone() });
            Outcome::Nack(error.message.clone())
        } else {
            state.acked_nonce = Some(request.response_nonce.clone());
            state.nack = None;
            Outcome::Ack
        };

        if first {
            state.must_respond = true;
            state.known =
                request.initial_resource_versions.iter().map(|(k, v)| (k.clone(), Arc::from(v.as_str()))).collect();
            // Legacy wildcard: a first LDS/CDS request that names nothing.
            if ty.is_full_set() && request.resource_names_subscribe.is_empty() {
                state.wildcard = true;
            }
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.must_respond |= !state.wildcard;
                state.wildcard = true;
            } else if state.names.add(name.clone()) {
                state.absent_reported.remove(name);
                state.must_respond = true;
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(name);
                state.absent_reported.remove(name);
            }
            // An unsubscribed resource is dropped by the client: forget it so a
            // later subscription sends it again.
            if !state.wildcard {
                state.known.remove(name);
            }
        }
        self.changed |= first
            || outcome == Outcome::Subscribe
            || !request.resource_names_subscribe.is_empty()
            || !request.resource_names_unsubscribe.is_empty();
        Ok((ty, outcome))
    }

    fn set_access(&mut self, access: std::sync::Arc<crate::authz::Access>) {
        self.access = Some(access);
        self.view = None;
    }

    fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn responses(&mut self, snapshot: &Snapshot, changed: &Changed) -> Vec<Reply> {
        let Some(client) = super::client_view(&mut self.view, self.client.as_ref(), &self.access) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // Removals of every type, sent after all additions (make before break).
        let mut removals = Vec::new();
        for ty in ADD_ORDER {
            let Some(state) = self.types.get_mut(&ty) else { continue };
            // A type no change key's scope covers is not looked at, name by name.
            let stale = state.must_respond
                || (changed.touches_type(ty)
                    && (state.wildcard
                        || state.names.keys().any(|n| changed.touches(Snapshot::key_of(n), ty))
                        || state.known.keys().any(|n| changed.touches(Snapshot::key_of(n), ty))));
            if !stale {
                continue;
            }
            let mut wanted: BTreeSet<String> = state.names.keys().cloned().collect();
            if state.wildcard {
                wanted.extend(snapshot.wildcard_names(ty, client));
            }
            let present: BTreeMap<String, _> = wanted
                .iter()
                .filter_map(|name| snapshot.resolve(ty, name, client).map(|r| (name.clone(), r)))
                .collect();
            let updated: Vec<_> =
                present.iter().filter(|(name, r)| state.known.get(name) != Some(&r.version)).collect();
            // Gone from the wildcard set, or no longer existing.
            let mut removed: Vec<String> =
                state.known.keys().filter(|name| !present.contains_key(*name)).cloned().collect();
            // Named but never existed: say so once, so the client does not wait for it.
            for name in state.names.keys() {
                if !present.contains_key(name)
                    && !state.known.contains_key(name)
                    && !state.absent_reported.contains(name)
                {
                    removed.push(name.clone());
                }
            }
            if updated.is_empty() && removed.is_empty() && !state.must_respond {
                continue;
            }
            let system_version: Arc<str> =
                format!("{:016x}", stable_hash(&present.iter().map(|(n, r)| (n, &r.version)).collect::<Vec<_>>()))
                    .into();
            if !updated.is_empty() || removed.is_empty() {
                self.nonce += 1;
                let resources: Vec<_> = updated.iter().map(|(_, r)| (*r).clone()).collect();
                for (name, r) in &updated {
                    state.known.set(name, r.version.clone());
                }
                out.push(Reply {
                    ty,
                    version: system_version.clone(),
                    nonce: self.nonce,
                    resources,
                    removed: Vec::new(),
                });
                state.last_nonce = Some(self.nonce.to_string());
            }
            if !removed.is_empty() {
                self.nonce += 1;
                for name in &removed {
                    state.known.remove(name);
                    if state.names.contains(name) {
                        state.absent_reported.add(name.clone());
                    }
                }
                removals.push(Reply { ty, version: system_version, nonce: self.nonce, resources: Vec::new(), removed });
                state.last_nonce = Some(self.nonce.to_string());
            }
            state.must_respond = false;
        }
        removals.sort_by_key(|r| remove_rank(r.ty));
        out.extend(removals);
        out
    }

    fn encode(reply: &Reply) -> Frame {
        wire::delta(reply)
    }

    fn watch(&self) -> Watch {
        watch_of(self.types.values().map(|s| (s.wildcard, s.names.keys())))
    }

    fn eds_names(&self) -> BTreeSet<String> {
        self.types
            .get(&ResourceType::ClusterLoadAssignment)
            .map(|s| s.names.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
    use prost::Message;

    /// The responses due, as the client decodes them off the wire.
    fn sent(s: &mut DeltaState, snapshot: &Snapshot) -> Vec<DeltaDiscoveryResponse> {
        s.responses(snapshot, &Changed::All)
            .iter()
            .map(|r| DeltaDiscoveryResponse::decode(DeltaState::encode(r).message().as_slice()).expect("decodes"))
            .collect()
    }
    use crate::builder::Builder;
    use crate::model::{Endpoint, Health, ServiceEndpoints, ServiceName, Zone};
    use crate::policy::Policy;
    use ResourceType::{Cluster as CDS, ClusterLoadAssignment as EDS, Listener as LDS};
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use envoy_types::pb::google::rpc;
    use std::collections::HashMap;

    fn envoy_node() -> Node {
        Node {
            id: "envoy-1".into(),
            user_agent_name: "envoy".into(),
            locality: Some(Locality { zone: "a".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn service(builder: &mut Builder, name: &str, ip: u8) {
        let endpoint = Endpoint {
            instance_id: format!("i-{ip}"),
            ip: std::net::IpAddr::from([10, 0, 0, ip]),
            port: 50051,
            zone: Zone::new("a"),
            region: "r".into(),
            health: Health::Healthy,
            weight: 1,
            attributes: Default::default(),
            metadata: Default::default(),
        };
        builder.update_service(
            &ServiceName::new("demo", name),
            ServiceEndpoints::new(vec![endpoint], false),
            Policy::ZoneAware,
        );
    }

    fn request(ty: ResourceType, subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: ty.type_url().into(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    fn setup() -> (Builder, DeltaState) {
        let mut builder = Builder::default();
        service(&mut builder, "echo", 1);
        service(&mut builder, "other", 2);
        builder.set_ready();
        let mut s = DeltaState::default();
        let mut first = request(CDS, &[], &[], "");
        first.node = Some(envoy_node());
        assert_eq!(s.on_request(&first).ok().map(|r| r.1), Some(Outcome::Subscribe));
        (builder, s)
    }

    #[test]
    fn wildcard_cds_sends_changes_only() {
        let (mut builder, mut s) = setup();
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["echo.demo", "other.demo"]);
        assert!(s.on_request(&request(CDS, &[], &[], &r[0].nonce)).is_ok());
        assert!(sent(&mut s, &builder.snapshot()).is_empty(), "ACK is not answered");
        // A new service: only it is sent. Its endpoints change: CDS unchanged.
        service(&mut builder, "new", 3);
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["new.demo"]);
        assert!(r[0].removed_resources.is_empty());
        service(&mut builder, "new", 4);
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
        // A removed service goes in removed_resources.
        builder.remove_service(&ServiceName::new("demo", "other"));
        let r = sent(&mut s, &builder.snapshot());
        assert!(r[0].resources.is_empty());
        assert_eq!(r[0].removed_resources, vec!["other.demo"]);
    }

    #[test]
    fn named_eds_subscribe_unsubscribe_and_absent_names() {
        let (mut builder, mut s) = setup();
        sent(&mut s, &builder.snapshot());
        s.on_request(&request(EDS, &["echo.demo", "ghost.demo"], &[], "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["echo.demo"]);
        assert!(r[0].removed_resources.is_empty(), "removals go in a later response");
        assert_eq!(r[1].removed_resources, vec!["ghost.demo"], "absent names are reported once");
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
        assert_eq!(s.eds_names(), BTreeSet::from(["echo.demo".to_string(), "ghost.demo".to_string()]));
        // Endpoint change: the one resource is re-sent with a new version.
        service(&mut builder, "echo", 9);
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["echo.demo"]);
        // Unsubscribe, then subscribe again: sent again.
        s.on_request(&request(EDS, &[], &["echo.demo"], "")).expect("ok");
        assert!(sent(&mut s, &builder.snapshot()).is_empty());
        s.on_request(&request(EDS, &["echo.demo"], &[], "")).expect("ok");
        assert_eq!(names(&sent(&mut s, &builder.snapshot())[0]), vec!["echo.demo"]);
    }

    #[test]
    fn reconnect_with_initial_versions_sends_only_what_changed() {
        let (mut builder, mut s) = setup();
        let r = sent(&mut s, &builder.snapshot());
        let versions: HashMap<String, String> =
            r[0].resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
        // While away: "other" is removed and "new" added.
        builder.remove_service(&ServiceName::new("demo", "other"));
        service(&mut builder, "new", 3);
        let mut again = DeltaState::default();
        let mut first = request(CDS, &[], &[], "");
        first.node = Some(envoy_node());
        first.initial_resource_versions = versions;
        again.on_request(&first).expect("ok");
        let r = sent(&mut again, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["new.demo"], "echo.demo is unchanged and not re-sent");
        assert_eq!(r[1].removed_resources, vec!["other.demo"]);
    }

    /// What one moment's responses carry, in the order sent: (type, names, removed).
    fn walk(r: &[DeltaDiscoveryResponse]) -> Vec<(ResourceType, Vec<&str>, Vec<&str>)> {
        r.iter()
            .map(|r| {
                let ty = ResourceType::from_type_url(&r.type_url).expect("type");
                (ty, names(r), r.removed_resources.iter().map(String::as_str).collect())
            })
            .collect()
    }

    #[test]
    fn make_before_break_for_a_new_and_a_removed_service() {
        use ResourceType::RouteConfiguration as RDS;
        let mut builder = Builder::standalone(Some("127.0.0.1:15001".parse().expect("addr")));
        service(&mut builder, "echo", 1);
        builder.set_ready();
        let mut s = DeltaState::default();
        let mut first = request(LDS, &[], &[], "");
        first.node = Some(envoy_node());
        s.on_request(&first).expect("lds");
        s.on_request(&request(RDS, &[crate::resources::EGRESS], &[], "")).expect("rds");
        s.on_request(&request(CDS, &[], &[], "")).expect("cds");
        s.on_request(&request(EDS, &["echo.demo"], &[], "")).expect("eds");
        let first = sent(&mut s, &builder.snapshot());
        let order: Vec<ResourceType> = walk(&first).into_iter().map(|(t, _, _)| t).collect();
        assert_eq!(order, vec![CDS, EDS, LDS, RDS], "clusters and endpoints before the routes naming them");

        // A new service: its cluster goes out before the route that names it.
        service(&mut builder, "new", 3);
        s.on_request(&request(EDS, &["new.demo"], &[], "")).expect("eds");
        let order: Vec<ResourceType> =
            walk(&sent(&mut s, &builder.snapshot())).into_iter().map(|(t, _, _)| t).collect();
        assert_eq!(order, vec![CDS, EDS, RDS]);

        // Removed: the route stops naming it before the cluster goes.
        builder.remove_service(&ServiceName::new("demo", "new"));
        let r = sent(&mut s, &builder.snapshot());
        let w = walk(&r);
        let rds = w.iter().position(|(t, n, _)| *t == RDS && !n.is_empty()).expect("routes updated");
        let cds = w.iter().position(|(t, _, removed)| *t == CDS && removed == &vec!["new.demo"]).expect("cds removal");
        assert!(rds < cds, "{w:?}");
    }

    #[test]
    fn reconnect_after_an_upgrade_that_reshaped_a_resource_sends_it() {
        // What an Envoy holds from the previous release: the same cluster from the same
        // inputs, in an older shape (no circuit breakers), and that shape's version.
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use prost::Message;
        let (builder, _) = setup();
        let client = crate::cache::Client::new(Some(Zone::new("a")), crate::model::ClientKind::Envoy, "envoy-1");
        let now = builder.snapshot().resolve(CDS, "echo.demo", &client).expect("cds");
        let mut old = Cluster::decode(now.value()).expect("decodes");
        old.circuit_breakers = None;
        let old = crate::cache::Encoded::new("echo.demo".into(), envoy_types::util::pack_any(old));
        assert_ne!(old.version, now.version, "a different shape is a different version");
        let other = builder.snapshot().resolve(CDS, "other.demo", &client).expect("cds");

        let mut s = DeltaState::default();
        let mut first = request(CDS, &[], &[], "");
        first.node = Some(envoy_node());
        first.initial_resource_versions = HashMap::from([
            ("echo.demo".to_string(), old.version.to_string()),
            ("other.demo".to_string(), other.version.to_string()),
        ]);
        s.on_request(&first).expect("ok");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(names(&r[0]), vec!["echo.demo"], "the reshaped cluster is sent, the unchanged one is not");
        assert_eq!(*r[0].resources[0].version, *now.version);
    }

    #[test]
    fn nack_does_not_cause_a_resend_loop() {
        let (builder, mut s) = setup();
        let r = sent(&mut s, &builder.snapshot());
        let mut nack = request(CDS, &[], &[], &r[0].nonce);
        nack.error_detail = Some(rpc::Status { code: 3, message: "no".into(), ..Default::default() });
        assert_eq!(s.on_request(&nack).ok().map(|r| r.1), Some(Outcome::Nack("no".into())));
        for _ in 0..3 {
            assert!(sent(&mut s, &builder.snapshot()).is_empty());
        }
        assert!(s.types[&CDS].nack.is_some());
    }

    #[test]
    fn envoy_wildcard_lds_is_empty_without_egress_but_answered() {
        let (builder, mut s) = setup();
        sent(&mut s, &builder.snapshot());
        s.on_request(&request(LDS, &[], &[], "")).expect("ok");
        let r = sent(&mut s, &builder.snapshot());
        assert_eq!(r.len(), 1, "the first request is answered so Envoy's init does not wait");
        assert!(r[0].resources.is_empty());
    }
}
