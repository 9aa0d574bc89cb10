//! `cloudmap-xds check`: the start-up path run once, without serving, as a
//! report an operator reads — the region and credentials in use, each
//! namespace (found, not found, no permission), each service with its
//! instances per zone and health, every instance that would be skipped and
//! why, the effective settings per service, and the IAM actions the control
//! plane needs. Every problem comes with a one-line remedy; any problem makes
//! the command exit 1. [`inspect`] is generic over [`CloudMap`], so it runs
//! the same reads (and the same translation) as the watchers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::cloudmap::{AwsCloudMap, CloudMap, CloudMapError, DISCOVER_PAGE, select_listed};
use crate::config::{FileConfig, routing_with_attributes};
use crate::model::{Health, ServiceName};
use crate::translate::{self, TranslateOptions};

#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Cloud Map namespace to check (as `serve` would watch it); repeat or comma-separate.
    #[arg(long = "namespace", env = "CLOUDMAP_XDS_NAMESPACE", value_delimiter = ',', required = true)]
    pub namespaces: Vec<String>,

    /// The TOML file `serve` would read (its effective settings are shown per service).
    #[arg(long, env = "CLOUDMAP_XDS_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Something that stops a service (or the whole control plane) from being
/// served as intended, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub remedy: String,
}

/// What [`inspect`] found: the report's text and its problems.
#[derive(Debug, Default)]
pub struct Report {
    pub text: String,
    pub problems: Vec<Problem>,
    /// The IAM actions the reads needed (`servicediscovery:…`).
    pub actions: BTreeSet<&'static str>,
}

impl Report {
    fn problem(&mut self, what: impl Into<String>, remedy: impl Into<String>) {
        self.problems.push(Problem { what: what.into(), remedy: remedy.into() });
    }

    fn line(&mut self, indent: usize, text: impl AsRef<str>) {
        let _ = writeln!(self.text, "{:width$}{}", "", text.as_ref(), width = indent * 2);
    }

    /// A failed call: its problem, with a remedy that fits the error.
    fn call_failed(&mut self, subject: &str, e: &CloudMapError) {
        let remedy = if e.code.as_deref().is_some_and(|c| c.contains("AccessDenied")) {
            format!("grant servicediscovery:{} to the control plane's role", e.operation)
        } else if e.throttled {
            "Cloud Map throttled the call: retry, or lower --api-rate on other users of the account".to_string()
        } else {
            "check AWS_REGION, the network path to Cloud Map and the error above".to_string()
        };
        self.problem(format!("{subject}: {e}"), remedy);
    }

    /// The report, the IAM actions and the problems, as printed.
    pub fn render(&self) -> String {
        let mut out = self.text.clone();
        let _ = writeln!(out, "\nIAM actions needed (servicediscovery:):");
        let actions: Vec<&str> = self.actions.iter().copied().collect();
        let _ = writeln!(out, "  {}", actions.join(", "));
        if self.problems.is_empty() {
            let _ = writeln!(out, "\nno problems found");
        } else {
            let _ = writeln!(out, "\n{} problem(s):", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(out, "  - {}\n    fix: {}", p.what, p.remedy);
            }
        }
        out
    }
}

/// The calls `serve` makes, whether or not this run needed them (a list
/// without `GetService` would fail the first deleted service).
const ACTIONS: [&str; 8] = [
    "ListNamespaces",
    "ListServices",
    "GetService",
    "DiscoverInstances",
    "DiscoverInstancesRevision",
    "GetServiceAttributes",
    "ListInstances",
    "GetInstancesHealthStatus",
];

/// Read every namespace and service the way `serve` does and report.
pub async fn inspect<C: CloudMap>(api: &C, namespaces: &[String], config: &FileConfig, region: &str) -> Report {
    let mut report = Report { actions: ACTIONS.into_iter().collect(), ..Default::default() };
    for name in namespaces {
        let namespace = match api.find_namespace(name).await {
            Ok(Some(ns)) => ns,
            Ok(None) => {
                report.line(0, format!("namespace {name}: NOT FOUND in {region}"));
                report.problem(
                    format!("namespace {name} is not in Cloud Map in region {region}"),
                    "check the --namespace spelling and AWS_REGION (the namespace's name or HTTP name)",
                );
                continue;
            }
            Err(e) => {
                report.line(0, format!("namespace {name}: ERROR {e}"));
                report.call_failed(&format!("namespace {name}"), &e);
                continue;
            }
        };
        let services = match api.list_services(&namespace.id).await {
            Ok(s) => s.items,
            Err(e) => {
                report.line(0, format!("namespace {name} ({}): ERROR listing services: {e}", namespace.id));
                report.call_failed(&format!("namespace {name}"), &e);
                continue;
            }
        };
        report.line(
            0,
            format!(
                "namespace {name} ({}, HTTP name {}): {} service(s)",
                namespace.id,
                namespace.http_name,
                services.len()
            ),
        );
        if services.is_empty() {
            report.problem(
                format!("namespace {name} has no services"),
                "create the services in this namespace (ECS: serviceConnect or serviceRegistries)",
            );
        }
        for service in services {
            let service_name = ServiceName::new(name, &service.name);
            check_service(api, &mut report, &namespace.http_name, &service, &service_name, config, region).await;
        }
    }
    report
}

async fn check_service<C: CloudMap>(
    api: &C,
    report: &mut Report,
    http_name: &str,
    service: &crate::cloudmap::ServiceRef,
    name: &ServiceName,
    config: &FileConfig,
    region: &str,
) {
    let dial = name.dial_name();
    let settings = config.settings(name);
    let instances = match api.discover_instances(http_name, &service.name, &settings).await {
        Ok((instances, _)) if instances.len() >= DISCOVER_PAGE => match api.list_instances(&service.id).await {
            Ok(listed) => select_listed(listed.items, &settings),
            Err(e) => {
                report.line(1, format!("{dial}: ERROR {e}"));
                report.call_failed(&dial, &e);
                return;
            }
        },
        Ok((instances, _)) => instances,
        Err(e) => {
            report.line(1, format!("{dial}: ERROR {e}"));
            report.call_failed(&dial, &e);
            return;
        }
    };
    let options = TranslateOptions {
        default_region: region.to_string(),
        weight_attribute: settings.weight_attribute.clone(),
        metadata_attributes: settings.metadata_attributes.clone(),
    };
    let translation = translate::translate(&instances, &options);
    let endpoints = &translation.endpoints.endpoints;
    report.line(
        1,
        format!(
            "{dial} (dial xds:///{dial}): {} instance(s), {} served, {} skipped",
            instances.len(),
            endpoints.len(),
            translation.skipped.len()
        ),
    );
    // Per zone: healthy / unhealthy / unknown (no health check).
    let mut zones: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    for e in endpoints {
        let zone = if e.zone.is_unknown() { "(no zone)".to_string() } else { e.zone.as_str().to_string() };
        let counts = zones.entry(zone).or_default();
        counts[match e.health {
            Health::Healthy => 0,
            Health::Unhealthy => 1,
            Health::Unknown => 2,
        }] += 1;
    }
    for (zone, [healthy, unhealthy, unknown]) in &zones {
        report.line(2, format!("{zone}: {healthy} healthy, {unhealthy} unhealthy, {unknown} without health status"));
    }
    for skipped in &translation.skipped {
        report.line(2, format!("skipped {}: {}", skipped.instance_id, skipped.reason));
        let remedy = if skipped.reason.contains("duplicate") {
            "Cloud Map lists this instance id twice: deregister it and register it once"
        } else if settings.weight_attribute.as_ref().is_some_and(|w| skipped.reason.contains(w.as_str())) {
            "set the weight attribute to a non-negative integer (0 drains the instance)"
        } else {
            "register it with AWS_INSTANCE_IPV4 (or _IPV6) and AWS_INSTANCE_PORT (ECS sets both for awsvpc tasks)"
        };
        report.problem(format!("{dial}: instance {} is skipped: {}", skipped.instance_id, skipped.reason), remedy);
    }
    if let Some(zoneless) = zones.get("(no zone)") {
        let n: usize = zoneless.iter().sum();
        report.problem(
            format!("{dial}: {n} instance(s) have no AVAILABILITY_ZONE attribute"),
            "set AVAILABILITY_ZONE on them (ECS sets it): without it they are never anyone's same-zone endpoint",
        );
    }
    if endpoints.is_empty() {
        report.problem(
            format!("{dial}: no instance can be served"),
            "register instances (ECS: a service with service discovery) or fix the skipped ones above",
        );
    } else if translation.endpoints.fail_open {
        report.problem(
            format!("{dial}: no instance is healthy; it would be served fail-open (all instances)"),
            "fix the instances' health checks (custom health: UpdateInstanceCustomHealthStatus)",
        );
    }
    let routing = match api.service_attributes(&service.id).await {
        Ok(attributes) => match routing_with_attributes(&settings.routing, &attributes) {
            Ok(routing) => Some(routing),
            Err(e) => {
                report.problem(
                    format!("{dial}: its routing service attributes are refused: {e:#}"),
                    "fix the cloudmap-xds.routes / cloudmap-xds.subsets service attribute (README, Routes)",
                );
                None
            }
        },
        Err(e) => {
            report.call_failed(&dial, &e);
            None
        }
    };
    let routing = routing.unwrap_or_else(|| (*settings.routing).clone());
    report.line(
        2,
        format!(
            "settings: policy {}, health filter {:?}, weight attribute {}, routes {}, subsets {}, max_requests {}",
            serde_json::to_value(settings.policy)
                .ok()
                .and_then(|v| v.get("policy").and_then(|p| p.as_str()).map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", settings.policy)),
            settings.health_status,
            settings.weight_attribute.as_deref().unwrap_or("(none: weight 1)"),
            routing.routes.len(),
            routing.subsets.len(),
            settings.limits.max_requests,
        ),
    );
}

/// The `check` subcommand: returns the process's exit code (0: no problem).
pub async fn run(args: CheckArgs) -> anyhow::Result<i32> {
    let config = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let sdk = aws_config::load_from_env().await;
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
    let mut head = Report::default();
    head.line(0, format!("region: {}", if region.is_empty() { "(none)" } else { &region }));
    if region.is_empty() {
        head.problem("no AWS region configured", "set AWS_REGION (ECS sets it for tasks)");
    }
    let credentials = match sdk.credentials_provider() {
        Some(provider) => {
            use aws_credential_types::provider::ProvideCredentials;
            match provider.provide_credentials().await {
                Ok(c) => {
                    let key = c.access_key_id();
                    let shown = key.get(key.len().saturating_sub(4)..).unwrap_or("");
                    format!("found (access key …{shown})")
                }
                Err(e) => {
                    head.problem(
                        format!("no AWS credentials: {e}"),
                        "give the task a role (ECS task role) or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                    );
                    "NONE".to_string()
                }
            }
        }
        None => {
            head.problem("no AWS credentials provider", "give the task a role (ECS task role)");
            "NONE".to_string()
        }
    };
    head.line(0, format!("credentials: {credentials}"));
    if let Some(endpoint) = sdk.endpoint_url() {
        head.line(0, format!("endpoint: {endpoint}"));
    }
    let api = AwsCloudMap::new(&sdk);
    let report = inspect(&api, &args.namespaces, &config, &region).await;
    let merged = Report {
        text: format!("{}{}", head.text, report.text),
        problems: head.problems.into_iter().chain(report.problems).collect(),
        actions: report.actions,
    };
    print!("{}", merged.render());
    Ok(if merged.problems.is_empty() { 0 } else { 1 })
}
