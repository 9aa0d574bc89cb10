//! Watching Cloud Map: the only module that talks to AWS.
//!
//! One task per namespace lists its services; one task per service polls
//! `DiscoverInstancesRevision` every revision interval and reads all
//! instances with `DiscoverInstances` when the revision moves and every
//! refresh interval (health changes do not move the revision). Watchers are
//! per service, never per client, so Cloud Map calls do not grow with the
//! number of clients. On any error the last good state stays in the cache
//! and the watcher retries with jittered exponential backoff.
//!
//! Production estates, not just the demo: a namespace Cloud Map does not
//! have is reported and looked for again, never holding the others up; a
//! service is removed only when its deletion is confirmed (two listings
//! without it, or `GetService` saying `ServiceNotFound`), and a removed
//! watcher can never write again (its [`Claim`] is revoked); a service with
//! a full `DiscoverInstances` page is read completely with `ListInstances`;
//! every call draws from the replica's [`Budget`], and poll intervals
//! stretch as the service count grows.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_servicediscovery as sd;
use aws_sdk_servicediscovery::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::endpoint::EndpointPrefix;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::budget::{Budget, Priority, stretched_refresh};
use crate::builder::{Claim, Write, Writer};
use crate::cache::ServiceOptions;
use crate::census::Census;
use crate::config::{
    FileConfig, HealthFilter, ROUTES_ATTRIBUTE, SUBSETS_ATTRIBUTE, ServiceSettings, routing_with_attributes,
};
use crate::model::{Routing, ServiceName};
use crate::status::{NamespaceState, Status};
use crate::translate::{self, RawInstance, Skipped, TranslateOptions};

/// A Cloud Map error, as text fit for an operator's log.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct CloudMapError {
    pub operation: &'static str,
    pub message: String,
    /// The AWS error code (`ServiceNotFound`, `AccessDeniedException`, …), when there is one.
    pub code: Option<String>,
    pub throttled: bool,
}

impl CloudMapError {
    /// A local error (no AWS code, not throttled).
    pub fn local(operation: &'static str, message: impl Into<String>) -> Self {
        CloudMapError { operation, message: message.into(), code: None, throttled: false }
    }

    /// Cloud Map says the service (or its namespace) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.code.as_deref(), Some("ServiceNotFound" | "NamespaceNotFound"))
    }
}

/// A namespace as found by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub id: String,
    /// The name DiscoverInstances wants (the HttpName).
    pub http_name: String,
}

/// A service of a namespace, as listed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceRef {
    pub id: String,
    pub name: String,
}

/// The result of a call that may have made several requests (pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paged<T> {
    pub items: T,
    /// Requests made, at least 1; counted against the call budget.
    pub calls: u32,
}

/// `DiscoverInstances` returns at most this many instances; a full page
/// means the service may have more, read with `ListInstances` instead.
pub const DISCOVER_PAGE: usize = 1000;

/// The part of the Cloud Map API the control plane uses: reads only.
pub trait CloudMap: Send + Sync + 'static {
    /// Find a namespace by its name or HTTP name; `Ok(None)` when Cloud Map has none.
    fn find_namespace(&self, name: &str) -> impl Future<Output = Result<Option<Namespace>, CloudMapError>> + Send;
    /// The services in the namespace with this id.
    fn list_services(
        &self,
        namespace_id: &str,
    ) -> impl Future<Output = Result<Paged<Vec<ServiceRef>>, CloudMapError>> + Send;
    /// Whether the service with this id exists (`GetService`).
    fn service_exists(&self, service_id: &str) -> impl Future<Output = Result<bool, CloudMapError>> + Send;
    /// One page (at most [`DISCOVER_PAGE`]) of `DiscoverInstances`, with the revision.
    fn discover_instances(
        &self,
        namespace: &str,
        service: &str,
        settings: &ServiceSettings,
    ) -> impl Future<Output = Result<(Vec<RawInstance>, Option<i64>), CloudMapError>> + Send;
    fn discover_revision(
        &self,
        namespace: &str,
        service: &str,
    ) -> impl Future<Output = Result<Option<i64>, CloudMapError>> + Send;
    /// Every instance of the service (`ListInstances`, all pages) with its
    /// health (`GetInstancesHealthStatus`; `None` where Cloud Map has none),
    /// unfiltered: for services above [`DISCOVER_PAGE`] instances.
    fn list_instances(
        &self,
        service_id: &str,
    ) -> impl Future<Output = Result<Paged<Vec<RawInstance>>, CloudMapError>> + Send;
    /// The service's own attributes (`GetServiceAttributes`), where
    /// `cloudmap-xds.routes` and `cloudmap-xds.subsets` live.
    fn service_attributes(
        &self,
        service_id: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, CloudMapError>> + Send;
}

/// Cloud Map through the AWS SDK.
#[derive(Debug, Clone)]
pub struct AwsCloudMap {
    client: sd::Client,
    /// ServiceSummary has no namespace id, and moto ignores ListServices
    /// filters: remember each service's namespace (GetService, once per id).
    service_namespaces: Arc<dashmap::DashMap<String, String>>,
}

/// The SDK sends DiscoverInstances to `data-<endpoint>`, even for a custom
/// endpoint such as `http://127.0.0.1:5000`, which then fails to resolve.
/// Installed only when an endpoint override is configured.
#[derive(Debug)]
struct NoHostPrefix;

impl Intercept for NoHostPrefix {
    fn name(&self) -> &'static str {
        "NoHostPrefix"
    }

    fn modify_before_retry_loop(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().unset::<EndpointPrefix>();
        Ok(())
    }
}

impl AwsCloudMap {
    pub fn new(sdk: &aws_config::SdkConfig) -> Self {
        let custom_endpoint = sdk.endpoint_url().is_some()
            || std::env::var_os("AWS_ENDPOINT_URL_SERVICEDISCOVERY").is_some_and(|v| !v.is_empty());
        let mut config = sd::config::Builder::from(sdk).timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(15))
                .build(),
        );
        if custom_endpoint {
            config = config.interceptor(NoHostPrefix);
        }
        AwsCloudMap { client: sd::Client::from_conf(config.build()), service_namespaces: Default::default() }
    }

    /// The namespace id of a service, and whether a `GetService` call was made for it.
    async fn namespace_of(&self, service_id: &str) -> Result<(Option<String>, bool), CloudMapError> {
        if let Some(ns) = self.service_namespaces.get(service_id) {
            return Ok((Some(ns.clone()), false));
        }
        let out = self.client.get_service().id(service_id).send().await.map_err(|e| error("GetService", e))?;
        let ns = out.service().and_then(|s| s.namespace_id()).map(str::to_string);
        if let Some(ns) = &ns {
            self.service_namespaces.insert(service_id.to_string(), ns.clone());
        }
        Ok((ns, true))
    }
}

fn error<E, R>(operation: &'static str, e: sd::error::SdkError<E, R>) -> CloudMapError
where
    E: std::error::Error + sd::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug + 'static,
{
    let code = e.code().map(str::to_string);
    let (kind, message) = crate::aws_error::summarize(operation, &e);
    let throttled = kind == crate::aws_error::Kind::Throttled;
    metrics::counter!("cloudmap_xds_cloudmap_errors_total", "operation" => operation, "code" => code.clone().unwrap_or_else(|| "none".into()))
        .increment(1);
    // The SDK's full text runs to 1,000+ characters; the log line gets the summary.
    tracing::debug!(operation, error = %DisplayErrorContext(&e), "Cloud Map error in full");
    CloudMapError { operation, message, code, throttled }
}

fn health_filter(filter: HealthFilter) -> sd::types::HealthStatusFilter {
    match filter {
        HealthFilter::Healthy => sd::types::HealthStatusFilter::Healthy,
        HealthFilter::Unhealthy => sd::types::HealthStatusFilter::Unhealthy,
        HealthFilter::All => sd::types::HealthStatusFilter::All,
        HealthFilter::HealthyOrElseAll => sd::types::HealthStatusFilter::HealthyOrElseAll,
    }
}

/// Times one Cloud Map call into the latency histogram.
async fn timed<T>(
    operation: &'static str,
    call: impl Future<Output = Result<T, CloudMapError>>,
) -> Result<T, CloudMapError> {
    let start = Instant::now();
    let result = call.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!("cloudmap_xds_cloudmap_call_seconds", "operation" => operation, "outcome" => outcome)
        .record(start.elapsed().as_secs_f64());
    result
}

impl CloudMap for AwsCloudMap {
    async fn find_namespace(&self, name: &str) -> Result<Option<Namespace>, CloudMapError> {
        timed("ListNamespaces", async {
            let mut pages = self.client.list_namespaces().into_paginator().send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| error("ListNamespaces", e))?;
                for ns in page.namespaces() {
                    let http_name = ns.properties().and_then(|p| p.http_properties()).and_then(|h| h.http_name());
                    if ns.name() == Some(name) || http_name == Some(name) {
                        let Some(id) = ns.id() else { continue };
                        let http_name = http_name.or(ns.name()).unwrap_or(name).to_string();
                        return Ok(Some(Namespace { id: id.to_string(), http_name }));
                    }
                }
            }
            Ok(None)
        })
        .await
    }

    async fn list_services(&self, namespace_id: &str) -> Result<Paged<Vec<ServiceRef>>, CloudMapError> {
        timed("ListServices", async {
            let filter = sd::types::ServiceFilter::builder()
                .name(sd::types::ServiceFilterName::NamespaceId)
                .values(namespace_id)
                .condition(sd::types::FilterCondition::Eq)
                .build()
                .map_err(|e| CloudMapError::local("ListServices", e.to_string()))?;
            let mut pages = self.client.list_services().filters(filter).into_paginator().send();
            let mut services = Vec::new();
            let mut calls = 0;
            while let Some(page) = pages.next().await {
                calls += 1;
                let page = page.map_err(|e| error("ListServices", e))?;
                for service in page.services() {
                    let (Some(id), Some(name)) = (service.id(), service.name()) else {
                        continue;
                    };
                    let (namespace, called) = self.namespace_of(id).await?;
                    calls += u32::from(called);
                    if namespace.as_deref() == Some(namespace_id) {
                        services.push(ServiceRef { id: id.to_string(), name: name.to_string() });
                    }
                }
            }
            Ok(Paged { items: services, calls: calls.max(1) })
        })
        .await
    }

    async fn service_exists(&self, service_id: &str) -> Result<bool, CloudMapError> {
        timed("GetService", async {
            match self.client.get_service().id(service_id).send().await {
                Ok(_) => Ok(true),
                Err(e) => {
                    let e = error("GetService", e);
                    if e.is_not_found() { Ok(false) } else { Err(e) }
                }
            }
        })
        .await
    }

    async fn list_instances(&self, service_id: &str) -> Result<Paged<Vec<RawInstance>>, CloudMapError> {
        timed("ListInstances", async {
            let mut calls = 0;
            let mut instances = Vec::new();
            let mut pages =
                self.client.list_instances().service_id(service_id).max_results(100).into_paginator().send();
            while let Some(page) = pages.next().await {
                calls += 1;
                let page = page.map_err(|e| error("ListInstances", e))?;
                for i in page.instances() {
                    let Some(id) = i.id() else { continue };
                    instances.push(RawInstance {
                        instance_id: id.to_string(),
                        health: None,
                        attributes: i
                            .attributes()
                            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                            .unwrap_or_default(),
                    });
                }
            }
            let mut health: HashMap<String, String> = HashMap::new();
            let mut pages = self
                .client
                .get_instances_health_status()
                .service_id(service_id)
                .max_results(100)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                calls += 1;
                match page {
                    Ok(page) => {
                        for (id, status) in page.status().into_iter().flatten() {
                            health.insert(id.clone(), status.as_str().to_string());
                        }
                    }
                    // A service without a health check has no health to report: every instance is UNKNOWN.
                    Err(e) => {
                        let e = error("GetInstancesHealthStatus", e);
                        if e.code.as_deref() == Some("InvalidInput") {
                            break;
                        }
                        return Err(e);
                    }
                }
            }
            for i in &mut instances {
                i.health = health.remove(&i.instance_id);
            }
            Ok(Paged { items: instances, calls })
        })
        .await
    }

    async fn discover_instances(
        &self,
        namespace: &str,
        service: &str,
        settings: &ServiceSettings,
    ) -> Result<(Vec<RawInstance>, Option<i64>), CloudMapError> {
        timed("DiscoverInstances", async {
            let query: HashMap<String, String> =
                settings.query_parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let out = self
                .client
                .discover_instances()
                .namespace_name(namespace)
                .service_name(service)
                .max_results(DISCOVER_PAGE as i32)
                .health_status(health_filter(settings.health_status))
                .set_query_parameters((!query.is_empty()).then_some(query))
                .send()
                .await
                .map_err(|e| error("DiscoverInstances", e))?;
            let instances = out
                .instances()
                .iter()
                .map(|i| RawInstance {
                    instance_id: i.instance_id().unwrap_or_default().to_string(),
                    health: i.health_status().map(|h| h.as_str().to_string()),
                    attributes: i
                        .attributes()
                        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default(),
                })
                .collect();
            Ok((instances, out.instances_revision()))
        })
        .await
    }

    async fn service_attributes(&self, service_id: &str) -> Result<BTreeMap<String, String>, CloudMapError> {
        timed("GetServiceAttributes", async {
            let out = self
                .client
                .get_service_attributes()
                .service_id(service_id)
                .send()
                .await
                .map_err(|e| error("GetServiceAttributes", e))?;
            let attributes = out.service_attributes().and_then(|a| a.attributes()).cloned().unwrap_or_default();
            Ok(attributes.into_iter().collect())
        })
        .await
    }

    async fn discover_revision(&self, namespace: &str, service: &str) -> Result<Option<i64>, CloudMapError> {
        timed("DiscoverInstancesRevision", async {
            let out = self
                .client
                .discover_instances_revision()
                .namespace_name(namespace)
                .service_name(service)
                .send()
                .await
                .map_err(|e| error("DiscoverInstancesRevision", e))?;
            Ok(out.instances_revision())
        })
        .await
    }
}

/// Poll cadence and retry limits.
#[derive(Debug, Clone)]
pub struct Timing {
    pub revision_interval: Duration,
    pub refresh_interval: Duration,
    pub services_interval: Duration,
    pub max_backoff: Duration,
}

/// Full-jitter exponential backoff: a random wait in [d/2, d] with
/// d = min(max, base × 2^failures).
pub fn backoff(failures: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.min(16)).min(max);
    let low = exp / 2;
    low + exp.saturating_sub(low).mul_f64(rand::rng().random::<f64>())
}

/// Aborts the task when dropped, so a removed service's watcher never outlives it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A random duration in [0.9 d, 1.1 d], so services do not poll in step.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// How often a missing namespace is reported at ERROR level.
const MISSING_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Consecutive successful listings a service must be missing from before it
/// is removed (unless `GetService` confirms the deletion sooner).
const ABSENT_LISTINGS: u32 = 2;

/// Runs the watchers and feeds the index's writer.
pub struct Watcher<C> {
    pub api: Arc<C>,
    pub writer: Writer,
    /// Who subscribes to what: subscribed services are polled first.
    pub census: Arc<Census>,
    pub status: Arc<Status>,
    pub config: Arc<FileConfig>,
    pub timing: Timing,
    pub default_region: String,
    /// Every Cloud Map call of this replica draws from it.
    pub budget: Arc<Budget>,
}

impl<C> Clone for Watcher<C> {
    fn clone(&self) -> Self {
        Watcher {
            api: self.api.clone(),
            writer: self.writer.clone(),
            census: self.census.clone(),
            status: self.status.clone(),
            config: self.config.clone(),
            timing: self.timing.clone(),
            default_region: self.default_region.clone(),
            budget: self.budget.clone(),
        }
    }
}

/// What a service watcher tells its namespace task.
#[derive(Debug)]
enum ServiceEvent {
    /// The first read of the service succeeded.
    FirstRead(String),
    /// Cloud Map answered `ServiceNotFound` for it.
    NotFound(String),
}

/// One service being watched, as its namespace task keeps it.
struct Watched {
    id: String,
    claim: Claim,
    /// Consecutive successful listings without this service.
    absent: u32,
    _task: AbortOnDrop,
}

/// What one poll of a service did.
enum Polled {
    /// The revision had not moved.
    Unchanged,
    /// The instances were read.
    Read,
    /// The service was removed meanwhile: this watcher must stop.
    Revoked,
}

impl<C: CloudMap> Watcher<C> {
    /// Watch the namespaces until the task is dropped. The cache turns ready
    /// once every namespace that exists was listed and each of its services
    /// read once (or found deleted), and at least one namespace exists. A
    /// namespace Cloud Map does not have never holds the others up; it is
    /// looked for again every services interval and served when it appears.
    pub async fn run(self, namespaces: Vec<String>) {
        let namespaces: BTreeSet<String> = namespaces.into_iter().collect();
        let (report, mut reports) = mpsc::unbounded_channel::<(String, bool)>();
        let mut tasks = Vec::new();
        for name in &namespaces {
            self.status.set_namespace_state(name, NamespaceState::Pending);
            tasks.push(AbortOnDrop(tokio::spawn(self.clone().watch_namespace(name.clone(), report.clone()))));
        }
        drop(report);
        // Namespace → whether it exists (and synced) or is missing.
        let mut settled: BTreeMap<String, bool> = BTreeMap::new();
        let mut ready = false;
        while let Some((namespace, exists)) = reports.recv().await {
            settled.insert(namespace, exists);
            if !ready && settled.len() == namespaces.len() && settled.values().any(|exists| *exists) {
                ready = true;
                let missing: Vec<&String> = settled.iter().filter(|(_, e)| !**e).map(|(n, _)| n).collect();
                tracing::info!(?missing, "first Cloud Map sync complete; serving");
                self.writer.set_ready().await;
            }
        }
        // Every namespace task ended: only on shutdown.
        drop(tasks);
    }

    async fn watch_namespace(self, name: String, report: mpsc::UnboundedSender<(String, bool)>) {
        let mut namespace: Option<Namespace> = None;
        let mut services: BTreeMap<String, Watched> = BTreeMap::new();
        let (events_tx, mut events) = mpsc::unbounded_channel::<ServiceEvent>();
        // Services whose first read the first sync waits for; `None` until the first listing.
        let mut first_reads: Option<BTreeSet<String>> = None;
        let mut synced = false;
        let mut reported_missing = false;
        let mut missing_logged: Option<Instant> = None;
        let mut failures = 0u32;
        let next_listing = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(next_listing);
        loop {
            tokio::select! {
                () = &mut next_listing => {
                    let wait = match self.list_namespace(&name, &mut namespace).await {
                        Ok(None) => {
                            failures = 0;
                            self.status.set_namespace_state(&name, NamespaceState::Missing);
                            if missing_logged.is_none_or(|t| t.elapsed() >= MISSING_LOG_INTERVAL) {
                                missing_logged = Some(Instant::now());
                                tracing::error!(
                                    namespace = %name,
                                    "Cloud Map has no namespace {name:?}: check --namespace and AWS_REGION; \
                                     the other namespaces are served, this one is looked for again every {:?}",
                                    self.timing.services_interval
                                );
                            }
                            if !reported_missing && !synced {
                                reported_missing = true;
                                let _ = report.send((name.clone(), false));
                            }
                            self.timing.services_interval
                        }
                        Ok(Some((ns, listed))) => {
                            failures = 0;
                            if missing_logged.take().is_some() {
                                tracing::info!(namespace = %name, "namespace found");
                            }
                            self.reconcile(&ns, &name, listed, &mut services, &mut first_reads, &events_tx).await;
                            self.timing.services_interval
                        }
                        Err(e) => {
                            failures += 1;
                            if !synced {
                                self.status.set_namespace_state(&name, NamespaceState::Error(e.to_string()));
                            }
                            tracing::warn!(namespace = %name, error = %e, "listing services failed; keeping the last known services");
                            backoff(failures, self.timing.revision_interval, self.timing.max_backoff)
                                .max(self.timing.revision_interval)
                        }
                    };
                    next_listing.as_mut().reset(Instant::now() + jittered(wait));
                }
                Some(event) = events.recv() => match event {
                    ServiceEvent::FirstRead(service) => {
                        if let Some(pending) = first_reads.as_mut() {
                            pending.remove(&service);
                        }
                    }
                    ServiceEvent::NotFound(service) => {
                        // Readiness never waits on a service that does not exist.
                        if let Some(pending) = first_reads.as_mut() {
                            pending.remove(&service);
                        }
                        let Some(id) = services.get(&service).map(|w| w.id.clone()) else { continue };
                        match self.exists(&id).await {
                            Ok(false) => self.drop_service(&mut services, &name, &service, "GetService: ServiceNotFound"),
                            Ok(true) => tracing::debug!(namespace = %name, %service, "DiscoverInstances said ServiceNotFound, GetService finds it; still watching"),
                            Err(e) => tracing::debug!(namespace = %name, %service, error = %e, "cannot confirm the deletion yet"),
                        }
                    }
                },
            }
            if !synced && namespace.is_some() && first_reads.as_ref().is_some_and(BTreeSet::is_empty) {
                synced = true;
                self.status.set_namespace_state(&name, NamespaceState::Synced);
                tracing::info!(namespace = %name, services = services.len(), "namespace synced");
                let _ = report.send((name.clone(), true));
            }
        }
    }

    /// Find the namespace (once) and list its services: `Ok(None)` when Cloud Map has no such namespace.
    async fn list_namespace(
        &self,
        name: &str,
        namespace: &mut Option<Namespace>,
    ) -> Result<Option<(Namespace, Vec<ServiceRef>)>, CloudMapError> {
        let ns = match namespace {
            Some(ns) => ns.clone(),
            None => {
                self.budget.acquire(Priority::Background).await;
                match self.api.find_namespace(name).await? {
                    Some(ns) => {
                        *namespace = Some(ns.clone());
                        ns
                    }
                    None => return Ok(None),
                }
            }
        };
        self.budget.acquire(Priority::Background).await;
        let listed = self.api.list_services(&ns.id).await?;
        self.budget.charge(listed.calls.saturating_sub(1));
        Ok(Some((ns, listed.items)))
    }

    async fn exists(&self, service_id: &str) -> Result<bool, CloudMapError> {
        self.budget.acquire(Priority::Background).await;
        self.api.service_exists(service_id).await
    }

    /// Start watchers for new services; remove services whose deletion is confirmed.
    async fn reconcile(
        &self,
        ns: &Namespace,
        name: &str,
        listed: Vec<ServiceRef>,
        services: &mut BTreeMap<String, Watched>,
        first_reads: &mut Option<BTreeSet<String>>,
        events: &mpsc::UnboundedSender<ServiceEvent>,
    ) {
        let listed: BTreeMap<String, String> = listed.into_iter().map(|s| (s.name, s.id)).collect();
        let mut gone = Vec::new();
        for (service, watched) in services.iter_mut() {
            match listed.get(service) {
                // The same name under a new id is a new service: start over.
                Some(id) if *id != watched.id => gone.push((service.clone(), "re-created with a new id")),
                Some(_) => watched.absent = 0,
                None => {
                    watched.absent += 1;
                    if watched.absent >= ABSENT_LISTINGS {
                        gone.push((service.clone(), "missing from two listings"));
                        continue;
                    }
                    // One listing can miss a service (eventual consistency): ask for it by id.
                    match self.exists(&watched.id).await {
                        Ok(false) => gone.push((service.clone(), "GetService: ServiceNotFound")),
                        Ok(true) => {
                            tracing::info!(namespace = %name, %service, "service missing from a listing but GetService finds it; kept")
                        }
                        Err(e) => {
                            tracing::info!(namespace = %name, %service, error = %e, "service missing from a listing; kept until the next listing confirms it")
                        }
                    }
                }
            }
        }
        for (service, reason) in gone {
            // A service deleted before its first read must not hold up the first sync.
            if let Some(pending) = first_reads.as_mut() {
                pending.remove(&service);
            }
            self.drop_service(services, name, &service, reason);
        }
        let first_listing = first_reads.is_none();
        let pending = first_reads.get_or_insert_with(BTreeSet::new);
        for (service, id) in listed {
            if services.contains_key(&service) {
                continue;
            }
            if !first_listing {
                tracing::info!(namespace = %name, %service, "new service found");
            }
            let service_name = ServiceName::new(name, &service);
            let claim = self.writer.claim(&service_name);
            let task = self.clone().watch_service(
                ns.clone(),
                ServiceRef { id: id.clone(), name: service.clone() },
                claim.clone(),
                events.clone(),
            );
            self.budget.service_started();
            if first_listing {
                pending.insert(service.clone());
            }
            services.insert(service, Watched { id, claim, absent: 0, _task: AbortOnDrop(tokio::spawn(task)) });
        }
    }

    fn drop_service(&self, services: &mut BTreeMap<String, Watched>, namespace: &str, service: &str, reason: &str) {
        let Some(watched) = services.remove(service) else { return };
        // Abort first; the claim check makes a write that races the abort harmless.
        drop(watched._task);
        self.writer.retire(&watched.claim);
        self.budget.service_ended();
        metrics::gauge!("cloudmap_xds_endpoints", "service" => watched.claim.name.dial_name()).set(0.0);
        tracing::info!(%namespace, %service, %reason, "service deleted from Cloud Map; no longer served");
    }

    async fn watch_service(
        self,
        namespace: Namespace,
        service: ServiceRef,
        claim: Claim,
        events: mpsc::UnboundedSender<ServiceEvent>,
    ) {
        let name = claim.name.clone();
        let dial = name.dial_name();
        let settings = self.config.settings(&name);
        let options = TranslateOptions {
            default_region: self.default_region.clone(),
            weight_attribute: settings.weight_attribute.clone(),
            metadata_attributes: settings.metadata_attributes.clone(),
        };
        let mut revision: Option<i64> = None;
        let mut next_refresh = Instant::now();
        let mut failures = 0u32;
        let mut warned: HashSet<Skipped> = HashSet::new();
        let mut first_read = true;
        let mut large = false;
        // The routing in force: the file's, with the last good service attributes over it.
        let mut live = LiveRouting::new(settings.routing.clone());
        loop {
            // Clients of a service with subsets may subscribe only to its subset clusters.
            let subscribed = self.census.has_subscribers(&dial)
                || live.routing.subsets.keys().any(|s| self.census.has_subscribers(&format!("{dial}/{s}")));
            // A first read goes ahead of other services' steady polling: readiness waits for it.
            let priority = if subscribed || first_read { Priority::Subscribed } else { Priority::Background };
            let revision_interval = self.budget.stretch(self.timing.revision_interval);
            let refresh_interval =
                stretched_refresh(self.timing.refresh_interval, self.timing.revision_interval, revision_interval);
            let result = async {
                let due = Instant::now() >= next_refresh;
                if !due {
                    self.budget.acquire(priority).await;
                    let current = self.api.discover_revision(&namespace.http_name, &name.service).await?;
                    if current == revision {
                        return Ok(Polled::Unchanged);
                    }
                }
                self.budget.acquire(priority).await;
                let (mut instances, current) =
                    self.api.discover_instances(&namespace.http_name, &name.service, &settings).await?;
                if instances.len() >= DISCOVER_PAGE {
                    // DiscoverInstances stops at one page: read every instance the slow way.
                    self.budget.acquire(priority).await;
                    let listed = self.api.list_instances(&service.id).await?;
                    self.budget.charge(listed.calls.saturating_sub(1));
                    metrics::counter!("cloudmap_xds_full_listings_total", "service" => dial.clone()).increment(1);
                    if !large {
                        tracing::warn!(
                            service = %name, instances = listed.items.len(),
                            "service has {DISCOVER_PAGE} or more instances, more than one DiscoverInstances page: \
                             reading them with ListInstances and GetInstancesHealthStatus (slower, lower quota)"
                        );
                    }
                    large = true;
                    instances = select_listed(listed.items, &settings);
                } else if large {
                    large = false;
                    tracing::info!(service = %name, instances = instances.len(), "service back within one DiscoverInstances page");
                }
                // The service attributes, on the refresh schedule (editing them moves no revision).
                // A failed read keeps the last good routing and never holds up the endpoints.
                if due {
                    self.budget.acquire(priority).await;
                    match self.api.service_attributes(&service.id).await {
                        Ok(attributes) => live.apply(&name, &settings, &attributes, &self.status),
                        Err(e) => live.read_failed(&name, &e),
                    }
                }
                let translation = translate::translate(&instances, &options);
                for skipped in &translation.skipped {
                    if !warned.contains(skipped) {
                        tracing::warn!(service = %name, instance = %skipped.instance_id, reason = %skipped.reason, "skipping instance");
                    }
                }
                let skipped: HashSet<Skipped> = translation.skipped.iter().cloned().collect();
                if skipped != warned {
                    self.status.set_skipped(&dial, translation.skipped.clone());
                    warned = skipped;
                }
                if let Some(bytes) = translation.metadata_dropped {
                    tracing::warn!(service = %name, bytes, budget = translate::METADATA_BUDGET, "endpoint metadata over budget: publishing none (narrow metadata_attributes)");
                }
                if translation.endpoints.fail_open {
                    tracing::warn!(service = %name, "no healthy instance: serving all instances (fail-open)");
                }
                let count = translation.endpoints.endpoints.len();
                let service_options = ServiceOptions { routing: live.routing.clone(), ..settings.options() };
                match self.writer.write(&claim, translation.endpoints, service_options).await {
                    Write::Revoked => return Ok(Polled::Revoked),
                    Write::Unchanged => {}
                    Write::Changed => {
                        // When the change entered the cache: the start of push propagation.
                        metrics::gauge!("cloudmap_xds_service_updated_timestamp_seconds", "service" => dial.clone())
                            .set(unix_now());
                        metrics::gauge!("cloudmap_xds_endpoints", "service" => dial.clone()).set(count as f64);
                        tracing::info!(service = %name, endpoints = count, revision = ?current, "endpoints updated");
                    }
                }
                revision = current;
                next_refresh = Instant::now() + jittered(refresh_interval);
                Ok::<_, CloudMapError>(Polled::Read)
            }
            .await;
            let wait = match result {
                Ok(Polled::Revoked) => {
                    tracing::debug!(service = %name, "service removed; watcher ends");
                    return;
                }
                Ok(polled) => {
                    failures = 0;
                    // Any successful call means Cloud Map's view of this service is current.
                    self.writer.mark_synced_by(&claim);
                    metrics::gauge!("cloudmap_xds_last_sync_timestamp_seconds", "service" => dial.clone())
                        .set(unix_now());
                    if matches!(polled, Polled::Read) && first_read {
                        first_read = false;
                        let _ = events.send(ServiceEvent::FirstRead(name.service.clone()));
                        // Start the steady polls of all services at spread-out moments.
                        revision_interval.mul_f64(rand::rng().random::<f64>())
                    } else {
                        jittered(revision_interval)
                    }
                }
                Err(e) => {
                    failures += 1;
                    if e.is_not_found() {
                        let _ = events.send(ServiceEvent::NotFound(name.service.clone()));
                    }
                    let wait = backoff(failures, self.timing.revision_interval, self.timing.max_backoff);
                    tracing::warn!(service = %name, error = %e, throttled = e.throttled, retry_in = ?wait, "Cloud Map call failed; keeping the last good endpoints");
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The routing a watcher serves: the file's, overridden by the service
/// attributes `cloudmap-xds.routes` / `cloudmap-xds.subsets` while they are
/// valid. A bad value keeps the last good routing (it never reaches a client),
/// is warned about once per distinct value, counted in
/// `cloudmap_xds_service_attributes_invalid` and shown in `/config_dump`.
struct LiveRouting {
    routing: Arc<Routing>,
    /// The attribute values last seen, to warn once per change.
    seen: Option<(Option<String>, Option<String>)>,
    read_warned: bool,
}

impl LiveRouting {
    fn new(file: Arc<Routing>) -> Self {
        LiveRouting { routing: file, seen: None, read_warned: false }
    }

    fn apply(
        &mut self,
        name: &ServiceName,
        settings: &ServiceSettings,
        attributes: &BTreeMap<String, String>,
        status: &Status,
    ) {
        self.read_warned = false;
        let values = (attributes.get(ROUTES_ATTRIBUTE).cloned(), attributes.get(SUBSETS_ATTRIBUTE).cloned());
        if self.seen.as_ref() == Some(&values) {
            return;
        }
        self.seen = Some(values);
        let dial = name.dial_name();
        match routing_with_attributes(&settings.routing, attributes) {
            Ok(routing) => {
                if routing != *self.routing {
                    tracing::info!(service = %name, routes = routing.routes.len(), subsets = routing.subsets.len(), "routing from service attributes applied");
                }
                self.routing = Arc::new(routing);
                status.set_routing_error(&dial, None);
                metrics::gauge!("cloudmap_xds_service_attributes_invalid", "service" => dial).set(0.0);
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::warn!(service = %name, error = %error, "invalid routing in Cloud Map service attributes: keeping the last good routing");
                status.set_routing_error(&dial, Some(error));
                metrics::gauge!("cloudmap_xds_service_attributes_invalid", "service" => dial).set(1.0);
            }
        }
    }

    fn read_failed(&mut self, name: &ServiceName, e: &CloudMapError) {
        if !self.read_warned {
            self.read_warned = true;
            tracing::warn!(service = %name, error = %e, "GetServiceAttributes failed: keeping the last good routing (grant servicediscovery:GetServiceAttributes)");
        }
    }
}

/// What `DiscoverInstances` would have returned, from an unfiltered
/// `ListInstances` + `GetInstancesHealthStatus` read: the query parameters
/// and the health filter applied here. An instance without a known health
/// (no health check) counts as healthy, as Cloud Map treats it.
pub fn select_listed(instances: Vec<RawInstance>, settings: &ServiceSettings) -> Vec<RawInstance> {
    let matching: Vec<RawInstance> = instances
        .into_iter()
        .filter(|i| settings.query_parameters.iter().all(|(k, v)| i.attributes.get(k) == Some(v)))
        .collect();
    let unhealthy = |i: &RawInstance| i.health.as_deref() == Some("UNHEALTHY");
    match settings.health_status {
        HealthFilter::All => matching,
        HealthFilter::Healthy => matching.into_iter().filter(|i| !unhealthy(i)).collect(),
        HealthFilter::Unhealthy => matching.into_iter().filter(unhealthy).collect(),
        HealthFilter::HealthyOrElseAll => {
            if matching.iter().all(unhealthy) {
                matching
            } else {
                matching.into_iter().filter(|i| !unhealthy(i)).collect()
            }
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::model::Zone;
    use crate::policy::Policy;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// One service of the test double.
    #[derive(Clone)]
    struct FakeService {
        id: String,
        instances: Vec<RawInstance>,
        revision: i64,
        /// Shown by ListServices.
        listed: bool,
        /// GetService finds it.
        exists: bool,
        /// DiscoverInstances answers ServiceNotFound.
        not_found: bool,
        /// DiscoverInstances fails (throttled).
        failing: bool,
        /// GetServiceAttributes.
        attributes: BTreeMap<String, String>,
    }

    /// A Cloud Map test double for what moto cannot produce on demand: outages,
    /// a listing that misses a service once, a deletion at an exact moment.
    #[derive(Default)]
    struct Fake {
        /// Namespace name → service name → service.
        namespaces: Mutex<BTreeMap<String, BTreeMap<String, FakeService>>>,
        failing: AtomicBool,
        calls: Mutex<BTreeMap<&'static str, usize>>,
    }

    impl Fake {
        fn with(namespace: &str, service: &str, instances: Vec<RawInstance>) -> Fake {
            let fake = Fake::default();
            fake.add(namespace, service, instances);
            fake
        }

        fn add(&self, namespace: &str, service: &str, instances: Vec<RawInstance>) {
            let s = FakeService {
                id: format!("srv-{namespace}-{service}"),
                instances,
                revision: 1,
                listed: true,
                exists: true,
                not_found: false,
                failing: false,
                attributes: BTreeMap::new(),
            };
            self.namespaces.lock().expect("lock").entry(namespace.into()).or_default().insert(service.into(), s);
        }

        fn edit(&self, namespace: &str, service: &str, f: impl FnOnce(&mut FakeService)) {
            let mut namespaces = self.namespaces.lock().expect("lock");
            f(namespaces.get_mut(namespace).and_then(|n| n.get_mut(service)).expect("fake service"));
        }

        fn count(&self, operation: &'static str) -> Result<(), CloudMapError> {
            *self.calls.lock().expect("lock").entry(operation).or_default() += 1;
            if self.failing.load(Ordering::SeqCst) {
                return Err(CloudMapError {
                    operation,
                    message: "boom".into(),
                    code: Some("RequestLimitExceeded".into()),
                    throttled: true,
                });
            }
            Ok(())
        }

        fn calls(&self) -> usize {
            self.calls.lock().expect("lock").values().sum()
        }

        fn service(&self, namespace: &str, service: &str) -> Option<FakeService> {
            self.namespaces.lock().expect("lock").get(namespace).and_then(|n| n.get(service)).cloned()
        }
    }

    fn not_found(operation: &'static str) -> CloudMapError {
        CloudMapError { operation, message: "gone".into(), code: Some("ServiceNotFound".into()), throttled: false }
    }

    impl CloudMap for Fake {
        async fn find_namespace(&self, name: &str) -> Result<Option<Namespace>, CloudMapError> {
            self.count("ListNamespaces")?;
            let known = self.namespaces.lock().expect("lock").contains_key(name);
            Ok(known.then(|| Namespace { id: name.into(), http_name: name.into() }))
        }
        async fn list_services(&self, namespace_id: &str) -> Result<Paged<Vec<ServiceRef>>, CloudMapError> {
            self.count("ListServices")?;
            let namespaces = self.namespaces.lock().expect("lock");
            let items = namespaces
                .get(namespace_id)
                .into_iter()
                .flatten()
                .filter(|(_, s)| s.listed)
                .map(|(name, s)| ServiceRef { id: s.id.clone(), name: name.clone() })
                .collect();
            Ok(Paged { items, calls: 1 })
        }
        async fn service_exists(&self, service_id: &str) -> Result<bool, CloudMapError> {
            self.count("GetService")?;
            let namespaces = self.namespaces.lock().expect("lock");
            Ok(namespaces.values().flat_map(|n| n.values()).any(|s| s.id == service_id && s.exists))
        }
        async fn discover_instances(
            &self,
            namespace: &str,
            service: &str,
            _settings: &ServiceSettings,
        ) -> Result<(Vec<RawInstance>, Option<i64>), CloudMapError> {
            self.count("DiscoverInstances")?;
            let s = self.service(namespace, service).ok_or_else(|| not_found("DiscoverInstances"))?;
            if s.not_found {
                return Err(not_found("DiscoverInstances"));
            }
            if s.failing {
                return Err(CloudMapError::local("DiscoverInstances", "throttled"));
            }
            Ok((s.instances.into_iter().take(DISCOVER_PAGE).collect(), Some(s.revision)))
        }
        async fn discover_revision(&self, namespace: &str, service: &str) -> Result<Option<i64>, CloudMapError> {
            self.count("DiscoverInstancesRevision")?;
            let s = self.service(namespace, service).ok_or_else(|| not_found("DiscoverInstancesRevision"))?;
            if s.not_found {
                return Err(not_found("DiscoverInstancesRevision"));
            }
            Ok(Some(s.revision))
        }
        async fn service_attributes(&self, service_id: &str) -> Result<BTreeMap<String, String>, CloudMapError> {
            self.count("GetServiceAttributes")?;
            let namespaces = self.namespaces.lock().expect("lock");
            let s = namespaces
                .values()
                .flat_map(|n| n.values())
                .find(|s| s.id == service_id)
                .ok_or_else(|| not_found("GetServiceAttributes"))?;
            Ok(s.attributes.clone())
        }
        async fn list_instances(&self, service_id: &str) -> Result<Paged<Vec<RawInstance>>, CloudMapError> {
            self.count("ListInstances")?;
            let namespaces = self.namespaces.lock().expect("lock");
            let s = namespaces
                .values()
                .flat_map(|n| n.values())
                .find(|s| s.id == service_id)
                .ok_or_else(|| not_found("ListInstances"))?;
            let pages = s.instances.len().div_ceil(100) as u32;
            Ok(Paged { items: s.instances.clone(), calls: 2 * pages.max(1) })
        }
    }

    fn instance(id: &str, ip: &str) -> RawInstance {
        RawInstance {
            instance_id: id.into(),
            health: Some("HEALTHY".into()),
            attributes: [("AWS_INSTANCE_IPV4", ip), ("AWS_INSTANCE_PORT", "80"), ("AVAILABILITY_ZONE", "us-east-1a")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn many(n: usize) -> Vec<RawInstance> {
        (0..n).map(|i| instance(&format!("i-{i}"), &format!("10.0.{}.{}", i / 250, i % 250 + 1))).collect()
    }

    fn endpoint_count(cache: &Cache, dial: &str) -> Option<usize> {
        cache.snapshot().services.get(dial).map(|s| s.endpoints.endpoints.len())
    }

    fn timing() -> Timing {
        Timing {
            revision_interval: Duration::from_millis(100),
            refresh_interval: Duration::from_secs(1),
            services_interval: Duration::from_secs(10),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// A watcher writing to a builder task of its own, and the cache and status it fills.
    fn watcher(fake: &Arc<Fake>, budget: Budget) -> (Watcher<Fake>, Arc<Cache>, Arc<Status>) {
        let builder = crate::builder::Builder::default();
        let (cache, census, status) = (builder.cache().clone(), builder.census().clone(), builder.status().clone());
        let watcher = Watcher {
            api: fake.clone(),
            writer: builder.spawn(),
            census,
            status: status.clone(),
            config: Arc::new(FileConfig::default()),
            timing: timing(),
            default_region: "us-east-1".into(),
            budget: Arc::new(budget),
        };
        (watcher, cache, status)
    }

    fn start(fake: &Arc<Fake>, namespaces: &[&str]) -> (Arc<Cache>, Arc<Status>, AbortOnDrop) {
        let (w, cache, status) = watcher(fake, Budget::unlimited());
        let task = tokio::spawn(w.run(namespaces.iter().map(|n| n.to_string()).collect()));
        (cache, status, AbortOnDrop(task))
    }

    #[tokio::test(start_paused = true)]
    async fn errors_keep_the_last_good_state_and_back_off() {
        let fake = Arc::new(Fake::with("demo", "echo", vec![instance("i-1", "10.0.0.1")]));
        let (cache, _, _task) = start(&fake, &["demo"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.is_ready());
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));
        assert_eq!(cache.snapshot().services["echo.demo"].policy, Policy::ZoneAware);

        // A registration moves the revision: picked up within a poll (100 ms ± jitter).
        fake.edit("demo", "echo", |s| {
            s.instances.push(instance("i-2", "10.0.0.2"));
            s.revision += 1;
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(2));

        // Outage for 60 s: state kept, calls bounded by the backoff (max 5 s → ≥ ~12 waits of ≥ 2.5 s).
        fake.failing.store(true, Ordering::SeqCst);
        let calls_before = fake.calls();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let calls = fake.calls() - calls_before;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(2), "an outage removes nothing");
        // Service watcher and namespace lister each back off to ≤ 5 s waits.
        assert!(calls <= 60, "{calls} calls in 60 s of outage: backoff not applied");
        assert!(calls >= 10, "{calls} calls: still retrying");

        // Recovery: the next successful poll brings changes in.
        fake.failing.store(false, Ordering::SeqCst);
        fake.edit("demo", "echo", |s| {
            s.instances.pop();
            s.revision += 1;
        });
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));
        let zone = &cache.snapshot().services["echo.demo"].endpoints.endpoints[0].zone;
        assert_eq!(zone, &Zone::new("us-east-1a"));
    }

    #[tokio::test(start_paused = true)]
    async fn service_attributes_set_the_routing_and_a_bad_value_keeps_the_last_good() {
        let fake = Arc::new(Fake::with("demo", "echo", vec![instance("i-1", "10.0.0.1")]));
        let routing = |cache: &Cache| cache.snapshot().services["echo.demo"].routing.clone();
        let split = |cache: &Cache| routing(cache).routes.first().map(|r| r.split.clone());
        fake.edit("demo", "echo", |s| {
            s.attributes.insert(ROUTES_ATTRIBUTE.into(), r#"[{"split": {"other.demo": 1}}]"#.into());
        });
        let (cache, status, _task) = start(&fake, &["demo"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Read on start, before the first write.
        assert_eq!(split(&cache), Some(vec![(crate::model::Target::Other("other.demo".into()), 1)]));

        // A bad value: the last good routing stays, the error is recorded.
        fake.edit("demo", "echo", |s| {
            s.attributes.insert(ROUTES_ATTRIBUTE.into(), r#"[{"split": {"nope": 1}}]"#.into());
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(split(&cache), Some(vec![(crate::model::Target::Other("other.demo".into()), 1)]));
        let error = status.routing_error("echo.demo").expect("error recorded");
        assert!(error.contains(ROUTES_ATTRIBUTE) && error.contains("nope"), "{error}");

        // A good value again, within the refresh interval (1 s, jittered) and no revision change.
        fake.edit("demo", "echo", |s| {
            s.attributes.insert(ROUTES_ATTRIBUTE.into(), r#"[{"split": {"other.demo": 1, "third.demo": 1}}]"#.into());
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(split(&cache).map(|s| s.len()), Some(2));
        assert_eq!(status.routing_error("echo.demo"), None);

        // Removed: back to the file's routing (none here).
        fake.edit("demo", "echo", |s| s.attributes.clear());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(routing(&cache).routes.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_namespace_does_not_hold_up_the_others() {
        let fake = Arc::new(Fake::with("demo", "echo", vec![instance("i-1", "10.0.0.1")]));
        let (cache, status, _task) = start(&fake, &["demo", "no-such-namespace"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.is_ready(), "the namespace that exists is served");
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));
        let states = status.namespace_states();
        assert_eq!(states["demo"], NamespaceState::Synced);
        assert_eq!(states["no-such-namespace"], NamespaceState::Missing);

        // It appears later: served within a services interval (10 s ± 10 %).
        fake.add("no-such-namespace", "late", vec![instance("i-9", "10.0.9.1")]);
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(endpoint_count(&cache, "late.no-such-namespace"), Some(1));
        assert_eq!(status.namespace_states()["no-such-namespace"], NamespaceState::Synced);
    }

    #[tokio::test(start_paused = true)]
    async fn no_namespace_at_all_is_not_ready() {
        let fake = Arc::new(Fake::default());
        let (cache, status, _task) = start(&fake, &["typo"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!cache.is_ready(), "nothing to serve: not ready, so a rollout with a typo stops");
        assert_eq!(status.namespace_states()["typo"], NamespaceState::Missing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_deleted_before_its_first_read_does_not_block_readiness() {
        let fake = Arc::new(Fake::with("demo", "echo", vec![instance("i-1", "10.0.0.1")]));
        fake.add("demo", "gone", vec![instance("i-2", "10.0.0.2")]);
        // Listed, then deleted before its first DiscoverInstances.
        fake.edit("demo", "gone", |s| {
            s.not_found = true;
            s.exists = false;
        });
        let (cache, _, _task) = start(&fake, &["demo"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.is_ready());
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));
        assert_eq!(endpoint_count(&cache, "gone.demo"), None);
        // Dropped, not retried forever.
        let discovers = fake.calls.lock().expect("lock").get("DiscoverInstances").copied();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let polls_of_gone = fake.calls.lock().expect("lock").get("DiscoverInstances").copied();
        // Only echo's refreshes (1 s) happened since; gone's watcher would add ≥ 6 more.
        let delta = polls_of_gone.unwrap_or(0) - discovers.unwrap_or(0);
        assert!(delta <= 33, "{delta} DiscoverInstances in 30 s: the deleted service is still polled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_deleted_while_its_first_read_fails_does_not_block_readiness() {
        let fake = Arc::new(Fake::with("demo", "echo", vec![instance("i-1", "10.0.0.1")]));
        fake.add("demo", "flaky", vec![instance("i-2", "10.0.0.2")]);
        // Its reads fail (not "not found"), then it disappears from the listings.
        fake.edit("demo", "flaky", |s| s.failing = true);
        let (cache, _, _task) = start(&fake, &["demo"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!cache.is_ready(), "an existing service's first read is waited for");
        fake.edit("demo", "flaky", |s| s.listed = false);
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(cache.is_ready(), "deleted (two listings without it): no longer waited for");
        assert_eq!(endpoint_count(&cache, "flaky.demo"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn deletion_is_confirmed_before_a_service_is_removed() {
        let fake = Arc::new(Fake::with("demo", "echo", vec![instance("i-1", "10.0.0.1")]));
        let (cache, _, _task) = start(&fake, &["demo"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));

        // One listing misses it, GetService still finds it: kept.
        fake.edit("demo", "echo", |s| s.listed = false);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1), "one listing is not a deletion");
        fake.edit("demo", "echo", |s| s.listed = true);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));

        // Missing from two listings in a row: removed, even though GetService still answers.
        fake.edit("demo", "echo", |s| s.listed = false);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), None, "two listings without it");

        // Back again, then deleted for real: GetService's ServiceNotFound removes it at the first listing.
        fake.edit("demo", "echo", |s| s.listed = true);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), Some(1));
        fake.edit("demo", "echo", |s| {
            s.listed = false;
            s.exists = false;
        });
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(endpoint_count(&cache, "echo.demo"), None, "confirmed by GetService");
    }

    #[tokio::test(start_paused = true)]
    async fn services_above_one_page_are_read_completely() {
        let mut instances = many(1_500);
        instances[7].health = Some("UNHEALTHY".into());
        let fake = Arc::new(Fake::with("demo", "big", instances));
        let (cache, _, _task) = start(&fake, &["demo"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.is_ready());
        // 1,500 listed, one unhealthy left out by HEALTHY_OR_ELSE_ALL.
        assert_eq!(endpoint_count(&cache, "big.demo"), Some(1_499));
        assert!(fake.calls.lock().expect("lock").get("ListInstances").is_some());
    }

    #[test]
    fn listed_instances_are_filtered_like_discover_instances() {
        let mut settings = FileConfig::default().settings(&ServiceName::new("demo", "echo"));
        let mut all = many(4);
        all[0].health = Some("UNHEALTHY".into());
        all[1].health = None;
        all[2].attributes.insert("stage".into(), "prod".into());
        all[3].attributes.insert("stage".into(), "dev".into());
        let ids = |v: Vec<RawInstance>| v.into_iter().map(|i| i.instance_id).collect::<Vec<_>>();
        assert_eq!(ids(select_listed(all.clone(), &settings)), vec!["i-1", "i-2", "i-3"]);
        settings.health_status = HealthFilter::Unhealthy;
        assert_eq!(ids(select_listed(all.clone(), &settings)), vec!["i-0"]);
        settings.health_status = HealthFilter::All;
        assert_eq!(select_listed(all.clone(), &settings).len(), 4);
        settings.query_parameters = BTreeMap::from([("stage".to_string(), "prod".to_string())]);
        assert_eq!(ids(select_listed(all.clone(), &settings)), vec!["i-2"]);
        settings.query_parameters.clear();
        settings.health_status = HealthFilter::HealthyOrElseAll;
        let unhealthy: Vec<RawInstance> =
            all.iter().cloned().map(|i| RawInstance { health: Some("UNHEALTHY".into()), ..i }).collect();
        assert_eq!(select_listed(unhealthy, &settings).len(), 4, "none healthy: all of them");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_at_a_thousand_services() {
        let fake = Arc::new(Fake::default());
        for i in 0..1_000 {
            fake.add("demo", &format!("s{i}"), vec![instance("i-1", "10.0.0.1")]);
        }
        let rate = 200.0;
        let (w, cache, _) = watcher(&fake, Budget::new(rate));
        let _task = AbortOnDrop(tokio::spawn(w.run(vec!["demo".into()])));
        // Start-up reads everything once, at the budget's pace: per service a DiscoverInstances
        // and a GetServiceAttributes (the routing is read before the first write, so clients
        // never see a service without its routes) — 2,000 calls, less the 200-call burst, at
        // 200/s ≈ 9 s of (paused, virtual) time; first reads go ahead of the services already
        // read, whose polling would otherwise take budget from them (up to 13.6 s seen).
        let start = tokio::time::Instant::now();
        while !cache.is_ready() && start.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = start.elapsed();
        assert!(cache.is_ready(), "not ready after {took:?}");
        assert!(took <= Duration::from_secs(10), "first sync of 1,000 services took {took:?}, expected ≈ 9 s");
        assert_eq!(cache.snapshot().services.len(), 1_000);
        let before = fake.calls();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let per_second = (fake.calls() - before) as f64 / 60.0;
        assert!(per_second <= rate, "{per_second} calls/s over a budget of {rate}");
        // Stretched to ~6.25 s per service: ~160 polls/s, not 1,000.
        assert!(per_second >= 0.5 * crate::budget::STEADY_SHARE * rate, "{per_second} calls/s: polling stalled");
    }
}
