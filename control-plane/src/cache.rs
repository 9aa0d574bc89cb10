//! The index every stream reads: one immutable [`Snapshot`] of all services,
//! replaced whole on each change by the only writer, [`crate::builder`].
//! Resources are encoded once per variant (service × type × name × client
//! kind × traffic plan) and shared by every stream that needs them. The memo
//! is keyed by a hash of the inputs; a resource's *version* is a hash of its
//! encoded bytes, so it is stable across restarts, equal content never looks
//! new, and a release that changes a resource's shape changes its version
//! (a Delta Envoy reconnecting with the old versions is sent the new shape).
//!
//! The plans of each service come from the census the entry was built with
//! (`census` keeps the live one; the builder moves entries to it, and
//! `policy` computes the plans).
//!
//! Each snapshot records which services (change keys, [`Snapshot::key_of`])
//! it changed, and publishing wakes only the streams that watch them
//! ([`crate::wakeup`]). Encoded resources are kept as the bytes a response
//! splices in ([`Encoded`]), so a push shares them rather than copying.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use prost::Message;

use crate::model::{ClientKind, Routing, ServiceEndpoints, ServiceName, Zone};
use crate::policy::{self, PerZone, Plan, Policy};
use crate::resources::{self, ClusterLimits, ResourceType};
use crate::wakeup::{Changed, Wakeups};

/// An encoded resource, shared by all streams that are sent it. It is kept
/// only as bytes ready to be spliced into a response: a push copies no
/// resource, it takes another reference to these bytes (see `server::wire`).
#[derive(Debug)]
pub struct Encoded {
    pub name: String,
    /// Hash of the encoded bytes (type URL and value), as 16 hex digits;
    /// shared, so that streams hold and send it without copying.
    pub version: Arc<str>,
    /// The `google.protobuf.Any` as field 2 (`resources`) of a
    /// `DiscoveryResponse`: key, length, then the Any message.
    entry: Bytes,
    /// Where the Any message starts in `entry`.
    any_at: usize,
    /// Where `Any.value` (the resource message itself) starts in `entry`.
    value_at: usize,
}

impl Encoded {
    pub fn new(name: String, resource: Any) -> Self {
        let mut h = StableHasher::default();
        h.write(resource.type_url.as_bytes());
        h.write(&[0]);
        h.write(&resource.value);
        let any_len = resource.encoded_len();
        let mut entry = BytesMut::with_capacity(any_len + 11);
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut entry);
        prost::encoding::encode_varint(any_len as u64, &mut entry);
        let any_at = entry.len();
        resource.encode_raw(&mut entry);
        let value_at = entry.len() - resource.value.len();
        Encoded { name, version: format!("{:016x}", h.finish()).into(), entry: entry.freeze(), any_at, value_at }
    }

    /// The resource as field 2 of a `DiscoveryResponse` (shared, not copied).
    pub fn sotw_entry(&self) -> Bytes {
        self.entry.clone()
    }

    /// The encoded `Any` message (shared, not copied).
    pub fn any_bytes(&self) -> Bytes {
        self.entry.slice(self.any_at..)
    }

    /// The encoded resource message (`Any.value`).
    pub fn value(&self) -> &[u8] {
        &self.entry[self.value_at..]
    }

    /// A decoded copy, for the admin endpoints and CSDS (off the push path).
    pub fn resource(&self) -> Any {
        Any::decode(&self.entry[self.any_at..]).unwrap_or_default()
    }
}

/// Who is on the other end of a stream, as far as resources differ by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client {
    pub zone: Option<Zone>,
    pub kind: ClientKind,
    /// Which endpoint subset a flat client gets (< [`resources::FLAT_SUBSETS`],
    /// a stable hash of its node id); 0 for every other kind, whose
    /// resources do not depend on it.
    pub subset: u16,
    /// What it may read (`[authz]`, mTLS); `None`: everything.
    pub access: Option<Arc<crate::authz::Access>>,
}

impl Client {
    pub fn new(zone: Option<Zone>, kind: ClientKind, node_id: &str) -> Client {
        let subset = if kind == ClientKind::Flat {
            (stable_hash(&node_id) % u64::from(resources::FLAT_SUBSETS)) as u16
        } else {
            0
        };
        Client { zone, kind, subset, access: None }
    }

    pub fn with_access(mut self, access: Option<Arc<crate::authz::Access>>) -> Client {
        self.access = access;
        self
    }
}

/// What a service's settings decide in the cache: the traffic policy, the
/// cluster limits and the routing (subsets, routes, outlier detection).
/// Compared whole: any change is a change of the service (and of Envoy's
/// egress routes).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceOptions {
    pub policy: Policy,
    pub limits: ClusterLimits,
    pub routing: Arc<Routing>,
}

impl From<Policy> for ServiceOptions {
    fn from(policy: Policy) -> Self {
        ServiceOptions { policy, ..Default::default() }
    }
}

/// FNV-1a: deterministic across processes, unlike the std hasher's random seed.
#[derive(Debug)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

pub fn stable_hash(value: &impl Hash) -> u64 {
    let mut h = StableHasher::default();
    value.hash(&mut h);
    h.finish()
}

/// One subset of a service (`[services."…".subsets]`): the endpoints its
/// selector picks, with their own capacity, census and plans, so same-zone
/// preference holds inside the subset (EDS `SERVICE.NAMESPACE/SUBSET`).
#[derive(Debug)]
pub struct SubsetEntry {
    pub endpoints: Arc<ServiceEndpoints>,
    /// The census of the subset's EDS name that its plans use.
    pub census: PerZone,
    pub capacity: PerZone,
    endpoints_hash: u64,
    plans: DashMap<Option<Zone>, Arc<Plan>>,
}

impl SubsetEntry {
    fn new(endpoints: ServiceEndpoints, census: PerZone) -> Self {
        SubsetEntry {
            endpoints_hash: stable_hash(&endpoints),
            capacity: endpoints.capacity(),
            endpoints: Arc::new(endpoints),
            census,
            plans: DashMap::new(),
        }
    }

    fn with_census(&self, census: PerZone) -> Self {
        SubsetEntry {
            endpoints: self.endpoints.clone(),
            census,
            capacity: self.capacity.clone(),
            endpoints_hash: self.endpoints_hash,
            plans: DashMap::new(),
        }
    }
}

/// The endpoints of `service` that `routing` selects into each of its subsets.
fn subsets_of(
    routing: &Routing,
    service: &ServiceEndpoints,
    census: &BTreeMap<String, PerZone>,
) -> BTreeMap<String, SubsetEntry> {
    routing
        .subsets
        .keys()
        .map(|subset| {
            let members =
                service.endpoints.iter().filter(|e| routing.selects(subset, &e.attributes)).cloned().collect();
            let census = census.get(subset).cloned().unwrap_or_default();
            (subset.clone(), SubsetEntry::new(ServiceEndpoints::new(members, service.fail_open), census))
        })
        .collect()
}

/// One service as served: its endpoints, its policy, the census the plans
/// were computed from, and the memo of encoded resources.
#[derive(Debug)]
pub struct ServiceEntry {
    pub name: ServiceName,
    pub endpoints: Arc<ServiceEndpoints>,
    pub policy: Policy,
    pub limits: ClusterLimits,
    pub routing: Arc<Routing>,
    /// The census the plans use (the last one applied, see [`crate::builder::Builder::apply_census`]).
    pub census: PerZone,
    pub capacity: PerZone,
    /// By subset name.
    pub subsets: BTreeMap<String, SubsetEntry>,
    endpoints_hash: u64,
    plans: DashMap<Option<Zone>, Arc<Plan>>,
    /// Shared with later entries of the same endpoints, so a census change
    /// re-encodes only the zones whose plan changed.
    encoded: Arc<DashMap<u64, Arc<Encoded>>>,
    /// The service's EDS as each kind of client (zone, kind, flat subset)
    /// resolved it. This entry's plans never change, so after the first
    /// stream of a kind the others find it here, without planning or hashing
    /// the plan (every stream resolves it on every push). A new entry starts
    /// empty.
    variants: std::sync::RwLock<Vec<(Variant, Arc<Encoded>)>>,
}

/// Which EDS variant of a service a client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Variant {
    zone: Option<Zone>,
    kind: ClientKind,
    subset: u16,
}

/// Variants a service keeps for quick lookup; zones come from clients, so
/// the list is bounded (beyond it, resolving takes the planning path).
const MAX_VARIANTS: usize = 64;

impl ServiceEntry {
    pub(crate) fn new(
        name: ServiceName,
        endpoints: Arc<ServiceEndpoints>,
        options: ServiceOptions,
        census: PerZone,
        subset_census: &BTreeMap<String, PerZone>,
    ) -> Self {
        let endpoints_hash = stable_hash(&*endpoints);
        let capacity = endpoints.capacity();
        let subsets = subsets_of(&options.routing, &endpoints, subset_census);
        ServiceEntry {
            name,
            endpoints,
            policy: options.policy,
            limits: options.limits,
            routing: options.routing,
            census,
            capacity,
            subsets,
            endpoints_hash,
            plans: DashMap::new(),
            encoded: Arc::new(DashMap::new()),
            variants: Default::default(),
        }
    }

    pub fn options(&self) -> ServiceOptions {
        ServiceOptions { policy: self.policy, limits: self.limits, routing: self.routing.clone() }
    }

    /// The same endpoints under another census: keeps the encoded memo.
    pub(crate) fn with_census(&self, census: PerZone, subset_census: &BTreeMap<String, PerZone>) -> Self {
        ServiceEntry {
            name: self.name.clone(),
            endpoints: self.endpoints.clone(),
            policy: self.policy,
            limits: self.limits,
            routing: self.routing.clone(),
            census,
            capacity: self.capacity.clone(),
            subsets: self
                .subsets
                .iter()
                .map(|(s, e)| (s.clone(), e.with_census(subset_census.get(s).cloned().unwrap_or_default())))
                .collect(),
            endpoints_hash: self.endpoints_hash,
            plans: DashMap::new(),
            encoded: self.encoded.clone(),
            variants: Default::default(),
        }
    }

    /// The plan for clients in `zone`. The census counts the asking zone at
    /// least once, so a client is planned for as one of the clients it joins.
    pub fn plan(&self, zone: Option<&Zone>) -> Arc<Plan> {
        cached_plan(&self.plans, self.policy, zone, &self.capacity, &self.census)
    }

    /// The plan for clients in `zone` inside `subset`.
    pub fn subset_plan(&self, subset: &str, zone: Option<&Zone>) -> Option<Arc<Plan>> {
        let s = self.subsets.get(subset)?;
        Some(cached_plan(&s.plans, self.policy, zone, &s.capacity, &s.census))
    }

    fn memo(&self, key: u64, build: impl FnOnce() -> (String, Any)) -> Arc<Encoded> {
        if let Some(hit) = self.encoded.get(&key) {
            return hit.clone();
        }
        // Plans from old censuses pile up in the shared memo; a handful per zone
        // and kind is all that is ever live, so a full reset is cheap and rare.
        if self.encoded.len() > 256 {
            self.encoded.clear();
        }
        let (name, resource) = build();
        let encoded = Arc::new(Encoded::new(name, resource));
        self.encoded.insert(key, encoded.clone());
        metrics::counter!("cloudmap_xds_shared_encodes_total").increment(1);
        encoded
    }

    fn eds(&self, client: &Client) -> Arc<Encoded> {
        let subset = flat_subset(client);
        let is_variant = |v: &Variant| v.kind == client.kind && v.subset == subset && v.zone == client.zone;
        let known = self.variants.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, hit)) = known.iter().find(|(v, _)| is_variant(v)) {
            return hit.clone();
        }
        drop(known);
        let plan = self.plan(client.zone.as_ref());
        let encoded = self.eds_of(self.name.dial_name(), &self.endpoints, self.endpoints_hash, &plan, client);
        let mut known = self.variants.write().unwrap_or_else(|e| e.into_inner());
        if known.len() < MAX_VARIANTS && !known.iter().any(|(v, _)| is_variant(v)) {
            known.push((Variant { zone: client.zone.clone(), kind: client.kind, subset }, encoded.clone()));
        }
        encoded
    }

    /// The EDS of subset `subset` (named `SERVICE.NAMESPACE/SUBSET`), if the service has it.
    fn subset_eds(&self, subset: &str, client: &Client) -> Option<Arc<Encoded>> {
        let entry = self.subsets.get(subset)?;
        let plan = self.subset_plan(subset, client.zone.as_ref())?;
        let name = format!("{}/{subset}", self.name.dial_name());
        Some(self.eds_of(name, &entry.endpoints, entry.endpoints_hash, &plan, client))
    }

    fn eds_of(
        &self,
        name: String,
        endpoints: &ServiceEndpoints,
        endpoints_hash: u64,
        plan: &Plan,
        client: &Client,
    ) -> Arc<Encoded> {
        let subset = flat_subset(client);
        let key = stable_hash(&(ResourceType::ClusterLoadAssignment, &name, endpoints_hash, plan, client.kind, subset));
        self.memo(key, || {
            let cla = resources::cluster_load_assignment(&name, endpoints, plan, client.kind, subset);
            (name.clone(), pack_any(cla))
        })
    }

    /// The names of the service's clusters: its own, then one per subset.
    pub fn cluster_names(&self) -> impl Iterator<Item = String> + '_ {
        let dial = self.name.dial_name();
        std::iter::once(dial.clone()).chain(self.subsets.keys().map(move |s| format!("{dial}/{s}")))
    }
}

/// Flat clients differ by subset; the others share one variant per plan.
fn flat_subset(client: &Client) -> u16 {
    if client.kind == ClientKind::Flat { client.subset % resources::FLAT_SUBSETS } else { 0 }
}

fn cached_plan(
    plans: &DashMap<Option<Zone>, Arc<Plan>>,
    policy: Policy,
    zone: Option<&Zone>,
    capacity: &PerZone,
    census: &PerZone,
) -> Arc<Plan> {
    let key = zone.filter(|z| !z.is_unknown()).cloned();
    if let Some(plan) = plans.get(&key) {
        return plan.clone();
    }
    let plan = Arc::new(policy::plan_for(policy, key.as_ref(), capacity, census));
    plans.insert(key, plan.clone());
    plan
}

/// Every service, as of one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// What changed against generation − 1: a stream that answered that
    /// generation re-resolves only these keys.
    pub changed: Changed,
    pub services: BTreeMap<String, Arc<ServiceEntry>>,
    /// Where the Envoy egress listener binds, if enabled.
    pub egress: Option<SocketAddr>,
    egress_listener: OnceLock<Arc<Encoded>>,
    egress_routes: OnceLock<Arc<Encoded>>,
    /// The zones any service has endpoints in (built when first asked).
    zones: OnceLock<BTreeSet<Zone>>,
}

impl Snapshot {
    /// The service a listener or route name refers to: the dial name itself,
    /// or the dial name with a `:PORT` suffix. Never split at dots: namespace
    /// names contain them.
    pub fn lookup(&self, name: &str) -> Option<&Arc<ServiceEntry>> {
        if let Some(entry) = self.services.get(name) {
            return Some(entry);
        }
        let (host, port) = name.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        self.services.get(host)
    }

    /// The service a resource belongs to (its change key): the dial name,
    /// without a `:PORT` suffix (listener and route names) or a `/SUBSET`
    /// suffix (subset clusters). Pure string work, so a stream can watch a
    /// service that does not exist yet. The egress listener and routes are
    /// their own key, [`resources::EGRESS`].
    pub fn key_of(name: &str) -> &str {
        if name == resources::EGRESS {
            return name;
        }
        // Byte searches: this runs for every subscribed name on every push.
        let bytes = name.as_bytes();
        let service = bytes.iter().position(|b| *b == b'/').map_or(name, |i| &name[..i]);
        match service.as_bytes().iter().rposition(|b| *b == b':') {
            Some(i) if service[i + 1..].parse::<u16>().is_ok() => &service[..i],
            _ => service,
        }
    }

    /// Whether some service has endpoints in `zone`.
    pub fn serves_zone(&self, zone: &Zone) -> bool {
        self.zones
            .get_or_init(|| {
                self.services.values().flat_map(|e| e.endpoints.endpoints.iter().map(|ep| ep.zone.clone())).collect()
            })
            .contains(zone)
    }

    /// Whether the listener or route name `name` of `entry` is a variant worth
    /// keeping in the shared memo: the dial name itself, or `NAME:PORT` with a
    /// port the service's endpoints listen on. Any other port is encoded for
    /// the asking stream alone, so clients naming arbitrary ports can neither
    /// grow the memo nor push out what other streams share.
    fn memoised_variant(entry: &ServiceEntry, name: &str) -> bool {
        match name.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()) {
            Some(port) => entry.endpoints.endpoints.iter().any(|e| e.port == port),
            None => true,
        }
    }

    fn egress(&self, ty: ResourceType) -> Option<Arc<Encoded>> {
        let address = self.egress?;
        let encode = |resource: Any| Arc::new(Encoded::new(resources::EGRESS.to_string(), resource));
        Some(match ty {
            ResourceType::Listener => {
                self.egress_listener.get_or_init(|| encode(pack_any(resources::egress_listener(address)))).clone()
            }
            ResourceType::RouteConfiguration => self
                .egress_routes
                .get_or_init(|| {
                    let services = self.services.iter().map(|(name, entry)| (name.as_str(), &*entry.routing));
                    encode(pack_any(resources::egress_route_configuration(services)))
                })
                .clone(),
            _ => return None,
        })
    }

    /// Whether `client` may read resource `name` of type `ty` (`[authz]`). A
    /// name of no service is permitted: it is absent either way. `log` counts
    /// and logs a refusal (a name the client asked for, not a wildcard member).
    fn permits(&self, client: &Client, ty: ResourceType, name: &str, log: bool) -> bool {
        let Some(access) = &client.access else { return true };
        let permitted = if name == resources::EGRESS {
            access.reads_all()
        } else {
            let entry = match ty {
                ResourceType::Listener | ResourceType::RouteConfiguration => self.lookup(name),
                ResourceType::Cluster | ResourceType::ClusterLoadAssignment => self.cluster_entry(name).map(|(e, _)| e),
            };
            entry.is_none_or(|e| access.allows(&e.name))
        };
        if !permitted && log {
            access.denied(name);
        }
        permitted
    }

    /// The encoded resource `name` of type `ty` for `client`, if it exists
    /// (and the client may read it: else it is answered as absent).
    pub fn resolve(&self, ty: ResourceType, name: &str, client: &Client) -> Option<Arc<Encoded>> {
        if !self.permits(client, ty, name, true) {
            return None;
        }
        if name == resources::EGRESS {
            return self.egress(ty);
        }
        match ty {
            ResourceType::Listener => {
                let entry = self.lookup(name)?;
                let key = stable_hash(&(ty, name));
                let build = || (name.to_string(), pack_any(resources::listener(name)));
                Some(if Self::memoised_variant(entry, name) { entry.memo(key, build) } else { unshared(build) })
            }
            ResourceType::RouteConfiguration => {
                let entry = self.lookup(name)?;
                let dial = entry.name.dial_name();
                let key = stable_hash(&(ty, name, &dial, &*entry.routing, client.kind));
                let build = || {
                    (name.to_string(), pack_any(resources::service_routes(name, &dial, &entry.routing, client.kind)))
                };
                Some(if Self::memoised_variant(entry, name) { entry.memo(key, build) } else { unshared(build) })
            }
            ResourceType::Cluster => {
                let (entry, _) = self.cluster_entry(name)?;
                let key = stable_hash(&(ty, name, client.kind, entry.limits, &entry.routing.outlier_detection));
                Some(entry.memo(key, || {
                    let cluster = resources::service_cluster(name, client.kind, &entry.limits, &entry.routing);
                    (name.to_string(), pack_any(cluster))
                }))
            }
            ResourceType::ClusterLoadAssignment => match self.cluster_entry(name)? {
                (entry, None) => Some(entry.eds(client)),
                (entry, Some(subset)) => entry.subset_eds(subset, client),
            },
        }
    }

    /// The service of a cluster or EDS name, and the subset it names (`SERVICE.NAMESPACE/SUBSET`).
    fn cluster_entry<'a>(&self, name: &'a str) -> Option<(&Arc<ServiceEntry>, Option<&'a str>)> {
        match name.split_once('/') {
            None => Some((self.services.get(name)?, None)),
            Some((dial, subset)) => {
                let entry = self.services.get(dial)?;
                entry.subsets.contains_key(subset).then_some((entry, Some(subset)))
            }
        }
    }

    /// The names a wildcard subscription to `ty` covers for `client`. Envoy's
    /// wildcard LDS gets the egress listener only: the API listeners gRPC
    /// clients use mean nothing to a proxy.
    pub fn wildcard_names(&self, ty: ResourceType, client: &Client) -> Vec<String> {
        let mut names = self.all_wildcard_names(ty, client);
        if client.access.is_some() {
            names.retain(|n| self.permits(client, ty, n, false));
        }
        names
    }

    fn all_wildcard_names(&self, ty: ResourceType, client: &Client) -> Vec<String> {
        match ty {
            ResourceType::Listener if client.kind == ClientKind::Envoy => {
                self.egress.iter().map(|_| resources::EGRESS.to_string()).collect()
            }
            ResourceType::Listener => self.services.keys().cloned().collect(),
            ResourceType::Cluster => self.services.values().flat_map(|e| e.cluster_names()).collect(),
            ResourceType::RouteConfiguration | ResourceType::ClusterLoadAssignment => Vec::new(),
        }
    }
}

/// A resource encoded for one stream, kept in no memo.
fn unshared(build: impl FnOnce() -> (String, Any)) -> Arc<Encoded> {
    let (name, resource) = build();
    Arc::new(Encoded::new(name, resource))
}

/// The index every stream reads: the current [`Snapshot`], who to wake when
/// it changes, and whether the first Cloud Map sync is done. Only the
/// [`crate::builder`] publishes; streams, CSDS and the admin endpoints read.
#[derive(Debug)]
pub struct Cache {
    egress: Option<SocketAddr>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Who to wake when a snapshot changes a service.
    wakeups: Wakeups,
    ready: AtomicBool,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::new(None)
    }
}

impl Cache {
    /// `egress`: where Envoy's egress listener binds; `None` serves none.
    pub fn new(egress: Option<SocketAddr>) -> Self {
        Cache {
            egress,
            snapshot: RwLock::new(Arc::new(Snapshot { egress, ..Default::default() })),
            wakeups: Wakeups::default(),
            ready: AtomicBool::new(false),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who watches what; streams register here.
    pub fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// First Cloud Map sync done: streams may now be answered.
    pub(crate) fn set_ready(&self) {
        if !self.ready.swap(true, Ordering::AcqRel) {
            self.wakeups.wake(&Changed::All);
        }
    }

    /// Replace the snapshot with the next generation of `services`, which
    /// differs from the current one by `changed`, and wake who watches it.
    pub(crate) fn publish(&self, services: BTreeMap<String, Arc<ServiceEntry>>, changed: Changed) -> u64 {
        let mut guard = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        let generation = guard.generation + 1;
        *guard = Arc::new(Snapshot {
            generation,
            changed: changed.clone(),
            services,
            egress: self.egress,
            ..Default::default()
        });
        drop(guard);
        let woken = self.wakeups.wake(&changed);
        tracing::trace!(generation, ?changed, woken, "published");
        generation
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::builder::Builder;
    use crate::model::{Endpoint, Health};
    use crate::wakeup::Scope;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;

    /// One healthy endpoint per entry of `zones`, in that zone.
    pub(crate) fn endpoints(zones: &[&str]) -> ServiceEndpoints {
        ServiceEndpoints::new(
            zones
                .iter()
                .enumerate()
                .map(|(i, z)| Endpoint {
                    instance_id: format!("i-{i}"),
                    ip: std::net::IpAddr::from([10, 0, 0, i as u8 + 1]),
                    port: 8080,
                    zone: Zone::new(*z),
                    region: "us-east-1".into(),
                    health: Health::Healthy,
                    weight: 1,
                    attributes: BTreeMap::new(),
                    metadata: Default::default(),
                })
                .collect(),
            false,
        )
    }

    fn grpc(zone: &str) -> Client {
        Client::new(Some(Zone::new(zone)), ClientKind::Grpc, "test")
    }

    fn eds_zones(e: &Encoded) -> Vec<(u32, String, u32)> {
        let cla = ClusterLoadAssignment::decode(e.value()).expect("decodes");
        cla.endpoints
            .iter()
            .map(|l| {
                (
                    l.priority,
                    l.locality.clone().unwrap_or_default().zone,
                    l.load_balancing_weight.unwrap_or_default().value,
                )
            })
            .collect()
    }

    #[test]
    fn lookup_by_dial_name_with_optional_port() {
        let mut b = Builder::default();
        b.update_service(&ServiceName::new("grpc.demo", "echo"), endpoints(&["a"]), Policy::LocalFirst);
        let snap = b.snapshot();
        assert!(snap.lookup("echo.grpc.demo").is_some());
        assert!(snap.lookup("echo.grpc.demo:50051").is_some());
        assert!(snap.lookup("echo.grpc.demo:http").is_none());
        assert!(snap.lookup("echo.grpc").is_none());
        assert!(snap.lookup("grpc.demo").is_none());
        let client = grpc("a");
        let l = snap.resolve(ResourceType::Listener, "echo.grpc.demo:50051", &client).expect("listener");
        assert_eq!(l.name, "echo.grpc.demo:50051");
        assert!(snap.resolve(ResourceType::Cluster, "echo.grpc.demo:50051", &client).is_none());
    }

    #[test]
    fn every_resource_name_maps_to_its_service() {
        for (name, key) in [
            ("echo.demo", "echo.demo"),
            ("echo.demo:50051", "echo.demo"),
            ("echo.demo/canary", "echo.demo"),
            ("echo.demo:http", "echo.demo:http"),
            ("echo.my.name.space", "echo.my.name.space"),
            (resources::EGRESS, resources::EGRESS),
        ] {
            assert_eq!(Snapshot::key_of(name), key, "{name}");
        }
    }

    #[test]
    fn arbitrary_port_variants_neither_grow_nor_flush_the_shared_memo() {
        let mut b = Builder::default();
        b.update_service(&ServiceName::new("demo", "echo"), endpoints(&["a", "b"]), Policy::ZoneAware);
        let snapshot = b.snapshot();
        let client = grpc("a");
        let eds = snapshot.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &client).expect("eds");
        let entry = snapshot.services["echo.demo"].clone();
        let before = entry.encoded.len();
        for port in 1..=1000u16 {
            for ty in [ResourceType::Listener, ResourceType::RouteConfiguration] {
                let r = snapshot.resolve(ty, &format!("echo.demo:{port}"), &client).expect("a variant resolves");
                assert_eq!(r.name, format!("echo.demo:{port}"));
            }
        }
        assert_eq!(entry.encoded.len(), before, "no variant of an unused port is kept");
        let again = snapshot.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &client).expect("eds");
        assert!(Arc::ptr_eq(&eds, &again), "the shared EDS was not flushed");
        // The endpoints' own port is shared as before.
        let first = snapshot.resolve(ResourceType::Listener, "echo.demo:8080", &client).expect("lds");
        let second = snapshot.resolve(ResourceType::Listener, "echo.demo:8080", &client).expect("lds");
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn authz_answers_forbidden_names_as_absent_and_filters_wildcards() {
        use crate::authz::{AllowRule, Authz, AuthzTable};
        let mut b = Builder::standalone(Some("127.0.0.1:15001".parse().expect("addr")));
        for svc in ["echo", "secret"] {
            b.update_service(&ServiceName::new("demo", svc), endpoints(&["a"]), Policy::ZoneAware);
        }
        let table = AuthzTable {
            allow: vec![AllowRule {
                identity: "spiffe://t/*".into(),
                services: vec!["echo.demo".into()],
                ..Default::default()
            }],
        };
        let authz = Authz::new(&table).expect("valid");
        let web = grpc("a").with_access(Some(Arc::new(authz.access(&["spiffe://t/web".into()]))));
        let snapshot = b.snapshot();
        for ty in ResourceType::ALL {
            let name = if ty.is_full_set() || ty == ResourceType::ClusterLoadAssignment {
                "secret.demo"
            } else {
                "secret.demo:80"
            };
            assert!(snapshot.resolve(ty, name, &web).is_none(), "{ty:?} {name} is forbidden");
            assert!(snapshot.resolve(ty, name, &grpc("a")).is_some(), "{ty:?} {name} without [authz]");
        }
        assert!(snapshot.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &web).is_some());
        assert_eq!(snapshot.wildcard_names(ResourceType::Cluster, &web), vec!["echo.demo".to_string()]);
        assert_eq!(snapshot.wildcard_names(ResourceType::Listener, &web), vec!["echo.demo".to_string()]);
        let envoy = Client::new(None, ClientKind::Envoy, "e").with_access(web.access.clone());
        assert!(snapshot.wildcard_names(ResourceType::Listener, &envoy).is_empty(), "egress names every service");
        let everything = grpc("a");
        assert_eq!(snapshot.wildcard_names(ResourceType::Cluster, &everything).len(), 2, "no [authz]: all");
    }

    #[test]
    fn serves_zone_knows_the_zones_with_endpoints() {
        let mut b = Builder::default();
        b.update_service(&ServiceName::new("demo", "echo"), endpoints(&["a", "b"]), Policy::ZoneAware);
        let snapshot = b.snapshot();
        assert!(snapshot.serves_zone(&Zone::new("a")) && snapshot.serves_zone(&Zone::new("b")));
        assert!(!snapshot.serves_zone(&Zone::new("mars")));
    }

    #[test]
    fn versions_are_stable_and_encoded_once() {
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        b.update_service(&name, endpoints(&["a", "b", "c"]), Policy::LocalFirst);
        let snap = b.snapshot();
        let first = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("a")).expect("eds");
        let again = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("a")).expect("eds");
        assert!(Arc::ptr_eq(&first, &again), "same variant is encoded once");
        let other = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("b")).expect("eds");
        assert_ne!(first.version, other.version);
        // A fresh cache (a restarted control plane) computes the same version.
        let mut fresh = Builder::default();
        fresh.update_service(&name, endpoints(&["a", "b", "c"]), Policy::LocalFirst);
        let same = fresh.snapshot().resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("a")).expect("eds");
        assert_eq!(first.version, same.version);
        assert_eq!(eds_zones(&first), vec![(0, "a".into(), 10_000), (1, "b".into(), 1), (1, "c".into(), 1)]);
    }

    #[test]
    fn census_drives_zone_aware_plans_and_spares_unaffected_zones() {
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        b.update_service(&name, endpoints(&["a", "a", "b", "b", "c", "c"]), Policy::ZoneAware);
        for zone in ["a", "b", "c"] {
            b.census().join("echo.demo", &Zone::new(zone), &crate::census::Voter::unique());
        }
        assert!(b.apply_census());
        let snap = b.snapshot();
        let b_before = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("b")).expect("eds");
        let a = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("a")).expect("eds");
        assert_eq!(eds_zones(&a), vec![(0, "a".into(), 10_000), (1, "b".into(), 2), (1, "c".into(), 2)]);

        // Skew to 4/1/1: a spills half, b and c stay local — and b's resource is not re-encoded.
        for _ in 0..3 {
            b.census().join("echo.demo", &Zone::new("a"), &crate::census::Voter::unique());
        }
        assert!(b.apply_census());
        let snap = b.snapshot();
        let a = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("a")).expect("eds");
        assert_eq!(eds_zones(&a), vec![(0, "a".into(), 5_000), (0, "b".into(), 2_500), (0, "c".into(), 2_500)]);
        let b_after = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("b")).expect("eds");
        assert!(Arc::ptr_eq(&b_before, &b_after));
        assert_eq!(b.snapshot().services["echo.demo"].census.get(&Zone::new("a")), Some(&4));
    }

    #[test]
    fn tiny_census_shifts_are_not_pushed() {
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        b.update_service(&name, endpoints(&["a", "b"]), Policy::ZoneAware);
        for _ in 0..100 {
            b.census().join("echo.demo", &Zone::new("a"), &crate::census::Voter::unique());
            b.census().join("echo.demo", &Zone::new("b"), &crate::census::Voter::unique());
        }
        assert!(b.apply_census());
        // 101 vs 100 clients: both zones stay local, nothing moves.
        b.census().join("echo.demo", &Zone::new("a"), &crate::census::Voter::unique());
        assert!(!b.apply_census());
        // Non zone-aware services ignore the census.
        b.update_service(&name, endpoints(&["a", "b"]), Policy::LocalFirst);
        for _ in 0..50 {
            b.census().join("echo.demo", &Zone::new("a"), &crate::census::Voter::unique());
        }
        assert!(!b.apply_census());
    }

    #[test]
    fn envoy_wildcard_lds_is_the_egress_listener() {
        let mut b = Builder::standalone(Some("127.0.0.1:15001".parse().expect("addr")));
        b.update_service(&ServiceName::new("demo", "echo"), endpoints(&["a"]), Policy::ZoneAware);
        let snap = b.snapshot();
        let envoy = Client::new(None, ClientKind::Envoy, "envoy-1");
        assert_eq!(snap.wildcard_names(ResourceType::Listener, &envoy), vec![resources::EGRESS]);
        assert_eq!(snap.wildcard_names(ResourceType::Cluster, &envoy), vec!["echo.demo"]);
        let routes = snap.resolve(ResourceType::RouteConfiguration, resources::EGRESS, &envoy).expect("routes");
        let before = routes.version.clone();
        b.update_service(&ServiceName::new("demo", "other"), endpoints(&["a"]), Policy::ZoneAware);
        let after = b.snapshot().resolve(ResourceType::RouteConfiguration, resources::EGRESS, &envoy).expect("routes");
        assert_ne!(before, after.version, "a new service changes the egress routes");
        assert!(Builder::default().snapshot().resolve(ResourceType::Listener, resources::EGRESS, &envoy).is_none());
    }

    #[test]
    fn flat_variants_are_bounded_per_zone() {
        let mut b = Builder::default();
        b.update_service(&ServiceName::new("demo", "echo"), endpoints(&["a", "a", "b", "b"]), Policy::ZoneAware);
        let snap = b.snapshot();
        let eds = |kind, node: &str| {
            let client = Client::new(Some(Zone::new("a")), kind, node);
            snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &client).expect("eds")
        };
        let mut flat = BTreeSet::new();
        let mut grpc = BTreeSet::new();
        for i in 0..1000 {
            let node = format!("node-{i}");
            flat.insert(eds(ClientKind::Flat, &node).version.clone());
            grpc.insert(eds(ClientKind::Grpc, &node).version.clone());
        }
        assert!(flat.len() > 1, "flat clients all got one subset");
        assert!(flat.len() <= usize::from(resources::FLAT_SUBSETS), "{} flat variants", flat.len());
        assert_eq!(grpc.len(), 1, "gRPC clients do not differ by node id");
        // A reconnecting flat client gets the same subset (the same encoded variant).
        assert!(Arc::ptr_eq(&eds(ClientKind::Flat, "node-7"), &eds(ClientKind::Flat, "node-7")));
    }

    #[test]
    fn census_of_a_zone_without_servers_is_not_pushed() {
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        b.update_service(&name, endpoints(&["a", "b", "b", "b"]), Policy::ZoneAware);
        for zone in ["a", "a", "b", "b"] {
            b.census().join("echo.demo", &Zone::new(zone), &crate::census::Voter::unique());
        }
        assert!(b.apply_census());
        // Clients in x spread by capacity whatever their number; nobody's shares move.
        for _ in 0..4 {
            b.census().join("echo.demo", &Zone::new("x"), &crate::census::Voter::unique());
        }
        assert!(!b.apply_census());
        let a = b.snapshot().resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &grpc("a")).expect("eds");
        assert_eq!(eds_zones(&a), vec![(0, "a".into(), 5_000), (0, "b".into(), 5_000)]);
    }

    #[test]
    fn limits_change_the_cluster() {
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        b.update_service(&name, endpoints(&["a"]), Policy::ZoneAware);
        let before = b.snapshot().resolve(ResourceType::Cluster, "echo.demo", &grpc("a")).expect("cds");
        let options = ServiceOptions {
            policy: Policy::ZoneAware,
            limits: ClusterLimits { max_requests: 100 },
            routing: Default::default(),
        };
        assert!(b.update_service(&name, endpoints(&["a"]), options.clone()));
        assert!(!b.update_service(&name, endpoints(&["a"]), options));
        let after = b.snapshot().resolve(ResourceType::Cluster, "echo.demo", &grpc("a")).expect("cds");
        assert_ne!(before.version, after.version);
        let cluster = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(after.value()).expect("decodes");
        assert_eq!(cluster.circuit_breakers.and_then(|b| b.thresholds[0].max_requests).map(|v| v.value), Some(100));
    }

    #[test]
    fn versions_are_hashes_of_the_encoded_bytes() {
        let mut b = Builder::default();
        b.update_service(&ServiceName::new("demo", "echo"), endpoints(&["a"]), Policy::ZoneAware);
        let snap = b.snapshot();
        for ty in ResourceType::ALL {
            let e = snap.resolve(ty, "echo.demo", &grpc("a")).expect("resolves");
            assert_eq!(e.version, Encoded::new(e.name.clone(), e.resource()).version, "{ty:?}");
            // A release that changes a resource's shape from the same inputs changes its version.
            let mut reshaped = e.resource();
            reshaped.value.push(0);
            assert_ne!(e.version, Encoded::new(e.name.clone(), reshaped).version, "{ty:?}");
        }
    }

    fn versioned(zones: &[(&str, &str)]) -> ServiceEndpoints {
        let mut e = endpoints(&zones.iter().map(|(z, _)| *z).collect::<Vec<_>>());
        for endpoint in &mut e.endpoints {
            let i: usize = endpoint.instance_id.trim_start_matches("i-").parse().expect("test id");
            endpoint.attributes.insert("version".into(), zones[i].1.to_string());
        }
        e
    }

    fn canary_routing() -> Arc<Routing> {
        crate::config::FileConfig::parse(
            r#"
            [services."echo.demo".subsets]
            stable = { version = "v1" }
            canary = { version = "v2" }
            [[services."echo.demo".routes]]
            split = { stable = 90, canary = 10 }
            "#,
        )
        .expect("parses")
        .settings(&ServiceName::new("demo", "echo"))
        .routing
    }

    #[test]
    fn subsets_are_clusters_with_their_own_zone_aware_endpoints() {
        let mut b = Builder::standalone(Some("127.0.0.1:15001".parse().expect("addr")));
        let name = ServiceName::new("demo", "echo");
        // v1 2/2/2, v2 1/1/1.
        let service = versioned(&[
            ("a", "v1"),
            ("a", "v1"),
            ("a", "v2"),
            ("b", "v1"),
            ("b", "v1"),
            ("b", "v2"),
            ("c", "v1"),
            ("c", "v1"),
            ("c", "v2"),
        ]);
        let options =
            ServiceOptions { policy: Policy::ZoneAware, limits: Default::default(), routing: canary_routing() };
        assert!(b.update_service(&name, service.clone(), options.clone()));
        assert!(!b.update_service(&name, service.clone(), options.clone()), "same routing: no change");
        for zone in ["a", "b", "c"] {
            for eds in ["echo.demo/stable", "echo.demo/canary"] {
                b.census().join(eds, &Zone::new(zone), &crate::census::Voter::unique());
            }
        }
        assert!(b.apply_census(), "the subsets' census moves their plans");
        let snap = b.snapshot();
        let client = grpc("a");
        let envoy = Client::new(None, ClientKind::Envoy, "envoy");
        assert_eq!(
            snap.wildcard_names(ResourceType::Cluster, &envoy),
            vec!["echo.demo", "echo.demo/canary", "echo.demo/stable"]
        );
        for name in ["echo.demo/canary", "echo.demo/stable"] {
            let c = snap.resolve(ResourceType::Cluster, name, &client).expect("subset cluster");
            assert_eq!(c.name, name);
            assert_eq!(Snapshot::key_of(name), "echo.demo");
        }
        assert!(snap.resolve(ResourceType::Cluster, "echo.demo/nope", &client).is_none());
        assert!(snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo/nope", &client).is_none());
        // Same-zone preference inside each subset: all local, with the subset's members only.
        let canary = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo/canary", &client).expect("eds");
        assert_eq!(eds_zones(&canary), vec![(0, "a".into(), 10_000), (1, "b".into(), 1), (1, "c".into(), 1)]);
        let cla = ClusterLoadAssignment::decode(canary.resource().value.as_slice()).expect("decodes");
        assert_eq!(cla.cluster_name, "echo.demo/canary");
        assert_eq!(cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>(), 3);
        let stable = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo/stable", &client).expect("eds");
        assert_eq!(
            ClusterLoadAssignment::decode(stable.resource().value.as_slice()).expect("decodes").endpoints[0]
                .lb_endpoints
                .len(),
            2
        );
        // The route names the subset clusters; a new split is a change (and of Envoy's egress routes).
        let routes = snap.resolve(ResourceType::RouteConfiguration, "echo.demo", &client).expect("rds");
        let egress = snap.resolve(ResourceType::RouteConfiguration, resources::EGRESS, &envoy).expect("egress");
        let mut fifty = (*canary_routing()).clone();
        fifty.routes[0].split = vec![
            (crate::model::Target::Subset("stable".into()), 50),
            (crate::model::Target::Subset("canary".into()), 50),
        ];
        let options = ServiceOptions { routing: Arc::new(fifty), ..options };
        assert!(b.update_service(&name, service, options));
        let snap = b.snapshot();
        // A routing change wakes the service's streams and Envoy's egress routes.
        assert_eq!(
            snap.changed,
            Changed::Keys(
                [("echo.demo".to_string(), Scope::All), (resources::EGRESS.to_string(), Scope::All)]
                    .into_iter()
                    .collect()
            )
        );
        assert_ne!(
            snap.resolve(ResourceType::RouteConfiguration, "echo.demo", &client).expect("rds").version,
            routes.version
        );
        assert_ne!(
            snap.resolve(ResourceType::RouteConfiguration, resources::EGRESS, &envoy).expect("rds").version,
            egress.version
        );
        assert_eq!(snap.services["echo.demo"].subsets["canary"].census.get(&Zone::new("b")), Some(&1), "census kept");
    }

    #[test]
    fn a_skewed_subset_census_spills_inside_the_subset() {
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        let service = versioned(&[("a", "v2"), ("b", "v2"), ("c", "v2"), ("a", "v1"), ("b", "v1"), ("c", "v1")]);
        let options =
            ServiceOptions { policy: Policy::ZoneAware, limits: Default::default(), routing: canary_routing() };
        b.update_service(&name, service, options);
        for (zone, n) in [("a", 4), ("b", 1), ("c", 1)] {
            for _ in 0..n {
                b.census().join("echo.demo/canary", &Zone::new(zone), &crate::census::Voter::unique());
            }
        }
        assert!(b.apply_census());
        let snap = b.snapshot();
        let a = snap.resolve(ResourceType::ClusterLoadAssignment, "echo.demo/canary", &grpc("a")).expect("eds");
        assert_eq!(eds_zones(&a), vec![(0, "a".into(), 5_000), (0, "b".into(), 2_500), (0, "c".into(), 2_500)]);
        // The whole service's plan has no census of its own: unaffected.
        assert!(snap.services["echo.demo"].census.is_empty());
    }
}
