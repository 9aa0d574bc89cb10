//! Watching Cloud Map: the only module that talks to AWS.
//!
//! One task per namespace lists its services; one task per service polls
//! `DiscoverInstancesRevision` every revision interval and reads all
//! instances with `DiscoverInstances` when the revision moves and every
//! refresh interval (health changes do not move the revision). Watchers are
//! per service, never per client, so Cloud Map calls do not grow with the
//! number of clients. On any error the last good state stays in the cache
//! and the watcher retries with jittered exponential backoff.

use std::collections::{BTreeMap, HashMap, HashSet};
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
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cache::Cache;
use crate::config::{FileConfig, HealthFilter, ServiceSettings};
use crate::model::ServiceName;
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

/// The part of the Cloud Map API the control plane uses: reads only.
pub trait CloudMap: Send + Sync + 'static {
    /// Find a namespace by its name or HTTP name.
    fn find_namespace(&self, name: &str) -> impl Future<Output = Result<Option<Namespace>, CloudMapError>> + Send;
    /// Names of the services in the namespace with this id.
    fn list_services(&self, namespace_id: &str) -> impl Future<Output = Result<Vec<String>, CloudMapError>> + Send;
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

    async fn namespace_of(&self, service_id: &str) -> Result<Option<String>, CloudMapError> {
        if let Some(ns) = self.service_namespaces.get(service_id) {
            return Ok(Some(ns.clone()));
        }
        let out = self.client.get_service().id(service_id).send().await.map_err(|e| error("GetService", e))?;
        let ns = out.service().and_then(|s| s.namespace_id()).map(str::to_string);
        if let Some(ns) = &ns {
            self.service_namespaces.insert(service_id.to_string(), ns.clone());
        }
        Ok(ns)
    }
}

fn error<E, R>(operation: &'static str, e: sd::error::SdkError<E, R>) -> CloudMapError
where
    E: std::error::Error + sd::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug + 'static,
{
    let code = e.code().map(str::to_string);
    let throttled = matches!(code.as_deref(), Some("RequestLimitExceeded" | "ThrottlingException" | "Throttling"));
    metrics::counter!("cloudmap_xds_cloudmap_errors_total", "operation" => operation, "code" => code.clone().unwrap_or_else(|| "none".into()))
        .increment(1);
    CloudMapError { operation, message: DisplayErrorContext(&e).to_string(), code, throttled }
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

    async fn list_services(&self, namespace_id: &str) -> Result<Vec<String>, CloudMapError> {
        timed("ListServices", async {
            let filter = sd::types::ServiceFilter::builder()
                .name(sd::types::ServiceFilterName::NamespaceId)
                .values(namespace_id)
                .condition(sd::types::FilterCondition::Eq)
                .build()
                .map_err(|e| CloudMapError::local("ListServices", e.to_string()))?;
            let mut pages = self.client.list_services().filters(filter).into_paginator().send();
            let mut names = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| error("ListServices", e))?;
                for service in page.services() {
                    let (Some(id), Some(name)) = (service.id(), service.name()) else {
                        continue;
                    };
                    if self.namespace_of(id).await?.as_deref() == Some(namespace_id) {
                        names.push(name.to_string());
                    }
                }
            }
            Ok(names)
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
                .max_results(1000)
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

/// Runs the watchers and feeds the cache.
pub struct Watcher<C> {
    pub api: Arc<C>,
    pub cache: Arc<Cache>,
    pub config: Arc<FileConfig>,
    pub timing: Timing,
    pub default_region: String,
}

impl<C> Clone for Watcher<C> {
    fn clone(&self) -> Self {
        Watcher {
            api: self.api.clone(),
            cache: self.cache.clone(),
            config: self.config.clone(),
            timing: self.timing.clone(),
            default_region: self.default_region.clone(),
        }
    }
}

impl<C: CloudMap> Watcher<C> {
    /// Watch the namespaces until the task is dropped; marks the cache ready
    /// once every namespace was listed and every service in it read once.
    pub async fn run(self, namespaces: Vec<String>) {
        let mut synced = Vec::new();
        let mut tasks = Vec::new();
        for name in namespaces {
            let (tx, rx) = oneshot::channel();
            synced.push(rx);
            tasks.push(AbortOnDrop(tokio::spawn(self.clone().watch_namespace(name, tx))));
        }
        for rx in synced {
            // A dropped sender means the task ended, which only happens on shutdown.
            if rx.await.is_err() {
                return;
            }
        }
        tracing::info!("first Cloud Map sync complete; serving");
        self.cache.set_ready();
        std::future::pending::<()>().await;
        drop(tasks);
    }

    async fn watch_namespace(self, name: String, synced: oneshot::Sender<()>) {
        let mut synced = Some(synced);
        let mut failures = 0u32;
        let mut namespace: Option<Namespace> = None;
        let mut services: BTreeMap<String, AbortOnDrop> = BTreeMap::new();
        loop {
            let listed = async {
                let ns = match &namespace {
                    Some(ns) => ns.clone(),
                    None => self.api.find_namespace(&name).await?.ok_or_else(|| {
                        CloudMapError::local(
                            "ListNamespaces",
                            format!("namespace {name:?} not found; check --namespace and AWS_REGION (keeping what is served)"),
                        )
                    })?,
                };
                let names = self.api.list_services(&ns.id).await?;
                Ok::<_, CloudMapError>((ns, names))
            }
            .await;
            let wait = match listed {
                Ok((ns, names)) => {
                    failures = 0;
                    let wanted: HashSet<String> = names.into_iter().collect();
                    let before = services.len();
                    services.retain(|service, _| {
                        let keep = wanted.contains(service);
                        if !keep {
                            tracing::info!(namespace = %name, %service, "service deleted from Cloud Map; no longer served");
                            self.cache.remove_service(&ServiceName::new(&name, service));
                        }
                        keep
                    });
                    let mut first_reads = Vec::new();
                    for service in wanted {
                        if services.contains_key(&service) {
                            continue;
                        }
                        if before > 0 || synced.is_none() {
                            tracing::info!(namespace = %name, %service, "new service found");
                        }
                        let (tx, rx) = oneshot::channel();
                        first_reads.push(rx);
                        let task = self.clone().watch_service(ns.clone(), ServiceName::new(&name, &service), tx);
                        services.insert(service, AbortOnDrop(tokio::spawn(task)));
                    }
                    if let Some(tx) = synced.take() {
                        for rx in first_reads {
                            let _ = rx.await;
                        }
                        tracing::info!(namespace = %name, services = services.len(), "namespace synced");
                        let _ = tx.send(());
                    }
                    namespace = Some(ns);
                    self.timing.services_interval
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(namespace = %name, error = %e, "listing services failed; keeping the last known services");
                    backoff(failures, self.timing.revision_interval, self.timing.max_backoff)
                        .max(self.timing.revision_interval)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn watch_service(self, namespace: Namespace, name: ServiceName, synced: oneshot::Sender<()>) {
        let mut synced = Some(synced);
        let settings = self.config.settings(&name);
        let options = TranslateOptions {
            default_region: self.default_region.clone(),
            weight_attribute: settings.weight_attribute.clone(),
        };
        let mut revision: Option<i64> = None;
        let mut next_refresh = Instant::now();
        let mut failures = 0u32;
        let mut warned: HashSet<Skipped> = HashSet::new();
        loop {
            let result = async {
                let due = Instant::now() >= next_refresh;
                if !due {
                    let current = self.api.discover_revision(&namespace.http_name, &name.service).await?;
                    if current == revision {
                        return Ok(false);
                    }
                }
                let (instances, current) =
                    self.api.discover_instances(&namespace.http_name, &name.service, &settings).await?;
                let translation = translate::translate(&instances, &options);
                for skipped in &translation.skipped {
                    if !warned.contains(skipped) {
                        tracing::warn!(service = %name, instance = %skipped.instance_id, reason = %skipped.reason, "skipping instance");
                    }
                }
                warned = translation.skipped.iter().cloned().collect();
                if translation.endpoints.fail_open {
                    tracing::warn!(service = %name, "no healthy instance: serving all instances (fail-open)");
                }
                let count = translation.endpoints.endpoints.len();
                if self.cache.update_service(&name, translation.endpoints, settings.options()) {
                    // When the change entered the cache: the start of push propagation.
                    metrics::gauge!("cloudmap_xds_service_updated_timestamp_seconds", "service" => name.dial_name())
                        .set(unix_now());
                    metrics::gauge!("cloudmap_xds_endpoints", "service" => name.dial_name()).set(count as f64);
                    tracing::info!(service = %name, endpoints = count, revision = ?current, "endpoints updated");
                }
                revision = current;
                next_refresh = Instant::now() + self.timing.refresh_interval;
                Ok::<_, CloudMapError>(true)
            }
            .await;
            let wait = match result {
                Ok(read) => {
                    failures = 0;
                    // Any successful call means Cloud Map's view of this service is current.
                    self.cache.mark_synced(&name);
                    metrics::gauge!("cloudmap_xds_last_sync_timestamp_seconds", "service" => name.dial_name())
                        .set(unix_now());
                    if read && let Some(tx) = synced.take() {
                        let _ = tx.send(());
                    }
                    self.timing.revision_interval
                }
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures, self.timing.revision_interval, self.timing.max_backoff);
                    tracing::warn!(service = %name, error = %e, throttled = e.throttled, retry_in = ?wait, "Cloud Map call failed; keeping the last good endpoints");
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Zone;
    use crate::policy::Policy;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A Cloud Map test double for faults moto cannot produce on demand.
    #[derive(Default)]
    struct Fake {
        instances: Mutex<Vec<RawInstance>>,
        revision: Mutex<i64>,
        failing: std::sync::atomic::AtomicBool,
        discover_calls: AtomicUsize,
        revision_calls: AtomicUsize,
    }

    impl Fake {
        fn fail<T>(&self, operation: &'static str) -> Result<T, CloudMapError> {
            Err(CloudMapError { operation, message: "boom".into(), code: Some("RequestLimitExceeded".into()), throttled: true })
        }
    }

    impl CloudMap for Fake {
        async fn find_namespace(&self, name: &str) -> Result<Option<Namespace>, CloudMapError> {
            Ok(Some(Namespace { id: "ns-1".into(), http_name: name.into() }))
        }
        async fn list_services(&self, _namespace_id: &str) -> Result<Vec<String>, CloudMapError> {
            Ok(vec!["echo".into()])
        }
        async fn discover_instances(
            &self,
            _namespace: &str,
            _service: &str,
            _settings: &ServiceSettings,
        ) -> Result<(Vec<RawInstance>, Option<i64>), CloudMapError> {
            self.discover_calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return self.fail("DiscoverInstances");
            }
            let instances = self.instances.lock().map(|i| i.clone()).unwrap_or_default();
            Ok((instances, Some(*self.revision.lock().expect("lock"))))
        }
        async fn discover_revision(&self, _namespace: &str, _service: &str) -> Result<Option<i64>, CloudMapError> {
            self.revision_calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return self.fail("DiscoverInstancesRevision");
            }
            Ok(Some(*self.revision.lock().expect("lock")))
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

    fn endpoint_count(cache: &Cache) -> Option<usize> {
        cache.snapshot().services.get("echo.demo").map(|s| s.endpoints.endpoints.len())
    }

    #[tokio::test(start_paused = true)]
    async fn errors_keep_the_last_good_state_and_back_off() {
        let fake = Arc::new(Fake::default());
        *fake.instances.lock().expect("lock") = vec![instance("i-1", "10.0.0.1")];
        let cache = Arc::new(Cache::default());
        let watcher = Watcher {
            api: fake.clone(),
            cache: cache.clone(),
            config: Arc::new(FileConfig::default()),
            timing: Timing {
                revision_interval: Duration::from_millis(100),
                refresh_interval: Duration::from_secs(1),
                services_interval: Duration::from_secs(10),
                max_backoff: Duration::from_secs(5),
            },
            default_region: "us-east-1".into(),
        };
        let task = tokio::spawn(watcher.run(vec!["demo".into()]));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.is_ready());
        assert_eq!(endpoint_count(&cache), Some(1));
        assert_eq!(cache.snapshot().services["echo.demo"].policy, Policy::ZoneAware);

        // A registration moves the revision: picked up at the next poll.
        fake.instances.lock().expect("lock").push(instance("i-2", "10.0.0.2"));
        *fake.revision.lock().expect("lock") += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(endpoint_count(&cache), Some(2));

        // Outage for 60 s: state kept, calls bounded by the backoff (max 5 s → ≥ ~12 waits of ≥ 2.5 s).
        fake.failing.store(true, Ordering::SeqCst);
        let calls_before = fake.revision_calls.load(Ordering::SeqCst) + fake.discover_calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let calls =
            fake.revision_calls.load(Ordering::SeqCst) + fake.discover_calls.load(Ordering::SeqCst) - calls_before;
        assert_eq!(endpoint_count(&cache), Some(2), "an outage removes nothing");
        assert!(calls <= 30, "{calls} calls in 60 s of outage: backoff not applied");
        assert!(calls >= 10, "{calls} calls: still retrying");

        // Recovery: the next successful poll brings changes in.
        fake.failing.store(false, Ordering::SeqCst);
        fake.instances.lock().expect("lock").pop();
        *fake.revision.lock().expect("lock") += 1;
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(endpoint_count(&cache), Some(1));
        let zone = &cache.snapshot().services["echo.demo"].endpoints.endpoints[0].zone;
        assert_eq!(zone, &Zone::new("us-east-1a"));
        task.abort();
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for failures in 0..40 {
            let d = backoff(failures, base, max);
            let ceiling = base.saturating_mul(1 << failures.min(16)).min(max);
            assert!(d >= ceiling / 2 && d <= ceiling, "{failures}: {d:?} vs {ceiling:?}");
        }
    }
}
