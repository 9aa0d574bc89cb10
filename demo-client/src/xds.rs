//! A small ADS (State-of-the-World) client: LDS → RDS → CDS → EDS for one
//! `xds:///NAME` target, ending in a picker [`Table`].
//!
//! [`AdsState`] is the protocol as a pure state machine: it builds the
//! requests (the `Node` only on the first request of each stream), follows
//! the chain of resource names, validates each resource the way gRPC's
//! parsers do, and answers every response with an ACK (the response's
//! `version_info` and nonce) or a NACK (the last accepted version, the nonce,
//! and an `error_detail` saying what could not be used). A resource the
//! client cannot use is never applied; the last good configuration stays.
//!
//! [`spawn`] runs it over a tonic `AggregatedDiscoveryService` stream to the
//! bootstrap's server, keeps the stream open and applies updates, reconnects
//! with exponential backoff when the stream breaks (re-subscribing to all
//! names with the last accepted versions), and publishes each new table on a
//! `watch` channel. The last table is kept across disconnects.
//!
//! The chain, as `cloudmap-xds` emits it: Listener `echo.demo` with an
//! `api_listener` holding an `HttpConnectionManager` (RDS over ADS, router
//! filter last) → RouteConfiguration (virtual host matching the authority,
//! route → cluster) → Cluster (type EDS over ADS; `service_name` or the
//! cluster name is the EDS name) → ClusterLoadAssignment (localities with
//! weights and priorities).

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    ConfigSource, HealthStatus, Locality, Node, address, config_source, node, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost, route, route_action, route_match};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::{Message, Name};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, info, warn};

use crate::bootstrap::Bootstrap;
use crate::picker::{LocalityEntry, LocalityId, Table};

/// `Node.user_agent_name` sent by this client.
pub const USER_AGENT: &str = "cloudmap-xds demo-client";
/// `Node.client_features`: like grpcio and grpc-js, we ignore overprovisioning.
pub const CLIENT_FEATURES: &[&str] = &["envoy.lb.does_not_support_overprovisioning"];
/// The RPC path used for route matching (the only method this client calls).
pub const DESCRIBE_PATH: &str = "/demo.v1.Describer/Describe";

/// The four resource types, in chain order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Listener,
    Route,
    Cluster,
    Endpoints,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoints];

    /// The xDS type URL.
    pub fn type_url(self) -> String {
        match self {
            Kind::Listener => Listener::type_url(),
            Kind::Route => RouteConfiguration::type_url(),
            Kind::Cluster => Cluster::type_url(),
            Kind::Endpoints => ClusterLoadAssignment::type_url(),
        }
    }

    fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn short(self) -> &'static str {
        match self {
            Kind::Listener => "LDS",
            Kind::Route => "RDS",
            Kind::Cluster => "CDS",
            Kind::Endpoints => "EDS",
        }
    }
}

/// Per-type subscription state.
#[derive(Debug, Clone, Default)]
struct Subscription {
    names: Vec<String>,
    /// Last accepted `version_info`.
    version: String,
    /// Last nonce received on the current stream.
    nonce: String,
}

/// What one response led to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Requests to send, in order (the ACK/NACK first, then subscription changes).
    pub requests: Vec<DiscoveryRequest>,
    /// A new table, when the endpoints changed.
    pub table: Option<Arc<Table>>,
    /// The NACK message, when the response was rejected.
    pub nack: Option<String>,
}

/// The ADS protocol for one target, without I/O.
#[derive(Debug)]
pub struct AdsState {
    node: Node,
    listener: String,
    node_sent: bool,
    subs: [Subscription; 4],
    route_name: Option<String>,
    cluster: Option<String>,
    eds_name: Option<String>,
    table: Option<Arc<Table>>,
}

/// The `Node` this client announces, from the bootstrap.
pub fn node_from_bootstrap(bootstrap: &Bootstrap) -> Node {
    let n = &bootstrap.node;
    Node {
        id: if n.id.is_empty() { "demo-client".to_string() } else { n.id.clone() },
        cluster: n.cluster.clone(),
        locality: Some(Locality { region: n.region.clone(), zone: n.zone.clone(), sub_zone: n.sub_zone.clone() }),
        user_agent_name: USER_AGENT.to_string(),
        user_agent_version_type: Some(node::UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").to_string(),
        )),
        client_features: CLIENT_FEATURES.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    }
}

impl AdsState {
    /// State for the listener `listener` (the target's name).
    pub fn new(node: Node, listener: impl Into<String>) -> Self {
        let listener = listener.into();
        let mut subs: [Subscription; 4] = Default::default();
        subs[Kind::Listener.index()].names = vec![listener.clone()];
        AdsState {
            node,
            listener,
            node_sent: false,
            subs,
            route_name: None,
            cluster: None,
            eds_name: None,
            table: None,
        }
    }

    /// The last accepted table, if any.
    pub fn table(&self) -> Option<&Arc<Table>> {
        self.table.as_ref()
    }

    /// The names subscribed for `kind`.
    pub fn subscribed(&self, kind: Kind) -> &[String] {
        &self.subs[kind.index()].names
    }

    /// The last accepted version for `kind`.
    pub fn version(&self, kind: Kind) -> &str {
        &self.subs[kind.index()].version
    }

    /// Starts a new stream: the requests to send first (one per subscribed
    /// type, the first carrying the `Node`; versions are the last accepted
    /// ones, nonces empty).
    pub fn start_stream(&mut self) -> Vec<DiscoveryRequest> {
        self.node_sent = false;
        for s in &mut self.subs {
            s.nonce.clear();
        }
        let kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| !self.subs[k.index()].names.is_empty()).collect();
        kinds.into_iter().map(|k| self.request(k, None)).collect()
    }

    fn request(&mut self, kind: Kind, error: Option<&str>) -> DiscoveryRequest {
        let sub = &self.subs[kind.index()];
        let node = (!self.node_sent).then(|| self.node.clone());
        self.node_sent = true;
        DiscoveryRequest {
            version_info: sub.version.clone(),
            node,
            resource_names: sub.names.clone(),
            type_url: kind.type_url(),
            response_nonce: sub.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                // INVALID_ARGUMENT, as gRPC clients send.
                code: 3,
                message: message.to_string(),
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    /// Handles one response: validates, applies, and says what to send.
    pub fn on_response(&mut self, response: DiscoveryResponse) -> Outcome {
        let mut outcome = Outcome::default();
        let Some(kind) = Kind::from_type_url(&response.type_url) else {
            let message = format!("demo-client does not use type {}", response.type_url);
            warn!(type_url = %response.type_url, "unexpected xDS type; NACK");
            outcome.requests.push(DiscoveryRequest {
                node: (!self.node_sent).then(|| self.node.clone()),
                type_url: response.type_url,
                response_nonce: response.nonce,
                error_detail: Some(RpcStatus { code: 3, message: message.clone(), details: Vec::new() }),
                ..Default::default()
            });
            self.node_sent = true;
            outcome.nack = Some(message);
            return outcome;
        };
        self.subs[kind.index()].nonce = response.nonce.clone();
        let previous_table = self.table.clone();
        match self.apply(kind, &response.resources) {
            Ok(()) => {
                debug!(
                    kind = kind.short(),
                    version = %response.version_info,
                    nonce = %response.nonce,
                    "ACK"
                );
                self.subs[kind.index()].version = response.version_info;
                outcome.requests.push(self.request(kind, None));
            }
            Err(message) => {
                warn!(
                    kind = kind.short(),
                    version = %response.version_info,
                    nonce = %response.nonce,
                    error = %message,
                    "NACK"
                );
                outcome.requests.push(self.request(kind, Some(&message)));
                outcome.nack = Some(message);
            }
        }
        // Follow the chain: subscribe to what the accepted resources now name.
        let wanted = [
            (Kind::Route, self.route_name.clone()),
            (Kind::Cluster, self.cluster.clone()),
            (Kind::Endpoints, self.eds_name.clone()),
        ];
        for (k, name) in wanted {
            let names: Vec<String> = name.into_iter().collect();
            if self.subs[k.index()].names != names {
                debug!(kind = k.short(), ?names, "subscribing");
                self.subs[k.index()].names = names;
                outcome.requests.push(self.request(k, None));
            }
        }
        if self.table != previous_table {
            outcome.table = self.table.clone();
        }
        outcome
    }

    fn apply(&mut self, kind: Kind, resources: &[Any]) -> Result<(), String> {
        match kind {
            Kind::Listener => {
                let Some(listener) = find::<Listener>(resources, |l| l.name == self.listener)? else {
                    // SotW LDS: absent means deleted. Keep serving the last
                    // configuration (as gRPC does with ignore_resource_deletion).
                    if self.route_name.is_some() || self.cluster.is_some() {
                        warn!(listener = %self.listener, "listener absent from LDS; keeping the last configuration");
                    }
                    return Ok(());
                };
                match listener_route(&listener)? {
                    ListenerRoute::Rds(name) => self.route_name = Some(name),
                    ListenerRoute::Inline(config) => {
                        let cluster = route_cluster(&config, &self.listener)?;
                        self.route_name = None;
                        self.cluster = Some(cluster);
                    }
                }
                Ok(())
            }
            Kind::Route => {
                let Some(name) = self.route_name.clone() else {
                    return Ok(());
                };
                if let Some(config) = find::<RouteConfiguration>(resources, |r| r.name == name)? {
                    self.cluster = Some(route_cluster(&config, &self.listener)?);
                }
                Ok(())
            }
            Kind::Cluster => {
                let Some(name) = self.cluster.clone() else {
                    return Ok(());
                };
                match find::<Cluster>(resources, |c| c.name == name)? {
                    Some(c) => self.eds_name = Some(eds_service_name(&c)?),
                    None => {
                        warn!(cluster = %name, "cluster absent from CDS; keeping the last endpoints")
                    }
                }
                Ok(())
            }
            Kind::Endpoints => {
                let Some(name) = self.eds_name.clone() else {
                    return Ok(());
                };
                if let Some(cla) = find::<ClusterLoadAssignment>(resources, |c| c.cluster_name == name)? {
                    let table = table_from_cla(&cla)?;
                    if self.table.as_deref() != Some(&table) {
                        self.table = Some(Arc::new(table));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Decodes every resource as `M` (unwrapping `discovery.v3.Resource`) and
/// returns the one `wanted` selects. Any undecodable resource is an error.
fn find<M: Message + Name + Default>(resources: &[Any], wanted: impl Fn(&M) -> bool) -> Result<Option<M>, String> {
    let mut found = None;
    for any in resources {
        let m: M = decode_resource(any)?;
        if found.is_none() && wanted(&m) {
            found = Some(m);
        }
    }
    Ok(found)
}

fn decode_resource<M: Message + Name + Default>(any: &Any) -> Result<M, String> {
    let inner;
    let any = if any.type_url == Resource::type_url() {
        let wrapper =
            Resource::decode(any.value.as_slice()).map_err(|e| format!("cannot decode a Resource wrapper: {e}"))?;
        inner = wrapper.resource.ok_or_else(|| format!("Resource wrapper {:?} holds no resource", wrapper.name))?;
        &inner
    } else {
        any
    };
    if any.type_url != M::type_url() {
        return Err(format!("resource of type {} in a {} response", any.type_url, M::full_name()));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {}: {e}", M::full_name()))
}

enum ListenerRoute {
    Rds(String),
    Inline(Box<RouteConfiguration>),
}

fn ads_or_self(source: Option<&ConfigSource>) -> bool {
    matches!(
        source.and_then(|s| s.config_source_specifier.as_ref()),
        Some(config_source::ConfigSourceSpecifier::Ads(_)) | Some(config_source::ConfigSourceSpecifier::Self_(_))
    )
}

/// Validates a client-side Listener: an `api_listener` holding an
/// HttpConnectionManager with the router filter last and RDS over ADS (or an
/// inline route configuration).
fn listener_route(listener: &Listener) -> Result<ListenerRoute, String> {
    let name = &listener.name;
    let any = listener
        .api_listener
        .as_ref()
        .and_then(|a| a.api_listener.as_ref())
        .ok_or_else(|| format!("listener {name:?} has no api_listener"))?;
    let hcm: HttpConnectionManager =
        decode_resource(any).map_err(|e| format!("listener {name:?}: api_listener: {e}"))?;
    let Some(last) = hcm.http_filters.last() else {
        return Err(format!("listener {name:?}: http_filters is empty (router required)"));
    };
    let last_is_router = match &last.config_type {
        Some(http_filter::ConfigType::TypedConfig(c)) => c.type_url == Router::type_url(),
        _ => last.name == "envoy.filters.http.router",
    };
    if !last_is_router {
        return Err(format!("listener {name:?}: the last http filter {:?} is not the router", last.name));
    }
    match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
            if !ads_or_self(rds.config_source.as_ref()) {
                return Err(format!("listener {name:?}: RDS config_source is not ads or self"));
            }
            if rds.route_config_name.is_empty() {
                return Err(format!("listener {name:?}: RDS route_config_name is empty"));
            }
            Ok(ListenerRoute::Rds(rds.route_config_name))
        }
        Some(http_connection_manager::RouteSpecifier::RouteConfig(config)) => {
            Ok(ListenerRoute::Inline(Box::new(config)))
        }
        _ => Err(format!("listener {name:?}: neither RDS nor an inline route_config")),
    }
}

/// How well a virtual-host domain matches the authority: higher is more
/// specific (exact > `*.suffix` > `prefix*` > `*`, longer wins within a class).
fn domain_score(domain: &str, host: &str) -> Option<(u8, usize)> {
    let domain = domain.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    if domain == "*" {
        Some((0, 0))
    } else if let Some(suffix) = domain.strip_prefix('*') {
        host.ends_with(suffix).then_some((2, domain.len()))
    } else if let Some(prefix) = domain.strip_suffix('*') {
        host.starts_with(prefix).then_some((1, domain.len()))
    } else {
        (domain == host).then_some((3, domain.len()))
    }
}

fn best_virtual_host<'a>(config: &'a RouteConfiguration, host: &str) -> Option<&'a VirtualHost> {
    config
        .virtual_hosts
        .iter()
        .filter_map(|vh| vh.domains.iter().filter_map(|d| domain_score(d, host)).max().map(|s| (s, vh)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, vh)| vh)
}

/// The cluster a route configuration sends [`DESCRIBE_PATH`] on `host` to.
fn route_cluster(config: &RouteConfiguration, host: &str) -> Result<String, String> {
    let name = &config.name;
    let vh = best_virtual_host(config, host)
        .ok_or_else(|| format!("route configuration {name:?}: no virtual host matches {host:?}"))?;
    for r in &vh.routes {
        let Some(m) = &r.r#match else { continue };
        // Header, query and runtime matchers are not evaluated here: such
        // routes are skipped rather than guessed.
        if !m.headers.is_empty() || !m.query_parameters.is_empty() || m.runtime_fraction.is_some() {
            continue;
        }
        let case_sensitive = m.case_sensitive.as_ref().is_none_or(|c| c.value);
        let eq = |a: &str, b: &str| {
            if case_sensitive { a == b } else { a.eq_ignore_ascii_case(b) }
        };
        let matches = match &m.path_specifier {
            Some(route_match::PathSpecifier::Prefix(p)) => DESCRIBE_PATH.get(..p.len()).is_some_and(|head| eq(head, p)),
            Some(route_match::PathSpecifier::Path(p)) => eq(DESCRIBE_PATH, p),
            _ => false,
        };
        if !matches {
            continue;
        }
        return match &r.action {
            Some(route::Action::Route(action)) => match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) if !c.is_empty() => Ok(c.clone()),
                Some(route_action::ClusterSpecifier::WeightedClusters(_)) => {
                    Err(format!("route configuration {name:?}: weighted_clusters is not supported by demo-client"))
                }
                _ => Err(format!("route configuration {name:?}: the matching route names no cluster")),
            },
            _ => Err(format!("route configuration {name:?}: the matching route is not a route action")),
        };
    }
    Err(format!("route configuration {name:?}: no route in virtual host {:?} matches {DESCRIBE_PATH}", vh.name))
}

/// Validates an EDS cluster and returns its EDS resource name.
fn eds_service_name(c: &Cluster) -> Result<String, String> {
    let name = &c.name;
    match c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32 => {}
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            let kind = cluster::DiscoveryType::try_from(t)
                .map(|k| k.as_str_name().to_string())
                .unwrap_or_else(|_| t.to_string());
            return Err(format!("cluster {name:?}: type {kind} is not supported (EDS only)"));
        }
        Some(cluster::ClusterDiscoveryType::ClusterType(_)) => {
            return Err(format!("cluster {name:?}: custom cluster types are not supported (EDS only)"));
        }
        None => return Err(format!("cluster {name:?}: no type (EDS required)")),
    }
    let eds = c.eds_cluster_config.as_ref().ok_or_else(|| format!("cluster {name:?}: eds_cluster_config missing"))?;
    if !ads_or_self(eds.eds_config.as_ref()) {
        return Err(format!("cluster {name:?}: eds_config is not ads or self"));
    }
    let policy = cluster::LbPolicy::try_from(c.lb_policy);
    match policy {
        Ok(cluster::LbPolicy::RoundRobin)
        | Ok(cluster::LbPolicy::LeastRequest)
        | Ok(cluster::LbPolicy::RingHash)
        | Ok(cluster::LbPolicy::LoadBalancingPolicyConfig) => {}
        _ => {
            return Err(format!("cluster {name:?}: lb_policy {} is not supported", c.lb_policy));
        }
    }
    Ok(if eds.service_name.is_empty() { name.clone() } else { eds.service_name.clone() })
}

/// Turns a ClusterLoadAssignment into the picker's table, applying gRPC's
/// rules: a locality without `locality` is an error; one with weight 0 or
/// unset is dropped; priorities (of the kept localities) must be contiguous
/// from 0; one locality twice in a priority, one address twice in the
/// cluster, an endpoint weight of 0, a non-IP address or a missing port are
/// errors; endpoints whose health is not HEALTHY or UNKNOWN are dropped, and
/// so is a locality left without endpoints.
pub fn table_from_cla(cla: &ClusterLoadAssignment) -> Result<Table, String> {
    let name = &cla.cluster_name;
    let mut levels: Vec<Vec<LocalityEntry>> = Vec::new();
    let mut priorities = BTreeSet::new();
    let mut seen_localities = HashSet::new();
    let mut seen_addresses = HashSet::new();
    for (i, group) in cla.endpoints.iter().enumerate() {
        let Some(loc) = &group.locality else {
            return Err(format!("{name:?}: endpoints[{i}] has no locality"));
        };
        let id = LocalityId { region: loc.region.clone(), zone: loc.zone.clone(), sub_zone: loc.sub_zone.clone() };
        let weight = group.load_balancing_weight.as_ref().map_or(0, |w| w.value);
        if weight == 0 {
            debug!(cluster = %name, zone = %id.zone, "locality without weight dropped");
            continue;
        }
        let priority = group.priority as usize;
        if !seen_localities.insert((priority, id.clone())) {
            return Err(format!(
                "{name:?}: locality {:?}/{:?} appears twice in priority {priority}",
                id.region, id.zone
            ));
        }
        priorities.insert(priority);
        let mut endpoints = Vec::new();
        for (j, lb) in group.lb_endpoints.iter().enumerate() {
            let at = format!("{name:?}: endpoints[{i}].lb_endpoints[{j}]");
            if lb.load_balancing_weight.as_ref().is_some_and(|w| w.value == 0) {
                return Err(format!("{at} has weight 0"));
            }
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(format!("{at} has no endpoint"));
            };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref()) else {
                return Err(format!("{at} has no socket address"));
            };
            let ip: IpAddr =
                sa.address.parse().map_err(|_| format!("{at}: address {:?} is not an IP literal", sa.address))?;
            let port = match sa.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => {
                    u16::try_from(p).map_err(|_| format!("{at}: port {p} out of range"))?
                }
                _ => return Err(format!("{at}: no port_value")),
            };
            let addr = SocketAddr::new(ip, port);
            if !seen_addresses.insert(addr) {
                return Err(format!("{name:?}: address {addr} appears twice"));
            }
            let health = HealthStatus::try_from(lb.health_status).unwrap_or(HealthStatus::Unknown);
            if matches!(health, HealthStatus::Healthy | HealthStatus::Unknown) {
                endpoints.push(addr);
            } else {
                debug!(cluster = %name, %addr, health = health.as_str_name(), "endpoint dropped");
            }
        }
        if levels.len() <= priority {
            levels.resize_with(priority + 1, Vec::new);
        }
        if !endpoints.is_empty() {
            levels[priority].push(LocalityEntry { id, weight, endpoints });
        }
    }
    if let Some(gap) = (0..priorities.len()).find(|p| !priorities.contains(p)) {
        return Err(format!("{name:?}: priorities {priorities:?} are not contiguous from 0 (missing {gap})"));
    }
    Ok(Table { priorities: levels })
}

/// What the ADS client is doing, for `/endpoints` and logs.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    pub server: String,
    pub listener: String,
    pub connected: bool,
    pub last_error: Option<String>,
    pub last_nack: Option<String>,
    /// Last accepted version per type (LDS, RDS, CDS, EDS).
    pub versions: Vec<(String, String)>,
}

/// A running ADS client.
#[derive(Debug)]
pub struct XdsHandle {
    /// The current endpoints; `None` until the first usable EDS.
    pub tables: watch::Receiver<Option<Arc<Table>>>,
    /// What the client is doing.
    pub status: Arc<Mutex<XdsStatus>>,
    task: JoinHandle<()>,
}

impl Drop for XdsHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reconnect delays: 0.5 s doubling to 30 s, ±20 % jitter; reset once a
/// stream has delivered a response.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts the ADS client for `listener` against the bootstrap's server.
pub fn spawn(bootstrap: &Bootstrap, listener: &str) -> XdsHandle {
    let (tx, rx) = watch::channel(None);
    let status = Arc::new(Mutex::new(XdsStatus {
        server: bootstrap.server_uri.clone(),
        listener: listener.to_string(),
        ..Default::default()
    }));
    let state = AdsState::new(node_from_bootstrap(bootstrap), listener);
    let task = tokio::spawn(run(state, bootstrap.server_uri.clone(), tx, Arc::clone(&status)));
    XdsHandle { tables: rx, status, task }
}

fn with_status(status: &Mutex<XdsStatus>, f: impl FnOnce(&mut XdsStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

async fn run(mut state: AdsState, uri: String, tx: watch::Sender<Option<Arc<Table>>>, status: Arc<Mutex<XdsStatus>>) {
    let mut delay = BACKOFF_START;
    loop {
        let (responses, result) = run_stream(&mut state, &uri, &tx, &status).await;
        let error = match result {
            Ok(()) => "the server closed the stream".to_string(),
            Err(e) => format!("{e:#}"),
        };
        with_status(&status, |s| {
            s.connected = false;
            s.last_error = Some(error.clone());
        });
        if responses > 0 {
            delay = BACKOFF_START;
        }
        let wait = delay.mul_f64(rand::random_range(0.8..1.2));
        if tx.borrow().is_some() {
            warn!(server = %uri, %error, retry_in = ?wait, "ADS stream ended; keeping the last endpoints");
        } else {
            warn!(server = %uri, %error, retry_in = ?wait, "ADS stream failed; retrying");
        }
        tokio::time::sleep(wait).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// One stream: returns how many responses it handled and how it ended.
async fn run_stream(
    state: &mut AdsState,
    uri: &str,
    tx: &watch::Sender<Option<Arc<Table>>>,
    status: &Mutex<XdsStatus>,
) -> (u64, Result<()>) {
    let mut responses = 0;
    let result = async {
        let channel = tonic::transport::Endpoint::from_shared(uri.to_string())
            .with_context(|| format!("invalid xDS server URI {uri:?}"))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .with_context(|| format!("connecting to the xDS server {uri}"))?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
        for r in state.start_stream() {
            req_tx.send(r).map_err(|_| anyhow!("request channel closed"))?;
        }
        let mut stream = client
            .stream_aggregated_resources(UnboundedReceiverStream::new(req_rx))
            .await
            .context("opening the ADS stream")?
            .into_inner();
        info!(server = %uri, listener = %state.listener, "ADS stream open");
        with_status(status, |s| {
            s.connected = true;
            s.last_error = None;
        });
        while let Some(response) = stream.message().await.context("reading from the ADS stream")? {
            responses += 1;
            let outcome = state.on_response(response);
            for r in outcome.requests {
                req_tx.send(r).map_err(|_| anyhow!("request channel closed"))?;
            }
            with_status(status, |s| {
                if let Some(nack) = &outcome.nack {
                    s.last_nack = Some(nack.clone());
                }
                s.versions =
                    Kind::ALL.into_iter().map(|k| (k.short().to_string(), state.version(k).to_string())).collect();
            });
            if let Some(table) = outcome.table {
                info!(endpoints = table.endpoint_count(), priorities = table.priorities.len(), "endpoints updated");
                tx.send_replace(Some(table));
            }
        }
        Ok(())
    }
    .await;
    (responses, result)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Address, AggregatedConfigSource, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints};
    use envoy_types::pb::envoy::config::listener::v3::ApiListener;
    use envoy_types::pb::envoy::config::route::v3::{Route, RouteAction, RouteMatch};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{HttpFilter, Rds};
    use envoy_types::pb::google::protobuf::UInt32Value;
    use envoy_types::util::pack_any;

    fn ads() -> ConfigSource {
        ConfigSource {
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
            ..Default::default()
        }
    }

    /// The listener `cloudmap-xds` emits.
    pub fn listener(name: &str) -> Listener {
        Listener {
            name: name.into(),
            api_listener: Some(ApiListener {
                api_listener: Some(pack_any(HttpConnectionManager {
                    route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                        config_source: Some(ads()),
                        route_config_name: name.into(),
                    })),
                    http_filters: vec![HttpFilter {
                        name: "envoy.filters.http.router".into(),
                        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }
    }

    pub fn route_config(name: &str, domains: &[&str], cluster: &str) -> RouteConfiguration {
        RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![VirtualHost {
                name: name.into(),
                domains: domains.iter().map(|d| d.to_string()).collect(),
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub fn eds_cluster(name: &str, service_name: &str) -> Cluster {
        Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: service_name.into(),
            }),
            ..Default::default()
        }
    }

    pub fn lb(addr: SocketAddr, health: HealthStatus) -> LbEndpoint {
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: addr.ip().to_string(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: health as i32,
            ..Default::default()
        }
    }

    pub fn group(zone: &str, weight: Option<u32>, priority: u32, endpoints: Vec<LbEndpoint>) -> LocalityLbEndpoints {
        LocalityLbEndpoints {
            locality: Some(Locality { region: "us-east-1".into(), zone: zone.into(), ..Default::default() }),
            lb_endpoints: endpoints,
            load_balancing_weight: weight.map(|value| UInt32Value { value }),
            priority,
            ..Default::default()
        }
    }

    pub fn cla(name: &str, groups: Vec<LocalityLbEndpoints>) -> ClusterLoadAssignment {
        ClusterLoadAssignment { cluster_name: name.into(), endpoints: groups, ..Default::default() }
    }

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn healthy(ports: &[u16]) -> Vec<LbEndpoint> {
        ports.iter().map(|&p| lb(a(p), HealthStatus::Healthy)).collect()
    }

    #[test]
    fn cla_becomes_a_table() {
        let t = table_from_cla(&cla(
            "echo.demo",
            vec![
                group("us-east-1a", Some(80), 0, healthy(&[1, 2])),
                group("us-east-1b", Some(20), 0, healthy(&[3])),
                group("us-east-1c", Some(1), 1, healthy(&[4])),
            ],
        ))
        .unwrap();
        assert_eq!(t.priorities.len(), 2);
        assert_eq!(t.priorities[0].len(), 2);
        assert_eq!(t.priorities[0][0].id.zone, "us-east-1a");
        assert_eq!(t.priorities[0][0].id.region, "us-east-1");
        assert_eq!(t.priorities[0][0].weight, 80);
        assert_eq!(t.priorities[0][0].endpoints, vec![a(1), a(2)]);
        assert_eq!(t.priorities[1][0].endpoints, vec![a(4)]);
        assert_eq!(t.endpoint_count(), 4);
    }

    #[test]
    fn empty_cla_is_an_empty_table() {
        let t = table_from_cla(&cla("echo.demo", vec![])).unwrap();
        assert_eq!(t.endpoint_count(), 0);
    }

    #[test]
    fn unhealthy_and_draining_endpoints_are_dropped() {
        let t = table_from_cla(&cla(
            "e",
            vec![
                group(
                    "a",
                    Some(1),
                    0,
                    vec![
                        lb(a(1), HealthStatus::Healthy),
                        lb(a(2), HealthStatus::Unhealthy),
                        lb(a(3), HealthStatus::Unknown),
                        lb(a(4), HealthStatus::Draining),
                    ],
                ),
                // All dropped: the locality goes too.
                group("b", Some(1), 0, vec![lb(a(5), HealthStatus::Unhealthy)]),
            ],
        ))
        .unwrap();
        assert_eq!(t.priorities[0].len(), 1);
        assert_eq!(t.priorities[0][0].endpoints, vec![a(1), a(3)]);
    }

    #[test]
    fn zero_weight_localities_are_dropped() {
        let t = table_from_cla(&cla(
            "e",
            vec![
                group("a", None, 0, healthy(&[1])),
                group("b", Some(0), 0, healthy(&[2])),
                group("c", Some(5), 0, healthy(&[3])),
            ],
        ))
        .unwrap();
        assert_eq!(t.priorities[0].len(), 1);
        assert_eq!(t.priorities[0][0].id.zone, "c");
    }

    #[test]
    fn invalid_clas_are_rejected_with_a_reason() {
        let no_locality = LocalityLbEndpoints { locality: None, ..group("a", Some(1), 0, healthy(&[1])) };
        let mut zero_weight_ep = lb(a(1), HealthStatus::Healthy);
        zero_weight_ep.load_balancing_weight = Some(UInt32Value { value: 0 });
        let socket = |address: &str, port: Option<u32>| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: address.into(),
                        port_specifier: port.map(socket_address::PortSpecifier::PortValue),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let hostname = socket("echo.internal", Some(50051));
        let no_port = socket("10.0.0.1", None);
        let big_port = socket("10.0.0.1", Some(70000));
        let cases = vec![
            (vec![no_locality], "no locality"),
            (vec![group("a", Some(1), 0, healthy(&[1])), group("b", Some(1), 2, healthy(&[2]))], "not contiguous"),
            (vec![group("b", Some(1), 1, healthy(&[2]))], "not contiguous"),
            (vec![group("a", Some(1), 0, healthy(&[1])), group("a", Some(2), 0, healthy(&[2]))], "twice in priority 0"),
            (vec![group("a", Some(1), 0, healthy(&[1])), group("b", Some(1), 1, healthy(&[1]))], "appears twice"),
            (vec![group("a", Some(1), 0, vec![zero_weight_ep])], "weight 0"),
            (vec![group("a", Some(1), 0, vec![hostname])], "not an IP"),
            (vec![group("a", Some(1), 0, vec![no_port])], "no port_value"),
            (vec![group("a", Some(1), 0, vec![big_port])], "out of range"),
            (vec![group("a", Some(1), 0, vec![LbEndpoint::default()])], "no endpoint"),
        ];
        for (groups, needle) in cases {
            let err = table_from_cla(&cla("e", groups)).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // The same locality in two priorities is fine.
        table_from_cla(&cla("e", vec![group("a", Some(1), 0, healthy(&[1])), group("a", Some(1), 1, healthy(&[2]))]))
            .unwrap();
    }

    fn response(kind: Kind, version: &str, nonce: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            resources,
            type_url: kind.type_url(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn state() -> AdsState {
        let b = Bootstrap::parse(
            r#"{"xds_servers":[{"server_uri":"127.0.0.1:1"}],
                "node":{"id":"c1","cluster":"demo","locality":{"region":"r","zone":"z1"}}}"#,
        )
        .unwrap();
        AdsState::new(node_from_bootstrap(&b), "echo.demo")
    }

    #[test]
    fn first_request_carries_the_node_and_asks_for_the_listener() {
        let mut s = state();
        let reqs = s.start_stream();
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.type_url, Kind::Listener.type_url());
        assert_eq!(r.resource_names, vec!["echo.demo".to_string()]);
        assert_eq!(r.version_info, "");
        assert_eq!(r.response_nonce, "");
        let node = r.node.as_ref().unwrap();
        assert_eq!(node.id, "c1");
        assert_eq!(node.cluster, "demo");
        assert_eq!(node.user_agent_name, USER_AGENT);
        assert_eq!(node.client_features, vec!["envoy.lb.does_not_support_overprovisioning".to_string()]);
        assert_eq!(node.locality.as_ref().unwrap().zone, "z1");
    }

    #[test]
    fn follows_the_chain_and_acks_each_response() {
        let mut s = state();
        s.start_stream();

        let o = s.on_response(response(Kind::Listener, "1", "n1", vec![pack_any(listener("echo.demo"))]));
        assert!(o.nack.is_none());
        assert_eq!(o.requests.len(), 2);
        let ack = &o.requests[0];
        assert_eq!(
            (ack.type_url.as_str(), ack.version_info.as_str(), ack.response_nonce.as_str()),
            (Kind::Listener.type_url().as_str(), "1", "n1")
        );
        assert!(ack.node.is_none(), "node only on the first request");
        assert!(ack.error_detail.is_none());
        let rds = &o.requests[1];
        assert_eq!(rds.type_url, Kind::Route.type_url());
        assert_eq!(rds.resource_names, vec!["echo.demo".to_string()]);

        let o = s.on_response(response(
            Kind::Route,
            "1",
            "n2",
            vec![pack_any(route_config("echo.demo", &["*"], "echo-cluster"))],
        ));
        assert_eq!(o.requests[1].type_url, Kind::Cluster.type_url());
        assert_eq!(o.requests[1].resource_names, vec!["echo-cluster".to_string()]);

        let o =
            s.on_response(response(Kind::Cluster, "1", "n3", vec![pack_any(eds_cluster("echo-cluster", "echo.demo"))]));
        assert_eq!(o.requests[1].type_url, Kind::Endpoints.type_url());
        assert_eq!(o.requests[1].resource_names, vec!["echo.demo".to_string()]);
        assert!(o.table.is_none());

        let o = s.on_response(response(
            Kind::Endpoints,
            "7",
            "n4",
            vec![pack_any(cla("echo.demo", vec![group("z1", Some(3), 0, healthy(&[1]))]))],
        ));
        assert_eq!(o.requests.len(), 1);
        assert_eq!(o.requests[0].version_info, "7");
        assert_eq!(o.requests[0].response_nonce, "n4");
        let table = o.table.unwrap();
        assert_eq!(table.priorities[0][0].weight, 3);

        // Same endpoints again: ACK, no table change.
        let o = s.on_response(response(
            Kind::Endpoints,
            "8",
            "n5",
            vec![pack_any(cla("echo.demo", vec![group("z1", Some(3), 0, healthy(&[1]))]))],
        ));
        assert!(o.table.is_none());
        assert_eq!(s.version(Kind::Endpoints), "8");

        // A reconnect re-subscribes everything with the accepted versions.
        let reqs = s.start_stream();
        assert_eq!(reqs.len(), 4);
        assert!(reqs[0].node.is_some());
        assert!(reqs[1..].iter().all(|r| r.node.is_none()));
        assert!(reqs.iter().all(|r| r.response_nonce.is_empty()));
        assert_eq!(reqs[3].version_info, "8");
        assert_eq!(s.table().unwrap().endpoint_count(), 1);
    }

    #[test]
    fn bad_resources_are_nacked_and_the_last_good_kept() {
        let mut s = state();
        s.start_stream();
        s.on_response(response(Kind::Listener, "1", "n1", vec![pack_any(listener("echo.demo"))]));
        s.on_response(response(Kind::Route, "1", "n2", vec![pack_any(route_config("echo.demo", &["*"], "c"))]));
        s.on_response(response(Kind::Cluster, "1", "n3", vec![pack_any(eds_cluster("c", ""))]));
        assert_eq!(s.subscribed(Kind::Endpoints), &["c".to_string()]);
        s.on_response(response(
            Kind::Endpoints,
            "1",
            "n4",
            vec![pack_any(cla("c", vec![group("a", Some(1), 0, healthy(&[1]))]))],
        ));

        // Duplicate address: NACK with the previous version and the new nonce.
        let o = s.on_response(response(
            Kind::Endpoints,
            "2",
            "n5",
            vec![pack_any(cla(
                "c",
                vec![group("a", Some(1), 0, healthy(&[1])), group("b", Some(1), 0, healthy(&[1]))],
            ))],
        ));
        let nack = &o.requests[0];
        assert_eq!(nack.version_info, "1");
        assert_eq!(nack.response_nonce, "n5");
        let detail = nack.error_detail.as_ref().unwrap();
        assert_eq!(detail.code, 3);
        assert!(detail.message.contains("appears twice"), "{}", detail.message);
        assert!(o.table.is_none());
        assert_eq!(s.table().unwrap().endpoint_count(), 1);

        // A listener without the router filter last.
        let mut bad = listener("echo.demo");
        let mut hcm: HttpConnectionManager =
            decode_resource(bad.api_listener.as_ref().unwrap().api_listener.as_ref().unwrap()).unwrap();
        hcm.http_filters.clear();
        bad.api_listener = Some(ApiListener { api_listener: Some(pack_any(hcm)) });
        let o = s.on_response(response(Kind::Listener, "2", "n6", vec![pack_any(bad)]));
        assert!(o.nack.as_deref().unwrap().contains("router"));
        assert_eq!(o.requests[0].version_info, "1");
        assert_eq!(s.subscribed(Kind::Route), &["echo.demo".to_string()]);

        // A STATIC cluster.
        let mut c = eds_cluster("c", "");
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Static as i32));
        let o = s.on_response(response(Kind::Cluster, "2", "n7", vec![pack_any(c)]));
        assert!(o.nack.as_deref().unwrap().contains("STATIC"), "{:?}", o.nack);

        // A route configuration with no matching virtual host.
        let o = s.on_response(response(
            Kind::Route,
            "2",
            "n8",
            vec![pack_any(route_config("echo.demo", &["other.demo"], "c"))],
        ));
        assert!(o.nack.as_deref().unwrap().contains("no virtual host"), "{:?}", o.nack);

        // Garbage bytes and an unknown type URL.
        let o = s.on_response(response(
            Kind::Endpoints,
            "3",
            "n9",
            vec![Any { type_url: ClusterLoadAssignment::type_url(), value: vec![0xff, 0xff] }],
        ));
        assert!(o.nack.is_some());
        let o = s.on_response(DiscoveryResponse {
            type_url: "type.googleapis.com/foo.Bar".into(),
            nonce: "n10".into(),
            ..Default::default()
        });
        assert_eq!(o.requests[0].response_nonce, "n10");
        assert!(o.requests[0].error_detail.is_some());
        assert_eq!(s.table().unwrap().endpoint_count(), 1);
    }

    #[test]
    fn listener_deletion_keeps_the_configuration_and_resource_wrappers_are_unwrapped() {
        let mut s = state();
        s.start_stream();
        let wrapped = pack_any(Resource {
            name: "echo.demo".into(),
            resource: Some(pack_any(listener("echo.demo"))),
            ..Default::default()
        });
        let o = s.on_response(response(Kind::Listener, "1", "n1", vec![wrapped]));
        assert!(o.nack.is_none(), "{:?}", o.nack);
        assert_eq!(s.subscribed(Kind::Route), &["echo.demo".to_string()]);
        let o = s.on_response(response(Kind::Listener, "2", "n2", vec![]));
        assert!(o.nack.is_none());
        assert_eq!(o.requests.len(), 1);
        assert_eq!(s.subscribed(Kind::Route), &["echo.demo".to_string()]);
    }

    #[test]
    fn an_inline_route_configuration_skips_rds() {
        let mut s = state();
        s.start_stream();
        let mut l = listener("echo.demo");
        let any = l.api_listener.as_ref().and_then(|a| a.api_listener.as_ref()).unwrap();
        let mut hcm: HttpConnectionManager = decode_resource(any).unwrap();
        hcm.route_specifier =
            Some(http_connection_manager::RouteSpecifier::RouteConfig(route_config("inline", &["echo.demo"], "c")));
        l.api_listener = Some(ApiListener { api_listener: Some(pack_any(hcm)) });
        let o = s.on_response(response(Kind::Listener, "1", "n1", vec![pack_any(l)]));
        assert!(o.nack.is_none(), "{:?}", o.nack);
        assert!(s.subscribed(Kind::Route).is_empty());
        assert_eq!(s.subscribed(Kind::Cluster), &["c".to_string()]);
    }

    #[test]
    fn weighted_clusters_are_nacked() {
        let mut config = route_config("r", &["*"], "c");
        if let Some(route::Action::Route(action)) = &mut config.virtual_hosts[0].routes[0].action {
            action.cluster_specifier = Some(route_action::ClusterSpecifier::WeightedClusters(Default::default()));
        }
        assert!(route_cluster(&config, "echo.demo").unwrap_err().contains("weighted_clusters"));
    }

    #[test]
    fn virtual_host_matching_prefers_the_most_specific_domain() {
        let mut config = route_config("r", &["*"], "wild");
        config.virtual_hosts.extend(route_config("r", &["echo.*"], "prefix").virtual_hosts);
        config.virtual_hosts.extend(route_config("r", &["*.demo"], "suffix").virtual_hosts);
        assert_eq!(route_cluster(&config, "echo.demo").unwrap(), "suffix");
        config.virtual_hosts.extend(route_config("r", &["Echo.Demo"], "exact").virtual_hosts);
        assert_eq!(route_cluster(&config, "echo.demo").unwrap(), "exact");
        assert_eq!(route_cluster(&config, "other.x").unwrap(), "wild");
    }

    #[test]
    fn routes_match_on_the_describe_path() {
        let mut config = route_config("r", &["*"], "c");
        let m = config.virtual_hosts[0].routes[0].r#match.as_mut().unwrap();
        m.path_specifier = Some(route_match::PathSpecifier::Prefix("/other.v1".into()));
        assert!(route_cluster(&config, "x").unwrap_err().contains("no route"));
        let m = config.virtual_hosts[0].routes[0].r#match.as_mut().unwrap();
        m.path_specifier = Some(route_match::PathSpecifier::Prefix("/demo.v1.Describer/".into()));
        assert_eq!(route_cluster(&config, "x").unwrap(), "c");
        let m = config.virtual_hosts[0].routes[0].r#match.as_mut().unwrap();
        m.path_specifier = Some(route_match::PathSpecifier::Path(DESCRIBE_PATH.into()));
        assert_eq!(route_cluster(&config, "x").unwrap(), "c");
    }
}
