//! Plain types for what the control plane knows: services, their endpoints
//! and zones. No AWS or Envoy types appear here, so every later stage
//! (policy, resources, cache) can be tested with values built by hand.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// An availability-zone name such as `us-east-1a`, as Cloud Map's
/// `AVAILABILITY_ZONE` attribute and a client's `node.locality.zone` spell it.
/// The empty string stands for "zone unknown".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Zone(pub String);

impl Zone {
    pub fn new(name: impl Into<String>) -> Self {
        Zone(name.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_unknown(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { f.write_str("(none)") } else { f.write_str(&self.0) }
    }
}

/// A Cloud Map service, named the way clients dial it: `SERVICE.NAMESPACE`
/// (`xds:///echo.demo`). Namespace names may contain dots, so the two parts
/// are kept apart and never recovered by splitting the joined name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub service: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, service: impl Into<String>) -> Self {
        ServiceName { namespace: namespace.into(), service: service.into() }
    }
    /// The name clients dial and the name of every xDS resource for this service.
    pub fn dial_name(&self) -> String {
        format!("{}.{}", self.service, self.namespace)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.service, self.namespace)
    }
}

/// Health as Cloud Map reports it for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Health {
    Healthy,
    Unhealthy,
    /// No health check on the service, or fail-open (see [`ServiceEndpoints::fail_open`]).
    Unknown,
}

impl Health {
    /// Whether the endpoint should receive traffic.
    pub fn is_serving(self) -> bool {
        !matches!(self, Health::Unhealthy)
    }
}

/// One reachable instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub instance_id: String,
    pub ip: IpAddr,
    pub port: u16,
    pub zone: Zone,
    pub region: String,
    pub health: Health,
    /// Relative capacity, at least 1.
    pub weight: u32,
    /// Every Cloud Map attribute of the instance (what matching on attributes reads).
    pub attributes: BTreeMap<String, String>,
    /// The attributes published as endpoint metadata: those the service's
    /// `metadata_attributes` selects (see `translate`).
    pub metadata: BTreeMap<String, String>,
}

/// The endpoints of one service as last read from Cloud Map, sorted by
/// (zone, ip, port) so equal sets compare and encode equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ServiceEndpoints {
    pub endpoints: Vec<Endpoint>,
    /// No instance was healthy, so every instance is served as `Unknown`
    /// rather than leaving clients with nothing (gRPC drops UNHEALTHY endpoints).
    pub fail_open: bool,
}

impl ServiceEndpoints {
    pub fn new(mut endpoints: Vec<Endpoint>, fail_open: bool) -> Self {
        endpoints.sort_by(|a, b| (&a.zone, a.ip, a.port).cmp(&(&b.zone, b.ip, b.port)));
        ServiceEndpoints { endpoints, fail_open }
    }

    /// Healthy weight per zone: the capacity the policy divides traffic by.
    pub fn capacity(&self) -> BTreeMap<Zone, u64> {
        let mut capacity = BTreeMap::new();
        for e in self.endpoints.iter().filter(|e| e.health.is_serving()) {
            *capacity.entry(e.zone.clone()).or_insert(0) += u64::from(e.weight);
        }
        capacity
    }
}

/// What kind of xDS client is on a stream; decides how the same traffic
/// shares are expressed (see `resources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    /// Proxyless gRPC (Go, Java, C-core, Node): priorities + weighted localities,
    /// UNHEALTHY endpoints omitted.
    Grpc,
    /// Envoy: the same localities, UNHEALTHY endpoints kept and marked.
    Envoy,
    /// Clients that flatten localities (tonic-xds).
    Flat,
}

impl ClientKind {
    /// The kind of a client from `node.user_agent_name`, by the rules
    /// installed with [`AgentRules::install`] (else the built-in ones).
    pub fn from_user_agent(agent: &str) -> ClientKind {
        AGENT_RULES.get().unwrap_or(&BUILT_IN).classify(agent)
    }
}

/// How user agents map to client kinds: the configured rules first (a
/// case-insensitive substring of the user agent → kind), then the built-in
/// ones (`envoy`, `tonic-xds` → flat, `gRPC …`), then `unknown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRules {
    pub rules: Vec<(String, ClientKind)>,
    pub unknown: ClientKind,
}

static AGENT_RULES: std::sync::OnceLock<AgentRules> = std::sync::OnceLock::new();
static BUILT_IN: AgentRules = AgentRules { rules: Vec::new(), unknown: ClientKind::Grpc };

impl AgentRules {
    pub fn classify(&self, agent: &str) -> ClientKind {
        let lower = agent.to_ascii_lowercase();
        if let Some((_, kind)) = self.rules.iter().find(|(needle, _)| lower.contains(&needle.to_ascii_lowercase())) {
            return *kind;
        }
        if lower == "envoy" || lower.starts_with("envoy ") || lower.starts_with("envoy/") {
            ClientKind::Envoy
        } else if lower.contains("tonic-xds") {
            ClientKind::Flat
        } else if lower.starts_with("grpc") {
            ClientKind::Grpc
        } else {
            self.unknown
        }
    }

    /// Make these the process-wide rules (once, at start).
    pub fn install(self) {
        let _ = AGENT_RULES.set(self);
    }
}

/// How a service's calls are routed and guarded: named subsets of its
/// instances, ordered routes, outlier detection. Built and validated once
/// (by `config`, from TOML or a Cloud Map service attribute); `resources`
/// turns it into RDS and CDS. The default routes everything to the whole service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Routing {
    /// Subset name → the instance attributes (all of them) its members carry.
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
    /// First match wins. Empty: one route, everything to the whole service.
    pub routes: Vec<RouteRule>,
    pub outlier_detection: Option<OutlierDetection>,
}

impl Routing {
    /// Whether endpoint attributes select it into `subset`.
    pub fn selects(&self, subset: &str, attributes: &BTreeMap<String, String>) -> bool {
        self.subsets.get(subset).is_some_and(|selector| selector.iter().all(|(k, v)| attributes.get(k) == Some(v)))
    }

    /// The share of its clients' calls each target gets from the catch-all
    /// route (the first route without a match), as weights; the whole
    /// service when there is none. Used to weigh a subset's demand.
    pub fn catch_all(&self) -> Vec<(Target, u32)> {
        match self.routes.iter().find(|r| r.matcher.is_catch_all()) {
            Some(route) => route.targets(),
            None if self.routes.is_empty() => vec![(Target::Service, 1)],
            None => Vec::new(),
        }
    }
}

/// Where a route sends calls.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The whole service (its own cluster).
    Service,
    /// A subset of the service, by name.
    Subset(String),
    /// Another service's cluster, by dial name (`SERVICE.NAMESPACE`).
    Other(String),
}

/// One route: which calls it takes and what it does with them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RouteRule {
    pub matcher: CallMatch,
    /// Targets and weights (> 0 each). Empty: the whole service.
    pub split: Vec<(Target, u32)>,
    /// Per-call timeout (max_stream_duration); the caller's deadline still applies.
    pub timeout: Option<std::time::Duration>,
    /// Envoy only: idle timeout of the stream.
    pub idle_timeout: Option<std::time::Duration>,
    pub retry: Option<RetryRule>,
}

impl RouteRule {
    pub fn targets(&self) -> Vec<(Target, u32)> {
        if self.split.is_empty() { vec![(Target::Service, 1)] } else { self.split.clone() }
    }
}

/// Which calls a route takes: by gRPC path and by request metadata (all must match).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CallMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
}

impl CallMatch {
    pub fn is_catch_all(&self) -> bool {
        self.path == PathMatch::Any && self.headers.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum PathMatch {
    #[default]
    Any,
    /// Every method of a gRPC service, `pkg.Service`.
    Service(String),
    /// One method, `pkg.Service/Method`.
    Method(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeaderMatch {
    /// Lower case, as HTTP/2 carries it.
    pub name: String,
    pub rule: HeaderRule,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderRule {
    Exact(String),
    Prefix(String),
    /// `true`: the header is sent; `false`: it is not.
    Present(bool),
    /// RE2 syntax (checked with Rust's `regex`, which accepts the same common subset).
    Regex(String),
}

/// gRPC status codes a retry may follow (gRFC A44's set; Envoy names them the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetryOn {
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    pub const ALL: [RetryOn; 5] = [
        RetryOn::Cancelled,
        RetryOn::DeadlineExceeded,
        RetryOn::Internal,
        RetryOn::ResourceExhausted,
        RetryOn::Unavailable,
    ];

    /// The name in the configuration and in `retry_on`.
    pub fn name(self) -> &'static str {
        match self {
            RetryOn::Cancelled => "cancelled",
            RetryOn::DeadlineExceeded => "deadline-exceeded",
            RetryOn::Internal => "internal",
            RetryOn::ResourceExhausted => "resource-exhausted",
            RetryOn::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RetryRule {
    /// Sorted, no duplicates, not empty.
    pub on: Vec<RetryOn>,
    /// Attempts in all, first one included: 1..=5 (gRPC's cap).
    pub max_attempts: u32,
    /// First backoff; later ones grow up to `max_backoff`.
    pub backoff: std::time::Duration,
    pub max_backoff: std::time::Duration,
    /// Envoy only: a timeout per attempt.
    pub per_try_timeout: Option<std::time::Duration>,
}

impl RetryRule {
    pub const MAX_ATTEMPTS: u32 = 5;
    /// gRFC A44's default initial backoff.
    pub const DEFAULT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(25);
}

/// Outlier detection (gRFC A50 for gRPC; Envoy's own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    pub interval: std::time::Duration,
    pub base_ejection_time: std::time::Duration,
    pub max_ejection_percent: u32,
    pub failure_percentage: Option<FailurePercentage>,
    pub success_rate: Option<SuccessRate>,
    /// Envoy only (gRPC has no consecutive-5xx ejection).
    pub consecutive_5xx: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FailurePercentage {
    /// Eject a host whose failed share of calls is at least this many percent.
    pub threshold: u32,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SuccessRate {
    /// Eject below mean − stdev × factor / 1000.
    pub stdev_factor: u32,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_kind_from_user_agent() {
        for (agent, kind) in [
            ("envoy", ClientKind::Envoy),
            ("gRPC Go", ClientKind::Grpc),
            ("gRPC C-core 1.85.0", ClientKind::Grpc),
            ("gRPC Node Pure JS", ClientKind::Grpc),
            ("gRPC Rust tonic-xds", ClientKind::Flat),
            ("", ClientKind::Grpc),
        ] {
            assert_eq!(ClientKind::from_user_agent(agent), kind, "{agent:?}");
        }
    }

    #[test]
    fn configured_agent_rules_come_first() {
        let rules = AgentRules { rules: vec![("my-proxy".into(), ClientKind::Envoy)], unknown: ClientKind::Flat };
        assert_eq!(rules.classify("My-Proxy 2.0"), ClientKind::Envoy);
        assert_eq!(rules.classify("gRPC Java"), ClientKind::Grpc);
        assert_eq!(rules.classify("something else"), ClientKind::Flat);
        assert_eq!(rules.classify("envoy"), ClientKind::Envoy);
    }

    #[test]
    fn dial_name_keeps_dotted_namespaces() {
        assert_eq!(ServiceName::new("grpc.demo", "echo").dial_name(), "echo.grpc.demo");
    }
}
