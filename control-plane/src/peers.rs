//! Replicas that agree: each cloudmap-xds replica offers its own census
//! (clients per zone per service, counts only) on the xDS port through the
//! `cloudmapxds.peer.v1.Census/Watch` stream ([`CensusService`]), and watches
//! every peer's ([`Peering`]); the census sums them (see [`crate::census`]),
//! so every replica plans from the same clients.
//!
//! Peers come from `--peers` (fixed addresses) or `--peer-service` (the
//! control plane's own Cloud Map service, read every few seconds). A replica
//! recognises itself by the random replica id in the reports: an address that
//! answers with our own id is marked `self` and not dialed again. A peer heard
//! from no report for the peer timeout drops out of the sum, and its clients'
//! counts with it. Nothing here is waited for: a replica serves from the
//! first Cloud Map sync whether or not any peer answers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};

use crate::budget::{Budget, Priority};
use crate::census::Census;
use crate::cloudmap::CloudMap;
use crate::config::{FileConfig, HealthFilter};
use crate::model::{ServiceName, Zone};
use crate::policy::PerZone;
use crate::translate::{ATTR_IPV4, ATTR_PORT};

/// The generated `cloudmapxds.peer.v1` protocol (`control-plane/proto/peer.proto`).
pub mod proto {
    tonic::include_proto!("cloudmapxds.peer.v1");
}

use proto::census_client::CensusClient;
use proto::census_server::{Census as CensusRpc, CensusServer};
use proto::{CensusReport, ServiceCensus, WatchRequest};

/// How often the watch stream compares the local census with what it last sent.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Most services and zones taken from one report (a peer is trusted, but a
/// bug there must not grow this replica without bound).
const MAX_SERVICES: usize = 100_000;
const MAX_ZONES: usize = 64;

/// A random id for this process: how a replica tells its own reports from a peer's.
pub fn replica_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

/// `--peers` as given, each checked to be `HOST:PORT`; blanks are dropped.
pub fn check_addresses(addresses: &[String]) -> anyhow::Result<Vec<String>> {
    let mut checked = Vec::new();
    for address in addresses.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
        let port = address.rsplit_once(':').filter(|(host, _)| !host.is_empty()).map(|(_, port)| port.parse::<u16>());
        match port {
            Some(Ok(port)) if port > 0 => checked.push(address.to_string()),
            _ => anyhow::bail!("--peers: {address:?} is not HOST:PORT (e.g. 10.0.1.5:18000)"),
        }
    }
    Ok(checked)
}

fn to_report(replica: &str, census: &BTreeMap<String, PerZone>) -> CensusReport {
    CensusReport {
        replica: replica.to_string(),
        services: census
            .iter()
            .map(|(dial, per_zone)| ServiceCensus {
                dial: dial.clone(),
                zones: per_zone.iter().map(|(z, n)| (z.as_str().to_string(), *n)).collect(),
            })
            .collect(),
    }
}

/// A peer's report as a census; empty zone names and zero counts are dropped.
fn from_report(report: &CensusReport) -> BTreeMap<String, PerZone> {
    let mut census: BTreeMap<String, PerZone> = BTreeMap::new();
    for service in report.services.iter().take(MAX_SERVICES) {
        let per_zone: PerZone = service
            .zones
            .iter()
            .filter(|(zone, n)| !zone.is_empty() && **n > 0)
            .take(MAX_ZONES)
            .map(|(zone, n)| (Zone::new(zone.as_str()), *n))
            .collect();
        if !service.dial.is_empty() && !per_zone.is_empty() {
            let into = census.entry(service.dial.clone()).or_default();
            for (zone, n) in per_zone {
                *into.entry(zone).or_insert(0) += n;
            }
        }
    }
    census
}

/// The server half: this replica's own census, to every replica that watches it.
#[derive(Debug, Clone)]
pub struct CensusService {
    census: Arc<Census>,
    replica: String,
    stop: watch::Receiver<bool>,
}

impl CensusService {
    pub fn new(census: Arc<Census>, replica: String, stop: watch::Receiver<bool>) -> CensusServer<Self> {
        CensusServer::new(CensusService { census, replica, stop })
    }
}

type ReportStream = Pin<Box<dyn futures::Stream<Item = Result<CensusReport, Status>> + Send>>;

#[tonic::async_trait]
impl CensusRpc for CensusService {
    type WatchStream = ReportStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<ReportStream>, Status> {
        let request = request.into_inner();
        let heartbeat = match request.heartbeat_ms {
            0 => Duration::from_millis(2500),
            ms => Duration::from_millis(u64::from(ms)).clamp(Duration::from_millis(100), Duration::from_secs(60)),
        };
        tracing::debug!(watcher = %request.replica, ?heartbeat, "a peer watches this replica's census");
        let (tx, rx) = mpsc::channel(2);
        let census = self.census.clone();
        let replica = self.replica.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut sent: Option<BTreeMap<String, PerZone>> = None;
            let mut last_sent = Instant::now();
            loop {
                let now = census.local();
                if sent.as_ref() != Some(&now) || last_sent.elapsed() >= heartbeat {
                    if tx.send(Ok(to_report(&replica, &now))).await.is_err() {
                        return; // the watcher went away
                    }
                    sent = Some(now);
                    last_sent = Instant::now();
                }
                tokio::select! {
                    () = tokio::time::sleep(CHECK_EVERY.min(heartbeat)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// How to dial peers: plaintext, or TLS that checks the peer's certificate
/// against `ca` (and presents `identity` where the peers require mTLS).
#[derive(Debug, Clone, Default)]
pub struct PeerTls {
    pub ca: Option<PathBuf>,
    /// Certificate chain and key (PEM) presented to peers.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the peers' certificates carry (default: the address dialed).
    pub server_name: Option<String>,
}

impl PeerTls {
    /// The TLS client configuration, read from the files now (each reconnect
    /// reads them again, so renewed certificates are picked up); `None`: plaintext.
    fn client_config(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.ca else { return Ok(None) };
        let pem = std::fs::read(ca).with_context(|| format!("reading the peer CA {}", ca.display()))?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        if let Some((cert, key)) = &self.identity {
            let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let key = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

/// What this replica knows of one peer (for `/config_dump`).
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    /// The peer's replica id, from its last report.
    pub replica: Option<String>,
    /// The address answered with our own id: it is this replica.
    pub is_self: bool,
    /// Whether a watch stream is open now.
    pub connected: bool,
    pub last_contact: Option<Instant>,
    pub last_error: Option<String>,
    pub errors: u64,
}

/// Where peers come from.
#[derive(Debug, Clone)]
pub enum PeerSource {
    /// `--peers`: these addresses, for the process's life.
    Fixed(Vec<String>),
    /// `--peer-service SERVICE.NAMESPACE`: the instances of this Cloud Map
    /// service, on `default_port` where an instance has no `AWS_INSTANCE_PORT`
    /// (ECS registers A records without one).
    CloudMap { service: ServiceName, every: Duration, default_port: u16 },
}

/// The client half: one watch task per peer, the timeout that drops silent
/// peers, and what `/config_dump` shows of them.
#[derive(Debug)]
pub struct Peering {
    census: Arc<Census>,
    replica: String,
    timeout: Duration,
    tls: PeerTls,
    status: Mutex<BTreeMap<String, PeerStatus>>,
}

impl Peering {
    pub fn new(census: Arc<Census>, replica: String, timeout: Duration, tls: PeerTls) -> Arc<Self> {
        metrics::gauge!("cloudmap_xds_peers").set(0.0);
        metrics::counter!("cloudmap_xds_peer_errors_total").increment(0);
        Arc::new(Peering { census, replica, timeout, tls, status: Mutex::new(BTreeMap::new()) })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Every peer known now, with its status.
    pub fn status(&self) -> BTreeMap<String, PeerStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, peer: &str, f: impl FnOnce(&mut PeerStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = status.get_mut(peer) {
            f(s);
        }
    }

    /// Keep watching the peers `source` names until the task is dropped.
    pub async fn run<C: CloudMap>(self: Arc<Self>, source: PeerSource, api: Arc<C>, budget: Arc<Budget>) {
        match source {
            PeerSource::Fixed(addresses) => self.run_fixed(addresses).await,
            PeerSource::CloudMap { service, every, default_port } => {
                let sweeping = tokio::spawn(self.clone().sweep());
                let mut tasks: HashMap<String, AbortOnDrop> = HashMap::new();
                let _stop_sweeping = AbortOnDrop(sweeping);
                loop {
                    budget.acquire(Priority::Background).await;
                    match discover(api.as_ref(), &service, default_port).await {
                        Ok(addresses) => self.set_peers(&mut tasks, addresses),
                        Err(e) => {
                            metrics::counter!("cloudmap_xds_peer_errors_total").increment(1);
                            tracing::warn!(service = %service.dial_name(), "cannot list the peer replicas: {e:#}");
                        }
                    }
                    tokio::time::sleep(every).await;
                }
            }
        }
    }

    /// Keep watching these addresses (`--peers`) until the task is dropped.
    pub async fn run_fixed(self: Arc<Self>, addresses: Vec<String>) {
        let _stop_sweeping = AbortOnDrop(tokio::spawn(self.clone().sweep()));
        let mut tasks: HashMap<String, AbortOnDrop> = HashMap::new();
        self.set_peers(&mut tasks, addresses.into_iter().collect());
        // Dropping `tasks` (when this task is dropped) aborts the watchers.
        std::future::pending::<()>().await;
    }

    /// Start watching new addresses, stop watching (and forget) those gone.
    fn set_peers(self: &Arc<Self>, tasks: &mut HashMap<String, AbortOnDrop>, addresses: BTreeSet<String>) {
        tasks.retain(|address, _| {
            let keep = addresses.contains(address);
            if !keep {
                // Dropping the entry aborts the watch task.
                self.census.forget_peer(address);
                self.status.lock().unwrap_or_else(|e| e.into_inner()).remove(address);
                tracing::info!(peer = %address, "peer left; its clients leave the census");
            }
            keep
        });
        for address in addresses {
            if tasks.contains_key(&address) {
                continue;
            }
            self.status.lock().unwrap_or_else(|e| e.into_inner()).entry(address.clone()).or_default();
            tracing::info!(peer = %address, "watching the census of a peer");
            tasks.insert(address.clone(), AbortOnDrop(tokio::spawn(self.clone().watch(address))));
        }
        self.count_live();
    }

    fn count_live(&self) {
        let live = self.census.peers().len();
        metrics::gauge!("cloudmap_xds_peers").set(live as f64);
    }

    /// Drop peers not heard from for the timeout (their task keeps trying to reach them).
    async fn sweep(self: Arc<Self>) {
        let every = (self.timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            let stale: Vec<String> = {
                let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                let live = self.census.peers();
                live.keys()
                    .filter(|peer| {
                        status.get(*peer).is_none_or(|s| s.last_contact.is_none_or(|t| t.elapsed() >= self.timeout))
                    })
                    .cloned()
                    .collect()
            };
            for peer in stale {
                tracing::warn!(
                    %peer,
                    timeout = ?self.timeout,
                    "no census from the peer for the peer timeout; its clients leave the census"
                );
                self.census.forget_peer(&peer);
            }
            self.count_live();
        }
    }

    /// Watch one peer, reconnecting with backoff, until the task is dropped
    /// or the peer turns out to be this replica.
    async fn watch(self: Arc<Self>, peer: String) {
        let mut failures: u32 = 0;
        loop {
            let result = self.session(&peer).await;
            self.update(&peer, |s| s.connected = false);
            match result {
                Ok(Session::IsSelf) => {
                    tracing::info!(peer = %peer, "this address is this replica; not watching it");
                    self.census.forget_peer(&peer);
                    self.update(&peer, |s| s.is_self = true);
                    self.count_live();
                    return;
                }
                Ok(Session::Ended { reported }) => {
                    tracing::info!(peer = %peer, "the peer ended its census stream; reconnecting");
                    failures = if reported { 0 } else { failures + 1 };
                }
                Err((e, true)) => {
                    // A stream that delivered reports and then broke — most often its
                    // connection reaching the peer's maximum age — is reconnected at once;
                    // only a reconnect that fails counts as an error.
                    tracing::debug!(peer = %peer, "peer census stream ended ({e:#}); reconnecting");
                    failures = 0;
                }
                Err((e, false)) => {
                    metrics::counter!("cloudmap_xds_peer_errors_total").increment(1);
                    let message = format!("{e:#}");
                    failures += 1;
                    // The first failure in a row, then every 50th (~4 min at the 5 s backoff).
                    if failures % 50 == 1 {
                        tracing::warn!(peer = %peer, failures, "peer census stream failed (retrying): {message}");
                    } else {
                        tracing::debug!(peer = %peer, failures, "peer census stream failed: {message}");
                    }
                    self.update(&peer, |s| {
                        s.errors += 1;
                        s.last_error = Some(message);
                    });
                }
            }
            tokio::time::sleep(backoff(failures)).await;
        }
    }

    /// One watch stream, from connect to its end. `reported`: whether any report came.
    async fn session(&self, peer: &str) -> Result<Session, (anyhow::Error, bool)> {
        let tls = self.tls.client_config().map_err(|e| (e, false))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{peer}"))
            .with_context(|| format!("peer address {peer:?} (expected HOST:PORT)"))
            .map_err(|e| (e, false))?
            .connect_timeout(self.timeout.min(Duration::from_secs(3)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).context("peer TLS configuration").map_err(|e| (e, false))?;
        }
        let channel =
            endpoint.connect().await.with_context(|| format!("connecting to peer {peer}")).map_err(|e| (e, false))?;
        let heartbeat_ms = u32::try_from((self.timeout / 4).as_millis()).unwrap_or(u32::MAX);
        let mut stream = CensusClient::new(channel)
            .watch(WatchRequest { replica: self.replica.clone(), heartbeat_ms })
            .await
            .map_err(|s| (anyhow::anyhow!("peer {peer} refused the census watch: {s}"), false))?
            .into_inner();
        self.update(peer, |s| s.connected = true);
        let mut reported = false;
        loop {
            // A silent stream (a half-open connection, a stuck peer) counts as failed.
            let message = match tokio::time::timeout(self.timeout, stream.message()).await {
                Ok(message) => message,
                Err(_) => return Err((anyhow::anyhow!("no report from peer {peer} for {:?}", self.timeout), reported)),
            };
            match message {
                Ok(Some(report)) => {
                    if report.replica == self.replica {
                        return Ok(Session::IsSelf);
                    }
                    reported = true;
                    let census = from_report(&report);
                    self.update(peer, |s| {
                        s.replica = Some(report.replica.clone());
                        s.last_contact = Some(Instant::now());
                        s.last_error = None;
                    });
                    self.census.set_peer(peer, census);
                    self.count_live();
                }
                Ok(None) => return Ok(Session::Ended { reported }),
                Err(status) => return Err((anyhow::anyhow!("peer {peer}: {status}"), reported)),
            }
        }
    }
}

/// Aborts the task when dropped (the watchers end with the task that started them).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Session {
    IsSelf,
    Ended { reported: bool },
}

/// 100 ms doubling to 5 s, with ±20 % jitter so replicas do not retry in step.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(6)).min(Duration::from_secs(5));
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// The `HOST:PORT` of every instance of the control plane's own Cloud Map
/// service (ECS-style `AWS_INSTANCE_IPV4`, and `AWS_INSTANCE_PORT` or else
/// `default_port`), whatever their health: a peer that does not answer drops
/// out by the timeout.
async fn discover<C: CloudMap>(api: &C, service: &ServiceName, default_port: u16) -> anyhow::Result<BTreeSet<String>> {
    let mut settings = FileConfig::default().settings(service);
    settings.health_status = HealthFilter::All;
    let (instances, _) = api
        .discover_instances(&service.namespace, &service.service, &settings)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut addresses = BTreeSet::new();
    for instance in instances {
        let ip = instance.attributes.get(ATTR_IPV4).and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
        let port = match instance.attributes.get(ATTR_PORT) {
            Some(port) => port.parse::<u16>().ok(),
            None => Some(default_port),
        };
        match (ip, port) {
            (Some(ip), Some(port)) => {
                addresses.insert(std::net::SocketAddr::new(ip, port).to_string());
            }
            _ => tracing::debug!(
                instance = %instance.instance_id,
                "peer instance without a valid {ATTR_IPV4} (or with a bad {ATTR_PORT}); skipped"
            ),
        }
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_carry_counts_and_bad_entries_are_dropped() {
        let census =
            BTreeMap::from([("echo.demo".to_string(), PerZone::from([(Zone::new("a"), 4), (Zone::new("b"), 1)]))]);
        let report = to_report("r1", &census);
        assert_eq!(from_report(&report), census);
        let mut bad = report.clone();
        bad.services.push(ServiceCensus { dial: String::new(), zones: [("a".to_string(), 1)].into() });
        bad.services
            .push(ServiceCensus { dial: "x.demo".into(), zones: [(String::new(), 3), ("c".to_string(), 0)].into() });
        assert_eq!(from_report(&bad), census, "no dial, no zone or a zero count adds nothing");
    }

    #[test]
    fn peer_addresses_must_be_host_and_port() {
        assert_eq!(check_addresses(&["10.0.0.1:18000".into(), " ".into()]).ok(), Some(vec!["10.0.0.1:18000".into()]));
        for bad in ["10.0.0.1", ":18000", "host:http", "host:0"] {
            let error = check_addresses(&[bad.to_string()]).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains("HOST:PORT"), "{bad}: {error}");
        }
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff(0) < Duration::from_millis(130));
        assert!(backoff(30) <= Duration::from_secs(6));
    }
}
