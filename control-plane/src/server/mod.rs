//! The ADS server: one task per stream running a protocol state machine —
//! State-of-the-World ([`sotw::SotwState`]) or Delta ([`delta::DeltaState`])
//! — against the shared [`Cache`]. The state machines are pure (requests in,
//! responses out) and share the cache and the resource builders; only the
//! bookkeeping of what the client has differs.
//!
//! Rules kept by both (see `shared/notes/xds-rules.md`): the Node is read
//! from the first request and remembered; a NACK (a request with
//! `error_detail`) is recorded and the rejected version is never re-sent —
//! only a new version is; newly named resources are answered at once.
//! Nothing is sent before the first Cloud Map sync, so a restarted control
//! plane never tells clients their resources are gone. Responses of one
//! moment go out make-before-break ([`ADD_ORDER`], then [`REMOVE_ORDER`]).

pub mod csds;
pub mod delta;
pub mod registry;
pub mod sotw;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{Cache, Client, Snapshot};
use crate::model::{ClientKind, Zone};
use crate::resources::ResourceType;

/// Make before break: a client is sent what a resource refers to before the
/// resource that refers to it — clusters, their endpoints, then listeners and
/// routes (a route never names a cluster the client does not have yet) ...
pub const ADD_ORDER: [ResourceType; 4] = [
    ResourceType::Cluster,
    ResourceType::ClusterLoadAssignment,
    ResourceType::Listener,
    ResourceType::RouteConfiguration,
];

/// ... and removals go last, referrers first: listeners and routes stop
/// naming a cluster before the cluster goes.
pub const REMOVE_ORDER: [ResourceType; 4] = [
    ResourceType::Listener,
    ResourceType::RouteConfiguration,
    ResourceType::Cluster,
    ResourceType::ClusterLoadAssignment,
];

fn remove_rank(ty: ResourceType) -> usize {
    REMOVE_ORDER.iter().position(|t| *t == ty).unwrap_or(REMOVE_ORDER.len())
}

/// Who a stream belongs to, from the Node of its first request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub node_id: String,
    pub user_agent: String,
    pub zone: Option<Zone>,
    pub kind: ClientKind,
}

impl ClientInfo {
    pub fn from_node(node: Option<&Node>) -> ClientInfo {
        let node = node.cloned().unwrap_or_default();
        let zone = node.locality.map(|l| Zone::new(l.zone)).filter(|z| !z.is_unknown());
        ClientInfo {
            kind: ClientKind::from_user_agent(&node.user_agent_name),
            node_id: node.id,
            user_agent: node.user_agent_name,
            zone,
        }
    }

    /// The cache's view of this client; flat clients get a subset from their node id.
    pub fn client(&self) -> Client {
        Client::new(self.zone.clone(), self.kind, &self.node_id)
    }
}

/// What a request meant, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// First request of a type on this stream (or after a reconnect).
    Subscribe,
    Ack,
    Nack(String),
    /// The nonce answers no response this stream still expects an answer to
    /// for this type (SotW: see `sotw`'s module doc): ignored.
    Stale,
    /// A type this server does not serve: ignored.
    UnknownType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub version: String,
    pub message: String,
}

/// A stream's protocol state machine: requests in, responses out, no I/O.
pub trait Protocol: Default + Send + 'static {
    type Request: prost::Message + Send + 'static;
    type Response: Send + 'static;
    const NAME: &'static str;

    fn on_request(&mut self, request: &Self::Request) -> Result<(ResourceType, Outcome), Status>;
    /// The responses due now against `snapshot`.
    fn responses(&mut self, snapshot: &Snapshot) -> Vec<Self::Response>;
    fn client(&self) -> Option<&ClientInfo>;
    /// Services whose endpoints this stream watches (for the census).
    fn eds_names(&self) -> BTreeSet<String>;
    fn request_type_url(request: &Self::Request) -> &str;
    /// How many resource names the request (un)subscribes, for the limit.
    fn request_names(request: &Self::Request) -> usize;
    /// The Node the request carries, if any.
    fn request_node(request: &Self::Request) -> Option<&Node>;
    /// Whether a request since the last call may need an answer (a new or
    /// changed subscription); clears the flag. A plain ACK, a NACK or a stale
    /// request does not, so the stream skips recomputing its responses.
    fn take_changed(&mut self) -> bool;
    /// What the client holds, per type (for /config_dump and CSDS).
    fn status(&self) -> Vec<registry::TypeStatus>;
    fn response_type_url(response: &Self::Response) -> &str;
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The tonic service. Cheap to clone; all state is in the cache and the streams.
/// Limits against broken or hostile clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Resource names one request may (un)subscribe.
    pub max_resource_names: usize,
    /// How long a push may wait for a client that is not reading before the
    /// stream is closed.
    pub send_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_resource_names: 10_000, send_timeout: std::time::Duration::from_secs(60) }
    }
}

/// Create the counters at 0 so the first ACK, NACK or refusal is visible to
/// `increase()` in Prometheus.
pub fn register_metrics() {
    for ty in ResourceType::ALL {
        for name in ["cloudmap_xds_acks_total", "cloudmap_xds_nacks_total", "cloudmap_xds_pushes_total"] {
            metrics::counter!(name, "type_url" => ty.type_url()).increment(0);
        }
    }
    metrics::counter!("cloudmap_xds_streams_refused_total").increment(0);
    metrics::counter!("cloudmap_xds_streams_timed_out_total").increment(0);
}

#[derive(Debug, Clone)]
pub struct AdsServer {
    cache: Arc<Cache>,
    registry: Arc<registry::Registry>,
    limits: Limits,
    next_stream: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl AdsServer {
    pub fn new(cache: Arc<Cache>, registry: Arc<registry::Registry>, limits: Limits) -> Self {
        AdsServer { cache, registry, limits, next_stream: Arc::new(AtomicU64::new(1)), shutdown: None }
    }

    /// End every stream with UNAVAILABLE when `shutdown` turns true, so clients
    /// reconnect (to another replica, or to this one restarted) at once
    /// instead of holding the server's graceful shutdown open.
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    fn start<P: Protocol>(
        &self,
        peer: Option<std::net::SocketAddr>,
        inbound: Streaming<P::Request>,
    ) -> Result<BoxStream<P::Response>, Status> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let admission = self.registry.admit(id, P::NAME, peer)?;
        // Small on purpose: a client that stops reading blocks only its own
        // task, and when it reads again it gets the latest versions, not a
        // backlog (responses are computed from the newest snapshot when sent).
        let (tx, rx) = mpsc::channel(2);
        let stream = StreamTask {
            cache: self.cache.clone(),
            id,
            peer,
            limits: self.limits,
            admission,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(run_stream::<P>(stream, inbound, tx));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// What a stream task owns besides its protocol state.
struct StreamTask {
    cache: Arc<Cache>,
    id: u64,
    peer: Option<std::net::SocketAddr>,
    limits: Limits,
    admission: registry::Admission,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Resolves once shutdown was requested; never without a shutdown channel.
async fn shutting_down(shutdown: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match shutdown {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.start::<sotw::SotwState>(peer, request.into_inner())?))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.start::<delta::DeltaState>(peer, request.into_inner())?))
    }
}

/// Keeps a stream's census entries and removes them when the stream ends,
/// however it ends.
struct CensusGuard {
    cache: Arc<Cache>,
    zone: Option<Zone>,
    services: BTreeSet<String>,
}

impl CensusGuard {
    fn update(&mut self, services: BTreeSet<String>) {
        // A client without a zone still counts as a subscriber (it is in no zone's census).
        let zone = self.zone.clone().unwrap_or_default();
        for gone in self.services.difference(&services) {
            self.cache.census().leave(gone, &zone);
        }
        for new in services.difference(&self.services) {
            self.cache.census().join(new, &zone);
        }
        self.services = services;
    }
}

impl Drop for CensusGuard {
    fn drop(&mut self) {
        self.update(BTreeSet::new());
    }
}

async fn run_stream<P: Protocol>(
    stream: StreamTask,
    mut inbound: Streaming<P::Request>,
    tx: mpsc::Sender<Result<P::Response, Status>>,
) {
    let StreamTask { cache, id, peer, limits, admission, mut shutdown } = stream;
    let mut changes = cache.subscribe();
    // Shared with the registry, which locks it briefly when someone asks for status.
    let state = Arc::new(std::sync::Mutex::new(P::default()));
    let status_of = state.clone();
    admission.attach(Arc::new(move || status_of.lock().map(|s| s.status()).unwrap_or_default()));
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let mut client: Option<ClientInfo> = None;
    let mut census: Option<CensusGuard> = None;
    let mut labels: Option<(String, String)> = None;
    // The snapshot generation the responses were last computed against, and
    // whether a request since then may need an answer.
    let mut answered: Option<u64> = None;
    let mut dirty = true;
    'stream: loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    let handled = checked::<P>(&limits, &request).and_then(|()| {
                        let mut state = lock();
                        let result = state.on_request(&request);
                        if client.is_none() {
                            client = state.client().cloned();
                        }
                        dirty |= state.take_changed();
                        result.map(|(ty, outcome)| (ty, outcome, state.eds_names()))
                    });
                    match handled {
                        Ok((ty, outcome, eds_names)) => {
                            record(id, ty, P::request_type_url(&request), &outcome);
                            if let (None, Some(c)) = (&census, &client) {
                                admission.identify(P::request_node(&request), Some(c));
                                tracing::info!(
                                    stream = id, ?peer, protocol = P::NAME, node = %c.node_id, zone = ?c.zone.as_ref().map(Zone::as_str),
                                    agent = %c.user_agent, kind = ?c.kind, "client connected"
                                );
                                let zone = c.zone.as_ref().map(|z| z.as_str().to_string()).unwrap_or_default();
                                let kind = format!("{:?}", c.kind).to_ascii_lowercase();
                                metrics::gauge!("cloudmap_xds_streams", "zone" => zone.clone(), "kind" => kind.clone()).increment(1.0);
                                labels = Some((zone, kind));
                                census = Some(CensusGuard { cache: cache.clone(), zone: c.zone.clone(), services: BTreeSet::new() });
                            }
                            if let Some(guard) = census.as_mut() {
                                guard.update(eds_names);
                            }
                        }
                        Err(status) => {
                            tracing::warn!(stream = id, error = %status.message(), "rejecting malformed request");
                            let _ = tx.send(Err(status)).await;
                            break 'stream;
                        }
                    }
                }
                Ok(None) => break 'stream,
                Err(status) => {
                    tracing::debug!(stream = id, error = %status, "stream closed by transport error");
                    break 'stream;
                }
            },
            changed = changes.changed() => if changed.is_err() { break 'stream },
            () = shutting_down(&mut shutdown) => {
                let _ = tx.send(Err(Status::unavailable("control plane shutting down; reconnect"))).await;
                break 'stream;
            }
        }
        if !cache.is_ready() {
            continue;
        }
        let snapshot = cache.snapshot();
        if !dirty && answered == Some(snapshot.generation) {
            continue;
        }
        let responses = lock().responses(&snapshot);
        answered = Some(snapshot.generation);
        dirty = false;
        for response in responses {
            let type_url = P::response_type_url(&response).to_string();
            tracing::debug!(stream = id, %type_url, "push");
            metrics::counter!("cloudmap_xds_pushes_total", "type_url" => type_url).increment(1);
            // Waits while the client is not reading; the channel holds at most two responses.
            match tokio::time::timeout(limits.send_timeout, tx.send(Ok(response))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break 'stream,
                Err(_) => {
                    metrics::counter!("cloudmap_xds_streams_timed_out_total").increment(1);
                    tracing::warn!(stream = id, timeout = ?limits.send_timeout, "client stopped reading; closing its stream");
                    break 'stream;
                }
            }
        }
    }
    if let Some((zone, kind)) = labels {
        metrics::gauge!("cloudmap_xds_streams", "zone" => zone, "kind" => kind).decrement(1.0);
    }
    tracing::info!(stream = id, "stream ended");
}

fn checked<P: Protocol>(limits: &Limits, request: &P::Request) -> Result<(), Status> {
    let names = P::request_names(request);
    if names > limits.max_resource_names {
        return Err(Status::invalid_argument(format!(
            "request names {names} resources; the limit is {} (--max-resource-names)",
            limits.max_resource_names
        )));
    }
    Ok(())
}

fn record(id: u64, ty: ResourceType, type_url: &str, outcome: &Outcome) {
    let label = type_url.to_string();
    match outcome {
        Outcome::Ack => metrics::counter!("cloudmap_xds_acks_total", "type_url" => label).increment(1),
        Outcome::Nack(message) => {
            metrics::counter!("cloudmap_xds_nacks_total", "type_url" => label).increment(1);
            tracing::warn!(stream = id, %type_url, %message, "client rejected (NACK)");
        }
        Outcome::UnknownType => {
            tracing::warn!(stream = id, %type_url, "ignoring request for a type this server does not serve");
        }
        Outcome::Stale => tracing::debug!(stream = id, ty = ty.short(), "stale nonce ignored"),
        Outcome::Subscribe => tracing::debug!(stream = id, ty = ty.short(), "subscribe"),
    }
}
