//! One simulated proxyless gRPC client on one ADS stream.
//!
//! It subscribes the way gRPC's xDS client does for `xds:///SERVICE`: LDS for
//! the target, then the RDS name the listener names, the cluster the route
//! names, and the EDS name the cluster names — one type at a time, each
//! learned from the previous response. Every response is ACKed. The Node
//! (id, zone, user agent `gRPC loadgen`) goes on the first request only, as
//! gRPC sends it. SotW and Delta differ only in how requests are framed.
//!
//! The client is lean so that a run measures the control plane, not the load
//! generator: responses are decoded into [`wire`] messages whose fields are
//! slices of tonic's receive buffer (no copy of the resource, no `String`s),
//! a resource is parsed only to learn the next name (LDS, RDS, CDS, once) or
//! a version's change marker (EDS, once per version, see `tracker`), and an
//! ACK is encoded straight from those slices into tonic's send buffer.

use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::value;
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::tracker::Tracker;
use crate::{REGION, unix_now};

pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// The types in the order a client walks them.
const TYPES: [&str; 4] = [LDS, RDS, CDS, EDS];
const EDS_INDEX: usize = 3;

/// The instance attribute that carries a change's marker.
pub const MARKER_ATTRIBUTE: &str = "LOADGEN_CHANGE";
/// The endpoint metadata key the control plane publishes attributes under.
const METADATA_KEY: &str = "cloudmap";
/// Large CLAs (1,000 endpoints with attributes) exceed tonic's 4 MiB default only
/// far beyond what Cloud Map allows, but do not let that be the failure.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Who one simulated client is.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub index: usize,
    pub zone: &'static str,
    /// The listener name gRPC asks for when dialing `xds:///TARGET`.
    pub target: String,
    pub delta: bool,
}

impl ClientSpec {
    fn node(&self) -> Node {
        Node {
            id: format!("loadgen-{}", self.index),
            cluster: "loadgen".to_string(),
            user_agent_name: "gRPC loadgen".to_string(),
            locality: Some(Locality { region: REGION.to_string(), zone: self.zone.to_string(), ..Default::default() }),
            ..Default::default()
        }
    }
}

/// Runs the client until its stream ends; failures are recorded in the tracker.
pub async fn run(channel: Channel, spec: ClientSpec, tracker: Arc<Tracker>) {
    let result = if spec.delta { delta(channel, &spec, &tracker).await } else { sotw(channel, &spec, &tracker).await };
    if let Err(e) = result {
        tracker.fail(spec.index, &e);
    }
}

/// What a resource of type `ty` (an index of [`TYPES`]) tells the client to
/// subscribe to next: the type's index and the name.
fn next(ty: usize, resource: &[u8]) -> anyhow::Result<Option<(usize, String)>> {
    Ok(Some(match ty {
        0 => {
            let listener = Listener::decode(resource).context("decoding Listener")?;
            let api = listener.api_listener.and_then(|a| a.api_listener).ok_or_else(|| anyhow!("no api_listener"))?;
            let manager = HttpConnectionManager::decode(api.value.as_slice()).context("decoding HCM")?;
            match manager.route_specifier {
                Some(http_connection_manager::RouteSpecifier::Rds(rds)) => (1, rds.route_config_name),
                _ => bail!("listener {} does not use RDS", listener.name),
            }
        }
        1 => {
            let routes = RouteConfiguration::decode(resource).context("decoding RouteConfiguration")?;
            let cluster = routes
                .virtual_hosts
                .iter()
                .flat_map(|vh| &vh.routes)
                .find_map(|r| match &r.action {
                    Some(route::Action::Route(action)) => match &action.cluster_specifier {
                        Some(route_action::ClusterSpecifier::Cluster(c)) => Some(c.clone()),
                        _ => None,
                    },
                    _ => None,
                })
                .ok_or_else(|| anyhow!("route configuration {} names no cluster", routes.name))?;
            (2, cluster)
        }
        2 => {
            let cluster = Cluster::decode(resource).context("decoding Cluster")?;
            let eds = cluster.eds_cluster_config.map(|e| e.service_name).filter(|n| !n.is_empty());
            (EDS_INDEX, eds.unwrap_or(cluster.name))
        }
        _ => return Ok(None),
    }))
}

/// The change marker of an EDS resource (the encoded ClusterLoadAssignment):
/// the largest `LOADGEN_CHANGE` among its endpoints, 0 when none carries one.
pub fn marker(resource: &[u8]) -> anyhow::Result<u64> {
    let cla = ClusterLoadAssignment::decode(resource).context("decoding ClusterLoadAssignment")?;
    let mut newest = 0;
    for lb in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
        let field = lb
            .metadata
            .as_ref()
            .and_then(|m| m.filter_metadata.get(METADATA_KEY))
            .and_then(|s| s.fields.get(MARKER_ATTRIBUTE))
            .and_then(|v| v.kind.as_ref());
        if let Some(value::Kind::StringValue(text)) = field {
            newest = newest.max(text.parse::<u64>().with_context(|| format!("{MARKER_ATTRIBUTE}={text:?}"))?);
        }
    }
    Ok(newest)
}

fn missing(ty: usize, name: &[u8]) -> anyhow::Error {
    let name = String::from_utf8_lossy(name);
    anyhow!("the {} response does not hold {name:?}: is the service served?", TYPES[ty])
}

/// The index of a response's type among the types this client subscribed to.
fn subscribed(names: &[Option<Bytes>; 4], type_url: &[u8]) -> anyhow::Result<usize> {
    TYPES
        .iter()
        .position(|t| t.as_bytes() == type_url)
        .filter(|&t| names[t].is_some())
        .ok_or_else(|| anyhow!("response of type {} that was never subscribed", String::from_utf8_lossy(type_url)))
}

async fn sotw(channel: Channel, spec: &ClientSpec, tracker: &Tracker) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(8);
    let first = DiscoveryRequest {
        node: Some(spec.node()),
        type_url: LDS.to_string(),
        resource_names: vec![spec.target.clone()],
        ..Default::default()
    };
    tx.send(wire::Request::Sotw(first)).await.context("request channel closed")?;
    let mut inbound = wire::open::<wire::SotwResponse>(channel, SOTW_PATH, rx).await?;
    let mut names: [Option<Bytes>; 4] = [Some(Bytes::from(spec.target.clone())), None, None, None];
    while let Some(response) = inbound.message().await? {
        let received = unix_now();
        tracker.response();
        let ty = subscribed(&names, &response.type_url)?;
        let name = names[ty].clone().unwrap_or_default();
        let resource = response.resources.first().ok_or_else(|| missing(ty, &name))?;
        if ty == EDS_INDEX {
            tracker.eds(spec.index, &response.version_info, received, || marker(&resource.value))?;
        }
        let follow = next(ty, &resource.value)?;
        let ack =
            wire::Request::SotwAck { type_url: TYPES[ty], name, version: response.version_info, nonce: response.nonce };
        tx.send(ack).await.context("request channel closed")?;
        if let Some((ty, name)) = follow
            && names[ty].as_deref() != Some(name.as_bytes())
        {
            names[ty] = Some(Bytes::from(name.clone()));
            let subscribe =
                DiscoveryRequest { type_url: TYPES[ty].to_string(), resource_names: vec![name], ..Default::default() };
            tx.send(wire::Request::Sotw(subscribe)).await.context("request channel closed")?;
        }
    }
    bail!("the control plane ended the stream")
}

async fn delta(channel: Channel, spec: &ClientSpec, tracker: &Tracker) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(8);
    let first = DeltaDiscoveryRequest {
        node: Some(spec.node()),
        type_url: LDS.to_string(),
        resource_names_subscribe: vec![spec.target.clone()],
        ..Default::default()
    };
    tx.send(wire::Request::Delta(first)).await.context("request channel closed")?;
    let mut inbound = wire::open::<wire::DeltaResponse>(channel, DELTA_PATH, rx).await?;
    let mut names: [Option<Bytes>; 4] = [Some(Bytes::from(spec.target.clone())), None, None, None];
    while let Some(response) = inbound.message().await? {
        let received = unix_now();
        tracker.response();
        let ty = subscribed(&names, &response.type_url)?;
        let name = names[ty].clone().unwrap_or_default();
        if response.removed_resources.contains(&name) {
            return Err(missing(ty, &name));
        }
        let mut follow = None;
        if let Some(resource) = response.resources.iter().find(|r| r.name == name) {
            let any = resource.resource.as_ref().ok_or_else(|| missing(ty, &name))?;
            if ty == EDS_INDEX {
                tracker.eds(spec.index, &resource.version, received, || marker(&any.value))?;
            }
            follow = next(ty, &any.value)?;
        }
        tx.send(wire::Request::DeltaAck { type_url: TYPES[ty], nonce: response.nonce })
            .await
            .context("request channel closed")?;
        if let Some((ty, name)) = follow
            && names[ty].as_deref() != Some(name.as_bytes())
        {
            let unsubscribe =
                names[ty].replace(Bytes::from(name.clone())).map(|n| String::from_utf8_lossy(&n).into_owned());
            let unsubscribe = unsubscribe.into_iter().collect();
            let subscribe = DeltaDiscoveryRequest {
                type_url: TYPES[ty].to_string(),
                resource_names_subscribe: vec![name],
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            };
            tx.send(wire::Request::Delta(subscribe)).await.context("request channel closed")?;
        }
    }
    bail!("the control plane ended the stream")
}

/// The client's side of the ADS wire: responses decoded as slices of the
/// receive buffer, requests (ACKs above all) encoded without building a
/// prost message. Field numbers are those of `envoy.service.discovery.v3`.
pub mod wire {
    use std::marker::PhantomData;

    use bytes::{BufMut, Bytes};
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use prost::Message;
    use prost::encoding;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Status;
    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
    use tonic::transport::Channel;

    use super::{MAX_MESSAGE, PathAndQuery};

    /// `google.protobuf.Any`, its value left encoded.
    #[derive(Clone, PartialEq, Message)]
    pub struct RawAny {
        #[prost(bytes = "bytes", tag = "2")]
        pub value: Bytes,
    }

    /// `DiscoveryResponse`: the fields a client reads (strings as bytes: not validated, not copied).
    #[derive(Clone, PartialEq, Message)]
    pub struct SotwResponse {
        #[prost(bytes = "bytes", tag = "1")]
        pub version_info: Bytes,
        #[prost(message, repeated, tag = "2")]
        pub resources: Vec<RawAny>,
        #[prost(bytes = "bytes", tag = "4")]
        pub type_url: Bytes,
        #[prost(bytes = "bytes", tag = "5")]
        pub nonce: Bytes,
    }

    /// `Resource` of a Delta response.
    #[derive(Clone, PartialEq, Message)]
    pub struct RawResource {
        #[prost(bytes = "bytes", tag = "1")]
        pub version: Bytes,
        #[prost(message, optional, tag = "2")]
        pub resource: Option<RawAny>,
        #[prost(bytes = "bytes", tag = "3")]
        pub name: Bytes,
    }

    /// `DeltaDiscoveryResponse`: the fields a client reads.
    #[derive(Clone, PartialEq, Message)]
    pub struct DeltaResponse {
        #[prost(message, repeated, tag = "2")]
        pub resources: Vec<RawResource>,
        #[prost(bytes = "bytes", tag = "4")]
        pub type_url: Bytes,
        #[prost(bytes = "bytes", tag = "5")]
        pub nonce: Bytes,
        #[prost(bytes = "bytes", repeated, tag = "6")]
        pub removed_resources: Vec<Bytes>,
    }

    /// What a client sends: full requests (the first, and subscriptions) and ACKs.
    #[derive(Debug)]
    pub enum Request {
        Sotw(DiscoveryRequest),
        Delta(DeltaDiscoveryRequest),
        /// A SotW ACK: the version and nonce are slices of the response being ACKed.
        SotwAck {
            type_url: &'static str,
            name: Bytes,
            version: Bytes,
            nonce: Bytes,
        },
        DeltaAck {
            type_url: &'static str,
            nonce: Bytes,
        },
    }

    impl Request {
        /// Encodes the request as the protobuf the server decodes.
        pub fn encode(&self, buf: &mut impl BufMut) {
            // Encoding into tonic's growable buffer cannot run out of space.
            match self {
                Request::Sotw(r) => {
                    let _ = r.encode(buf);
                }
                Request::Delta(r) => {
                    let _ = r.encode(buf);
                }
                Request::SotwAck { type_url, name, version, nonce } => {
                    field(1, version, buf);
                    field(3, name, buf);
                    field(4, type_url.as_bytes(), buf);
                    field(5, nonce, buf);
                }
                Request::DeltaAck { type_url, nonce } => {
                    field(2, type_url.as_bytes(), buf);
                    field(6, nonce, buf);
                }
            }
        }
    }

    /// A length-delimited field (string or bytes), left out when empty as proto3 does.
    fn field(tag: u32, value: &[u8], buf: &mut impl BufMut) {
        if !value.is_empty() {
            encoding::encode_key(tag, encoding::WireType::LengthDelimited, buf);
            encoding::encode_varint(value.len() as u64, buf);
            buf.put_slice(value);
        }
    }

    /// Requests out, `R` in; small buffers (ACKs are a few hundred bytes).
    pub struct AdsCodec<R>(PhantomData<R>);

    impl<R> Default for AdsCodec<R> {
        fn default() -> Self {
            AdsCodec(PhantomData)
        }
    }

    impl<R: Message + Default + Send + 'static> Codec for AdsCodec<R> {
        type Encode = Request;
        type Decode = R;
        type Encoder = RequestEncoder;
        type Decoder = ResponseDecoder<R>;

        fn encoder(&mut self) -> RequestEncoder {
            RequestEncoder
        }

        fn decoder(&mut self) -> ResponseDecoder<R> {
            ResponseDecoder(PhantomData)
        }
    }

    pub struct RequestEncoder;

    impl Encoder for RequestEncoder {
        type Item = Request;
        type Error = Status;

        fn encode(&mut self, item: Request, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            item.encode(dst);
            Ok(())
        }

        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::new(1024, 32 * 1024)
        }
    }

    pub struct ResponseDecoder<R>(PhantomData<R>);

    impl<R: Message + Default + Send + 'static> Decoder for ResponseDecoder<R> {
        type Item = R;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
            R::decode(src).map(Some).map_err(|e| Status::internal(format!("decoding the response: {e}")))
        }

        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::new(4096, 32 * 1024)
        }
    }

    /// Opens the ADS stream at `path` on `channel`, sending what `requests` yields.
    pub async fn open<R: Message + Default + Send + 'static>(
        channel: Channel,
        path: &'static str,
        requests: mpsc::Receiver<Request>,
    ) -> Result<Streaming<R>, Status> {
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
        grpc.ready().await.map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
        let request = tonic::Request::new(ReceiverStream::new(requests));
        let response = grpc.streaming(request, PathAndQuery::from_static(path), AdsCodec::<R>::default()).await?;
        Ok(response.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudmap_xds::model::{ClientKind, Endpoint, Health, ServiceEndpoints, Zone};
    use cloudmap_xds::policy::{self, Policy};
    use cloudmap_xds::resources;
    use envoy_types::util::pack_any;

    #[test]
    fn walks_the_control_planes_own_resources() {
        let name = "bench.loadgen";
        let (ty, rds) = next(0, &pack_any(resources::listener(name)).value).expect("ok").expect("follows");
        assert_eq!((TYPES[ty], rds.as_str()), (RDS, name));
        let (ty, cluster) =
            next(1, &pack_any(resources::route_configuration(name, name)).value).expect("ok").expect("follows");
        assert_eq!((TYPES[ty], cluster.as_str()), (CDS, name));
        let (ty, eds) = next(2, &pack_any(resources::cluster(name, ClientKind::Grpc, &Default::default())).value)
            .expect("ok")
            .expect("follows");
        assert_eq!((TYPES[ty], eds.as_str()), (EDS, name));
    }

    #[test]
    fn acks_decode_as_the_envoy_requests() {
        let mut buf = Vec::new();
        wire::Request::SotwAck {
            type_url: EDS,
            name: Bytes::from_static(b"bench.loadgen"),
            version: Bytes::from_static(b"v7"),
            nonce: Bytes::from_static(b"n7"),
        }
        .encode(&mut buf);
        let ack = DiscoveryRequest::decode(buf.as_slice()).expect("decodes");
        let expected = DiscoveryRequest {
            version_info: "v7".into(),
            resource_names: vec!["bench.loadgen".into()],
            type_url: EDS.into(),
            response_nonce: "n7".into(),
            ..Default::default()
        };
        assert_eq!(ack, expected);
        let mut buf = Vec::new();
        wire::Request::DeltaAck { type_url: CDS, nonce: Bytes::from_static(b"n3") }.encode(&mut buf);
        let ack = DeltaDiscoveryRequest::decode(buf.as_slice()).expect("decodes");
        let expected =
            DeltaDiscoveryRequest { type_url: CDS.into(), response_nonce: "n3".into(), ..Default::default() };
        assert_eq!(ack, expected);
    }

    #[test]
    fn responses_decode_as_slices_of_the_envoy_responses() {
        use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource};
        let any = pack_any(resources::listener("bench.loadgen"));
        let full = DiscoveryResponse {
            version_info: "3".into(),
            resources: vec![any.clone()],
            type_url: LDS.into(),
            nonce: "n".into(),
            canary: true,
            ..Default::default()
        };
        let lean = wire::SotwResponse::decode(full.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(
            (&lean.version_info[..], &lean.type_url[..], &lean.nonce[..]),
            (&b"3"[..], LDS.as_bytes(), &b"n"[..])
        );
        assert_eq!(lean.resources[0].value, any.value);
        let full = DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "bench.loadgen".into(),
                version: "9".into(),
                resource: Some(any.clone()),
                ..Default::default()
            }],
            type_url: LDS.into(),
            nonce: "d".into(),
            removed_resources: vec!["gone".into()],
            ..Default::default()
        };
        let lean = wire::DeltaResponse::decode(full.encode_to_vec().as_slice()).expect("decodes");
        let resource = &lean.resources[0];
        assert_eq!((&resource.name[..], &resource.version[..]), (&b"bench.loadgen"[..], &b"9"[..]));
        assert_eq!(resource.resource.as_ref().map(|a| &a.value), Some(&Bytes::from(any.value)));
        assert_eq!((&lean.nonce[..], lean.removed_resources.len()), (&b"d"[..], 1));
    }

    #[test]
    fn marker_is_the_largest_change_attribute() {
        let endpoint = |i: u8, change: Option<&str>| Endpoint {
            instance_id: format!("i-{i}"),
            ip: std::net::IpAddr::from([10, 0, 0, i]),
            port: 50051,
            zone: Zone::new("us-east-1a"),
            region: REGION.into(),
            health: Health::Healthy,
            weight: 1,
            attributes: Default::default(),
            metadata: change.map(|c| (MARKER_ATTRIBUTE.to_string(), c.to_string())).into_iter().collect(),
        };
        let service =
            ServiceEndpoints::new(vec![endpoint(1, Some("3")), endpoint(2, Some("12")), endpoint(3, None)], false);
        let capacity = service.capacity();
        let plan = policy::plan(&policy::shares(Policy::ZoneAware, None, &capacity, &capacity), &capacity);
        let cla = resources::cluster_load_assignment("x", &service, &plan, ClientKind::Grpc, 0);
        assert_eq!(marker(&pack_any(cla).value).expect("decodes"), 12);
        let none = resources::cluster_load_assignment("x", &ServiceEndpoints::default(), &plan, ClientKind::Grpc, 0);
        assert_eq!(marker(&pack_any(none).value).expect("decodes"), 0);
    }
}
