//! One simulated proxyless gRPC client on one ADS stream.
//!
//! It subscribes the way gRPC's xDS client does for `xds:///SERVICE`: LDS for
//! the target, then the RDS name the listener names, the cluster the route
//! names, and the EDS name the cluster names — one type at a time, each
//! learned from the previous response. Every response is ACKed. The Node
//! (id, zone, user agent `gRPC loadgen`) goes on the first request only, as
//! gRPC sends it. SotW and Delta differ only in how requests are framed.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::{Any, value};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::tracker::Tracker;
use crate::{REGION, unix_now};

pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The instance attribute that carries a change's marker.
pub const MARKER_ATTRIBUTE: &str = "LOADGEN_CHANGE";
/// The endpoint metadata key the control plane publishes attributes under.
const METADATA_KEY: &str = "cloudmap";
/// Large CLAs (1,000 endpoints with attributes) exceed tonic's 4 MiB default only
/// far beyond what Cloud Map allows, but do not let that be the failure.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

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

/// What a response of `type_url` tells the client to subscribe to next.
fn next(type_url: &str, resource: &Any) -> anyhow::Result<Option<(&'static str, String)>> {
    Ok(Some(match type_url {
        LDS => {
            let listener = Listener::decode(resource.value.as_slice()).context("decoding Listener")?;
            let api = listener.api_listener.and_then(|a| a.api_listener).ok_or_else(|| anyhow!("no api_listener"))?;
            let manager = HttpConnectionManager::decode(api.value.as_slice()).context("decoding HCM")?;
            match manager.route_specifier {
                Some(http_connection_manager::RouteSpecifier::Rds(rds)) => (RDS, rds.route_config_name),
                _ => bail!("listener {} does not use RDS", listener.name),
            }
        }
        RDS => {
            let routes =
                RouteConfiguration::decode(resource.value.as_slice()).context("decoding RouteConfiguration")?;
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
            (CDS, cluster)
        }
        CDS => {
            let cluster = Cluster::decode(resource.value.as_slice()).context("decoding Cluster")?;
            let eds = cluster.eds_cluster_config.map(|e| e.service_name).filter(|n| !n.is_empty());
            (EDS, eds.unwrap_or(cluster.name))
        }
        _ => return Ok(None),
    }))
}

/// The change marker of an EDS resource: the largest `LOADGEN_CHANGE` among its
/// endpoints, 0 when none carries one.
pub fn marker(resource: &Any) -> anyhow::Result<u64> {
    let cla = ClusterLoadAssignment::decode(resource.value.as_slice()).context("decoding ClusterLoadAssignment")?;
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

fn missing(type_url: &str, name: &str) -> anyhow::Error {
    anyhow!("the {type_url} response does not hold {name:?}: is the service served?")
}

async fn sotw(channel: Channel, spec: &ClientSpec, tracker: &Tracker) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(8);
    let first = DiscoveryRequest {
        node: Some(spec.node()),
        type_url: LDS.to_string(),
        resource_names: vec![spec.target.clone()],
        ..Default::default()
    };
    tx.send(first).await.context("request channel closed")?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let mut inbound = ads.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let mut names: HashMap<&'static str, String> = HashMap::from([(LDS, spec.target.clone())]);
    while let Some(response) = inbound.message().await? {
        let received = unix_now();
        let ty = names
            .keys()
            .copied()
            .find(|t| *t == response.type_url)
            .ok_or_else(|| anyhow!("response of type {} that was never subscribed", response.type_url))?;
        let name = names.get(ty).cloned().unwrap_or_default();
        let resource = response.resources.first().ok_or_else(|| missing(ty, &name))?;
        if ty == EDS {
            tracker.eds(spec.index, &response.version_info, received, || marker(resource))?;
        }
        let follow = next(ty, resource)?;
        let ack = DiscoveryRequest {
            type_url: ty.to_string(),
            version_info: response.version_info,
            response_nonce: response.nonce,
            resource_names: vec![name],
            ..Default::default()
        };
        tx.send(ack).await.context("request channel closed")?;
        if let Some((ty, name)) = follow
            && names.get(ty) != Some(&name)
        {
            names.insert(ty, name.clone());
            let subscribe =
                DiscoveryRequest { type_url: ty.to_string(), resource_names: vec![name], ..Default::default() };
            tx.send(subscribe).await.context("request channel closed")?;
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
    tx.send(first).await.context("request channel closed")?;
    let mut ads = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let mut inbound = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let mut names: HashMap<&'static str, String> = HashMap::from([(LDS, spec.target.clone())]);
    while let Some(response) = inbound.message().await? {
        let received = unix_now();
        let ty = names
            .keys()
            .copied()
            .find(|t| *t == response.type_url)
            .ok_or_else(|| anyhow!("response of type {} that was never subscribed", response.type_url))?;
        let name = names.get(ty).cloned().unwrap_or_default();
        if response.removed_resources.contains(&name) {
            return Err(missing(ty, &name));
        }
        let mut follow = None;
        if let Some(resource) = response.resources.iter().find(|r| r.name == name) {
            let any = resource.resource.as_ref().ok_or_else(|| missing(ty, &name))?;
            if ty == EDS {
                tracker.eds(spec.index, &resource.version, received, || marker(any))?;
            }
            follow = next(ty, any)?;
        }
        let ack =
            DeltaDiscoveryRequest { type_url: ty.to_string(), response_nonce: response.nonce, ..Default::default() };
        tx.send(ack).await.context("request channel closed")?;
        if let Some((ty, name)) = follow
            && names.get(ty) != Some(&name)
        {
            let unsubscribe = names.insert(ty, name.clone()).into_iter().collect();
            let subscribe = DeltaDiscoveryRequest {
                type_url: ty.to_string(),
                resource_names_subscribe: vec![name],
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            };
            tx.send(subscribe).await.context("request channel closed")?;
        }
    }
    bail!("the control plane ended the stream")
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
        let (ty, rds) = next(LDS, &pack_any(resources::listener(name))).expect("ok").expect("follows");
        assert_eq!((ty, rds.as_str()), (RDS, name));
        let (ty, cluster) =
            next(RDS, &pack_any(resources::route_configuration(name, name))).expect("ok").expect("follows");
        assert_eq!((ty, cluster.as_str()), (CDS, name));
        let (ty, eds) = next(CDS, &pack_any(resources::cluster(name, ClientKind::Grpc, &Default::default())))
            .expect("ok")
            .expect("follows");
        assert_eq!((ty, eds.as_str()), (EDS, name));
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
        assert_eq!(marker(&pack_any(cla)).expect("decodes"), 12);
        let none = resources::cluster_load_assignment("x", &ServiceEndpoints::default(), &plan, ClientKind::Grpc, 0);
        assert_eq!(marker(&pack_any(none)).expect("decodes"), 0);
    }
}
