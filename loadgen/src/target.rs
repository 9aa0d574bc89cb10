//! The control plane under test, and how a change is made to it and timed.
//!
//! - [`InProcess`]: the `cloudmap_xds` library in this process, wired as the
//!   binary wires it (the index's builder task, census debouncer, ADS server
//!   on a loopback port). A Cloud Map test double stands in for the watcher:
//!   it translates raw instances with `translate::translate` and writes them
//!   under its claim (`builder::Writer::write`), and the moment just before
//!   that call is the change's apply time. A change sets the marker attribute on one instance,
//!   so the endpoint set and the zone capacities stay the same.
//! - [`External`]: a `cloudmap-xds` process reading moto. A change registers
//!   one new instance carrying the marker; the apply time is the process's
//!   `cloudmap_xds_service_updated_timestamp_seconds{service}` gauge, read
//!   once every client has the change (nothing else moves it meanwhile).
//! - [`FloorProcess`]: a `loadgen floor` process, the bare-stack floor. A
//!   change is `POST /change?k=K` on its admin port (it registers the same
//!   instance in its own state); the apply time is the same gauge.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use aws_sdk_servicediscovery as sd;
use cloudmap_xds::builder::{Builder, Claim, Writer};
use cloudmap_xds::model::ServiceName;
use cloudmap_xds::policy::Policy;
use cloudmap_xds::server::registry::Registry;
use cloudmap_xds::server::{AdsServer, Limits};
use cloudmap_xds::translate::{self, MetadataAttributes, RawInstance, TranslateOptions};
use tokio::task::JoinHandle;

use crate::client::MARKER_ATTRIBUTE;
use crate::{REGION, cloudmap, unix_now};

use crate::floor::UPDATED_GAUGE;

pub enum Target {
    InProcess(InProcess),
    External(External),
    Floor(FloorProcess),
}

impl Target {
    /// Where the clients connect.
    pub fn xds(&self) -> SocketAddr {
        match self {
            Target::InProcess(t) => t.xds,
            Target::External(t) => t.xds,
            Target::Floor(t) => t.xds,
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Target::InProcess(_) => "in-process",
            Target::External(_) => "external",
            Target::Floor(_) => "floor",
        }
    }

    /// Make change `k`, which carries marker `k`.
    pub async fn change(&mut self, k: u64) -> anyhow::Result<()> {
        match self {
            Target::InProcess(t) => {
                t.change(k).await;
                Ok(())
            }
            Target::External(t) => {
                let (id, attributes) = cloudmap::change_instance(k);
                cloudmap::register(&t.cloudmap, &t.service_id, &id, attributes).await
            }
            Target::Floor(t) => t.change(k).await,
        }
    }

    /// When the control plane applied change `k` (Unix seconds). For the
    /// external process: call it after the clients received `k`.
    pub async fn applied_at(&self, k: u64) -> anyhow::Result<f64> {
        match self {
            Target::InProcess(t) => t.applied.get(&k).copied().ok_or_else(|| anyhow!("change {k} was not made")),
            Target::External(t) => updated_at(&t.http, t.admin, &t.dial).await,
            Target::Floor(t) => updated_at(&t.http, t.admin, &t.dial).await,
        }
    }
}

/// The control-plane library in this process.
pub struct InProcess {
    xds: SocketAddr,
    /// The index's writer, as the binary's watchers use it (one claim, this service).
    writer: Writer,
    claim: Claim,
    instances: Vec<RawInstance>,
    options: TranslateOptions,
    applied: HashMap<u64, f64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl InProcess {
    /// Serve `namespace`/`service` with `endpoints` instances; ready at once.
    pub async fn start(namespace: &str, service: &str, endpoints: usize) -> anyhow::Result<InProcess> {
        let builder = Builder::default();
        let (cache, census) = (builder.cache().clone(), builder.census().clone());
        let writer = builder.spawn();
        let claim = writer.claim(&ServiceName::new(namespace, service));
        let instances = (0..endpoints.max(1))
            .map(|i| {
                let (instance_id, attributes) = cloudmap::instance(0, i);
                RawInstance { instance_id, health: Some("HEALTHY".into()), attributes }
            })
            .collect();
        let options = TranslateOptions {
            default_region: REGION.to_string(),
            weight_attribute: None,
            // The change marker reaches clients as endpoint metadata.
            metadata_attributes: MetadataAttributes::from_names(&[MARKER_ATTRIBUTE]),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")?;
        let xds = listener.local_addr()?;
        let ads = AdsServer::new(cache, census.clone(), Arc::new(Registry::new(usize::MAX)), Limits::default());
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(ads)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let tasks = vec![
            tokio::spawn(async move {
                if let Err(e) = server.await {
                    eprintln!("in-process xDS server failed: {e}");
                }
            }),
            tokio::spawn(cloudmap_xds::census::follow(census, writer.clone(), Duration::from_secs(1))),
        ];
        let mut target = InProcess { xds, writer, claim, instances, options, applied: HashMap::new(), tasks };
        target.change(0).await;
        target.writer.set_ready().await;
        Ok(target)
    }

    async fn change(&mut self, k: u64) {
        let mut instances = self.instances.clone();
        if let Some(first) = instances.first_mut() {
            first.attributes.insert(MARKER_ATTRIBUTE.to_string(), k.to_string());
        }
        let translation = translate::translate(&instances, &self.options);
        let at = unix_now();
        self.writer.write(&self.claim, translation.endpoints, Policy::ZoneAware).await;
        self.applied.insert(k, at);
    }
}

/// A `cloudmap-xds` process reading Cloud Map (moto).
pub struct External {
    xds: SocketAddr,
    admin: SocketAddr,
    dial: String,
    cloudmap: sd::Client,
    service_id: String,
    http: reqwest::Client,
}

impl External {
    pub async fn connect(
        xds: SocketAddr,
        admin: SocketAddr,
        cloudmap_url: &str,
        namespace: &str,
        service: &str,
    ) -> anyhow::Result<External> {
        let cloudmap = cloudmap::connect(cloudmap_url).await;
        let service_id = cloudmap::service_id(&cloudmap, namespace, service).await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(External { xds, admin, dial: format!("{service}.{namespace}"), cloudmap, service_id, http })
    }

    /// Waits for `/ready` to answer 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_ready(&self.http, self.admin, timeout).await
    }
}

/// A `loadgen floor` process.
pub struct FloorProcess {
    xds: SocketAddr,
    admin: SocketAddr,
    dial: String,
    http: reqwest::Client,
}

impl FloorProcess {
    pub async fn connect(xds: SocketAddr, admin: SocketAddr, namespace: &str, service: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let floor = FloorProcess { xds, admin, dial: format!("{service}.{namespace}"), http };
        wait_ready(&floor.http, admin, Duration::from_secs(30)).await?;
        Ok(floor)
    }

    async fn change(&self, k: u64) -> anyhow::Result<()> {
        let url = format!("http://{}/change?k={k}", self.admin);
        self.http.post(&url).send().await?.error_for_status().with_context(|| format!("POST {url}"))?;
        Ok(())
    }
}

/// When the control plane at `admin` last updated service `dial` (its gauge).
async fn updated_at(http: &reqwest::Client, admin: SocketAddr, dial: &str) -> anyhow::Result<f64> {
    let url = format!("http://{admin}/metrics");
    let text = http.get(&url).send().await?.error_for_status()?.text().await?;
    gauge(&text, UPDATED_GAUGE, dial).with_context(|| format!("{url} has no {UPDATED_GAUGE}{{service=\"{dial}\"}}"))
}

/// Polls `http://ADMIN/ready` until it answers 200; returns how long that took.
pub async fn wait_ready(http: &reqwest::Client, admin: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("http://{admin}/ready");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => bail!("{url} did not answer 200 within {timeout:?}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The value of `name{service="SERVICE"}` in a Prometheus text exposition.
fn gauge(text: &str, name: &str, service: &str) -> Option<f64> {
    let label = format!("service=\"{service}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| l.split_once('}').is_some_and(|(labels, _)| labels.contains(&label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gauge_of_one_service() {
        let text = "# TYPE cloudmap_xds_service_updated_timestamp_seconds gauge\n\
            cloudmap_xds_service_updated_timestamp_seconds{service=\"other.loadgen\"} 1.5\n\
            cloudmap_xds_service_updated_timestamp_seconds{service=\"bench.loadgen\"} 1764300000.123456\n\
            cloudmap_xds_service_updated_timestamp_seconds_x{service=\"bench.loadgen\"} 9\n";
        assert_eq!(gauge(text, UPDATED_GAUGE, "bench.loadgen"), Some(1_764_300_000.123_456));
        assert_eq!(gauge(text, UPDATED_GAUGE, "bench"), None);
    }
}
