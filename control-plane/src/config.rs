//! Command line, environment and the optional TOML file of per-service
//! settings. Every flag has an environment variable (`CLOUDMAP_XDS_…`); the
//! file holds what differs per service (health filter, attribute filters,
//! weight attribute, traffic policy), with a `[default]` table for all.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::cache::ServiceOptions;
use crate::model::{AgentRules, ClientKind, ServiceName};
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Write a gRPC xDS bootstrap file (gRPC A27) that points a proxyless gRPC
    /// client at this control plane, then exit.
    ///
    /// The client's zone comes from --zone, else ECS task metadata v4, else EC2
    /// instance metadata (IMDSv2); without one, same-zone routing does not apply
    /// to that client. Flags also read CLOUDMAP_XDS_BOOTSTRAP_* variables. Only
    /// insecure channel credentials are written (no TLS yet).
    Bootstrap(crate::bootstrap::BootstrapArgs),
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

    /// A stream whose client has not taken a response for this long is closed
    /// (the client reconnects and gets the current state).
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

    /// `/ready` answers 503 when a service's last successful Cloud Map call is older
    /// than this (e.g. 60s). Off by default: serving the last good state is ready.
    #[arg(long, env = "CLOUDMAP_XDS_READY_STALENESS", value_parser = parse_duration)]
    pub ready_staleness: Option<Duration>,

    /// Log format.
    #[arg(long, env = "CLOUDMAP_XDS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
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
}

impl ServiceSettings {
    /// What the cache needs of these settings.
    pub fn options(&self) -> ServiceOptions {
        ServiceOptions { policy: self.policy, limits: self.limits }
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
        Ok(())
    }

    pub fn settings(&self, service: &ServiceName) -> ServiceSettings {
        let table = self.services.get(&service.dial_name()).cloned().unwrap_or_default();
        let merged = merge(&self.default, &table);
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
        }
    }
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
        assert_eq!(other.options(), ServiceOptions { policy: Policy::LocalFirst, limits: other.limits });
        for (text, needle) in [
            ("[default.limits]\nmax_requests = 0", "max_requests = 0"),
            ("[default.limits]\nmax_requests = -1", "invalid value"),
            ("[default.limits]\nmax_connections = 5", "unknown field"),
        ] {
            let error = format!("{:#}", FileConfig::parse(text).expect_err(text));
            assert!(error.contains(needle), "{text}: {error}");
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
}
