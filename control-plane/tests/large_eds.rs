//! No response a client must refuse: one SotW client subscribed to 16
//! services of 1,000 instances, each instance with 30 attributes all
//! published as metadata (the worst an operator can configure), through the
//! real `AdsServer` to a tonic ADS client at tonic's default 4 MiB decoding
//! limit — the client grpc-go and tonic users have. A single response holding
//! every subscribed resource would be ~25 MiB; EDS is sent one resource per
//! response instead. A 17th service whose metadata alone would exceed the
//! limit is published without metadata rather than refused.

use std::sync::Arc;
use std::time::Duration;

use cloudmap_xds::builder::Builder;
use cloudmap_xds::model::ServiceName;
use cloudmap_xds::policy::Policy;
use cloudmap_xds::resources::{METADATA_KEY, ResourceType};
use cloudmap_xds::server::registry::Registry;
use cloudmap_xds::server::{AdsServer, Limits};
use cloudmap_xds::translate::{self, MetadataAttributes, RawInstance, TranslateOptions};
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use prost::Message;

const SERVICES: usize = 16;
const INSTANCES: usize = 1_000;
/// tonic's (and grpc-go's) default limit on a received message.
const CLIENT_LIMIT: usize = 4 * 1024 * 1024;
const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

/// An ECS task's registration: the 8 attributes ECS writes, and 22 custom
/// ones, 30 in all (Cloud Map's limit), with values of `value_len` characters.
fn instance(service: usize, i: usize, value_len: usize) -> RawInstance {
    let mut attributes: std::collections::BTreeMap<String, String> = [
        ("AWS_INSTANCE_IPV4", format!("10.{service}.{}.{}", i / 250, i % 250 + 1)),
        ("AWS_INSTANCE_PORT", "50051".to_string()),
        ("AVAILABILITY_ZONE", ZONES[i % 3].to_string()),
        ("REGION", "us-east-1".to_string()),
        ("ECS_CLUSTER_NAME", "production-cluster".to_string()),
        ("ECS_SERVICE_NAME", format!("service-{service}")),
        ("ECS_TASK_DEFINITION_FAMILY", format!("service-{service}-task")),
        ("AWS_INIT_HEALTH_STATUS", "HEALTHY".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for n in 0..22 {
        attributes.insert(format!("team_label_{n:02}"), format!("{i:06}-{}", "x".repeat(value_len - 7)));
    }
    RawInstance { instance_id: format!("task-{service}-{i:05}"), health: Some("HEALTHY".into()), attributes }
}

fn eds_request(names: &[String], version: &str, nonce: &str, node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ResourceType::ClusterLoadAssignment.type_url().into(),
        resource_names: names.to_vec(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        node,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_big_services_reach_a_client_with_the_default_4_mib_limit() {
    let mut builder = Builder::default();
    let options = TranslateOptions {
        default_region: "us-east-1".into(),
        weight_attribute: None,
        metadata_attributes: MetadataAttributes::All,
    };
    let mut names = Vec::new();
    for s in 0..=SERVICES {
        // Service 16 is the one whose metadata alone would be over the limit.
        let value_len = if s == SERVICES { 300 } else { 24 };
        let instances: Vec<RawInstance> = (0..INSTANCES).map(|i| instance(s, i, value_len)).collect();
        let translation = translate::translate(&instances, &options);
        assert_eq!(translation.endpoints.endpoints.len(), INSTANCES);
        assert_eq!(translation.metadata_dropped.is_some(), s == SERVICES, "service {s}");
        let name = ServiceName::new("prod", format!("svc{s:02}"));
        builder.update_service(&name, translation.endpoints, Policy::ZoneAware);
        names.push(name.dial_name());
    }
    builder.set_ready();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let ads = AdsServer::new(
        builder.cache().clone(),
        builder.census().clone(),
        Arc::new(Registry::new(10)),
        Limits::default(),
    );
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // tonic's defaults: 4 MiB max decoding size.
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{port}")).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let node = Node {
        id: "big-client".into(),
        user_agent_name: "gRPC Go".into(),
        locality: Some(Locality { zone: ZONES[0].into(), ..Default::default() }),
        ..Default::default()
    };
    tx.send(eds_request(&names, "", "", Some(node))).await.expect("send");
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();

    let mut received = std::collections::BTreeMap::new();
    let mut largest = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while received.len() < names.len() {
        let message = tokio::time::timeout_at(deadline, responses.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} EDS resources within the deadline", received.len(), names.len()));
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => panic!("stream ended after {} resources", received.len()),
            Err(status) => panic!("the client refused a response ({} resources so far): {status}", received.len()),
        };
        largest = largest.max(response.encoded_len());
        for any in &response.resources {
            let cla = ClusterLoadAssignment::decode(any.value.as_slice()).expect("decodes");
            received.insert(cla.cluster_name.clone(), cla);
        }
        tx.send(eds_request(&names, &response.version_info, &response.nonce, None)).await.expect("ack");
    }
    assert!(largest <= CLIENT_LIMIT, "largest response {largest} bytes");
    eprintln!("largest EDS response: {largest} bytes");

    let metadata_fields = |cla: &ClusterLoadAssignment| -> Vec<usize> {
        cla.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| {
                e.metadata.as_ref().and_then(|m| m.filter_metadata.get(METADATA_KEY)).map_or(0, |s| s.fields.len())
            })
            .collect()
    };
    for name in &names[..SERVICES] {
        let fields = metadata_fields(&received[name]);
        assert_eq!(fields.len(), INSTANCES, "{name}");
        assert!(fields.iter().all(|n| *n == 30), "{name}: every attribute published");
    }
    let huge = &received[&names[SERVICES]];
    assert!(metadata_fields(huge).iter().all(|n| *n == 0), "over-budget metadata is dropped, the endpoints kept");
    assert_eq!(metadata_fields(huge).len(), INSTANCES);

    // One service changes: that service, alone, is the next response.
    let changed = ServiceName::new("prod", "svc03");
    let fewer: Vec<RawInstance> = (0..INSTANCES - 1).map(|i| instance(3, i, 24)).collect();
    builder.update_service(&changed, translate::translate(&fewer, &options).endpoints, Policy::ZoneAware);
    let next = tokio::time::timeout(Duration::from_secs(30), responses.message())
        .await
        .expect("a push after the change")
        .expect("a response")
        .expect("not the end");
    let pushed: Vec<String> = next
        .resources
        .iter()
        .map(|any| ClusterLoadAssignment::decode(any.value.as_slice()).expect("decodes").cluster_name)
        .collect();
    assert_eq!(pushed, vec![changed.dial_name()]);
    server.abort();
}
