//! The ADS server: each stream is its HTTP response body ([`StreamBody`]),
//! running a protocol state machine — State-of-the-World
//! ([`sotw::SotwState`]) or Delta ([`delta::DeltaState`]) — against the
//! shared [`Cache`]. The state machines are pure (requests in, [`Reply`]s
//! out) and share the cache and the resource builders; only the bookkeeping
//! of what the client has differs.
//!
//! The push path: hyper polls a stream's body in its own task for the
//! stream; the body reads the requests that arrived and sleeps until one
//! does or the cache raises the stream's [`Signal`] because a service it
//! watches changed ([`crate::wakeup`]). It then looks again only at the
//! resources of the services that changed, and a reply goes on the wire as
//! a [`wire::Frame`] — the cache's encoded bytes shared, with this stream's
//! version and nonce beside them. No task, channel, encoder or encode buffer
//! per stream. The service is written against HTTP ([`AdsServer`]
//! implements the tower `Service` tonic mounts). A client that stops reading
//! stops being polled; the server's reaper ([`registry::Registry::reap`])
//! gives up its census votes, watch and slot after `--stream-send-timeout`.
//!
//! Rules kept by both (see `shared/notes/xds-rules.md`): the Node is read
//! from the first request and remembered; a NACK (a request with
//! `error_detail`) is recorded and the rejected version is never re-sent —
//! only a new version is; newly named resources are answered at once.
//! Nothing is sent before the first Cloud Map sync, so a restarted control
//! plane never tells clients their resources are gone. Responses of one
//! moment go out make-before-break ([`ADD_ORDER`], then [`REMOVE_ORDER`]).

pub mod checks;
pub mod csds;
pub mod delta;
pub mod names;
pub mod registry;
pub mod sotw;
pub mod wire;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use futures::Stream;
use tonic::codec::{BufferSettings, Streaming};
use tonic::codegen::http;
use tonic::{Request, Status};

use crate::cache::{Cache, Client, Snapshot};
use crate::census::{Census, Voter};
use crate::model::{ClientKind, Zone};
use crate::resources::ResourceType;
use crate::wakeup::{Changed, Signal, Watch};
pub use wire::{Frame, Reply};

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

/// One value per resource type, inline: a stream's per-type state without a
/// map's allocation (most streams use all four types, one name each).
#[derive(Debug, Clone)]
pub struct PerType<T>([Option<T>; 4]);

impl<T> Default for PerType<T> {
    fn default() -> Self {
        PerType([None, None, None, None])
    }
}

impl<T> PerType<T> {
    fn slot(ty: ResourceType) -> usize {
        ty as usize
    }

    pub fn contains_key(&self, ty: &ResourceType) -> bool {
        self.0[Self::slot(*ty)].is_some()
    }

    pub fn get(&self, ty: &ResourceType) -> Option<&T> {
        self.0[Self::slot(*ty)].as_ref()
    }

    pub fn get_mut(&mut self, ty: &ResourceType) -> Option<&mut T> {
        self.0[Self::slot(*ty)].as_mut()
    }

    /// The value of `ty`, created empty if absent.
    pub fn entry(&mut self, ty: ResourceType) -> &mut T
    where
        T: Default,
    {
        self.0[Self::slot(ty)].get_or_insert_with(T::default)
    }

    /// The types present, in [`ResourceType::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (ResourceType, &T)> {
        ResourceType::ALL.into_iter().filter_map(|ty| self.get(&ty).map(|v| (ty, v)))
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flatten()
    }
}

impl<T> std::ops::Index<&ResourceType> for PerType<T> {
    type Output = T;

    /// Panics when the type is absent (tests).
    fn index(&self, ty: &ResourceType) -> &T {
        self.0[Self::slot(*ty)].as_ref().expect("no state for this type")
    }
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

/// A stream's cached view of its client (`view`), made from `client` and
/// `access` the first time it is asked for after being reset to `None`; none
/// before the first request has said who the client is.
fn client_view<'a>(
    view: &'a mut Option<Client>,
    client: Option<&ClientInfo>,
    access: &Option<std::sync::Arc<crate::authz::Access>>,
) -> Option<&'a Client> {
    if view.is_none() {
        *view = client.map(|c| c.client().with_access(access.clone()));
    }
    view.as_ref()
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
    type Request: prost::Message + Default + Send + 'static;
    const NAME: &'static str;

    fn on_request(&mut self, request: &Self::Request) -> Result<(ResourceType, Outcome), Status>;
    /// The responses due now against `snapshot`. `changed` says what moved
    /// since the snapshot they were last computed against; resources of
    /// other services are not looked at again.
    fn responses(&mut self, snapshot: &Snapshot, changed: &Changed) -> Vec<Reply>;
    /// The response on the wire.
    fn encode(reply: &Reply) -> Frame;
    fn client(&self) -> Option<&ClientInfo>;
    /// Services whose endpoints this stream watches (for the census).
    fn eds_names(&self) -> BTreeSet<String>;
    /// The change keys of everything subscribed (what should wake the stream).
    fn watch(&self) -> Watch;
    fn request_type_url(request: &Self::Request) -> &str;
    /// How many resource names the request (un)subscribes, for the limit.
    fn request_names(request: &Self::Request) -> usize;
    /// How many resource names the stream holds subscribed, all types together.
    fn held_names(&self) -> usize;
    /// The Node the request carries, if any.
    fn request_node(request: &Self::Request) -> Option<&Node>;
    /// Whether a request since the last call may need an answer (a new or
    /// changed subscription); clears the flag. A plain ACK, a NACK or a stale
    /// request does not, so the stream skips recomputing its responses.
    fn take_changed(&mut self) -> bool;
    /// What the client holds, per type (for /config_dump and CSDS).
    fn status(&self) -> Vec<registry::TypeStatus>;
    /// Limit what the stream is sent to what its client may read (`[authz]`).
    fn set_access(&mut self, access: Arc<crate::authz::Access>);
}

/// The watch of a stream's subscriptions: per type, whether it is a
/// wildcard, and the names (mapped to their change keys).
pub(crate) fn watch_of<'a, I>(types: impl IntoIterator<Item = (bool, I)>) -> Watch
where
    I: IntoIterator<Item = &'a String>,
{
    let mut all = false;
    let mut keys = Vec::new();
    for (wildcard, names) in types {
        all |= wildcard;
        keys.extend(names.into_iter().map(|n| Snapshot::key_of(n).to_string()));
    }
    Watch::new(all, keys)
}

/// Limits against broken or hostile clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Resource names one request may (un)subscribe.
    pub max_resource_names: usize,
    /// Resource names one stream may hold subscribed, all types together
    /// (SotW and Delta subscriptions accumulate across requests).
    pub max_names_per_stream: usize,
    /// Census votes by source address rather than by connection.
    pub census_per_address: bool,
    /// How long a push may wait for a client that is not reading before the
    /// stream is closed.
    pub send_timeout: std::time::Duration,
    /// Largest request message accepted (bytes).
    pub max_message_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_resource_names: 10_000,
            max_names_per_stream: 20_000,
            census_per_address: false,
            send_timeout: std::time::Duration::from_secs(60),
            max_message_size: 4 * 1024 * 1024,
        }
    }
}

/// Per-type counters, looked up once: a push or an ACK does not hash labels.
struct TypeCounters {
    acks: [metrics::Counter; 4],
    nacks: [metrics::Counter; 4],
    pushes: [metrics::Counter; 4],
}

/// The counters, registered with the recorder installed when first asked
/// (`main` asks through [`register_metrics`] right after installing it).
fn counters() -> &'static TypeCounters {
    static COUNTERS: std::sync::OnceLock<TypeCounters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        let of = |name: &'static str| ResourceType::ALL.map(|ty| metrics::counter!(name, "type_url" => ty.type_url()));
        TypeCounters {
            acks: of("cloudmap_xds_acks_total"),
            nacks: of("cloudmap_xds_nacks_total"),
            pushes: of("cloudmap_xds_pushes_total"),
        }
    })
}

/// Create the counters at 0 so the first ACK, NACK or refusal is visible to
/// `increase()` in Prometheus.
pub fn register_metrics() {
    let counters = counters();
    for counter in counters.acks.iter().chain(&counters.nacks).chain(&counters.pushes) {
        counter.increment(0);
    }
    metrics::counter!("cloudmap_xds_streams_refused_total").increment(0);
    metrics::counter!("cloudmap_xds_streams_timed_out_total").increment(0);
    // Exported from the start (0 without TLS) so dashboards and alerts always find it.
    metrics::counter!("cloudmap_xds_tls_handshake_failures_total").increment(0);
    metrics::counter!("cloudmap_xds_shared_encodes_total").increment(0);
    metrics::counter!("cloudmap_xds_requests_rejected_total").increment(0);
}

pub const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Initial request decode buffer: ACKs are a few hundred bytes; a larger
/// request (an Envoy's first, with its Node) grows it.
const REQUEST_BUFFER: usize = 512;

/// The ADS service, written against HTTP directly (not tonic's generated
/// server) so that responses are [`wire`] frames of shared bytes with no
/// per-stream encoder or encode buffer. Mount it with
/// `tonic::transport::Server::add_service`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdsServer {
    cache: Arc<Cache>,
    /// Where the streams vote (joins and leaves as they subscribe).
    census: Arc<Census>,
    registry: Arc<registry::Registry>,
    limits: Limits,
    next_stream: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    /// Set when `shutdown` turned true: every stream ends at its next poll.
    stopping: Arc<AtomicBool>,
    /// The reaper and the shutdown watcher start with the first stream.
    background: Arc<std::sync::Once>,
    authz: Option<Arc<crate::authz::Authz>>,
}

impl AdsServer {
    pub fn new(cache: Arc<Cache>, census: Arc<Census>, registry: Arc<registry::Registry>, limits: Limits) -> Self {
        AdsServer {
            cache,
            census,
            registry,
            limits,
            next_stream: Arc::new(AtomicU64::new(1)),
            shutdown: None,
            stopping: Arc::new(AtomicBool::new(false)),
            background: Arc::new(std::sync::Once::new()),
            authz: None,
        }
    }

    /// Serve each client only what `[authz]` lets its certificate identities
    /// read (a client without a certificate reads nothing).
    pub fn with_authz(mut self, authz: Arc<crate::authz::Authz>) -> Self {
        self.authz = Some(authz);
        self
    }

    /// End every stream with UNAVAILABLE when `shutdown` turns true, so clients
    /// reconnect (to another replica, or to this one restarted) at once
    /// instead of holding the server's graceful shutdown open.
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    fn handle(&self, request: http::Request<tonic::body::Body>) -> http::Response<tonic::body::Body> {
        let result = match request.uri().path() {
            SOTW_PATH => self.open::<sotw::SotwState>(request),
            DELTA_PATH => self.open::<delta::DeltaState>(request),
            path => Err(Status::unimplemented(format!("{path} is not a method of {SERVICE_NAME}"))),
        };
        result.unwrap_or_else(Status::into_http)
    }

    fn open<P: Protocol>(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        if let Some(encoding) = request.headers().get("grpc-encoding").filter(|e| *e != "identity") {
            return Err(Status::unimplemented(format!(
                "grpc-encoding {encoding:?} is not supported: send uncompressed requests"
            )));
        }
        let request = Request::from_http(request);
        let peer = request.remote_addr();
        let voter = voter_of(&request, self.limits.census_per_address);
        let access = self.authz.as_ref().map(|authz| {
            let leaf = request.peer_certs().and_then(|certs| certs.first().cloned());
            Arc::new(authz.access(&leaf.map(|c| crate::authz::identities(c.as_ref())).unwrap_or_default()))
        });
        let decoder = tonic_prost::ProstDecoder::<P::Request>::new(BufferSettings::new(REQUEST_BUFFER, 32 * 1024));
        let inbound = Streaming::new_request(decoder, request.into_inner(), None, Some(self.limits.max_message_size));
        let body = self.start::<P>(peer, voter, access, inbound)?;
        let mut response = http::Response::new(tonic::body::Body::new(body));
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        Ok(response)
    }

    fn start<P: Protocol>(
        &self,
        peer: Option<std::net::SocketAddr>,
        voter: Voter,
        access: Option<Arc<crate::authz::Access>>,
        inbound: Streaming<P::Request>,
    ) -> Result<StreamBody<P>, Status> {
        self.start_background();
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let admission = self.registry.admit(id, P::NAME, peer)?;
        let signal = Arc::new(Signal::default());
        let mut guard = StreamGuard {
            cache: self.cache.clone(),
            census: self.census.clone(),
            id,
            voter,
            zone: None,
            services: Vec::new(),
            watch: None,
        };
        // Woken by readiness until the first request says what to watch.
        guard.watch(&signal, Watch::default());
        let mut protocol = P::default();
        if let Some(access) = access {
            protocol.set_access(access);
        }
        let shared = Arc::new(Shared {
            state: std::sync::Mutex::new(protocol),
            handed: AtomicU64::new(0),
            released: AtomicBool::new(false),
            signal,
            held: std::sync::Mutex::new(None),
        });
        admission.attach(shared.clone());
        *shared.lock_held() = Some(Held { id, guard, admission, labels: None });
        Ok(StreamBody {
            id,
            peer,
            limits: self.limits,
            cache: self.cache.clone(),
            stopping: self.stopping.clone(),
            inbound,
            shared,
            identified: false,
            dirty: true,
            answered: None,
            replies: Vec::new().into_iter(),
            chunks: Vec::new().into_iter(),
            done: false,
        })
    }

    /// Once per server, from its first stream (inside the runtime): the
    /// reaper of streams whose client stopped reading, and the watcher of
    /// the shutdown signal, which wakes every stream to end it.
    fn start_background(&self) {
        self.background.call_once(|| {
            let registry = Arc::downgrade(&self.registry);
            let timeout = self.limits.send_timeout;
            tokio::spawn(async move {
                let period =
                    (timeout / 4).clamp(std::time::Duration::from_millis(50), std::time::Duration::from_secs(1));
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(registry) = registry.upgrade() else { return };
                    let reaped = registry.reap(timeout);
                    if reaped > 0 {
                        metrics::counter!("cloudmap_xds_streams_timed_out_total").increment(reaped as u64);
                        tracing::warn!(
                            streams = reaped,
                            ?timeout,
                            "clients stopped reading; their streams were released"
                        );
                    }
                }
            });
            if let Some(mut shutdown) = self.shutdown.clone() {
                let (stopping, cache) = (self.stopping.clone(), self.cache.clone());
                tokio::spawn(async move {
                    if shutdown.wait_for(|stop| *stop).await.is_ok() {
                        stopping.store(true, Ordering::Release);
                        cache.wakeups().wake(&Changed::All);
                    }
                });
            }
        });
    }
}

impl tonic::server::NamedService for AdsServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for AdsServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(self.handle(request)))
    }
}

/// Whose census vote a stream is: with mTLS, the client certificate (one
/// vote per client identity, however many connections it opens); else the
/// source address when `per_address`; else the connection (its address and
/// port). A stream whose connection is unknown votes alone.
fn voter_of<T>(request: &Request<T>, per_address: bool) -> Voter {
    if let Some(leaf) = request.peer_certs().and_then(|certs| certs.first().cloned()) {
        return Voter::new(&format!("cert:{:016x}", crate::cache::stable_hash(&leaf.as_ref())));
    }
    match request.remote_addr() {
        Some(addr) if per_address => Voter::new(&format!("ip:{}", addr.ip())),
        Some(addr) => Voter::new(&format!("conn:{addr}")),
        None => Voter::unique(),
    }
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    trailers
}

/// Keeps a stream's census entries and its watch, and removes them when the
/// stream ends, however it ends.
struct StreamGuard {
    cache: Arc<Cache>,
    census: Arc<Census>,
    id: u64,
    /// Whose census vote this stream's subscriptions are.
    voter: Voter,
    /// Set once the client is known: its zone, for the census.
    zone: Option<Option<Zone>>,
    /// The services whose endpoints it watches, sorted.
    services: Vec<String>,
    watch: Option<Watch>,
}

impl StreamGuard {
    fn census(&mut self, services: BTreeSet<String>) {
        let Some(zone) = &self.zone else { return };
        // A client without a zone still counts as a subscriber (it is in no zone's census).
        let zone = zone.clone().unwrap_or_default();
        for gone in self.services.iter().filter(|s| !services.contains(*s)) {
            self.census.leave(gone, &zone, &self.voter);
        }
        for new in services.iter().filter(|s| self.services.binary_search(s).is_err()) {
            self.census.join(new, &zone, &self.voter);
        }
        self.services = services.into_iter().collect();
        self.services.shrink_to_fit();
    }

    fn watch(&mut self, signal: &Arc<Signal>, watch: Watch) {
        if self.watch.as_ref() != Some(&watch) {
            self.cache.wakeups().watch(self.id, signal, watch.clone());
            self.watch = Some(watch);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.census(BTreeSet::new());
        self.cache.wakeups().forget(self.id);
    }
}

/// What a stream holds in the control plane's shared tables — census votes,
/// watch, registry slot, stream gauge — given up together, once: when the
/// stream ends, or earlier when its client stopped reading.
struct Held {
    id: u64,
    guard: StreamGuard,
    admission: registry::Admission,
    /// The stream gauge's labels, once the client is known.
    labels: Option<(String, String)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((zone, kind)) = self.labels.take() {
            metrics::gauge!("cloudmap_xds_streams", "zone" => zone, "kind" => kind).decrement(1.0);
        }
        tracing::info!(stream = self.id, "stream ended");
    }
}

/// The part of a stream that others reach: the registry (status, the
/// reaper) and the wake-ups. One allocation per stream; nothing here is
/// touched per push but one atomic store.
struct Shared<P> {
    /// Locked by the stream's own poll, and briefly by status requests.
    state: std::sync::Mutex<P>,
    /// [`registry::clock_ms`] + 1 when a frame was handed to hyper and hyper
    /// has not come back for the next one (the client is not reading); 0 otherwise.
    handed: AtomicU64,
    /// [`Held`] was given up: the stream ends at its next poll.
    released: AtomicBool,
    signal: Arc<Signal>,
    held: std::sync::Mutex<Option<Held>>,
}

impl<P> Shared<P> {
    fn lock(&self) -> std::sync::MutexGuard<'_, P> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn give_up(&self) {
        self.released.store(true, Ordering::Release);
        let held = self.lock_held().take();
        // Dropped outside the lock: it removes the registry entry that holds this.
        drop(held);
        self.signal.raise();
    }
}

impl<P: Protocol> registry::Handle for Shared<P> {
    fn status(&self) -> Vec<registry::TypeStatus> {
        self.lock().status()
    }

    fn waiting_since(&self) -> Option<u64> {
        match self.handed.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t - 1),
        }
    }

    fn release(&self) {
        self.give_up();
    }
}

/// One stream, as its HTTP response body: hyper polls it, and each poll
/// reads the requests that arrived, answers them, and pushes what changed
/// since the stream was last woken — all in hyper's own task for the
/// stream, with no task or channel of its own. Each frame's chunks go out as
/// DATA, then the gRPC status as trailers; it holds no buffer of its own.
struct StreamBody<P: Protocol> {
    id: u64,
    peer: Option<std::net::SocketAddr>,
    limits: Limits,
    cache: Arc<Cache>,
    stopping: Arc<AtomicBool>,
    inbound: Streaming<P::Request>,
    shared: Arc<Shared<P>>,
    /// The client's Node was read (from its first request).
    identified: bool,
    /// A request since the responses were last computed may need an answer.
    dirty: bool,
    /// The snapshot generation the responses were last computed against.
    answered: Option<u64>,
    /// Responses computed, not yet encoded: each is encoded when its turn comes.
    replies: std::vec::IntoIter<Reply>,
    /// The chunks of the frame being written.
    chunks: std::vec::IntoIter<Bytes>,
    /// The trailers went out.
    done: bool,
}

impl<P: Protocol> StreamBody<P> {
    fn on_message(&mut self, request: &P::Request) -> Result<(), Status> {
        checked::<P>(&self.limits, request)?;
        let (ty, outcome, news, client) = {
            let mut state = self.shared.lock();
            let (ty, outcome) = state.on_request(request)?;
            let held = state.held_names();
            if held > self.limits.max_names_per_stream {
                // The stream ends with this error, and its state with it.
                return Err(Status::resource_exhausted(format!(
                    "the stream subscribes {held} resource names; one stream may hold at most {} \
                     (--max-names-per-stream)",
                    self.limits.max_names_per_stream
                )));
            }
            let changed = state.take_changed();
            let news = changed.then(|| (state.eds_names(), state.watch()));
            let client = if self.identified { None } else { state.client().cloned() };
            (ty, outcome, news, client)
        };
        self.dirty |= news.is_some();
        record(self.id, ty, P::request_type_url(request), &outcome);
        if client.is_none() && news.is_none() {
            return Ok(());
        }
        let mut held = self.shared.lock_held();
        let Some(held) = held.as_mut() else {
            return Err(Status::unavailable("this stream was released; reconnect"));
        };
        if let Some(c) = client {
            self.identified = true;
            held.admission.identify(P::request_node(request), Some(&c));
            tracing::info!(
                stream = self.id, peer = ?self.peer, protocol = P::NAME, node = %c.node_id,
                zone = ?c.zone.as_ref().map(Zone::as_str), agent = %c.user_agent, kind = ?c.kind, "client connected"
            );
            // A label only for zones that have endpoints: any other string a client
            // claims would be a series of its own, kept forever.
            let zone = match &c.zone {
                None => String::new(),
                Some(z) if self.cache.snapshot().serves_zone(z) => z.as_str().to_string(),
                Some(_) => "other".to_string(),
            };
            let kind = format!("{:?}", c.kind).to_ascii_lowercase();
            metrics::gauge!("cloudmap_xds_streams", "zone" => zone.clone(), "kind" => kind.clone()).increment(1.0);
            held.labels = Some((zone, kind));
            held.guard.zone = Some(c.zone);
        }
        if let Some((eds_names, watch)) = news {
            held.guard.census(eds_names);
            // Before the snapshot is read: a change published after this wakes the stream again.
            held.guard.watch(&self.shared.signal, watch);
        }
        Ok(())
    }

    /// End the stream with `status` in the trailers.
    fn end(&mut self, status: &Status) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        self.done = true;
        self.shared.give_up();
        std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers(status)))))
    }
}

impl<P: Protocol> Drop for StreamBody<P> {
    fn drop(&mut self) {
        self.shared.give_up();
    }
}

impl<P: Protocol> http_body::Body for StreamBody<P> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        use std::task::Poll;
        let this = &mut *self;
        // hyper came back: whatever was handed to it went out.
        this.shared.handed.store(0, Ordering::Relaxed);
        loop {
            if let Some(chunk) = this.chunks.next() {
                this.shared.handed.store(registry::clock_ms() + 1, Ordering::Relaxed);
                return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(reply) = this.replies.next() {
                let frame = P::encode(&reply);
                tracing::debug!(stream = this.id, ty = reply.ty.short(), bytes = frame.len(), "push");
                counters().pushes[reply.ty as usize].increment(1);
                this.chunks = frame.chunks.into_iter();
                continue;
            }
            // Requests first, so an ACK or a new subscription is seen before a push.
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => {
                    if let Err(status) = this.on_message(&request) {
                        static LOG: checks::LogLimit = checks::LogLimit::new(10, std::time::Duration::from_secs(10));
                        metrics::counter!("cloudmap_xds_requests_rejected_total").increment(1);
                        if let Some(left_out) = LOG.allow() {
                            tracing::warn!(stream = this.id, peer = ?this.peer, error = %status.message(), left_out, "rejecting request; closing the stream");
                        }
                        return this.end(&status);
                    }
                    continue;
                }
                Poll::Ready(Some(Err(status))) => {
                    tracing::debug!(stream = this.id, error = %status, "stream closed by transport error");
                    return this.end(&status);
                }
                Poll::Ready(None) => return this.end(&Status::ok("")),
                Poll::Pending => {}
            }
            if this.stopping.load(Ordering::Acquire) {
                return this.end(&Status::unavailable("control plane shutting down; reconnect"));
            }
            let woken = this.shared.signal.poll_take(cx).is_ready();
            if this.shared.released.load(Ordering::Acquire) {
                return this
                    .end(&Status::unavailable("this stream was released (its client stopped reading); reconnect"));
            }
            if !(woken || this.dirty) || !this.cache.is_ready() {
                if woken {
                    // Poll the signal again, so that this task is woken by the next change.
                    continue;
                }
                return Poll::Pending;
            }
            let snapshot = this.cache.snapshot();
            if !this.dirty && this.answered == Some(snapshot.generation) {
                continue;
            }
            // Only what moved since the snapshot last answered, when that was the previous one.
            let all = Changed::All;
            let changed = match this.answered {
                Some(g) if !this.dirty && g + 1 == snapshot.generation => &snapshot.changed,
                _ => &all,
            };
            let replies = this.shared.lock().responses(&snapshot, changed);
            this.answered = Some(snapshot.generation);
            this.dirty = false;
            this.replies = replies.into_iter();
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.chunks.len() == 0
    }
}

fn checked<P: Protocol>(limits: &Limits, request: &P::Request) -> Result<(), Status> {
    if let Some(node) = P::request_node(request) {
        checks::node(node)?;
    }
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
    match outcome {
        Outcome::Ack => counters().acks[ty as usize].increment(1),
        Outcome::Nack(message) => {
            counters().nacks[ty as usize].increment(1);
            // A client can NACK every response: the counter says how often, the log samples.
            static LOG: checks::LogLimit = checks::LogLimit::new(10, std::time::Duration::from_secs(10));
            if let Some(left_out) = LOG.allow() {
                let message: String = message.chars().take(500).collect();
                tracing::warn!(stream = id, %type_url, %message, left_out, "client rejected (NACK)");
            }
        }
        Outcome::UnknownType => {
            static LOG: checks::LogLimit = checks::LogLimit::new(10, std::time::Duration::from_secs(10));
            if let Some(left_out) = LOG.allow() {
                let type_url: String = type_url.chars().take(200).collect();
                tracing::warn!(stream = id, %type_url, left_out, "ignoring request for a type this server does not serve");
            }
        }
        Outcome::Stale => tracing::debug!(stream = id, ty = ty.short(), "stale nonce ignored"),
        Outcome::Subscribe => tracing::debug!(stream = id, ty = ty.short(), "subscribe"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_type_slots_follow_the_type_order() {
        // PerType and the counters index by `ty as usize`.
        for (i, ty) in ResourceType::ALL.into_iter().enumerate() {
            assert_eq!(ty as usize, i);
        }
        let mut per = PerType::<u8>::default();
        *per.entry(ResourceType::Cluster) = 7;
        assert_eq!(per.iter().collect::<Vec<_>>(), vec![(ResourceType::Cluster, &7)]);
        assert!(!per.contains_key(&ResourceType::Listener));
    }
}
