//! Model + plan → Envoy/xDS resources. Pure builders, one per resource type,
//! shaped to pass the checks real clients apply (see
//! `shared/notes/xds-rules.md`): an `api_listener` with the router filter
//! last, RDS and EDS from ADS, locality always set, weights never 0,
//! contiguous priorities. The same traffic plan is expressed differently
//! per [`ClientKind`]; the plan itself comes from `policy`.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlierDetection, circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    self as core_v3, Address, AggregatedConfigSource, ApiVersion, ConfigSource, Locality, Metadata, RoutingPriority,
    SocketAddress, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
    header_matcher, retry_policy, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Duration, Struct, UInt32Value, Value, value};
use envoy_types::util::pack_any;

use crate::model::{
    CallMatch, ClientKind, Endpoint, HeaderRule, Health, OutlierDetection, PathMatch, RetryOn, RetryRule, RouteRule,
    Routing, ServiceEndpoints, Target, Zone,
};
use crate::policy::{self, Plan};

/// The four resource types served over ADS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    Listener,
    RouteConfiguration,
    Cluster,
    ClusterLoadAssignment,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Listener,
        ResourceType::RouteConfiguration,
        ResourceType::Cluster,
        ResourceType::ClusterLoadAssignment,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::RouteConfiguration => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::ClusterLoadAssignment => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name for logs and metric labels.
    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Listener => "lds",
            ResourceType::RouteConfiguration => "rds",
            ResourceType::Cluster => "cds",
            ResourceType::ClusterLoadAssignment => "eds",
        }
    }

    /// LDS and CDS responses carry the whole subscribed set: a name left out is deleted.
    pub fn is_full_set(self) -> bool {
        matches!(self, ResourceType::Listener | ResourceType::Cluster)
    }
}

/// The name of the optional Envoy egress listener and of its route configuration.
pub const EGRESS: &str = "cloudmap-xds-egress";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";

/// The metadata filter key endpoint attributes are published under.
pub const METADATA_KEY: &str = "cloudmap";
const ROUTER_FILTER: &str = "envoy.filters.http.router";

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// The listener a gRPC client asks for when dialing `xds:///NAME`: an API
/// listener whose route configuration (named like the listener) comes over ADS.
pub fn listener(name: &str) -> Listener {
    let manager = HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: name.to_string(),
        })),
        // gRPC NACKs a listener whose last filter is not the router.
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener { api_listener: Some(pack_any(manager)) }),
        ..Default::default()
    }
}

fn router_filters() -> Vec<HttpFilter> {
    vec![HttpFilter {
        name: ROUTER_FILTER.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
        ..Default::default()
    }]
}

/// Envoy's egress listener: plaintext HTTP/2 (gRPC) on `address`, routed by
/// `:authority` to the service of that name, like App Mesh's egress.
pub fn egress_listener(address: std::net::SocketAddr) -> Listener {
    let manager = HttpConnectionManager {
        stat_prefix: "egress".to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        // `echo.demo:50051` and `echo.demo` both match the virtual host `echo.demo`.
        strip_port_mode: Some(http_connection_manager::StripPortMode::StripAnyHostPort(true)),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: EGRESS.to_string(),
        })),
        http_filters: router_filters(),
        ..Default::default()
    };
    Listener {
        name: EGRESS.to_string(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                protocol: socket_address::Protocol::Tcp as i32,
                address: address.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(address.port()))),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM_FILTER.to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The egress route configuration: one virtual host per service, named and
/// matched by the service's dial name, with the service's routes (Envoy's shape).
pub fn egress_route_configuration<'a>(
    services: impl IntoIterator<Item = (&'a str, &'a Routing)>,
) -> RouteConfiguration {
    let virtual_hosts = services
        .into_iter()
        .map(|(service, routing)| {
            let mut host = service_routes(service, service, routing, ClientKind::Envoy).virtual_hosts.remove(0);
            host.domains = vec![service.to_string()];
            host
        })
        .collect();
    RouteConfiguration { name: EGRESS.to_string(), virtual_hosts, ..Default::default() }
}

/// One virtual host matching any authority (the listener already chose the
/// service), routing everything to `cluster`.
pub fn route_configuration(name: &str, cluster: &str) -> RouteConfiguration {
    let route = grpc_route(&RouteRule::default(), &[(cluster.to_string(), 1)], ClientKind::Grpc);
    virtual_host_config(name, vec![route])
}

fn virtual_host_config(name: &str, routes: Vec<Route>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec!["*".to_string()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The cluster (CDS and EDS name) a route target of service `dial` names:
/// `dial` itself, `dial/SUBSET`, or another service's dial name.
pub fn cluster_name(dial: &str, target: &Target) -> String {
    match target {
        Target::Service => dial.to_string(),
        Target::Subset(subset) => format!("{dial}/{subset}"),
        Target::Other(other) => other.clone(),
    }
}

/// The route configuration `name` of service `dial` as a client of `kind`
/// gets it: the service's routes in order (one catch-all to the whole
/// service when it has none), each with its match, split, timeout and retries.
pub fn service_routes(name: &str, dial: &str, routing: &Routing, kind: ClientKind) -> RouteConfiguration {
    let default = [RouteRule::default()];
    let rules = if routing.routes.is_empty() { &default[..] } else { &routing.routes[..] };
    let routes = rules
        .iter()
        .map(|rule| {
            let targets: Vec<(String, u32)> = rule.targets().iter().map(|(t, w)| (cluster_name(dial, t), *w)).collect();
            grpc_route(rule, &targets, kind)
        })
        .collect();
    virtual_host_config(name, routes)
}

fn duration(d: std::time::Duration) -> Duration {
    Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn route_match(matcher: &CallMatch) -> RouteMatch {
    let path = match &matcher.path {
        PathMatch::Any => route_match::PathSpecifier::Prefix(String::new()),
        PathMatch::Service(service) => route_match::PathSpecifier::Prefix(format!("/{service}/")),
        PathMatch::Method(method) => route_match::PathSpecifier::Path(format!("/{method}")),
    };
    let headers = matcher
        .headers
        .iter()
        .map(|h| {
            // `string_match`, not the deprecated exact/prefix/safe_regex fields: gRPC
            // (grpc-go, C-core, Java, Node) and Envoy read it.
            let string = |pattern| {
                header_matcher::HeaderMatchSpecifier::StringMatch(StringMatcher {
                    match_pattern: Some(pattern),
                    ..Default::default()
                })
            };
            let (specifier, invert) = match &h.rule {
                HeaderRule::Exact(v) => (string(string_matcher::MatchPattern::Exact(v.clone())), false),
                HeaderRule::Prefix(v) => (string(string_matcher::MatchPattern::Prefix(v.clone())), false),
                HeaderRule::Present(present) => (header_matcher::HeaderMatchSpecifier::PresentMatch(true), !present),
                HeaderRule::Regex(r) => (
                    string(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                        regex: r.clone(),
                        ..Default::default()
                    })),
                    false,
                ),
            };
            HeaderMatcher {
                name: h.name.clone(),
                header_match_specifier: Some(specifier),
                invert_match: invert,
                ..Default::default()
            }
        })
        .collect();
    RouteMatch { path_specifier: Some(path), headers, ..Default::default() }
}

/// gRFC A44's `retry_policy`; Envoy also gets `per_try_timeout` and, when
/// UNAVAILABLE is retried, the transport failures a gRPC client reports as
/// UNAVAILABLE (a reset or refused connection). `None` for one attempt.
fn retry(rule: &RetryRule, kind: ClientKind) -> Option<RetryPolicy> {
    if rule.max_attempts < 2 {
        return None;
    }
    let mut on: Vec<&str> = rule.on.iter().map(|c| c.name()).collect();
    if kind == ClientKind::Envoy && rule.on.contains(&RetryOn::Unavailable) {
        on.extend(["connect-failure", "refused-stream", "reset"]);
    }
    Some(RetryPolicy {
        retry_on: on.join(","),
        num_retries: Some(UInt32Value { value: rule.max_attempts - 1 }),
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(duration(rule.backoff)),
            max_interval: Some(duration(rule.max_backoff)),
        }),
        per_try_timeout: rule.per_try_timeout.filter(|_| kind == ClientKind::Envoy).map(duration),
        ..Default::default()
    })
}

fn grpc_route(rule: &RouteRule, targets: &[(String, u32)], kind: ClientKind) -> Route {
    let zero = Some(Duration { seconds: 0, nanos: 0 });
    let cluster_specifier = match targets {
        [(only, _)] => route_action::ClusterSpecifier::Cluster(only.clone()),
        _ => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: targets
                .iter()
                .map(|(name, weight)| weighted_cluster::ClusterWeight {
                    name: name.clone(),
                    weight: Some(UInt32Value { value: *weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let envoy = kind == ClientKind::Envoy;
    Route {
        r#match: Some(route_match(&rule.matcher)),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(cluster_specifier),
            // The caller's deadline rules unless the route sets a timeout. Envoy: `timeout`
            // (0: no 15 s default), and `grpc_timeout_header_max` 0 lets the `grpc-timeout`
            // header bound the stream without a cap. gRPC ignores `timeout`; it takes
            // `grpc_timeout_header_max` when set, else `max_stream_duration`, as the route's
            // limit (0: none) and applies the smaller of it and the call's deadline (gRFC A31),
            // so a route timeout goes into both.
            timeout: if envoy { rule.timeout.map(duration).or(zero) } else { zero },
            max_stream_duration: Some(route_action::MaxStreamDuration {
                max_stream_duration: rule.timeout.filter(|_| !envoy).map(duration),
                grpc_timeout_header_max: rule.timeout.filter(|_| !envoy).map(duration).or(zero),
                ..Default::default()
            }),
            idle_timeout: rule.idle_timeout.filter(|_| envoy).map(duration),
            retry_policy: rule.retry.as_ref().and_then(|r| retry(r, kind)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Per-service caps on a cluster's concurrency (`[services."…".limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterLimits {
    /// Concurrent requests per cluster and client. gRPC caps at 1024 when
    /// the cluster sets none (gRFC A32); the default, App Mesh's client-side
    /// value, does not limit.
    pub max_requests: u32,
}

impl ClusterLimits {
    pub const DEFAULT_MAX_REQUESTS: u32 = i32::MAX as u32;
}

impl Default for ClusterLimits {
    fn default() -> Self {
        ClusterLimits { max_requests: Self::DEFAULT_MAX_REQUESTS }
    }
}

/// The DEFAULT-priority circuit breaker. gRPC reads only `max_requests`.
/// Envoy also gets `max_pending_requests` and `max_connections` at the same
/// value (its defaults, 1024 each, would cap an application that its own
/// concurrency already bounds), and `max_retries` too when `retries` (its
/// default, 3 concurrent retries per cluster, would refuse most retries of a
/// busy client; gRPC bounds retries per call, not per cluster).
fn breakers(limits: &ClusterLimits, retries: bool) -> CircuitBreakers {
    let value = Some(UInt32Value { value: limits.max_requests.max(1) });
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            priority: RoutingPriority::Default as i32,
            max_requests: value,
            max_pending_requests: value,
            max_connections: value,
            max_retries: value.filter(|_| retries),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `outlier_detection` as gRPC (A50) reads it: success-rate and
/// failure-percentage, each enforced only when configured (both default on or
/// off otherwise, unlike what a reader expects). Envoy also gets
/// consecutive-5xx, explicitly off when not configured (Envoy's default is 5).
fn outlier_detection(od: &OutlierDetection, kind: ClientKind) -> EnvoyOutlierDetection {
    let u = |value: u32| Some(UInt32Value { value });
    let envoy = kind == ClientKind::Envoy;
    let mut out = EnvoyOutlierDetection {
        interval: Some(duration(od.interval)),
        base_ejection_time: Some(duration(od.base_ejection_time)),
        max_ejection_percent: u(od.max_ejection_percent),
        enforcing_success_rate: u(if od.success_rate.is_some() { 100 } else { 0 }),
        enforcing_failure_percentage: u(if od.failure_percentage.is_some() { 100 } else { 0 }),
        ..Default::default()
    };
    if let Some(sr) = od.success_rate {
        out.success_rate_stdev_factor = u(sr.stdev_factor);
        out.success_rate_minimum_hosts = u(sr.minimum_hosts);
        out.success_rate_request_volume = u(sr.request_volume);
    }
    if let Some(fp) = od.failure_percentage {
        out.failure_percentage_threshold = u(fp.threshold);
        out.failure_percentage_minimum_hosts = u(fp.minimum_hosts);
        out.failure_percentage_request_volume = u(fp.request_volume);
    }
    if envoy {
        out.enforcing_consecutive_5xx = u(if od.consecutive_5xx.is_some() { 100 } else { 0 });
        out.consecutive_5xx = od.consecutive_5xx.and_then(u);
        // Gateway failures are counted as 5xx already; keep their own ejection off.
        out.enforcing_consecutive_gateway_failure = u(0);
    }
    out
}

/// A service's cluster (its own or a subset's, `name`): [`cluster`] with the
/// service's outlier detection, and Envoy's retry breaker opened when a route retries.
pub fn service_cluster(name: &str, kind: ClientKind, limits: &ClusterLimits, routing: &Routing) -> Cluster {
    let mut c = cluster(name, kind, limits);
    let retries = routing.routes.iter().any(|r| r.retry.as_ref().is_some_and(|r| r.max_attempts > 1));
    if kind == ClientKind::Envoy && retries {
        c.circuit_breakers = Some(breakers(limits, true));
    }
    c.outlier_detection = routing.outlier_detection.as_ref().map(|od| outlier_detection(od, kind));
    c
}

/// An EDS cluster over ADS, round robin, with circuit breakers that do not
/// cap clients (see [`ClusterLimits`]). Envoy additionally gets
/// `locality_weighted_lb_config`, without which it ignores locality weights.
pub fn cluster(name: &str, kind: ClientKind, limits: &ClusterLimits) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig { eds_config: Some(ads()), service_name: name.to_string() }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        connect_timeout: Some(Duration { seconds: 5, nanos: 0 }),
        circuit_breakers: Some(breakers(limits, false)),
        ..Default::default()
    };
    if kind == ClientKind::Envoy {
        // Cloud Map services here are gRPC: Envoy must speak HTTP/2 upstream.
        let http2 = HttpProtocolOptions {
            upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            core_v3::Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options = HashMap::from([(HTTP_PROTOCOL_OPTIONS.to_string(), pack_any(http2))]);
        c.common_lb_config = Some(cluster::CommonLbConfig {
            locality_config_specifier: Some(
                cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                    cluster::common_lb_config::LocalityWeightedLbConfig {},
                ),
            ),
            ..Default::default()
        });
    }
    c
}

/// How many endpoint subsets flat clients are spread over (see
/// [`cluster_load_assignment`]). Bounded so arbitrary node ids cannot grow
/// the encoded variants; 12 divides evenly by 1, 2, 3, 4 and 6 endpoints per zone.
pub const FLAT_SUBSETS: u16 = 12;

/// The endpoints of one service as a client of `kind` should see them under `plan`.
///
/// - gRPC: the plan's priorities and weights; UNHEALTHY endpoints left out
///   (gRPC would drop them anyway, and a locality left empty by them is a NACK
///   risk in C-core).
/// - Envoy: the same, with UNHEALTHY endpoints kept and marked so Envoy's own
///   failover maths sees them; zones that have only unhealthy endpoints go in
///   one more, last, priority.
/// - Flat: one priority; the endpoint *set* approximates the shares, since
///   such clients ignore localities and weights. `subset` (< [`FLAT_SUBSETS`],
///   from the client's node id) rotates which endpoints of a zone it gets, so
///   that over many clients every endpoint carries the same load.
///
/// Endpoint weights are scaled down together when they would sum past
/// [`policy::WEIGHT_SUM_MAX`], so no locality or priority can exceed it.
pub fn cluster_load_assignment(
    name: &str,
    service: &ServiceEndpoints,
    plan: &Plan,
    kind: ClientKind,
    subset: u16,
) -> ClusterLoadAssignment {
    let weights = policy::fit_weights(&service.endpoints.iter().map(|e| u64::from(e.weight)).collect::<Vec<_>>());
    let mut by_zone: BTreeMap<&Zone, Vec<(&Endpoint, u32)>> = BTreeMap::new();
    for (e, w) in service.endpoints.iter().zip(weights) {
        by_zone.entry(&e.zone).or_default().push((e, w));
    }
    let mut localities = Vec::new();
    match kind {
        ClientKind::Grpc | ClientKind::Envoy => {
            let keep_unhealthy = kind == ClientKind::Envoy;
            for (priority, zones) in plan.priorities.iter().enumerate() {
                for weighted in zones {
                    let members = by_zone.get(&weighted.zone).map(Vec::as_slice).unwrap_or_default();
                    let lb: Vec<LbEndpoint> = members
                        .iter()
                        .filter(|(e, _)| keep_unhealthy || e.health.is_serving())
                        .map(|(e, w)| lb_endpoint(e, *w))
                        .collect();
                    if !lb.is_empty() {
                        localities.push(locality(&weighted.zone, members, lb, weighted.weight, priority as u32));
                    }
                }
            }
            if keep_unhealthy {
                let last = plan.priorities.len() as u32;
                for (zone, members) in &by_zone {
                    if plan.find(zone).is_none() {
                        let lb = members.iter().map(|(e, w)| lb_endpoint(e, *w)).collect();
                        localities.push(locality(zone, members, lb, 1, last));
                    }
                }
            }
        }
        ClientKind::Flat => {
            let counts = flat_counts(plan, &by_zone);
            for (zone, members) in &by_zone {
                let take = counts.get(*zone).copied().unwrap_or(0);
                let serving: Vec<&(&Endpoint, u32)> = members.iter().filter(|(e, _)| e.health.is_serving()).collect();
                let lb: Vec<LbEndpoint> =
                    flat_window(serving.len(), take, subset).map(|i| lb_endpoint(serving[i].0, serving[i].1)).collect();
                if !lb.is_empty() {
                    let weight = lb.len() as u32;
                    localities.push(locality(zone, members, lb, weight, 0));
                }
            }
        }
    }
    ClusterLoadAssignment { cluster_name: name.to_string(), endpoints: localities, ..Default::default() }
}

/// The indices (of `n` serving endpoints of a zone) a flat client in
/// `subset` gets when it should get `k` of them: `k` consecutive ones from an
/// offset spread evenly over the zone by subset, so the subsets together
/// cover every endpoint equally often (exactly when `n` divides
/// [`FLAT_SUBSETS`]).
fn flat_window(n: usize, k: usize, subset: u16) -> impl Iterator<Item = usize> {
    let k = k.min(n);
    let offset = if n == 0 { 0 } else { usize::from(subset % FLAT_SUBSETS) * n / usize::from(FLAT_SUBSETS) };
    (0..k).map(move |j| (offset + j) % n)
}

/// How many serving endpoints of each zone a flat client gets so that its
/// per-endpoint round robin approximates the shares of the plan's first
/// priority: the largest total K with round(share × K) ≤ available in every
/// zone, at least one per zone with a share.
fn flat_counts(plan: &Plan, by_zone: &BTreeMap<&Zone, Vec<(&Endpoint, u32)>>) -> HashMap<Zone, usize> {
    let serving =
        |z: &Zone| by_zone.get(z).map(|m| m.iter().filter(|(e, _)| e.health.is_serving()).count()).unwrap_or(0);
    let first = plan.priorities.first().map(Vec::as_slice).unwrap_or_default();
    let total_weight: f64 = first.iter().map(|w| f64::from(w.weight)).sum();
    let positive: Vec<(&Zone, f64)> =
        first.iter().filter(|w| serving(&w.zone) > 0).map(|w| (&w.zone, f64::from(w.weight) / total_weight)).collect();
    let total = positive.iter().map(|(z, s)| serving(z) as f64 / s).fold(f64::INFINITY, f64::min);
    positive
        .into_iter()
        .map(|(z, s)| {
            let k = if total.is_finite() { (s * total).round() as usize } else { 1 };
            (z.clone(), k.clamp(1, serving(z)))
        })
        .collect()
}

fn locality(
    zone: &Zone,
    members: &[(&Endpoint, u32)],
    lb: Vec<LbEndpoint>,
    weight: u32,
    priority: u32,
) -> LocalityLbEndpoints {
    LocalityLbEndpoints {
        locality: Some(Locality {
            region: members.first().map(|(e, _)| e.region.clone()).unwrap_or_default(),
            zone: zone.as_str().to_string(),
            ..Default::default()
        }),
        lb_endpoints: lb,
        load_balancing_weight: Some(UInt32Value { value: weight.max(1) }),
        priority,
        ..Default::default()
    }
}

/// `weight`: the endpoint's weight after [`policy::fit_weights`].
fn lb_endpoint(e: &Endpoint, weight: u32) -> LbEndpoint {
    let health = match e.health {
        Health::Healthy => core_v3::HealthStatus::Healthy,
        Health::Unhealthy => core_v3::HealthStatus::Unhealthy,
        Health::Unknown => core_v3::HealthStatus::Unknown,
    };
    let metadata = (!e.metadata.is_empty()).then(|| Metadata {
        filter_metadata: HashMap::from([(
            METADATA_KEY.to_string(),
            Struct {
                fields: e
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), Value { kind: Some(value::Kind::StringValue(v.clone())) }))
                    .collect(),
            },
        )]),
        ..Default::default()
    });
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    protocol: socket_address::Protocol::Tcp as i32,
                    address: e.ip.to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(e.port))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: health as i32,
        metadata,
        // Unset means 1; an explicit 0 is a NACK.
        load_balancing_weight: (weight != 1).then_some(UInt32Value { value: weight.max(1) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Client;
    use crate::policy::{self, PerZone, Policy};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ep(id: &str, ip: &str, zone: &str, health: Health) -> Endpoint {
        Endpoint {
            instance_id: id.into(),
            ip: ip.parse().unwrap_or_else(|_| panic!("test ip {ip}")),
            port: 50051,
            zone: Zone::new(zone),
            region: "us-east-1".into(),
            health,
            weight: 1,
            attributes: BTreeMap::from([("AVAILABILITY_ZONE".to_string(), zone.to_string())]),
            metadata: BTreeMap::from([("AVAILABILITY_ZONE".to_string(), zone.to_string())]),
        }
    }

    fn six() -> ServiceEndpoints {
        ServiceEndpoints::new(
            vec![
                ep("a1", "10.0.0.1", "a", Health::Healthy),
                ep("a2", "10.0.0.2", "a", Health::Healthy),
                ep("b1", "10.0.1.1", "b", Health::Healthy),
                ep("b2", "10.0.1.2", "b", Health::Unhealthy),
                ep("c1", "10.0.2.1", "c", Health::Unhealthy),
                ep("c2", "10.0.2.2", "c", Health::Unhealthy),
            ],
            false,
        )
    }

    fn build(policy: Policy, zone: &str, census: &PerZone, kind: ClientKind) -> ClusterLoadAssignment {
        let service = six();
        let capacity = service.capacity();
        let shares = policy::shares(policy, Some(&Zone::new(zone)), &capacity, census);
        let plan = policy::plan(&shares, &capacity);
        cluster_load_assignment("echo.demo", &service, &plan, kind, 0)
    }

    /// The checks gRPC clients apply (xds-rules.md), as one predicate.
    fn assert_grpc_valid(cla: &ClusterLoadAssignment) {
        let priorities: BTreeSet<u32> = cla.endpoints.iter().map(|l| l.priority).collect();
        assert_eq!(priorities, (0..priorities.len() as u32).collect(), "priorities contiguous from 0");
        let mut seen_localities = BTreeSet::new();
        let mut seen_addresses = BTreeSet::new();
        // Sums per priority of locality weights (grpc-go, C-core, Envoy) and of endpoint
        // weights (Envoy: per locality, or per priority without locality weighting).
        let mut locality_sums: BTreeMap<u32, u64> = BTreeMap::new();
        let mut endpoint_sums: BTreeMap<u32, u64> = BTreeMap::new();
        for l in &cla.endpoints {
            let locality = l.locality.as_ref().expect("locality set");
            assert!(seen_localities.insert((l.priority, locality.zone.clone())), "locality twice in a priority");
            assert!(l.load_balancing_weight.as_ref().is_some_and(|w| w.value > 0), "locality weight > 0");
            *locality_sums.entry(l.priority).or_default() +=
                l.load_balancing_weight.map(|w| u64::from(w.value)).unwrap_or(0);
            assert!(!l.lb_endpoints.is_empty());
            for e in &l.lb_endpoints {
                assert_ne!(e.load_balancing_weight.as_ref().map(|w| w.value), Some(0));
                *endpoint_sums.entry(l.priority).or_default() +=
                    e.load_balancing_weight.map(|w| u64::from(w.value)).unwrap_or(1);
                let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &e.host_identifier else {
                    panic!("endpoint")
                };
                let Some(address::Address::SocketAddress(sa)) =
                    endpoint.address.as_ref().and_then(|a| a.address.clone())
                else {
                    panic!("socket address")
                };
                assert!(sa.address.parse::<std::net::IpAddr>().is_ok());
                assert!(
                    seen_addresses.insert((sa.address.clone(), format!("{:?}", sa.port_specifier))),
                    "duplicate address"
                );
            }
        }
        for (p, sum) in locality_sums {
            assert!(sum <= policy::WEIGHT_SUM_MAX, "locality weights of priority {p} sum to {sum}");
        }
        for (p, sum) in endpoint_sums {
            assert!(sum <= policy::WEIGHT_SUM_MAX, "endpoint weights of priority {p} sum to {sum}");
        }
    }

    fn zones_at(cla: &ClusterLoadAssignment, priority: u32) -> Vec<(String, u32, usize)> {
        cla.endpoints
            .iter()
            .filter(|l| l.priority == priority)
            .map(|l| {
                (
                    l.locality.as_ref().map(|x| x.zone.clone()).unwrap_or_default(),
                    l.load_balancing_weight.as_ref().map(|w| w.value).unwrap_or(0),
                    l.lb_endpoints.len(),
                )
            })
            .collect()
    }

    #[test]
    fn grpc_local_first() {
        let cla = build(Policy::LocalFirst, "a", &PerZone::new(), ClientKind::Grpc);
        assert_grpc_valid(&cla);
        assert_eq!(zones_at(&cla, 0), vec![("a".into(), 10_000, 2)]);
        // c has no serving endpoint: left out for gRPC; b keeps its healthy one.
        assert_eq!(zones_at(&cla, 1), vec![("b".into(), 1, 1)]);
    }

    #[test]
    fn grpc_own_zone_without_capacity_gets_one_priority() {
        let cla = build(Policy::LocalFirst, "c", &PerZone::new(), ClientKind::Grpc);
        assert_grpc_valid(&cla);
        assert_eq!(zones_at(&cla, 0), vec![("a".into(), 6_667, 2), ("b".into(), 3_333, 1)]);
        assert!(zones_at(&cla, 1).is_empty());
    }

    #[test]
    fn envoy_keeps_unhealthy_marked() {
        let cla = build(Policy::LocalFirst, "a", &PerZone::new(), ClientKind::Envoy);
        assert_grpc_valid(&cla);
        assert_eq!(zones_at(&cla, 1), vec![("b".into(), 1, 2)]);
        assert_eq!(zones_at(&cla, 2), vec![("c".into(), 1, 2)]);
        let unhealthy = cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .filter(|e| e.health_status == core_v3::HealthStatus::Unhealthy as i32)
            .count();
        assert_eq!(unhealthy, 3);
    }

    #[test]
    fn flat_set_approximates_shares() {
        let service = ServiceEndpoints::new(
            (0..6)
                .map(|i| {
                    let zone = ["a", "b", "c"][i / 2];
                    ep(&format!("{zone}{i}"), &format!("10.0.0.{i}"), zone, Health::Healthy)
                })
                .collect(),
            false,
        );
        let capacity = service.capacity();
        let census = PerZone::from([(Zone::new("a"), 4), (Zone::new("b"), 1), (Zone::new("c"), 1)]);
        let shares = policy::shares(Policy::ZoneAware, Some(&Zone::new("a")), &capacity, &census);
        let plan = policy::plan(&shares, &capacity);
        let cla = cluster_load_assignment("echo.demo", &service, &plan, ClientKind::Flat, 0);
        assert_grpc_valid(&cla);
        // Shares .5/.25/.25 → 2/1/1 endpoints.
        let counts: Vec<usize> = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).collect();
        assert_eq!(counts, vec![2, 1, 1]);
        let shares = policy::shares(Policy::ZoneAware, Some(&Zone::new("b")), &capacity, &census);
        let cla =
            cluster_load_assignment("echo.demo", &service, &policy::plan(&shares, &capacity), ClientKind::Flat, 0);
        assert_eq!(zones_at(&cla, 0), vec![("b".into(), 2, 2)]);
    }

    /// The load each server carries when `clients` flat clients (zone, node id) each spread
    /// one unit evenly over the endpoints of their own ClusterLoadAssignment.
    fn flat_loads(service: &ServiceEndpoints, census: &PerZone, clients: &[(Zone, String)], subsets: bool) -> Vec<f64> {
        let capacity = service.capacity();
        let mut load: BTreeMap<String, f64> =
            service.endpoints.iter().filter(|e| e.health.is_serving()).map(|e| (e.ip.to_string(), 0.0)).collect();
        for (zone, node_id) in clients {
            let subset = if subsets { Client::new(Some(zone.clone()), ClientKind::Flat, node_id).subset } else { 0 };
            let plan = policy::plan(&policy::shares(Policy::ZoneAware, Some(zone), &capacity, census), &capacity);
            let cla = cluster_load_assignment("echo.demo", service, &plan, ClientKind::Flat, subset);
            assert_grpc_valid(&cla);
            let chosen: Vec<String> = cla
                .endpoints
                .iter()
                .flat_map(|l| &l.lb_endpoints)
                .filter_map(|e| match &e.host_identifier {
                    Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) => {
                        match endpoint.address.as_ref()?.address.as_ref()? {
                            address::Address::SocketAddress(sa) => Some(sa.address.clone()),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .collect();
            for ip in &chosen {
                *load.get_mut(ip).expect("a serving endpoint") += 1.0 / chosen.len() as f64;
            }
        }
        load.into_values().collect()
    }

    fn servers(per_zone: &[(&str, usize)]) -> ServiceEndpoints {
        let mut endpoints = Vec::new();
        for (z, (zone, n)) in per_zone.iter().enumerate() {
            for i in 0..*n {
                endpoints.push(ep(&format!("{zone}{i}"), &format!("10.0.{z}.{}", i + 1), zone, Health::Healthy));
            }
        }
        ServiceEndpoints::new(endpoints, false)
    }

    /// Node ids as tonic-xds deployments make them (one per task), from a fixed seed.
    fn node_ids(census: &PerZone, seed: u64) -> Vec<(Zone, String)> {
        let mut x = seed;
        let mut out = Vec::new();
        for (zone, n) in census {
            for _ in 0..*n {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                out.push((zone.clone(), format!("task/{:016x}", x)));
            }
        }
        out
    }

    fn worst_deviation(loads: &[f64]) -> f64 {
        let mean = loads.iter().sum::<f64>() / loads.len() as f64;
        loads.iter().map(|l| (l / mean - 1.0).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn flat_clients_spread_over_every_server() {
        // 60 flat clients, skewed census 30/20/10: zone-aware shares spill a's and b's excess.
        // The ids come from a fixed seed: which subset a client lands in is a hash, so with 20–30
        // clients picking one of two servers the loads carry binomial noise (over 1,000 seeds the
        // worst server stays within ±20 % in 98.9 % of id sets for 2/2/2 and 96.7 % for 3/1/2;
        // median worst deviation 6.7 % and 10 %). Exact balance per subset is flat_subsets_cover_….
        let census = PerZone::from([(Zone::new("a"), 30), (Zone::new("b"), 20), (Zone::new("c"), 10)]);
        for topology in [[("a", 2), ("b", 2), ("c", 2)], [("a", 3), ("b", 1), ("c", 2)]] {
            let service = servers(&topology);
            let clients = node_ids(&census, 11);
            let loads = flat_loads(&service, &census, &clients, true);
            assert!((loads.iter().sum::<f64>() - 60.0).abs() < 1e-9);
            let worst = worst_deviation(&loads);
            assert!(worst <= 0.2, "{topology:?}: loads {loads:?} ({:.0} % off the mean)", worst * 100.0);
            // Before: every flat client of a zone got the same subset.
            let same = flat_loads(&service, &census, &clients, false);
            assert!(worst_deviation(&same) > 0.2, "{topology:?}: one subset per zone was already even: {same:?}");
        }
    }

    #[test]
    fn flat_subsets_cover_a_zone_evenly() {
        // One client per subset: every endpoint is in the same number of windows.
        for n in [1usize, 2, 3, 4, 6, 12] {
            for k in 1..=n {
                let mut cover = vec![0usize; n];
                for subset in 0..FLAT_SUBSETS {
                    for i in flat_window(n, k, subset) {
                        cover[i] += 1;
                    }
                }
                assert!(cover.iter().all(|c| *c == cover[0]), "n={n} k={k}: {cover:?}");
                assert_eq!(cover.iter().sum::<usize>(), k * usize::from(FLAT_SUBSETS));
            }
        }
        assert_eq!(flat_window(0, 3, 5).count(), 0);
        assert_eq!(flat_window(2, 5, 5).count(), 2, "never more than the zone has");
    }

    #[test]
    fn flat_client_of_a_dead_zone_gets_the_other_zones() {
        let mut service = servers(&[("a", 2), ("b", 2), ("c", 2)]);
        for e in service.endpoints.iter_mut().filter(|e| e.zone.as_str() == "a") {
            e.health = Health::Unhealthy;
        }
        let census = PerZone::from([(Zone::new("a"), 30), (Zone::new("b"), 20), (Zone::new("c"), 10)]);
        let capacity = service.capacity();
        for subset in 0..FLAT_SUBSETS {
            let plan =
                policy::plan(&policy::shares(Policy::ZoneAware, Some(&Zone::new("a")), &capacity, &census), &capacity);
            let cla = cluster_load_assignment("echo.demo", &service, &plan, ClientKind::Flat, subset);
            assert_grpc_valid(&cla);
            let zones: Vec<(String, u32, usize)> = zones_at(&cla, 0);
            assert_eq!(zones.iter().map(|(z, _, _)| z.as_str()).collect::<Vec<_>>(), ["b", "c"], "subset {subset}");
        }
        // a's 30 clients spread over the four live servers: 60 / 4 = 15 each, within ±20 %.
        let loads = flat_loads(&service, &census, &node_ids(&census, 7), true);
        assert_eq!(loads.len(), 4);
        assert!(worst_deviation(&loads) <= 0.2, "{loads:?}");
    }

    fn endpoint_set() -> impl Strategy<Value = ServiceEndpoints> {
        let one = (
            prop::sample::select(vec!["a", "b", "c", "d"]),
            prop_oneof![Just(Health::Healthy), Just(Health::Unhealthy), Just(Health::Unknown)],
            prop_oneof![1u32..10, Just(u32::MAX), 1u32..=u32::MAX],
        );
        (prop::collection::vec(one, 0..40), any::<bool>()).prop_map(|(endpoints, fail_open)| {
            let endpoints = endpoints
                .into_iter()
                .enumerate()
                .map(|(i, (zone, health, weight))| {
                    let mut e = ep(&format!("i-{i}"), &format!("10.1.{}.{}", i / 200, i % 200 + 1), zone, health);
                    e.weight = weight;
                    e
                })
                .collect();
            ServiceEndpoints::new(endpoints, fail_open)
        })
    }

    proptest! {
        #[test]
        fn every_assignment_passes_the_grpc_checks(
            service in endpoint_set(),
            census in prop::collection::btree_map(
                prop::sample::select(vec!["a", "b", "c", "d", "x"]).prop_map(Zone::new), 0u64..1000, 0..5),
            zone in prop::option::of(prop::sample::select(vec!["a", "b", "c", "x"]).prop_map(Zone::new)),
            policy in prop_oneof![
                Just(Policy::ZoneAware), Just(Policy::LocalFirst), Just(Policy::None),
                (0.0f64..=1.0).prop_map(|local_share| Policy::FixedShare { local_share }),
            ],
            kind in prop_oneof![Just(ClientKind::Grpc), Just(ClientKind::Envoy), Just(ClientKind::Flat)],
            subset in 0..FLAT_SUBSETS,
        ) {
            let capacity = service.capacity();
            let plan = policy::plan(&policy::shares(policy, zone.as_ref(), &capacity, &census), &capacity);
            let cla = cluster_load_assignment("echo.demo", &service, &plan, kind, subset);
            assert_grpc_valid(&cla);
            let listed: BTreeSet<String> =
                cla.endpoints.iter().filter_map(|l| l.locality.as_ref().map(|x| x.zone.clone())).collect();
            let serving: BTreeSet<String> = service
                .endpoints.iter().filter(|e| e.health.is_serving()).map(|e| e.zone.as_str().to_string()).collect();
            match kind {
                // Never a zone dropped: every zone with a serving endpoint is reachable.
                ClientKind::Grpc => prop_assert_eq!(listed, serving),
                ClientKind::Envoy => {
                    let all: BTreeSet<String> = service.endpoints.iter().map(|e| e.zone.as_str().to_string()).collect();
                    prop_assert_eq!(listed, all);
                }
                // Flat clients get the zones of the first priority: something whenever anything serves.
                ClientKind::Flat => prop_assert_eq!(listed.is_empty(), serving.is_empty()),
            }
        }
    }

    #[test]
    fn endpoint_carries_attributes_and_weight() {
        let mut e = ep("a1", "10.0.0.1", "a", Health::Healthy);
        let lb = lb_endpoint(&e, e.weight);
        assert!(lb.load_balancing_weight.is_none());
        let meta = lb.metadata.as_ref().and_then(|m| m.filter_metadata.get(METADATA_KEY)).expect("metadata");
        assert!(meta.fields.contains_key("AVAILABILITY_ZONE"));
        e.weight = 3;
        assert_eq!(lb_endpoint(&e, e.weight).load_balancing_weight.map(|w| w.value), Some(3));
        // Nothing selected for publishing: no metadata at all, not an empty struct.
        e.metadata.clear();
        assert!(lb_endpoint(&e, e.weight).metadata.is_none());
    }

    #[test]
    fn listener_has_router_last_and_rds_over_ads() {
        use prost::Message;
        let l = listener("echo.demo:50051");
        let any = l.api_listener.and_then(|a| a.api_listener).expect("api listener");
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("decodes");
        assert_eq!(hcm.http_filters.last().map(|f| f.name.as_str()), Some(ROUTER_FILTER));
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier else { panic!("rds") };
        assert_eq!(rds.route_config_name, "echo.demo:50051");
        assert!(matches!(
            rds.config_source.and_then(|c| c.config_source_specifier),
            Some(config_source::ConfigSourceSpecifier::Ads(_))
        ));
    }

    #[test]
    fn envoy_cluster_speaks_http2_and_weights_localities() {
        let c = cluster("echo.demo", ClientKind::Envoy, &ClusterLimits::default());
        assert!(c.typed_extension_protocol_options.contains_key(HTTP_PROTOCOL_OPTIONS));
        assert!(c.common_lb_config.is_some());
        let g = cluster("echo.demo", ClientKind::Grpc, &ClusterLimits::default());
        assert!(g.typed_extension_protocol_options.is_empty() && g.common_lb_config.is_none());
    }

    #[test]
    fn clusters_do_not_cap_and_routes_leave_the_deadline_to_the_caller() {
        for kind in [ClientKind::Grpc, ClientKind::Envoy, ClientKind::Flat] {
            let c = cluster("echo.demo", kind, &ClusterLimits::default());
            let thresholds = c.circuit_breakers.expect("circuit breakers").thresholds;
            assert_eq!(thresholds.len(), 1);
            assert_eq!(thresholds[0].priority, RoutingPriority::Default as i32);
            assert_eq!(thresholds[0].max_requests.map(|v| v.value), Some(2_147_483_647));
            assert_eq!(thresholds[0].max_pending_requests.map(|v| v.value), Some(2_147_483_647));
            assert_eq!(thresholds[0].max_connections.map(|v| v.value), Some(2_147_483_647));
            assert_eq!(thresholds[0].max_retries, None, "Envoy's default: no retries are configured");
        }
        let c = cluster("echo.demo", ClientKind::Grpc, &ClusterLimits { max_requests: 100_000 });
        assert_eq!(c.circuit_breakers.and_then(|b| b.thresholds[0].max_requests).map(|v| v.value), Some(100_000));
        let zero = Some(Duration { seconds: 0, nanos: 0 });
        let routing = Routing::default();
        let egress = egress_route_configuration([("echo.demo", &routing)]);
        for config in [route_configuration("echo.demo", "echo.demo"), egress] {
            let Some(route::Action::Route(action)) = config.virtual_hosts[0].routes[0].action.clone() else {
                panic!("route action")
            };
            assert_eq!(action.timeout, zero);
            let msd = action.max_stream_duration.expect("max_stream_duration");
            assert_eq!(msd.grpc_timeout_header_max, zero);
            assert_eq!(msd.max_stream_duration, None);
        }
    }

    #[test]
    fn egress_routes_one_virtual_host_per_service() {
        let routing = Routing::default();
        let r = egress_route_configuration([("echo.demo", &routing), ("echo.grpc.demo", &routing)]);
        assert_eq!(r.name, EGRESS);
        let domains: Vec<_> = r.virtual_hosts.iter().map(|v| v.domains.clone()).collect();
        assert_eq!(domains, vec![vec!["echo.demo".to_string()], vec!["echo.grpc.demo".to_string()]]);
        let l = egress_listener("127.0.0.1:15001".parse().expect("addr"));
        assert_eq!(l.filter_chains.len(), 1);
    }

    /// The checks gRPC clients apply to a RouteConfiguration (gRFC A28, A31, A44):
    /// a path specifier on every match, a cluster or non-empty weighted clusters
    /// with positive weights summing within u32, only supported header matchers,
    /// retry codes gRPC knows, at most 5 attempts, a positive backoff, no per-try timeout.
    fn assert_grpc_routes_valid(rc: &RouteConfiguration, kind: ClientKind) {
        use prost::Message;
        let decoded = RouteConfiguration::decode(pack_any(rc.clone()).value.as_slice()).expect("round trips");
        assert_eq!(&decoded, rc);
        assert!(!rc.virtual_hosts.is_empty());
        for host in &rc.virtual_hosts {
            assert!(!host.domains.is_empty(), "domains");
            assert!(!host.routes.is_empty(), "routes");
            for r in &host.routes {
                let m = r.r#match.as_ref().expect("match");
                match m.path_specifier.as_ref().expect("path specifier") {
                    route_match::PathSpecifier::Prefix(p) => {
                        assert!(p.is_empty() || (p.starts_with('/') && p.ends_with('/')))
                    }
                    route_match::PathSpecifier::Path(p) => assert_eq!(p.matches('/').count(), 2, "{p}"),
                    other => panic!("unexpected path specifier {other:?}"),
                }
                for h in &m.headers {
                    assert!(
                        !h.name.ends_with("-bin") && !h.name.starts_with("grpc-") && h.name == h.name.to_lowercase()
                    );
                    match h.header_match_specifier.as_ref().expect("specifier") {
                        header_matcher::HeaderMatchSpecifier::PresentMatch(true) => {}
                        header_matcher::HeaderMatchSpecifier::StringMatch(sm) => {
                            assert!(!sm.ignore_case);
                            match sm.match_pattern.as_ref().expect("pattern") {
                                string_matcher::MatchPattern::Exact(_) => {}
                                string_matcher::MatchPattern::Prefix(p) => assert!(!p.is_empty()),
                                string_matcher::MatchPattern::SafeRegex(re) => {
                                    assert!(regex::Regex::new(&re.regex).is_ok())
                                }
                                other => panic!("unexpected pattern {other:?}"),
                            }
                        }
                        other => panic!("unexpected header matcher {other:?}"),
                    }
                }
                let Some(route::Action::Route(action)) = &r.action else { panic!("route action") };
                match action.cluster_specifier.as_ref().expect("cluster specifier") {
                    route_action::ClusterSpecifier::Cluster(c) => assert!(!c.is_empty()),
                    route_action::ClusterSpecifier::WeightedClusters(w) => {
                        assert!(w.clusters.len() >= 2);
                        #[allow(deprecated)]
                        let total = w.total_weight;
                        assert!(total.is_none(), "deprecated; gRPC sums the weights");
                        let sum: u64 =
                            w.clusters.iter().map(|c| u64::from(c.weight.map(|w| w.value).unwrap_or(0))).sum();
                        assert!(sum > 0 && sum <= u64::from(u32::MAX));
                        for c in &w.clusters {
                            assert!(!c.name.is_empty() && c.weight.is_some_and(|w| w.value > 0));
                        }
                    }
                    other => panic!("unexpected cluster specifier {other:?}"),
                }
                // gRPC (A31) takes grpc_timeout_header_max before max_stream_duration: a route
                // timeout must be in the first, or 0 there ("no limit") hides it.
                let msd = action.max_stream_duration.as_ref().expect("max_stream_duration");
                match (&msd.max_stream_duration, kind) {
                    (Some(d), ClientKind::Grpc | ClientKind::Flat) => {
                        assert!(d.seconds > 0 || d.nanos > 0);
                        assert_eq!(msd.grpc_timeout_header_max.as_ref(), Some(d), "A31 precedence");
                    }
                    (Some(_), ClientKind::Envoy) => panic!("Envoy gets the route timeout in `timeout`"),
                    (None, _) => assert_eq!(msd.grpc_timeout_header_max, Some(Duration { seconds: 0, nanos: 0 })),
                }
                if let Some(retry) = &action.retry_policy {
                    let known = ["cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"];
                    let codes: Vec<&str> = retry.retry_on.split(',').collect();
                    assert!(codes.iter().any(|c| known.contains(c)), "{codes:?}");
                    if kind != ClientKind::Envoy {
                        assert!(codes.iter().all(|c| known.contains(c)), "{codes:?}");
                        assert!(retry.per_try_timeout.is_none(), "gRPC has no per-try timeout");
                    }
                    let n = retry.num_retries.map(|n| n.value).unwrap_or(1);
                    assert!((1..=4).contains(&n), "num_retries {n}");
                    let backoff = retry.retry_back_off.as_ref().expect("backoff");
                    let base = backoff.base_interval.as_ref().expect("base");
                    let max = backoff.max_interval.as_ref().expect("max");
                    assert!(base.seconds > 0 || base.nanos > 0);
                    assert!((max.seconds, max.nanos) >= (base.seconds, base.nanos));
                }
                if kind != ClientKind::Envoy {
                    assert!(action.idle_timeout.is_none(), "gRPC has no idle timeout");
                }
            }
        }
    }

    /// The checks gRPC clients apply to a Cluster (xds-rules.md, gRFC A32, A50).
    fn assert_grpc_cluster_valid(c: &Cluster, kind: ClientKind) {
        use prost::Message;
        assert_eq!(&Cluster::decode(pack_any(c.clone()).value.as_slice()).expect("round trips"), c);
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32))
        );
        let eds = c.eds_cluster_config.as_ref().expect("eds config");
        assert!(matches!(
            eds.eds_config.as_ref().and_then(|s| s.config_source_specifier.as_ref()),
            Some(config_source::ConfigSourceSpecifier::Ads(_))
        ));
        assert_eq!(eds.service_name, c.name);
        assert_eq!(c.lb_policy, cluster::LbPolicy::RoundRobin as i32);
        let thresholds = &c.circuit_breakers.as_ref().expect("breakers").thresholds;
        assert!(thresholds.iter().all(|t| t.priority == RoutingPriority::Default as i32));
        if let Some(od) = &c.outlier_detection {
            for pct in [
                &od.max_ejection_percent,
                &od.failure_percentage_threshold,
                &od.enforcing_failure_percentage,
                &od.enforcing_success_rate,
            ]
            .into_iter()
            .flatten()
            {
                assert!(pct.value <= 100);
            }
            assert!(od.interval.as_ref().is_some_and(|d| d.seconds > 0 || d.nanos > 0));
            assert!(od.base_ejection_time.as_ref().is_some_and(|d| d.seconds > 0 || d.nanos > 0));
            // Both gRPC algorithms must be explicitly on or off (their defaults differ: success rate on).
            assert!(od.enforcing_success_rate.is_some() && od.enforcing_failure_percentage.is_some());
            if kind != ClientKind::Envoy {
                assert!(
                    od.consecutive_5xx.is_none() && od.enforcing_consecutive_5xx.is_none(),
                    "gRPC: no consecutive 5xx"
                );
            } else {
                assert!(od.enforcing_consecutive_5xx.is_some(), "Envoy's default is on at 5");
            }
        }
    }

    fn issue_routing() -> Routing {
        crate::config::FileConfig::parse(
            r#"
            [services."echo.demo".subsets]
            stable = { version = "v1" }
            canary = { version = "v2" }

            [[services."echo.demo".routes]]
            match = { method = "demo.v1.Describer/Describe", headers = { "x-canary" = "always" } }
            split = { canary = 100 }

            [[services."echo.demo".routes]]
            match = { service = "demo.v1.Other", headers = { "a" = { prefix = "p" }, "b" = { present = false }, "c" = { regex = "^v[0-9]$" } } }
            idle_timeout = "5m"
            retry = { on = ["unavailable", "internal"], max_attempts = 5, backoff = "10ms", per_try_timeout = "1s" }

            [[services."echo.demo".routes]]
            split = { stable = 90, canary = 10, "other.demo" = 0 }
            timeout = "1500ms"
            retry = { on = ["unavailable"], max_attempts = 3, backoff = "25ms" }

            [services."echo.demo".outlier_detection]
            failure_percentage = { threshold = 50, minimum_hosts = 2, request_volume = 20 }
            success_rate = {}
            consecutive_5xx = 7
            interval = "2s"
            max_ejection_percent = 50
            "#,
        )
        .expect("parses")
        .settings(&crate::model::ServiceName::new("demo", "echo"))
        .routing
        .as_ref()
        .clone()
    }

    #[test]
    fn every_route_shape_passes_the_grpc_checks() {
        let routing = issue_routing();
        let mut one_attempt = routing.clone();
        if let Some(r) = one_attempt.routes[2].retry.as_mut() {
            r.max_attempts = 1;
        }
        let mut cross = Routing::default();
        cross.routes.push(RouteRule {
            split: vec![(Target::Other("other.demo".into()), 3), (Target::Service, 1)],
            ..Default::default()
        });
        for (label, routing) in [
            ("default", Routing::default()),
            ("issue", routing.clone()),
            ("one attempt", one_attempt),
            ("cross", cross),
        ] {
            for kind in [ClientKind::Grpc, ClientKind::Envoy, ClientKind::Flat] {
                let rc = service_routes("echo.demo:50051", "echo.demo", &routing, kind);
                assert_grpc_routes_valid(&rc, kind);
                assert_eq!(rc.name, "echo.demo:50051", "{label}");
                let egress = egress_route_configuration([("echo.demo", &routing)]);
                assert_grpc_routes_valid(&egress, ClientKind::Envoy);
            }
        }
    }

    fn action(rc: &RouteConfiguration, i: usize) -> RouteAction {
        match rc.virtual_hosts[0].routes[i].action.clone() {
            Some(route::Action::Route(a)) => a,
            other => panic!("route action {other:?}"),
        }
    }

    #[test]
    fn routes_carry_matches_splits_timeouts_and_retries() {
        let routing = issue_routing();
        let grpc = service_routes("echo.demo", "echo.demo", &routing, ClientKind::Grpc);
        let routes = &grpc.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 3);
        let m = routes[0].r#match.clone().expect("match");
        assert_eq!(m.path_specifier, Some(route_match::PathSpecifier::Path("/demo.v1.Describer/Describe".into())));
        assert_eq!(m.headers[0].name, "x-canary");
        assert_eq!(
            action(&grpc, 0).cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster("echo.demo/canary".into()))
        );
        let m = routes[1].r#match.clone().expect("match");
        assert_eq!(m.path_specifier, Some(route_match::PathSpecifier::Prefix("/demo.v1.Other/".into())));
        assert!(m.headers[1].invert_match, "present = false inverts a presence match");
        assert_eq!(
            action(&grpc, 1).cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster("echo.demo".into()))
        );
        let main = action(&grpc, 2);
        let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &main.cluster_specifier else {
            panic!("split")
        };
        let split: Vec<(String, u32)> =
            w.clusters.iter().map(|c| (c.name.clone(), c.weight.map(|w| w.value).unwrap_or(0))).collect();
        assert_eq!(
            split,
            vec![("echo.demo/canary".into(), 10), ("echo.demo/stable".into(), 90)],
            "zero weights left out"
        );
        assert_eq!(
            main.max_stream_duration.and_then(|m| m.max_stream_duration),
            Some(Duration { seconds: 1, nanos: 500_000_000 })
        );
        let retry = main.retry_policy.expect("retry");
        assert_eq!((retry.retry_on.as_str(), retry.num_retries.map(|n| n.value)), ("unavailable", Some(2)));
        // gRPC: no per-try or idle timeout; Envoy: both, its route timeout, and the transport failures.
        let r1 = action(&grpc, 1);
        assert!(r1.idle_timeout.is_none() && r1.retry_policy.expect("retry").per_try_timeout.is_none());
        let envoy = service_routes("echo.demo", "echo.demo", &routing, ClientKind::Envoy);
        let e1 = action(&envoy, 1);
        assert_eq!(e1.idle_timeout, Some(Duration { seconds: 300, nanos: 0 }));
        let e1_retry = e1.retry_policy.expect("retry");
        assert_eq!(e1_retry.per_try_timeout, Some(Duration { seconds: 1, nanos: 0 }));
        assert_eq!(e1_retry.retry_on, "internal,unavailable,connect-failure,refused-stream,reset");
        let e2 = action(&envoy, 2);
        assert_eq!(e2.timeout, Some(Duration { seconds: 1, nanos: 500_000_000 }));
        assert_eq!(e2.max_stream_duration.and_then(|m| m.max_stream_duration), None);
    }

    #[test]
    fn clusters_carry_outlier_detection_per_kind() {
        let routing = issue_routing();
        for kind in [ClientKind::Grpc, ClientKind::Envoy, ClientKind::Flat] {
            for name in ["echo.demo", "echo.demo/canary"] {
                let c = service_cluster(name, kind, &ClusterLimits::default(), &routing);
                assert_grpc_cluster_valid(&c, kind);
                let od = c.outlier_detection.clone().expect("outlier detection");
                assert_eq!(od.failure_percentage_threshold.map(|v| v.value), Some(50));
                assert_eq!(od.enforcing_failure_percentage.map(|v| v.value), Some(100));
                assert_eq!(od.success_rate_stdev_factor.map(|v| v.value), Some(1900));
                assert_eq!(od.interval, Some(Duration { seconds: 2, nanos: 0 }));
                let retries = c.circuit_breakers.and_then(|b| b.thresholds[0].max_retries).map(|v| v.value);
                if kind == ClientKind::Envoy {
                    assert_eq!(od.consecutive_5xx.map(|v| v.value), Some(7));
                    assert_eq!(
                        retries,
                        Some(ClusterLimits::DEFAULT_MAX_REQUESTS),
                        "routes retry: Envoy's retry breaker open"
                    );
                } else {
                    assert_eq!(retries, None);
                }
            }
            let plain = service_cluster("echo.demo", kind, &ClusterLimits::default(), &Routing::default());
            assert_grpc_cluster_valid(&plain, kind);
            assert!(plain.outlier_detection.is_none());
            // Without consecutive_5xx and success_rate, Envoy and gRPC have both turned off explicitly.
            let mut only_fp = routing.clone();
            if let Some(od) = only_fp.outlier_detection.as_mut() {
                od.consecutive_5xx = None;
                od.success_rate = None;
            }
            let c = service_cluster("echo.demo", kind, &ClusterLimits::default(), &only_fp);
            assert_grpc_cluster_valid(&c, kind);
            let od = c.outlier_detection.expect("outlier detection");
            assert_eq!(od.enforcing_success_rate.map(|v| v.value), Some(0));
            if kind == ClientKind::Envoy {
                assert_eq!(od.enforcing_consecutive_5xx.map(|v| v.value), Some(0));
            }
        }
    }

    #[test]
    fn type_urls_round_trip() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/foo"), None);
    }
}
