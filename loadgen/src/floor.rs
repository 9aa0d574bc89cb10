//! The floor: the cheapest ADS server tonic, h2 and tokio allow on this
//! machine, so every benchmark run can say how far cloudmap-xds is from it.
//!
//! It serves one service (`SERVICE.NAMESPACE`) with the same names and shapes
//! cloudmap-xds serves the load generator's clients (its listener, route,
//! cluster and zone-aware EDS come from the `cloudmap_xds::resources` builders,
//! fed the same instances `loadgen seed` registers), but it does nothing a
//! control plane must do per stream. Each response is encoded **once per
//! change**, gRPC length prefix included, with the version as nonce, and every
//! stream is sent a reference-counted clone of the same bytes as one HTTP/2
//! data frame. A stream holds its request decoder (1 KiB buffer), a watch on the
//! current [`Snapshot`], and per type whether it subscribed and which version
//! it was sent. Nothing else: no `Any` clones, no per-stream encoder or encode
//! buffer, no registry.
//!
//! The admin port stands in for Cloud Map: `POST /change?k=K` registers the
//! instance `loadgen seed`'s change K would (marker K, a new address), so the
//! EDS grows 30 → 30 + K exactly as in the external runs; `/metrics` carries
//! `cloudmap_xds_service_updated_timestamp_seconds{service}` (set just before
//! the new snapshot is published), and `/ready` answers 200.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::Context as _;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use bytes::{BufMut, Bytes, BytesMut};
use cloudmap_xds::model::{ClientKind, ServiceEndpoints, Zone};
use cloudmap_xds::policy::{self, Policy};
use cloudmap_xds::resources;
use cloudmap_xds::translate::{self, MetadataAttributes, RawInstance, TranslateOptions};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use futures::Stream;
use http_body::Frame;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder, Streaming};
use tonic::codegen::http;

use crate::client::{CDS, EDS, LDS, MARKER_ATTRIBUTE, RDS};
use crate::{REGION, ZONES, cloudmap, unix_now};

/// The gauge the load generator reads a change's apply time from (as cloudmap-xds exports it).
pub const UPDATED_GAUGE: &str = "cloudmap_xds_service_updated_timestamp_seconds";
/// Requests are ACKs of a few hundred bytes; the first carries the Node.
const REQUEST_BUFFER: usize = 1024;
const MAX_REQUEST: usize = 1024 * 1024;
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The types in the order a client walks them; indexes into the arrays below.
const TYPES: [&str; 4] = [LDS, RDS, CDS, EDS];
const EDS_INDEX: usize = 3;
/// EDS variants: one per zone of [`ZONES`], and one for clients without a known zone.
const VARIANTS: usize = ZONES.len() + 1;

/// What every stream is served after one change: each response encoded once,
/// as a whole gRPC message (5-byte prefix + protobuf).
#[derive(Debug)]
pub struct Snapshot {
    /// SotW responses for LDS, RDS, CDS (index 0..3); EDS per variant is in `eds`.
    sotw: [Bytes; 3],
    sotw_eds: [Bytes; VARIANTS],
    delta: [Bytes; 3],
    delta_eds: [Bytes; VARIANTS],
    /// Per type: the version the responses above carry (only EDS moves).
    versions: [u64; 4],
}

impl Snapshot {
    /// The resources of `name` served from these instances, encoded once;
    /// `change` is the EDS version (LDS, RDS, CDS stay at version 1).
    pub fn build(name: &str, instances: &[RawInstance], change: u64) -> Snapshot {
        let options = TranslateOptions {
            default_region: REGION.to_string(),
            weight_attribute: None,
            metadata_attributes: MetadataAttributes::from_names(&[MARKER_ATTRIBUTE]),
        };
        let service = translate::translate(instances, &options).endpoints;
        let fixed = [
            pack_any(resources::listener(name)),
            pack_any(resources::route_configuration(name, name)),
            pack_any(resources::cluster(name, ClientKind::Grpc, &Default::default())),
        ];
        let eds: [Any; VARIANTS] = std::array::from_fn(|v| pack_any(cla(name, &service, ZONES.get(v).copied())));
        let versions = [1, 1, 1, change + 1];
        Snapshot {
            sotw: std::array::from_fn(|t| sotw(TYPES[t], versions[t], &fixed[t])),
            sotw_eds: std::array::from_fn(|v| sotw(EDS, versions[EDS_INDEX], &eds[v])),
            delta: std::array::from_fn(|t| delta(TYPES[t], name, versions[t], &fixed[t])),
            delta_eds: std::array::from_fn(|v| delta(EDS, name, versions[EDS_INDEX], &eds[v])),
            versions,
        }
    }

    fn sotw_response(&self, ty: usize, variant: usize) -> Bytes {
        if ty == EDS_INDEX { self.sotw_eds[variant].clone() } else { self.sotw[ty].clone() }
    }

    fn delta_response(&self, ty: usize, variant: usize) -> Bytes {
        if ty == EDS_INDEX { self.delta_eds[variant].clone() } else { self.delta[ty].clone() }
    }
}

/// The zone-aware CLA cloudmap-xds builds for a gRPC client in `zone`, with
/// clients spread over the zones like the instances (the load generator's census).
fn cla(
    name: &str,
    service: &ServiceEndpoints,
    zone: Option<&str>,
) -> envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment {
    let capacity = service.capacity();
    let zone = zone.map(Zone::new);
    let plan = policy::plan(&policy::shares(Policy::ZoneAware, zone.as_ref(), &capacity, &capacity), &capacity);
    resources::cluster_load_assignment(name, service, &plan, ClientKind::Grpc, 0)
}

/// A whole gRPC message: the uncompressed flag, the length, the protobuf.
fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Encoding into a buffer of the exact size cannot fail.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

fn sotw(type_url: &str, version: u64, resource: &Any) -> Bytes {
    let version = version.to_string();
    frame(&DiscoveryResponse {
        version_info: version.clone(),
        resources: vec![resource.clone()],
        type_url: type_url.to_string(),
        nonce: version,
        ..Default::default()
    })
}

fn delta(type_url: &str, name: &str, version: u64, resource: &Any) -> Bytes {
    let version = version.to_string();
    frame(&DeltaDiscoveryResponse {
        system_version_info: version.clone(),
        resources: vec![Resource {
            name: name.to_string(),
            version: version.clone(),
            resource: Some(resource.clone()),
            ..Default::default()
        }],
        type_url: type_url.to_string(),
        nonce: version,
        ..Default::default()
    })
}

/// The instances `loadgen seed --instances N` registers, plus one per change made.
fn instances(endpoints: usize, changes: &BTreeSet<u64>) -> Vec<RawInstance> {
    let seeded = (0..endpoints).map(|i| cloudmap::instance(0, i));
    seeded
        .chain(changes.iter().map(|k| cloudmap::change_instance(*k)))
        .map(|(instance_id, attributes)| RawInstance { instance_id, health: Some("HEALTHY".into()), attributes })
        .collect()
}

/// The floor server's state: the published snapshot, and what makes the next one.
pub struct Floor {
    name: String,
    endpoints: usize,
    changes: Mutex<BTreeSet<u64>>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    updated_at: Mutex<f64>,
}

impl Floor {
    pub fn new(namespace: &str, service: &str, endpoints: usize) -> Arc<Floor> {
        let name = format!("{service}.{namespace}");
        let first = Snapshot::build(&name, &instances(endpoints, &BTreeSet::new()), 0);
        let (snapshots, _) = watch::channel(Arc::new(first));
        Arc::new(Floor {
            name,
            endpoints,
            changes: Mutex::new(BTreeSet::new()),
            snapshots,
            updated_at: Mutex::new(unix_now()),
        })
    }

    /// Registers change `k`'s instance and publishes the new snapshot to every stream.
    pub fn change(&self, k: u64) {
        let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        changes.insert(k);
        let snapshot = Snapshot::build(&self.name, &instances(self.endpoints, &changes), k);
        *self.updated_at.lock().unwrap_or_else(|e| e.into_inner()) = unix_now();
        self.snapshots.send_replace(Arc::new(snapshot));
    }

    pub fn metrics(&self) -> String {
        let at = *self.updated_at.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "# TYPE {UPDATED_GAUGE} gauge\n{UPDATED_GAUGE}{{service=\"{}\"}} {at:.6}\n# TYPE loadgen_floor_streams gauge\nloadgen_floor_streams {}\n",
            self.name,
            self.snapshots.receiver_count()
        )
    }

    /// The ADS service to add to a tonic server.
    pub fn ads(self: &Arc<Self>) -> FloorAds {
        FloorAds { floor: self.clone() }
    }
}

/// Serves ADS on `listen` and the admin endpoints on `admin` until either fails.
pub async fn serve(listen: SocketAddr, admin: SocketAddr, floor: Arc<Floor>) -> anyhow::Result<()> {
    let xds = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let admin_listener = tokio::net::TcpListener::bind(admin).await.with_context(|| format!("binding {admin}"))?;
    let ads = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(floor.ads())
        // TCP_NODELAY on every connection, as tonic's own `serve` sets by default.
        .serve_with_incoming(cloudmap_xds::connection_age::accepted(xds));
    let admin = axum::serve(admin_listener, admin_router(floor));
    tokio::select! {
        r = ads => r.context("the floor's ADS server failed"),
        r = admin => r.context("the floor's admin server failed"),
    }
}

#[derive(Debug, serde::Deserialize)]
struct ChangeQuery {
    k: u64,
}

fn admin_router(floor: Arc<Floor>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/ready", get(|| async { "ready\n" }))
        .route("/metrics", get(|State(f): State<Arc<Floor>>| async move { f.metrics() }))
        .route(
            "/change",
            post(|State(f): State<Arc<Floor>>, Query(q): Query<ChangeQuery>| async move {
                f.change(q.k);
                StatusCode::NO_CONTENT
            }),
        )
        .with_state(floor)
}

/// The hand-written ADS service: requests are decoded by tonic, responses are
/// bodies that yield shared frames.
#[derive(Clone)]
pub struct FloorAds {
    floor: Arc<Floor>,
}

impl tonic::server::NamedService for FloorAds {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for FloorAds {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let body = match request.uri().path() {
            SOTW_PATH => tonic::body::Body::new(AdsBody::<DiscoveryRequest>::new(request.into_body(), &self.floor)),
            DELTA_PATH => {
                tonic::body::Body::new(AdsBody::<DeltaDiscoveryRequest>::new(request.into_body(), &self.floor))
            }
            _ => {
                let status = Status::unimplemented("the floor serves ADS only");
                return std::future::ready(Ok(status.into_http()));
            }
        };
        let response = http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(body)
            .unwrap_or_else(|_| Status::internal("building the response").into_http());
        std::future::ready(Ok(response))
    }
}

/// Decodes requests into prost messages with a small buffer.
struct RequestDecoder<T>(std::marker::PhantomData<T>);

impl<T: Message + Default + Send + 'static> Decoder for RequestDecoder<T> {
    type Item = T;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<T>, Status> {
        T::decode(src).map(Some).map_err(|e| Status::invalid_argument(format!("decoding the request: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(REQUEST_BUFFER, 32 * 1024)
    }
}

/// What distinguishes SotW from Delta on the floor: how a request is read and
/// which pre-encoded response is sent.
trait Protocol: Message + Default + Send + Unpin + 'static {
    /// Updates the stream's subscriptions from one request; a Node, if any,
    /// sets the stream's EDS variant.
    fn apply(&self, name: &str, stream: &mut StreamState);
    fn response(snapshot: &Snapshot, ty: usize, variant: usize) -> Bytes;
}

fn type_index(type_url: &str) -> Option<usize> {
    TYPES.iter().position(|t| *t == type_url)
}

fn variant(zone: &str) -> usize {
    ZONES.iter().position(|z| *z == zone).unwrap_or(ZONES.len())
}

impl Protocol for DiscoveryRequest {
    fn apply(&self, name: &str, stream: &mut StreamState) {
        if let Some(zone) = self.node.as_ref().and_then(|n| n.locality.as_ref()) {
            stream.variant = variant(&zone.zone);
        }
        let Some(ty) = type_index(&self.type_url) else { return };
        // An ACK names the same resource; a request naming nothing we serve unsubscribes.
        stream.subscribed[ty] = self.resource_names.iter().any(|n| n == name);
        if !stream.subscribed[ty] {
            stream.sent[ty] = None;
        }
    }

    fn response(snapshot: &Snapshot, ty: usize, variant: usize) -> Bytes {
        snapshot.sotw_response(ty, variant)
    }
}

impl Protocol for DeltaDiscoveryRequest {
    fn apply(&self, name: &str, stream: &mut StreamState) {
        if let Some(zone) = self.node.as_ref().and_then(|n| n.locality.as_ref()) {
            stream.variant = variant(&zone.zone);
        }
        let Some(ty) = type_index(&self.type_url) else { return };
        if self.resource_names_subscribe.iter().any(|n| n == name || n == "*") {
            stream.subscribed[ty] = true;
        }
        if self.resource_names_unsubscribe.iter().any(|n| n == name) {
            stream.subscribed[ty] = false;
            stream.sent[ty] = None;
        }
    }

    fn response(snapshot: &Snapshot, ty: usize, variant: usize) -> Bytes {
        snapshot.delta_response(ty, variant)
    }
}

/// Per stream, all the floor keeps.
#[derive(Debug, Default)]
struct StreamState {
    variant: usize,
    subscribed: [bool; 4],
    /// Per type, the version last sent.
    sent: [Option<u64>; 4],
}

impl StreamState {
    /// The next type owed to the stream in `current` (subscribed, not yet sent
    /// in this version), marked as sent.
    fn owed(&mut self, current: &Snapshot) -> Option<usize> {
        let ty = (0..TYPES.len()).find(|&t| self.subscribed[t] && self.sent[t] != Some(current.versions[t]))?;
        self.sent[ty] = Some(current.versions[ty]);
        Some(ty)
    }
}

/// One ADS stream as an HTTP body: polls the requests and the snapshot watch,
/// and yields the shared frame of each type the stream subscribed to and was
/// not yet sent in the current version.
struct AdsBody<P: Protocol> {
    requests: Streaming<P>,
    snapshots: WatchStream<Arc<Snapshot>>,
    current: Arc<Snapshot>,
    floor: Arc<Floor>,
    state: StreamState,
    /// The trailers went out: the body is finished.
    done: bool,
}

impl<P: Protocol> AdsBody<P> {
    fn new(body: tonic::body::Body, floor: &Arc<Floor>) -> Self {
        let receiver = floor.snapshots.subscribe();
        let current = receiver.borrow().clone();
        AdsBody {
            requests: Streaming::new_request(
                RequestDecoder::<P>(std::marker::PhantomData),
                body,
                None,
                Some(MAX_REQUEST),
            ),
            snapshots: WatchStream::from_changes(receiver),
            current,
            floor: floor.clone(),
            state: StreamState { variant: ZONES.len(), ..Default::default() },
            done: false,
        }
    }

    /// The next frame owed to the stream in the current snapshot, if any.
    fn owed(&mut self) -> Option<Bytes> {
        let ty = self.state.owed(&self.current)?;
        Some(P::response(&self.current, ty, self.state.variant))
    }

    fn trailers(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
        if !status.message().is_empty()
            && let Ok(message) = http::HeaderValue::from_str(status.message())
        {
            trailers.insert("grpc-message", message);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl<P: Protocol> http_body::Body for AdsBody<P> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(bytes) = this.owed() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            // Requests first, so an ACK and the next subscription are seen before a push.
            match Pin::new(&mut this.requests).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => {
                    request.apply(&this.floor.name, &mut this.state);
                    continue;
                }
                Poll::Ready(Some(Err(status))) => return this.trailers(status),
                Poll::Ready(None) => return this.trailers(Status::ok("")),
                Poll::Pending => {}
            }
            match Pin::new(&mut this.snapshots).poll_next(cx) {
                Poll::Ready(Some(snapshot)) => this.current = snapshot,
                Poll::Ready(None) => return this.trailers(Status::unavailable("the floor is shutting down")),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    fn decode<M: Message + Default>(frame: &Bytes) -> M {
        assert_eq!(frame[0], 0, "uncompressed");
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len, frame.len() - 5, "the prefix holds the length");
        M::decode(&frame[5..]).expect("decodes")
    }

    #[test]
    fn snapshots_hold_the_control_planes_shapes_with_the_change_marker() {
        let floor = Floor::new("loadgen", "bench", 30);
        floor.change(1);
        floor.change(2);
        let snapshot = floor.snapshots.borrow().clone();
        for (t, ty) in TYPES.iter().enumerate().take(3) {
            let r: DiscoveryResponse = decode(&snapshot.sotw[t]);
            assert_eq!((r.type_url.as_str(), r.version_info.as_str(), r.nonce.as_str()), (*ty, "1", "1"));
        }
        for v in 0..VARIANTS {
            let r: DiscoveryResponse = decode(&snapshot.sotw_eds[v]);
            assert_eq!((r.type_url.as_str(), r.version_info.as_str()), (EDS, "3"));
            assert_eq!(client::marker(&r.resources[0].value).expect("marker"), 2);
            let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).expect("CLA");
            let endpoints: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            assert_eq!(endpoints, 32, "30 seeded + one per change, as in moto");
            let d: DeltaDiscoveryResponse = decode(&snapshot.delta_eds[v]);
            assert_eq!((d.resources[0].name.as_str(), d.nonce.as_str()), ("bench.loadgen", "3"));
        }
        // Zone variants differ (the client's own zone comes first); all share one marker.
        let first = |v: usize| -> ClusterLoadAssignment {
            let r: DiscoveryResponse = decode(&snapshot.sotw_eds[v]);
            ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).expect("CLA")
        };
        let zone_of_priority_0 =
            |v: usize| first(v).endpoints.iter().find(|l| l.priority == 0).and_then(|l| l.locality.clone());
        assert_eq!(zone_of_priority_0(1).map(|l| l.zone).as_deref(), Some(ZONES[1]));
        assert!(floor.metrics().contains("cloudmap_xds_service_updated_timestamp_seconds{service=\"bench.loadgen\"}"));
    }

    #[test]
    fn a_stream_is_owed_each_subscribed_type_once_per_version() {
        let floor = Floor::new("loadgen", "bench", 3);
        let mut state = StreamState { variant: ZONES.len(), ..Default::default() };
        let subscribe = |ty: &str| DiscoveryRequest {
            type_url: ty.into(),
            resource_names: vec!["bench.loadgen".into()],
            ..Default::default()
        };
        subscribe(LDS).apply("bench.loadgen", &mut state);
        subscribe(EDS).apply("bench.loadgen", &mut state);
        DiscoveryRequest { type_url: CDS.into(), resource_names: vec!["other".into()], ..Default::default() }
            .apply("bench.loadgen", &mut state);
        assert_eq!(state.subscribed, [true, false, false, true]);
        let current = floor.snapshots.borrow().clone();
        assert_eq!((state.owed(&current), state.owed(&current)), (Some(0), Some(3)));
        assert_eq!(state.owed(&current), None, "an ACK is not answered");
        floor.change(1);
        let current = floor.snapshots.borrow().clone();
        assert_eq!((state.owed(&current), state.owed(&current)), (Some(3), None), "only EDS moved");
    }
}
