//! The Cloud Map call budget, measured: calls per minute one replica makes
//! at 10, 100 and 1,000 services with the default flags, and how long an
//! instance registration, a new service and a deleted service then take to
//! reach the cache, with and without the budget.
//!
//! Runs the real `Watcher` against an in-memory Cloud Map with 20 ms per call,
//! in tokio's paused (virtual) time: the figures are the scheduler's, not this
//! machine's, and a simulated minute takes well under a second.
//!
//! ```sh
//! cargo run --release -p cloudmap-xds --example api_budget
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudmap_xds::budget::Budget;
use cloudmap_xds::builder::Builder;
use cloudmap_xds::cloudmap::{CloudMap, CloudMapError, DISCOVER_PAGE, Namespace, Paged, ServiceRef, Timing, Watcher};
use cloudmap_xds::config::{FileConfig, ServiceSettings};
use cloudmap_xds::model::Zone;
use cloudmap_xds::translate::RawInstance;
use tokio::time::Instant;

const LATENCY: Duration = Duration::from_millis(20);
const NAMESPACE: &str = "bench";

#[derive(Clone)]
struct Service {
    instances: Vec<RawInstance>,
    revision: i64,
}

/// Cloud Map in memory: one namespace, counted calls, a fixed latency.
#[derive(Default)]
struct Memory {
    services: Mutex<BTreeMap<String, Service>>,
    calls: Mutex<BTreeMap<&'static str, u64>>,
}

impl Memory {
    async fn call(&self, operation: &'static str) {
        tokio::time::sleep(LATENCY).await;
        *self.calls.lock().expect("lock").entry(operation).or_default() += 1;
    }

    fn total(&self) -> BTreeMap<&'static str, u64> {
        self.calls.lock().expect("lock").clone()
    }

    fn add_service(&self, name: &str) {
        self.services.lock().expect("lock").insert(name.into(), Service { instances: vec![instance(0)], revision: 1 });
    }

    fn register(&self, name: &str, i: usize) {
        if let Some(s) = self.services.lock().expect("lock").get_mut(name) {
            s.instances.push(instance(i));
            s.revision += 1;
        }
    }
}

fn instance(i: usize) -> RawInstance {
    RawInstance {
        instance_id: format!("i-{i}"),
        health: Some("HEALTHY".into()),
        attributes: [
            ("AWS_INSTANCE_IPV4", format!("10.0.{}.{}", i / 250, i % 250 + 1)),
            ("AWS_INSTANCE_PORT", "50051".into()),
            ("AVAILABILITY_ZONE", ["us-east-1a", "us-east-1b", "us-east-1c"][i % 3].into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    }
}

impl CloudMap for Memory {
    async fn find_namespace(&self, name: &str) -> Result<Option<Namespace>, CloudMapError> {
        self.call("ListNamespaces").await;
        Ok(Some(Namespace { id: name.into(), http_name: name.into() }))
    }
    async fn list_services(&self, _namespace_id: &str) -> Result<Paged<Vec<ServiceRef>>, CloudMapError> {
        self.call("ListServices").await;
        let services = self.services.lock().expect("lock");
        let items: Vec<ServiceRef> =
            services.keys().map(|name| ServiceRef { id: format!("srv-{name}"), name: name.clone() }).collect();
        // ListServices pages hold up to 100 services.
        let calls = items.len().div_ceil(100).max(1) as u32;
        Ok(Paged { items, calls })
    }
    async fn service_exists(&self, service_id: &str) -> Result<bool, CloudMapError> {
        self.call("GetService").await;
        Ok(self.services.lock().expect("lock").keys().any(|n| format!("srv-{n}") == service_id))
    }
    async fn discover_instances(
        &self,
        _namespace: &str,
        service: &str,
        _settings: &ServiceSettings,
    ) -> Result<(Vec<RawInstance>, Option<i64>), CloudMapError> {
        self.call("DiscoverInstances").await;
        let s = self.services.lock().expect("lock").get(service).cloned();
        let s = s.ok_or_else(|| not_found("DiscoverInstances"))?;
        Ok((s.instances.into_iter().take(DISCOVER_PAGE).collect(), Some(s.revision)))
    }
    async fn discover_revision(&self, _namespace: &str, service: &str) -> Result<Option<i64>, CloudMapError> {
        self.call("DiscoverInstancesRevision").await;
        let s = self.services.lock().expect("lock").get(service).cloned();
        Ok(Some(s.ok_or_else(|| not_found("DiscoverInstancesRevision"))?.revision))
    }
    async fn list_instances(&self, _service_id: &str) -> Result<Paged<Vec<RawInstance>>, CloudMapError> {
        self.call("ListInstances").await;
        Ok(Paged { items: Vec::new(), calls: 1 })
    }
    async fn service_attributes(&self, _service_id: &str) -> Result<BTreeMap<String, String>, CloudMapError> {
        self.call("GetServiceAttributes").await;
        Ok(BTreeMap::new())
    }
}

fn not_found(operation: &'static str) -> CloudMapError {
    CloudMapError { operation, message: "not found".into(), code: Some("ServiceNotFound".into()), throttled: false }
}

struct Row {
    label: &'static str,
    services: usize,
    ready: Duration,
    per_minute: BTreeMap<&'static str, u64>,
    register_subscribed: Vec<Duration>,
    register_other: Vec<Duration>,
    added: Duration,
    removed: Duration,
}

async fn wait_for(what: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !what() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if start.elapsed() > Duration::from_secs(600) {
            break;
        }
    }
    start.elapsed()
}

async fn run(label: &'static str, services: usize, budget: Budget) -> Row {
    let api = Arc::new(Memory::default());
    for i in 0..services {
        api.add_service(&format!("s{i}"));
    }
    let builder = Builder::default();
    let (cache, census, status) = (builder.cache().clone(), builder.census().clone(), builder.status().clone());
    // One service in ten has clients.
    let subscribed: Vec<String> = (0..services).step_by(10).map(|i| format!("s{i}.{NAMESPACE}")).collect();
    for dial in &subscribed {
        census.join(dial, &Zone::new("us-east-1a"), &cloudmap_xds::census::Voter::unique());
    }
    // The defaults of `cloudmap-xds serve`.
    let timing = Timing {
        revision_interval: Duration::from_secs(1),
        refresh_interval: Duration::from_secs(5),
        services_interval: Duration::from_secs(10),
        max_backoff: Duration::from_secs(10),
    };
    let watcher = Watcher {
        api: api.clone(),
        writer: builder.spawn(),
        census,
        status,
        config: Arc::new(FileConfig::default()),
        timing,
        default_region: "us-east-1".into(),
        budget: Arc::new(budget),
    };
    let task = tokio::spawn(watcher.run(vec![NAMESPACE.into()]));
    let ready = wait_for(|| cache.is_ready()).await;
    // Settle for a minute, then count a minute.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let before = api.total();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let per_minute = api.total().into_iter().map(|(op, n)| (op, n - before.get(op).copied().unwrap_or(0))).collect();

    let count = |dial: &str| cache.snapshot().services.get(dial).map(|s| s.endpoints.endpoints.len());
    let mut register_subscribed = Vec::new();
    let mut register_other = Vec::new();
    for k in 0..10usize {
        // Registrations at moments unrelated to the poll phase.
        tokio::time::sleep(Duration::from_millis(1_337 + 97 * k as u64)).await;
        let sub = format!("s{}", (k * 10) % services);
        let dial = format!("{sub}.{NAMESPACE}");
        let before = count(&dial).unwrap_or(0);
        api.register(&sub, 100 + k);
        register_subscribed.push(wait_for(|| count(&dial).unwrap_or(0) > before).await);
        if services > 1 {
            let other = format!("s{}", (k * 10 + 1) % services);
            let before = count(&format!("{other}.{NAMESPACE}")).unwrap_or(0);
            api.register(&other, 200 + k);
            let dial = format!("{other}.{NAMESPACE}");
            register_other.push(wait_for(|| count(&dial).unwrap_or(0) > before).await);
        }
    }
    api.add_service("new");
    let added = wait_for(|| count(&format!("new.{NAMESPACE}")).is_some()).await;
    api.services.lock().expect("lock").remove("new");
    let removed = wait_for(|| count(&format!("new.{NAMESPACE}")).is_none()).await;
    task.abort();
    Row { label, services, ready, per_minute, register_subscribed, register_other, added, removed }
}

fn median_max(v: &mut [Duration]) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.sort();
    format!("{:.1} / {:.1}", v[v.len() / 2].as_secs_f64(), v[v.len() - 1].as_secs_f64())
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let rate = 200.0;
    let mut rows = Vec::new();
    for services in [10, 100, 1_000] {
        rows.push(run("--api-rate 200 (default)", services, Budget::new(rate)).await);
        rows.push(run("no budget (before)", services, Budget::unlimited()).await);
    }
    println!(
        "| services | budget | to /ready s | calls/min | DIR/min | DI/min | other/min | max calls/s | registration → cache, subscribed (median / max s) | unsubscribed | new service s | deleted service s |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mut r in rows {
        let total: u64 = r.per_minute.values().sum();
        let dir = r.per_minute.get("DiscoverInstancesRevision").copied().unwrap_or(0);
        let di = r.per_minute.get("DiscoverInstances").copied().unwrap_or(0);
        println!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {:.0} | {} | {} | {:.1} | {:.1} |",
            r.services,
            r.label,
            r.ready.as_secs_f64(),
            total,
            dir,
            di,
            total - dir - di,
            total as f64 / 60.0,
            median_max(&mut r.register_subscribed),
            median_max(&mut r.register_other),
            r.added.as_secs_f64(),
            r.removed.as_secs_f64(),
        );
    }
}
