//! Command line, environment and the optional TOML file of per-service
//! settings. Every flag has an environment variable (`CLOUDMAP_XDS_…`); the
//! file holds what differs per service (health filter, attribute filters,
//! weight attribute, traffic policy), with a `[default]` table for all.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::cache::ServiceOptions;
use crate::model::{
    AgentRules, CallMatch, ClientKind, FailurePercentage, HeaderMatch, HeaderRule, OutlierDetection, PathMatch,
    RetryOn, RetryRule, RouteRule, Routing, ServiceName, SuccessRate, Target,
};
use crate::policy::Policy;
use crate::resources::ClusterLimits;
use crate::translate::MetadataAttributes;

#[derive(Debug, Parser)]
#[command(
    name = "cloudmap-xds",
    version,
    about = "Serve AWS Cloud Map services over xDS (ADS) to gRPC clients and Envoy, preferring same-zone endpoints."
)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start: the size of the flag set does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Write a gRPC xDS bootstrap file (gRPC A27) that points a proxyless gRPC
    /// client at this control plane, then exit.
    ///
    /// The client's zone comes from --zone, else ECS task metadata v4, else EC2
    /// instance metadata (IMDSv2); without one, same-zone routing does not apply
    /// to that client. Flags also read CLOUDMAP_XDS_BOOTSTRAP_* variables. The
    /// channel credentials are insecure unless --ca-file (TLS) and
    /// --cert-file/--key-file (mTLS) are given.
    Bootstrap(Box<cloudmap_xds_bootstrap::BootstrapArgs>),
    /// Run the start-up path once without serving and print what it found:
    /// region and credentials, each namespace and service, instances per zone
    /// and health, skipped instances with the reason, effective settings, the
    /// IAM actions needed. Exits 1 with a remedy per problem.
    Check(crate::check::CheckArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Cloud Map namespace to serve (every service in it); repeat or comma-separate for several.
    #[arg(long = "namespace", env = "CLOUDMAP_XDS_NAMESPACE", value_delimiter = ',', required = true)]
    pub namespaces: Vec<String>,

    /// Address of the xDS (ADS) gRPC server.
    #[arg(long, env = "CLOUDMAP_XDS_XDS_LISTEN", default_value = "0.0.0.0:18000")]
    pub xds_listen: SocketAddr,

    /// Address of the admin HTTP server (/healthz, /ready, /metrics). Keep it on loopback.
    #[arg(long, env = "CLOUDMAP_XDS_ADMIN_LISTEN", default_value = "127.0.0.1:9901")]
    pub admin_listen: SocketAddr,

    /// How often to poll DiscoverInstancesRevision per service.
    #[arg(long, env = "CLOUDMAP_XDS_REVISION_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub revision_interval: Duration,

    /// How often to re-read all instances of a service even if the revision is unchanged
    /// (health changes do not move the revision).
    #[arg(long, env = "CLOUDMAP_XDS_REFRESH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub refresh_interval: Duration,

    /// How often to list the services of each namespace (new services appear, deleted ones go).
    #[arg(long, env = "CLOUDMAP_XDS_SERVICES_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub services_interval: Duration,

    /// Longest wait between retries after Cloud Map errors or throttling.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_BACKOFF", default_value = "10s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// Cloud Map calls per second this replica may make, all APIs together. Poll
    /// intervals stretch when the services would need more (see README, "Cloud Map call budget").
    #[arg(long, env = "CLOUDMAP_XDS_API_RATE", default_value = "200", value_parser = parse_rate)]
    pub api_rate: f64,

    /// How long to gather client connects and disconnects before recomputing zone shares.
    #[arg(long, env = "CLOUDMAP_XDS_CENSUS_DEBOUNCE", default_value = "1s", value_parser = parse_duration)]
    pub census_debounce: Duration,

    /// TOML file with per-service settings (see README, "Configuration").
    #[arg(long, env = "CLOUDMAP_XDS_CONFIG")]
    pub config: Option<PathBuf>,

    /// Serve Envoy an egress listener on this port: plaintext gRPC to
    /// `localhost:PORT` with `:authority` = `SERVICE.NAMESPACE` reaches that service.
    #[arg(long, env = "CLOUDMAP_XDS_ENVOY_EGRESS_PORT")]
    pub envoy_egress_port: Option<u16>,

    /// Address the Envoy egress listener binds to (inside the Envoy).
    #[arg(long, env = "CLOUDMAP_XDS_ENVOY_EGRESS_ADDRESS", default_value = "127.0.0.1")]
    pub envoy_egress_address: std::net::IpAddr,

    /// Most concurrent ADS streams; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_STREAMS", default_value_t = 20_000)]
    pub max_streams: usize,

    /// Most resource names one request may subscribe or unsubscribe.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_RESOURCE_NAMES", default_value_t = 10_000)]
    pub max_resource_names: usize,

    /// A stream whose client has not taken a response for this long gives up
    /// its census votes and slot, and ends with UNAVAILABLE when the client
    /// reads again (it reconnects and gets the current state).
    #[arg(long, env = "CLOUDMAP_XDS_STREAM_SEND_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub stream_send_timeout: Duration,

    /// Largest request message accepted on the xDS port, in bytes.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_MESSAGE_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub max_message_size: usize,

    /// Serve the xDS port over TLS with this PEM certificate chain (reloaded when it changes).
    #[arg(long, env = "CLOUDMAP_XDS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "CLOUDMAP_XDS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this PEM CA (mTLS).
    #[arg(long, env = "CLOUDMAP_XDS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    // -- The xDS port under attack (README, "Security") --------------------------------------
    /// Most resource names one stream may hold subscribed, all types together
    /// (SotW and Delta subscriptions add up across requests); more end the
    /// stream with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_NAMES_PER_STREAM", default_value_t = 20_000)]
    pub max_names_per_stream: usize,

    /// Most ADS streams one connection may open; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub max_streams_per_connection: usize,

    /// Count one census vote per source IP address instead of one per connection
    /// (for estates where every task has its own address, as ECS awsvpc). With mTLS
    /// the vote is per client certificate either way.
    #[arg(long, env = "CLOUDMAP_XDS_CENSUS_PER_ADDRESS")]
    pub census_per_address: bool,

    /// Also serve CSDS (ClientStatusDiscoveryService) on the xDS port. By default it is
    /// served on the admin address only: it shows every client's node and what it holds.
    #[arg(long, env = "CLOUDMAP_XDS_CSDS_ON_XDS_PORT")]
    pub csds_on_xds_port: bool,

    /// Largest CSDS response, in bytes; larger ones are refused with RESOURCE_EXHAUSTED
    /// (ask with exclude_resource_contents or node_matchers).
    #[arg(long, env = "CLOUDMAP_XDS_CSDS_MAX_RESPONSE_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub csds_max_response_size: usize,
    // -- end of the security block ------------------------------------------------------------
    /// `/ready` answers 503 when a service's last successful Cloud Map call is older
    /// than this (e.g. 60s). Off by default: serving the last good state is ready.
    #[arg(long, env = "CLOUDMAP_XDS_READY_STALENESS", value_parser = parse_duration)]
    pub ready_staleness: Option<Duration>,

    /// Log format.
    #[arg(long, env = "CLOUDMAP_XDS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    // ---- replicas (issue 14): peers and connection age ----
    /// The other replicas' xDS addresses (HOST:PORT, comma-separated): their
    /// census is added to this replica's (see README, "Replicas that agree").
    #[arg(long, env = "CLOUDMAP_XDS_PEERS", value_delimiter = ',', conflicts_with = "peer_service")]
    pub peers: Vec<String>,

    /// Find the peers in Cloud Map: the instances of this service
    /// (SERVICE.NAMESPACE, the control plane's own); this replica skips itself.
    #[arg(long, env = "CLOUDMAP_XDS_PEER_SERVICE", value_parser = parse_service_name)]
    pub peer_service: Option<crate::model::ServiceName>,

    /// How often to read --peer-service's instances.
    #[arg(long, env = "CLOUDMAP_XDS_PEER_DISCOVERY_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub peer_discovery_interval: Duration,

    /// A peer not heard from for this long leaves the census, with its clients' counts.
    #[arg(long, env = "CLOUDMAP_XDS_PEER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub peer_timeout: Duration,

    /// Dial peers over TLS, checking their certificates against this PEM CA
    /// (with --tls-cert/--tls-key set, they are presented to peers that require mTLS).
    #[arg(long, env = "CLOUDMAP_XDS_PEER_TLS_CA")]
    pub peer_tls_ca: Option<PathBuf>,

    /// The name the peers' certificates carry (default: the address dialed).
    #[arg(long, env = "CLOUDMAP_XDS_PEER_TLS_SERVER_NAME", requires = "peer_tls_ca")]
    pub peer_tls_server_name: Option<String>,

    /// ADS connections get a GOAWAY after this long (±10 % per connection), so
    /// clients reconnect and spread over the replicas that exist now.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_CONNECTION_AGE", default_value = "30m", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// After the GOAWAY, streams still open (ADS streams never end on their own)
    /// are closed after this long; the client then resumes on a new connection.
    #[arg(long, env = "CLOUDMAP_XDS_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,
}

/// `SERVICE.NAMESPACE` (the namespace may contain dots; the service may not).
pub fn parse_service_name(text: &str) -> Result<crate::model::ServiceName, String> {
    match text.trim().split_once('.') {
        Some((service, namespace)) if !service.is_empty() && !namespace.is_empty() => {
            Ok(crate::model::ServiceName::new(namespace, service))
        }
        _ => Err(format!("{text:?} is not SERVICE.NAMESPACE (e.g. cloudmap-xds.demo)")),
    }
}

/// A positive number of calls per second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a positive number of calls per second")),
    }
}

/// Accepts `500ms`, `1s`, `2m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (try 500ms, 1s, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        other => {
            return Err(format!("unknown unit {other:?} in {text:?} (use ms, s or m)"));
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("{text:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Cloud Map's `HealthStatus` filter for DiscoverInstances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthFilter {
    Healthy,
    Unhealthy,
    All,
    #[default]
    HealthyOrElseAll,
}

/// One table of the TOML file; every field optional so a service's table
/// overrides the `[default]` table field by field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceTable {
    pub policy: Option<PolicyName>,
    pub local_share: Option<f64>,
    pub health_status: Option<HealthFilter>,
    /// Cloud Map `QueryParameters`: only instances with these attribute values.
    pub query_parameters: Option<BTreeMap<String, String>>,
    /// Instance attribute holding a positive integer weight (0 = drained).
    pub weight_attribute: Option<String>,
    /// Instance attributes published as endpoint metadata (`["*"]`: all; default none).
    pub metadata_attributes: Option<Vec<String>>,
    /// `[….limits]`: caps on each client's concurrency to the service's cluster.
    pub limits: Option<LimitsTable>,
    /// `[services."…".subsets]`: subset name → instance attributes its members carry.
    /// Per service only (subset names mean nothing in `[default]`).
    pub subsets: Option<BTreeMap<String, BTreeMap<String, String>>>,
    /// `[[services."…".routes]]`: first match wins. Per service only.
    pub routes: Option<Vec<RouteTable>>,
    /// `[….outlier_detection]`: replaces the default table's whole.
    pub outlier_detection: Option<OutlierTable>,
}

/// One `[[services."…".routes]]` entry; also the schema of each element of
/// the `cloudmap-xds.routes` service attribute (JSON).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    #[serde(rename = "match")]
    pub matcher: Option<MatchTable>,
    /// Subset name or `SERVICE.NAMESPACE` → weight.
    pub split: Option<BTreeMap<String, u32>>,
    pub timeout: Option<String>,
    /// Envoy only.
    pub idle_timeout: Option<String>,
    pub retry: Option<RetryTable>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchTable {
    /// `pkg.Service/Method`.
    pub method: Option<String>,
    /// `pkg.Service`: all its methods.
    pub service: Option<String>,
    /// Header name → a value (exact) or `{ exact | prefix | regex = "…" }` / `{ present = bool }`.
    pub headers: Option<BTreeMap<String, HeaderValue>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    Exact(String),
    Rule(HeaderTable),
}

/// A string or a table; by hand rather than `untagged`, so a mistake inside the
/// table is reported as itself ("unknown field `prefx`") instead of "no variant matched".
impl<'de> Deserialize<'de> for HeaderValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HeaderValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a value (exact match) or { exact | prefix | regex = \"…\" } or { present = true|false }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HeaderValue, E> {
                Ok(HeaderValue::Exact(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<HeaderValue, A::Error> {
                HeaderTable::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(HeaderValue::Rule)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderTable {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub present: Option<bool>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryTable {
    pub on: Vec<String>,
    pub max_attempts: u32,
    pub backoff: Option<String>,
    pub max_backoff: Option<String>,
    /// Envoy only.
    pub per_try_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierTable {
    pub failure_percentage: Option<FailurePercentageTable>,
    pub success_rate: Option<SuccessRateTable>,
    /// Envoy only.
    pub consecutive_5xx: Option<u32>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailurePercentageTable {
    pub threshold: Option<u32>,
    pub minimum_hosts: Option<u32>,
    pub request_volume: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateTable {
    pub stdev_factor: Option<u32>,
    pub minimum_hosts: Option<u32>,
    pub request_volume: Option<u32>,
}

/// `[default.limits]` / `[services."…".limits]`, merged field by field.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsTable {
    /// Circuit-breaker `max_requests` per client (≥ 1); default 2147483647.
    pub max_requests: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    ZoneAware,
    LocalFirst,
    FixedShare,
    None,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub default: ServiceTable,
    /// Keyed by `SERVICE.NAMESPACE`, the name clients dial.
    #[serde(default)]
    pub services: HashMap<String, ServiceTable>,
    #[serde(default)]
    pub clients: ClientsTable,
    /// `[authz]`: what mTLS clients may read (see `authz`); absent: everything.
    pub authz: Option<crate::authz::AuthzTable>,
}

/// `[clients]`: how user agents the built-in rules do not know are served.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsTable {
    /// Kind for agents no rule matches (default `grpc`).
    pub unknown: Option<ClientKind>,
    /// Case-insensitive substring of `node.user_agent_name` → kind, checked first.
    #[serde(default)]
    pub agents: BTreeMap<String, ClientKind>,
}

impl ClientsTable {
    pub fn rules(&self) -> AgentRules {
        AgentRules {
            rules: self.agents.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            unknown: self.unknown.unwrap_or(ClientKind::Grpc),
        }
    }
}

/// The settings in force for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSettings {
    pub policy: Policy,
    pub health_status: HealthFilter,
    pub query_parameters: BTreeMap<String, String>,
    pub weight_attribute: Option<String>,
    pub metadata_attributes: MetadataAttributes,
    pub limits: ClusterLimits,
    /// Subsets, routes and outlier detection from the file (the service
    /// attributes may override subsets and routes, see `cloudmap`).
    pub routing: Arc<Routing>,
}

impl ServiceSettings {
    /// What the cache needs of these settings.
    pub fn options(&self) -> ServiceOptions {
        ServiceOptions { policy: self.policy, limits: self.limits, routing: self.routing.clone() }
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        let config: FileConfig = toml::from_str(text)?;
        // Resolve every table once so mistakes surface at start, not at first use.
        config.check(&config.default, "[default]")?;
        for (name, table) in &config.services {
            config.check(table, &format!("[services.{name:?}]"))?;
        }
        Ok(config)
    }

    fn check(&self, table: &ServiceTable, label: &str) -> anyhow::Result<()> {
        let merged = merge(&self.default, table);
        policy_of(&merged).with_context(|| label.to_string())?;
        if merged.limits.and_then(|l| l.max_requests) == Some(0) {
            bail!("{label}: limits.max_requests = 0 would refuse every request (use at least 1)");
        }
        if std::ptr::eq(table, &self.default) {
            if self.default.subsets.is_some() || self.default.routes.is_some() {
                bail!("{label}: subsets and routes are per service: move them to [services.\"SERVICE.NAMESPACE\"]");
            }
            if let Some(outlier) = &self.default.outlier_detection {
                outlier_detection(outlier).with_context(|| format!("{label} outlier_detection"))?;
            }
            return Ok(());
        }
        routing_of(&merged, label)?;
        Ok(())
    }

    pub fn settings(&self, service: &ServiceName) -> ServiceSettings {
        let table = self.services.get(&service.dial_name()).cloned().unwrap_or_default();
        let merged = merge(&self.default, &table);
        // Checked in `parse`; a parsed config always builds.
        let routing = Arc::new(routing_of(&merged, "").unwrap_or_default());
        ServiceSettings {
            // Checked in `parse`; the fallback is unreachable for a parsed config.
            policy: policy_of(&merged).unwrap_or_default(),
            health_status: merged.health_status.unwrap_or_default(),
            query_parameters: merged.query_parameters.unwrap_or_default(),
            weight_attribute: merged.weight_attribute.filter(|w| !w.is_empty()),
            metadata_attributes: MetadataAttributes::from_names(&merged.metadata_attributes.unwrap_or_default()),
            limits: ClusterLimits {
                max_requests: merged
                    .limits
                    .and_then(|l| l.max_requests)
                    .unwrap_or(ClusterLimits::DEFAULT_MAX_REQUESTS)
                    .max(1),
            },
            routing,
        }
    }
}

/// The routing of a merged service table; errors name `label`, the field and the entry.
pub fn routing_of(table: &ServiceTable, label: &str) -> anyhow::Result<Routing> {
    let subsets = table.subsets.clone().unwrap_or_default();
    check_subsets(&subsets).with_context(|| format!("{label} subsets"))?;
    let routes = routes_of(table.routes.as_deref().unwrap_or_default(), &subsets, &format!("{label} routes"))?;
    let outlier_detection = match &table.outlier_detection {
        Some(outlier) => Some(outlier_detection(outlier).with_context(|| format!("{label} outlier_detection"))?),
        None => None,
    };
    Ok(Routing { subsets, routes, outlier_detection })
}

/// The service attribute whose JSON value (an array, the schema of `[[services."…".routes]]`)
/// replaces the file's routes of that service.
pub const ROUTES_ATTRIBUTE: &str = "cloudmap-xds.routes";
/// The service attribute whose JSON value (an object, the schema of `[services."…".subsets]`)
/// replaces the file's subsets of that service.
pub const SUBSETS_ATTRIBUTE: &str = "cloudmap-xds.subsets";

/// `file` with the Cloud Map service attributes `cloudmap-xds.subsets` and
/// `cloudmap-xds.routes` applied over it; the error says which attribute is
/// wrong and why (the caller keeps the last good routing). Outlier detection
/// stays the file's.
pub fn routing_with_attributes(file: &Routing, attributes: &BTreeMap<String, String>) -> anyhow::Result<Routing> {
    let subsets = match attributes.get(SUBSETS_ATTRIBUTE) {
        Some(json) => {
            let subsets: BTreeMap<String, BTreeMap<String, String>> =
                serde_json::from_str(json).with_context(|| format!("service attribute {SUBSETS_ATTRIBUTE}"))?;
            check_subsets(&subsets).with_context(|| format!("service attribute {SUBSETS_ATTRIBUTE}"))?;
            subsets
        }
        None => file.subsets.clone(),
    };
    let routes = match attributes.get(ROUTES_ATTRIBUTE) {
        Some(json) => {
            let tables: Vec<RouteTable> =
                serde_json::from_str(json).with_context(|| format!("service attribute {ROUTES_ATTRIBUTE}"))?;
            routes_of(&tables, &subsets, &format!("service attribute {ROUTES_ATTRIBUTE}"))?
        }
        None => {
            // The file's routes, checked again: the attribute may have renamed their subsets.
            for (i, route) in file.routes.iter().enumerate() {
                for (target, _) in &route.split {
                    if let Target::Subset(name) = target
                        && !subsets.contains_key(name)
                    {
                        bail!(
                            "service attribute {SUBSETS_ATTRIBUTE}: the file's routes[{i}] splits to {name:?}, which it no longer defines"
                        );
                    }
                }
            }
            file.routes.clone()
        }
    };
    Ok(Routing { subsets, routes, outlier_detection: file.outlier_detection.clone() })
}

/// Subset names become cluster names (`SERVICE.NAMESPACE/SUBSET`) and split
/// keys, where a dot means another service: letters, digits, `-` and `_` only.
pub fn check_subsets(subsets: &BTreeMap<String, BTreeMap<String, String>>) -> anyhow::Result<()> {
    for (name, selector) in subsets {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("subset name {name:?}: use letters, digits, '-' and '_' only");
        }
        if selector.is_empty() {
            bail!("subset {name:?} selects by no attribute (it would be the whole service: route without split)");
        }
    }
    Ok(())
}

/// Routes as the file or the `cloudmap-xds.routes` attribute spell them, checked against `subsets`.
pub fn routes_of(
    tables: &[RouteTable],
    subsets: &BTreeMap<String, BTreeMap<String, String>>,
    label: &str,
) -> anyhow::Result<Vec<RouteRule>> {
    tables
        .iter()
        .enumerate()
        .map(|(i, table)| route_of(table, subsets).with_context(|| format!("{label}[{i}]")))
        .collect()
}

fn duration_field(text: &Option<String>, field: &str) -> anyhow::Result<Option<Duration>> {
    text.as_deref().map(|t| parse_duration(t).map_err(|e| anyhow::anyhow!("{field}: {e}"))).transpose()
}

fn route_of(table: &RouteTable, subsets: &BTreeMap<String, BTreeMap<String, String>>) -> anyhow::Result<RouteRule> {
    let matcher = match &table.matcher {
        Some(m) => call_match(m).context("match")?,
        None => CallMatch::default(),
    };
    let mut split = Vec::new();
    if let Some(weights) = &table.split {
        for (target, weight) in weights {
            let target = if target.contains('.') {
                Target::Other(target.clone())
            } else if subsets.contains_key(target) {
                Target::Subset(target.clone())
            } else {
                bail!("split: {target:?} is no subset of this service (and not SERVICE.NAMESPACE)");
            };
            if *weight > 0 {
                split.push((target, *weight));
            }
        }
        let total: u64 = split.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            bail!("split: the weights sum to 0 (omit split to send everything to the whole service)");
        }
        if total > u64::from(u32::MAX) {
            bail!("split: the weights sum past {}", u32::MAX);
        }
    }
    let retry = match &table.retry {
        Some(r) => Some(retry_of(r).context("retry")?),
        None => None,
    };
    Ok(RouteRule {
        matcher,
        split,
        timeout: duration_field(&table.timeout, "timeout")?,
        idle_timeout: duration_field(&table.idle_timeout, "idle_timeout")?,
        retry,
    })
}

fn call_match(table: &MatchTable) -> anyhow::Result<CallMatch> {
    let grpc_name = |s: &str| !s.is_empty() && !s.contains(['/', ' ']);
    let path = match (&table.method, &table.service) {
        (Some(_), Some(_)) => bail!("method and service: give one (a method names its service)"),
        (Some(method), None) => match method.split_once('/') {
            Some((service, name)) if grpc_name(service) && grpc_name(name) => PathMatch::Method(method.clone()),
            _ => bail!("method = {method:?}: write it as \"package.Service/Method\""),
        },
        (None, Some(service)) if grpc_name(service) => PathMatch::Service(service.clone()),
        (None, Some(service)) => bail!("service = {service:?}: write it as \"package.Service\""),
        (None, None) => PathMatch::Any,
    };
    let mut headers = Vec::new();
    for (name, value) in table.headers.iter().flatten() {
        // gRPC never matches `-bin` headers and does not show `grpc-` ones to routing;
        // metadata names travel in lower case.
        if name.is_empty() || name != &name.to_ascii_lowercase() {
            bail!("headers: {name:?}: header names are lower case");
        }
        if name.ends_with("-bin") || name.starts_with("grpc-") || name.starts_with(':') {
            bail!("headers: {name:?}: gRPC clients cannot match -bin, grpc- or pseudo-headers");
        }
        let rule = match value {
            HeaderValue::Exact(v) => HeaderRule::Exact(v.clone()),
            HeaderValue::Rule(t) => match (&t.exact, &t.prefix, t.present, &t.regex) {
                (Some(v), None, None, None) => HeaderRule::Exact(v.clone()),
                (None, Some(v), None, None) if !v.is_empty() => HeaderRule::Prefix(v.clone()),
                (None, None, Some(p), None) => HeaderRule::Present(p),
                (None, None, None, Some(r)) => {
                    regex::Regex::new(r).map_err(|e| anyhow::anyhow!("headers: {name:?}: regex {r:?}: {e}"))?;
                    HeaderRule::Regex(r.clone())
                }
                _ => bail!("headers: {name:?}: give exactly one of exact, prefix (non-empty), present or regex"),
            },
        };
        headers.push(HeaderMatch { name: name.clone(), rule });
    }
    Ok(CallMatch { path, headers })
}

fn retry_of(table: &RetryTable) -> anyhow::Result<RetryRule> {
    let mut on = Vec::new();
    for name in &table.on {
        let Some(code) = RetryOn::ALL.into_iter().find(|c| c.name() == name) else {
            let known: Vec<&str> = RetryOn::ALL.iter().map(|c| c.name()).collect();
            bail!("on: {name:?} is not one of {known:?} (what gRPC retries on)");
        };
        on.push(code);
    }
    on.sort();
    on.dedup();
    if on.is_empty() {
        bail!("on: name at least one status code to retry on");
    }
    if !(1..=RetryRule::MAX_ATTEMPTS).contains(&table.max_attempts) {
        bail!(
            "max_attempts = {}: from 1 to {} (gRPC's cap, first attempt included)",
            table.max_attempts,
            RetryRule::MAX_ATTEMPTS
        );
    }
    let backoff = duration_field(&table.backoff, "backoff")?.unwrap_or(RetryRule::DEFAULT_BACKOFF);
    let max_backoff = duration_field(&table.max_backoff, "max_backoff")?.unwrap_or(backoff * 10);
    if max_backoff < backoff {
        bail!("max_backoff is shorter than backoff");
    }
    Ok(RetryRule {
        on,
        max_attempts: table.max_attempts,
        backoff,
        max_backoff,
        per_try_timeout: duration_field(&table.per_try_timeout, "per_try_timeout")?,
    })
}

fn outlier_detection(table: &OutlierTable) -> anyhow::Result<OutlierDetection> {
    // Defaults are gRFC A50's (and Envoy's).
    let failure_percentage = table.failure_percentage.map(|f| FailurePercentage {
        threshold: f.threshold.unwrap_or(85),
        minimum_hosts: f.minimum_hosts.unwrap_or(5),
        request_volume: f.request_volume.unwrap_or(50),
    });
    if let Some(f) = failure_percentage
        && f.threshold > 100
    {
        bail!("failure_percentage.threshold = {}: a percentage, 0 to 100", f.threshold);
    }
    let success_rate = table.success_rate.map(|s| SuccessRate {
        stdev_factor: s.stdev_factor.unwrap_or(1900),
        minimum_hosts: s.minimum_hosts.unwrap_or(5),
        request_volume: s.request_volume.unwrap_or(100),
    });
    if failure_percentage.is_none() && success_rate.is_none() && table.consecutive_5xx.is_none() {
        bail!("name failure_percentage, success_rate or consecutive_5xx (Envoy only): nothing would eject");
    }
    if table.consecutive_5xx == Some(0) {
        bail!("consecutive_5xx = 0 would eject on every call (leave it out to disable)");
    }
    let max_ejection_percent = table.max_ejection_percent.unwrap_or(10);
    if max_ejection_percent > 100 {
        bail!("max_ejection_percent = {max_ejection_percent}: a percentage, 0 to 100");
    }
    Ok(OutlierDetection {
        interval: duration_field(&table.interval, "interval")?.unwrap_or(Duration::from_secs(10)),
        base_ejection_time: duration_field(&table.base_ejection_time, "base_ejection_time")?
            .unwrap_or(Duration::from_secs(30)),
        max_ejection_percent,
        failure_percentage,
        success_rate,
        consecutive_5xx: table.consecutive_5xx,
    })
}

fn merge(base: &ServiceTable, over: &ServiceTable) -> ServiceTable {
    ServiceTable {
        policy: over.policy.or(base.policy),
        local_share: over.local_share.or(base.local_share),
        health_status: over.health_status.or(base.health_status),
        query_parameters: over.query_parameters.clone().or_else(|| base.query_parameters.clone()),
        weight_attribute: over.weight_attribute.clone().or_else(|| base.weight_attribute.clone()),
        metadata_attributes: over.metadata_attributes.clone().or_else(|| base.metadata_attributes.clone()),
        limits: match (base.limits, over.limits) {
            (Some(b), Some(o)) => Some(LimitsTable { max_requests: o.max_requests.or(b.max_requests) }),
            (b, o) => o.or(b),
        },
        subsets: over.subsets.clone(),
        routes: over.routes.clone(),
        outlier_detection: over.outlier_detection.clone().or_else(|| base.outlier_detection.clone()),
    }
}

fn policy_of(table: &ServiceTable) -> anyhow::Result<Policy> {
    Ok(match table.policy.unwrap_or(PolicyName::ZoneAware) {
        PolicyName::ZoneAware => Policy::ZoneAware,
        PolicyName::LocalFirst => Policy::LocalFirst,
        PolicyName::None => Policy::None,
        PolicyName::FixedShare => {
            let Some(local_share) = table.local_share else {
                bail!("policy \"fixed-share\" needs local_share (a number from 0 to 1)");
            };
            if !(0.0..=1.0).contains(&local_share) {
                bail!("local_share = {local_share} is outside 0..1");
            }
            Policy::FixedShare { local_share }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_the_subcommand_without_serve_flags() {
        let cli = Cli::try_parse_from([
            "cloudmap-xds",
            "bootstrap",
            "--server-uri",
            "cloudmap-xds.internal:18000",
            "--zone",
            "us-east-1a",
        ])
        .expect("parses");
        let Some(Command::Bootstrap(a)) = cli.command else {
            panic!("not the bootstrap subcommand: {:?}", cli.command);
        };
        assert_eq!(a.server_uri, "cloudmap-xds.internal:18000");
        assert_eq!(a.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(a.cluster, "cloudmap-xds-client");
        assert_eq!(a.output, std::path::PathBuf::from("-"));
        assert_eq!(a.metadata_timeout, Duration::from_secs(1));
        assert!(Cli::try_parse_from(["cloudmap-xds", "bootstrap", "--server-uri", "nope"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5h").is_err());
        assert_eq!(parse_rate("200"), Ok(200.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        assert!(parse_rate("0").is_err() && parse_rate("-1").is_err() && parse_rate("inf").is_err());
    }

    #[test]
    fn service_tables_override_the_default_field_by_field() {
        let config = FileConfig::parse(
            r#"
            [default]
            policy = "local-first"
            health_status = "HEALTHY"
            weight_attribute = "weight"

            [services."echo.grpc.demo"]
            policy = "fixed-share"
            local_share = 0.5
            query_parameters = { stage = "prod" }
            "#,
        )
        .expect("parses");
        let echo = config.settings(&ServiceName::new("grpc.demo", "echo"));
        assert_eq!(echo.policy, Policy::FixedShare { local_share: 0.5 });
        assert_eq!(echo.health_status, HealthFilter::Healthy);
        assert_eq!(echo.weight_attribute.as_deref(), Some("weight"));
        assert_eq!(echo.query_parameters.get("stage").map(String::as_str), Some("prod"));
        let other = config.settings(&ServiceName::new("demo", "other"));
        assert_eq!(other.policy, Policy::LocalFirst);
        assert!(other.query_parameters.is_empty());
    }

    #[test]
    fn metadata_attributes_default_to_none_and_a_service_table_replaces_the_default_list() {
        let config = FileConfig::parse(
            r#"
            [default]
            metadata_attributes = ["stage"]

            [services."echo.demo"]
            metadata_attributes = ["*"]

            [services."quiet.demo"]
            metadata_attributes = []
            "#,
        )
        .expect("parses");
        let named = |svc: &str| config.settings(&ServiceName::new("demo", svc)).metadata_attributes;
        assert_eq!(named("other"), MetadataAttributes::Named(["stage".to_string()].into()));
        assert_eq!(named("echo"), MetadataAttributes::All);
        assert_eq!(named("quiet"), MetadataAttributes::None);
        assert_eq!(
            FileConfig::default().settings(&ServiceName::new("demo", "echo")).metadata_attributes,
            MetadataAttributes::None
        );
    }

    #[test]
    fn limits_default_and_override() {
        let none = FileConfig::default().settings(&ServiceName::new("demo", "echo"));
        assert_eq!(none.limits.max_requests, 2_147_483_647);
        let config = FileConfig::parse(
            r#"
            [default.limits]
            max_requests = 5000

            [services."echo.demo".limits]
            max_requests = 100000

            [services."other.demo"]
            policy = "local-first"
            "#,
        )
        .expect("parses");
        assert_eq!(config.settings(&ServiceName::new("demo", "echo")).limits.max_requests, 100_000);
        let other = config.settings(&ServiceName::new("demo", "other"));
        assert_eq!(other.limits.max_requests, 5000);
        assert_eq!(
            other.options(),
            ServiceOptions { policy: Policy::LocalFirst, limits: other.limits, routing: Default::default() }
        );
        for (text, needle) in [
            ("[default.limits]\nmax_requests = 0", "max_requests = 0"),
            ("[default.limits]\nmax_requests = -1", "invalid value"),
            ("[default.limits]\nmax_connections = 5", "unknown field"),
        ] {
            let error = format!("{:#}", FileConfig::parse(text).expect_err(text));
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    const ISSUE_EXAMPLE: &str = r#"
        [services."echo.demo".subsets]
        stable = { version = "v1" }
        canary = { version = "v2" }

        [[services."echo.demo".routes]]
        match = { method = "demo.v1.Describer/Describe", headers = { "x-canary" = "always" } }
        split = { canary = 100 }

        [[services."echo.demo".routes]]
        split = { stable = 90, canary = 10 }
        timeout = "10s"
        retry = { on = ["unavailable"], max_attempts = 3, backoff = "25ms" }

        [services."echo.demo".outlier_detection]
        failure_percentage = { threshold = 50, minimum_hosts = 2, request_volume = 20 }
        interval = "2s"
        base_ejection_time = "30s"
        max_ejection_percent = 50

        [services."echo.demo".limits]
        max_requests = 100000
    "#;

    #[test]
    fn the_issue_example_parses_into_routing() {
        let config = FileConfig::parse(ISSUE_EXAMPLE).expect("parses");
        let routing = config.settings(&ServiceName::new("demo", "echo")).routing;
        assert_eq!(routing.subsets["canary"], BTreeMap::from([("version".to_string(), "v2".to_string())]));
        assert_eq!(routing.routes.len(), 2);
        let header = &routing.routes[0];
        assert_eq!(header.matcher.path, PathMatch::Method("demo.v1.Describer/Describe".into()));
        assert_eq!(
            header.matcher.headers,
            vec![HeaderMatch { name: "x-canary".into(), rule: HeaderRule::Exact("always".into()) }]
        );
        assert_eq!(header.split, vec![(Target::Subset("canary".into()), 100)]);
        let main = &routing.routes[1];
        assert!(main.matcher.is_catch_all());
        assert_eq!(main.split, vec![(Target::Subset("canary".into()), 10), (Target::Subset("stable".into()), 90)]);
        assert_eq!(main.timeout, Some(Duration::from_secs(10)));
        let retry = main.retry.as_ref().expect("retry");
        assert_eq!((retry.on.clone(), retry.max_attempts), (vec![RetryOn::Unavailable], 3));
        assert_eq!((retry.backoff, retry.max_backoff), (Duration::from_millis(25), Duration::from_millis(250)));
        let od = routing.outlier_detection.as_ref().expect("outlier detection");
        assert_eq!(
            od.failure_percentage,
            Some(FailurePercentage { threshold: 50, minimum_hosts: 2, request_volume: 20 })
        );
        assert_eq!((od.interval, od.max_ejection_percent), (Duration::from_secs(2), 50));
        assert_eq!(routing.catch_all().len(), 2);
        // Other services keep the default: one route to the whole service.
        assert_eq!(*config.settings(&ServiceName::new("demo", "other")).routing, Routing::default());
    }

    #[test]
    fn header_matchers_and_service_matches() {
        let config = FileConfig::parse(
            r#"
            [[services."echo.demo".routes]]
            match = { service = "demo.v1.Describer", headers = { "a" = { prefix = "x" }, "b" = { present = false }, "c" = { regex = "^v[0-9]+$" }, "d" = { exact = "y" } } }
            split = { "other.demo" = 1 }
            "#,
        )
        .expect("parses");
        let routing = config.settings(&ServiceName::new("demo", "echo")).routing;
        let rule = &routing.routes[0];
        assert_eq!(rule.matcher.path, PathMatch::Service("demo.v1.Describer".into()));
        let rules: Vec<HeaderRule> = rule.matcher.headers.iter().map(|h| h.rule.clone()).collect();
        assert_eq!(
            rules,
            vec![
                HeaderRule::Prefix("x".into()),
                HeaderRule::Present(false),
                HeaderRule::Regex("^v[0-9]+$".into()),
                HeaderRule::Exact("y".into())
            ]
        );
        assert_eq!(rule.split, vec![(Target::Other("other.demo".into()), 1)]);
        assert!(routing.catch_all().is_empty(), "no route without a match");
    }

    #[test]
    fn routing_mistakes_name_the_table_and_field() {
        let svc = "[services.\"echo.demo\"]\n";
        for (text, needles) in [
            (
                String::from("[[services.\"echo.demo\".routes]]\nsplit = { canary = 1 }"),
                vec!["[services.\"echo.demo\"] routes[0]", "split", "\"canary\" is no subset"],
            ),
            (
                format!(
                    "{svc}subsets = {{ stable = {{ version = \"v1\" }} }}\n[[services.\"echo.demo\".routes]]\nsplit = {{ stable = 0 }}"
                ),
                vec!["routes[0]", "sum to 0"],
            ),
            (
                String::from(
                    "[[services.\"echo.demo\".routes]]\n[[services.\"echo.demo\".routes]]\nretry = { on = [\"unavailable\"], max_attempts = 6 }",
                ),
                vec!["routes[1]", "retry", "max_attempts = 6"],
            ),
            (
                String::from("[[services.\"echo.demo\".routes]]\nretry = { on = [\"5xx\"], max_attempts = 2 }"),
                vec!["retry", "on: \"5xx\""],
            ),
            (
                String::from("[[services.\"echo.demo\".routes]]\nmatch = { method = \"Describe\" }"),
                vec!["routes[0]", "match", "method = \"Describe\""],
            ),
            (
                String::from("[[services.\"echo.demo\".routes]]\nmatch = { headers = { \"x-id-bin\" = \"1\" } }"),
                vec!["match", "headers", "-bin"],
            ),
            (
                String::from("[[services.\"echo.demo\".routes]]\nmatch = { headers = { \"x\" = { regex = \"(\" } } }"),
                vec!["headers", "regex"],
            ),
            (String::from("[[services.\"echo.demo\".routes]]\ntimeout = \"1h\""), vec!["routes[0]", "timeout"]),
            (
                String::from("[[services.\"echo.demo\".routes]]\nmatch = { path = \"/x\" }"),
                vec!["unknown field `path`"],
            ),
            (
                String::from("[[services.\"echo.demo\".routes]]\nmatch = { headers = { \"x\" = { prefx = \"a\" } } }"),
                vec!["unknown field `prefx`", "line 2"],
            ),
            (
                String::from("[[services.\"echo.demo\".routes]]\nmatch = { headers = { \"x\" = 5 } }"),
                vec!["exact match"],
            ),
            (format!("{svc}subsets = {{ \"a/b\" = {{ v = \"1\" }} }}"), vec!["subsets", "\"a/b\""]),
            (format!("{svc}subsets = {{ \"a.b\" = {{ v = \"1\" }} }}"), vec!["subsets", "\"a.b\""]),
            (
                String::from("[services.\"echo.demo\".outlier_detection]\ninterval = \"1s\""),
                vec!["outlier_detection", "nothing would eject"],
            ),
            (
                String::from("[services.\"echo.demo\".outlier_detection]\nfailure_percentage = { threshold = 150 }"),
                vec!["outlier_detection", "threshold = 150"],
            ),
            ("[default]\nsubsets = { a = { v = \"1\" } }".to_string(), vec!["[default]", "per service"]),
        ] {
            let error = format!("{:#}", FileConfig::parse(&text).expect_err(&text));
            for needle in needles {
                assert!(error.contains(needle), "{text}\n→ {error}\n(missing {needle:?})");
            }
        }
    }

    #[test]
    fn a_bad_routing_file_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routing.toml");
        std::fs::write(&path, "[[services.\"echo.demo\".routes]]\nsplit = { nope = 1 }\n").expect("write");
        let error = format!("{:#}", FileConfig::load(&path).expect_err("refused"));
        assert!(error.contains("routing.toml") && error.contains("routes[0]") && error.contains("split"), "{error}");
    }

    #[test]
    fn service_attributes_override_routes_and_subsets() {
        let file =
            FileConfig::parse(ISSUE_EXAMPLE).expect("parses").settings(&ServiceName::new("demo", "echo")).routing;
        let attrs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        // None set: the file's routing.
        assert_eq!(routing_with_attributes(&file, &BTreeMap::new()).expect("ok"), *file);
        // A 50/50 split replaces the file's routes; subsets and outlier detection stay.
        let fifty = routing_with_attributes(
            &file,
            &attrs(&[(
                ROUTES_ATTRIBUTE,
                r#"[{"split": {"stable": 50, "canary": 50}, "retry": {"on": ["unavailable"], "max_attempts": 2}}]"#,
            )]),
        )
        .expect("ok");
        assert_eq!(fifty.routes.len(), 1);
        assert_eq!(
            fifty.routes[0].split,
            vec![(Target::Subset("canary".into()), 50), (Target::Subset("stable".into()), 50)]
        );
        assert_eq!(
            (fifty.subsets.clone(), fifty.outlier_detection.clone()),
            (file.subsets.clone(), file.outlier_detection.clone())
        );
        // New subsets with routes that use them.
        let both = routing_with_attributes(
            &file,
            &attrs(&[
                (SUBSETS_ATTRIBUTE, r#"{"blue": {"color": "blue"}, "green": {"color": "green"}}"#),
                (ROUTES_ATTRIBUTE, r#"[{"match": {"headers": {"x-green": {"present": true}}}, "split": {"green": 1}}, {"split": {"blue": 1}}]"#),
            ]),
        )
        .expect("ok");
        assert_eq!(both.subsets.keys().collect::<Vec<_>>(), ["blue", "green"]);
        assert_eq!(both.routes[0].matcher.headers[0].rule, HeaderRule::Present(true));
        for (pairs, needles) in [
            (vec![(ROUTES_ATTRIBUTE, "not json")], vec![ROUTES_ATTRIBUTE]),
            (
                vec![(ROUTES_ATTRIBUTE, r#"[{"split": {"nope": 1}}]"#)],
                vec![ROUTES_ATTRIBUTE, "routes", "[0]", "\"nope\""],
            ),
            (vec![(ROUTES_ATTRIBUTE, r#"[{"spilt": {"stable": 1}}]"#)], vec![ROUTES_ATTRIBUTE, "unknown field"]),
            (
                vec![(SUBSETS_ATTRIBUTE, r#"{"blue": {"color": "blue"}}"#)],
                vec![SUBSETS_ATTRIBUTE, "routes[0]", "\"canary\""],
            ),
            (vec![(SUBSETS_ATTRIBUTE, r#"{"a.b": {"v": "1"}}"#)], vec![SUBSETS_ATTRIBUTE, "\"a.b\""]),
        ] {
            let error = format!("{:#}", routing_with_attributes(&file, &attrs(&pairs)).expect_err("refused"));
            for needle in needles {
                assert!(error.contains(needle), "{pairs:?} → {error} (missing {needle:?})");
            }
        }
    }

    #[test]
    fn client_kinds_for_unknown_agents() {
        let config = FileConfig::parse(
            r#"
            [clients]
            unknown = "flat"
            agents = { "my-mesh" = "envoy" }
            "#,
        )
        .expect("parses");
        let rules = config.clients.rules();
        assert_eq!(rules.classify("my-mesh/1.2"), ClientKind::Envoy);
        assert_eq!(rules.classify("curl"), ClientKind::Flat);
    }

    #[test]
    fn defaults_without_a_file() {
        let s = FileConfig::default().settings(&ServiceName::new("demo", "echo"));
        assert_eq!(s.policy, Policy::ZoneAware);
        assert_eq!(s.health_status, HealthFilter::HealthyOrElseAll);
    }

    #[test]
    fn mistakes_are_reported() {
        for (text, needle) in [
            ("[default]\npolicy = \"fixed-share\"", "local_share"),
            ("[default]\npolicy = \"fixed-share\"\nlocal_share = 1.5", "outside"),
            ("[default]\npolicy = \"random\"", "unknown variant"),
            ("[default]\nhealth = \"ALL\"", "unknown field"),
        ] {
            let error = format!("{:#}", FileConfig::parse(text).expect_err(text));
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn cli_parses_repeated_and_env_style_namespaces() {
        let cli = Cli::try_parse_from(["cloudmap-xds", "--namespace", "demo", "--namespace", "a.b,c"]).expect("parses");
        assert_eq!(cli.serve.namespaces, vec!["demo", "a.b", "c"]);
        assert_eq!(cli.serve.revision_interval, Duration::from_secs(1));
        assert_eq!(cli.serve.refresh_interval, Duration::from_secs(5));
        assert_eq!(cli.serve.xds_listen.to_string(), "0.0.0.0:18000");
    }

    #[test]
    fn replica_flags_parse_and_peer_sources_exclude_each_other() {
        let cli = Cli::try_parse_from(["cloudmap-xds", "--namespace", "demo"]).expect("parses");
        assert!(cli.serve.peers.is_empty() && cli.serve.peer_service.is_none());
        assert_eq!(cli.serve.peer_timeout, Duration::from_secs(10));
        assert_eq!(cli.serve.max_connection_age, Duration::from_secs(30 * 60));
        assert_eq!(cli.serve.max_connection_age_grace, Duration::from_secs(10));
        let cli =
            Cli::try_parse_from(["cloudmap-xds", "--namespace", "demo", "--peers", "10.0.0.1:18000,10.0.0.2:18000"])
                .expect("parses");
        assert_eq!(cli.serve.peers, vec!["10.0.0.1:18000", "10.0.0.2:18000"]);
        let cli = Cli::try_parse_from([
            "cloudmap-xds",
            "--namespace",
            "demo",
            "--peer-service",
            "control-plane.cloudmap-xds.internal",
        ])
        .expect("parses");
        assert_eq!(
            cli.serve.peer_service,
            Some(crate::model::ServiceName::new("cloudmap-xds.internal", "control-plane"))
        );
        assert!(parse_service_name("nodot").is_err() && parse_service_name(".ns").is_err());
        let both = ["cloudmap-xds", "--namespace", "d", "--peers", "a:1", "--peer-service", "s.n"];
        assert!(Cli::try_parse_from(both).is_err(), "--peers and --peer-service exclude each other");
    }
}
