//! End to end, in process: a fake ADS server (envoy-types'
//! `aggregated_discovery_service_server`) serving the LDS/RDS/CDS/EDS chain
//! `cloudmap-xds` emits, in-process `Describer` servers, and the demo client
//! started from an inline bootstrap. Checks that calls follow locality
//! weights and priorities, that a dead zone fails over with no visible
//! failures and comes back, that EDS updates apply, and that the client ACKs
//! and NACKs correctly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use demo_client::bootstrap::Bootstrap;
use demo_client::cli::{Client, start_with};
use demo_client::load::{LoadSpec, Report, run};
use demo_client::xds::{Kind, USER_AGENT};
use demo_proto::v1::describer_server::{Describer, DescriberServer};
use demo_proto::v1::{DescribeRequest, DescribeResponse};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, HealthStatus, Locality, SocketAddress, address, config_source,
    socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

const LISTENER: &str = "echo.demo";
const CLUSTER: &str = "echo-cluster";
const EDS_NAME: &str = "echo.demo";

// ---------------------------------------------------------------- resources

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn listener() -> Listener {
    Listener {
        name: LISTENER.into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(HttpConnectionManager {
                route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                    config_source: Some(ads()),
                    route_config_name: LISTENER.into(),
                })),
                http_filters: vec![HttpFilter {
                    name: "envoy.filters.http.router".into(),
                    config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

fn route_config() -> RouteConfiguration {
    RouteConfiguration {
        name: LISTENER.into(),
        virtual_hosts: vec![VirtualHost {
            name: LISTENER.into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(CLUSTER.into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn eds_cluster() -> Cluster {
    Cluster {
        name: CLUSTER.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig { eds_config: Some(ads()), service_name: EDS_NAME.into() }),
        ..Default::default()
    }
}

/// `(zone, weight, priority, endpoints)` → a ClusterLoadAssignment.
fn cla(groups: &[(&str, u32, u32, &[SocketAddr])]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: EDS_NAME.into(),
        endpoints: groups
            .iter()
            .map(|(zone, weight, priority, addrs)| LocalityLbEndpoints {
                locality: Some(Locality { region: "us-east-1".into(), zone: (*zone).into(), ..Default::default() }),
                lb_endpoints: addrs
                    .iter()
                    .map(|a| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(Address {
                                address: Some(address::Address::SocketAddress(SocketAddress {
                                    address: a.ip().to_string(),
                                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
                                    ..Default::default()
                                })),
                            }),
                            ..Default::default()
                        })),
                        health_status: HealthStatus::Healthy as i32,
                        ..Default::default()
                    })
                    .collect(),
                load_balancing_weight: Some(UInt32Value { value: *weight }),
                priority: *priority,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- fake ADS

#[derive(Clone)]
struct FakeAds {
    requests: Arc<Mutex<Vec<DiscoveryRequest>>>,
    eds: watch::Receiver<ClusterLoadAssignment>,
}

struct Sent {
    nonce: String,
    names: Vec<String>,
}

fn resources_for(type_url: &str, eds: &ClusterLoadAssignment) -> Vec<Any> {
    if type_url == Kind::Listener.type_url() {
        vec![pack_any(listener())]
    } else if type_url == Kind::Route.type_url() {
        vec![pack_any(route_config())]
    } else if type_url == Kind::Cluster.type_url() {
        vec![pack_any(eds_cluster())]
    } else if type_url == Kind::Endpoints.type_url() {
        vec![pack_any(eds.clone())]
    } else {
        Vec::new()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let log = Arc::clone(&self.requests);
        let mut eds = self.eds.clone();
        tokio::spawn(async move {
            let mut sent: HashMap<String, Sent> = HashMap::new();
            let mut counter = 0u64;
            let mut respond =
                |type_url: &str, names: Vec<String>, eds: &ClusterLoadAssignment, sent: &mut HashMap<String, Sent>| {
                    counter += 1;
                    let nonce = counter.to_string();
                    sent.insert(type_url.to_string(), Sent { nonce: nonce.clone(), names });
                    DiscoveryResponse {
                        version_info: format!("v{counter}"),
                        resources: resources_for(type_url, eds),
                        type_url: type_url.to_string(),
                        nonce,
                        ..Default::default()
                    }
                };
            loop {
                tokio::select! {
                    msg = incoming.next() => {
                        let Some(Ok(req)) = msg else { return };
                        if let Ok(mut l) = log.lock() {
                            l.push(req.clone());
                        }
                        if req.error_detail.is_some() {
                            continue; // NACK: wait for a new version
                        }
                        let last = sent.get(&req.type_url);
                        let is_ack = last.is_some_and(|s| {
                            s.nonce == req.response_nonce && s.names == req.resource_names
                        });
                        let stale = last.is_some_and(|s| {
                            !req.response_nonce.is_empty() && s.nonce != req.response_nonce
                        });
                        if is_ack || stale || req.resource_names.is_empty() {
                            continue;
                        }
                        let current = eds.borrow().clone();
                        let r = respond(&req.type_url, req.resource_names, &current, &mut sent);
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    changed = eds.changed() => {
                        if changed.is_err() { return; }
                        let url = Kind::Endpoints.type_url();
                        let Some(names) = sent.get(&url).map(|s| s.names.clone()) else { continue };
                        let current = eds.borrow_and_update().clone();
                        let r = respond(&url, names, &current, &mut sent);
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented("delta"))
    }
}

struct AdsServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<DiscoveryRequest>>>,
    eds: watch::Sender<ClusterLoadAssignment>,
    _task: JoinHandle<()>,
}

async fn start_ads(initial: ClusterLoadAssignment) -> AdsServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (eds_tx, eds_rx) = watch::channel(initial);
    let fake = FakeAds { requests: Arc::default(), eds: eds_rx };
    let requests = Arc::clone(&fake.requests);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    AdsServer { addr, requests, eds: eds_tx, _task: task }
}

// ---------------------------------------------------------------- backends

struct EchoService {
    zone: String,
    instance: String,
}

#[tonic::async_trait]
impl Describer for EchoService {
    async fn describe(&self, _request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        Ok(Response::new(DescribeResponse {
            instance_id: self.instance.clone(),
            zone: self.zone.clone(),
            region: "us-east-1".into(),
            ..Default::default()
        }))
    }
}

struct Backend {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

async fn start_backend_on(addr: SocketAddr, zone: &str, instance: &str) -> Backend {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let service = EchoService { zone: zone.into(), instance: instance.into() };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(DescriberServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await;
    });
    Backend { addr, stop: Some(stop_tx), task }
}

async fn start_backend(zone: &str, instance: &str) -> Backend {
    start_backend_on("127.0.0.1:0".parse().unwrap(), zone, instance).await
}

// ---------------------------------------------------------------- helpers

fn client(ads: &AdsServer, zone: &str) -> Client {
    let bootstrap = Bootstrap::parse(&format!(
        r#"{{"xds_servers":[{{"server_uri":"{}","channel_creds":[{{"type":"insecure"}}],
            "server_features":["xds_v3"]}}],
            "node":{{"id":"e2e","cluster":"demo","locality":{{"region":"us-east-1","zone":"{zone}"}}}}}}"#,
        ads.addr
    ))
    .unwrap();
    start_with(bootstrap, LISTENER).unwrap()
}

async fn load(client: &Client, n: usize) -> Report {
    let spec = LoadSpec { requests: n, concurrency: 4, timeout: Duration::from_secs(2), progress: false };
    let samples = run(&client.balancer, &spec).await;
    Report::new(&samples, &client.bootstrap.node.zone)
}

fn share(report: &Report, zone: &str) -> f64 {
    report.zones.get(zone).map_or(0.0, |z| z.share)
}

/// Waits until `check` holds for the picker's table (an EDS update arrived).
async fn wait_for_table(client: &Client, check: impl Fn(&demo_client::picker::Table) -> bool) {
    let mut rx = client.xds.tables.clone();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|t| t.as_ref().is_some_and(|t| check(t))))
        .await
        .expect("table update in time")
        .expect("xds client alive");
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_follow_locality_weights_and_the_client_acks() {
    let a = start_backend("us-east-1a", "a-1").await;
    let b = start_backend("us-east-1b", "b-1").await;
    let c = start_backend("us-east-1c", "c-1").await;
    let ads = start_ads(cla(&[
        ("us-east-1a", 80, 0, &[a.addr]),
        ("us-east-1b", 20, 0, &[b.addr]),
        ("us-east-1c", 100, 1, &[c.addr]),
    ]))
    .await;
    let client = client(&ads, "us-east-1a");
    let n = client.balancer.wait_for_endpoints(Duration::from_secs(5)).await.unwrap();
    assert_eq!(n, 3);

    let report = load(&client, 600).await;
    assert_eq!(report.failed, 0, "{report:?}");
    let a_share = share(&report, "us-east-1a");
    assert!((0.72..=0.88).contains(&a_share), "{report:?}");
    assert!((report.same_zone_share - a_share).abs() < 1e-9);
    assert_eq!(share(&report, "us-east-1c"), 0.0, "priority 1 unused: {report:?}");

    // The protocol as the server saw it.
    let requests = ads.requests.lock().unwrap().clone();
    let first = &requests[0];
    let node = first.node.as_ref().expect("node on the first request");
    assert_eq!(node.user_agent_name, USER_AGENT);
    assert_eq!(node.id, "e2e");
    assert_eq!(node.locality.as_ref().unwrap().zone, "us-east-1a");
    assert!(node.client_features.contains(&"envoy.lb.does_not_support_overprovisioning".to_string()));
    assert_eq!(first.type_url, Kind::Listener.type_url());
    assert_eq!(first.resource_names, vec![LISTENER.to_string()]);
    assert!(requests[1..].iter().all(|r| r.node.is_none()));
    for (kind, name) in
        [(Kind::Listener, LISTENER), (Kind::Route, LISTENER), (Kind::Cluster, CLUSTER), (Kind::Endpoints, EDS_NAME)]
    {
        let acked = requests.iter().any(|r| {
            r.type_url == kind.type_url()
                && r.resource_names == vec![name.to_string()]
                && !r.response_nonce.is_empty()
                && !r.version_info.is_empty()
                && r.error_detail.is_none()
        });
        assert!(acked, "no ACK for {kind:?}: {requests:#?}");
    }
    assert!(requests.iter().all(|r| r.error_detail.is_none()));

    for s in [a, b, c] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_zone_fails_over_without_failures_and_comes_back() {
    let a = start_backend("us-east-1a", "a-1").await;
    let b = start_backend("us-east-1b", "b-1").await;
    let a_addr = a.addr;
    let ads = start_ads(cla(&[("us-east-1a", 100, 0, &[a.addr]), ("us-east-1b", 100, 1, &[b.addr])])).await;
    let client = client(&ads, "us-east-1a");
    client.balancer.wait_for_endpoints(Duration::from_secs(5)).await.unwrap();

    let report = load(&client, 100).await;
    assert_eq!(share(&report, "us-east-1a"), 1.0, "{report:?}");

    // Zone a dies while the control plane still lists it.
    a.stop().await;
    let report = load(&client, 400).await;
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(share(&report, "us-east-1b"), 1.0, "{report:?}");

    // It comes back on the same address: the probe finds it and calls return.
    let a = start_backend_on(a_addr, "us-east-1a", "a-1").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let report = load(&client, 100).await;
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(share(&report, "us-east-1a"), 1.0, "{report:?}");

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_dying_mid_load_costs_under_one_percent() {
    let a1 = start_backend("us-east-1a", "a-1").await;
    let a2 = start_backend("us-east-1a", "a-2").await;
    let b = start_backend("us-east-1b", "b-1").await;
    let ads = start_ads(cla(&[("us-east-1a", 90, 0, &[a1.addr, a2.addr]), ("us-east-1b", 10, 0, &[b.addr])])).await;
    let client = client(&ads, "us-east-1a");
    client.balancer.wait_for_endpoints(Duration::from_secs(5)).await.unwrap();
    let balancer = client.balancer.clone();
    let running = tokio::spawn(async move {
        let spec = LoadSpec { requests: 1000, concurrency: 8, timeout: Duration::from_secs(2), progress: false };
        run(&balancer, &spec).await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    a1.stop().await;
    a2.stop().await;
    let samples = running.await.unwrap();
    let report = Report::new(&samples, "us-east-1a");
    assert!(report.failed * 100 < report.total, "{report:?}");
    // b has 10 % of the weight; most calls went there after a died.
    assert!(share(&report, "us-east-1b") > 0.5, "{report:?}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_updates_apply_and_invalid_ones_are_nacked() {
    let a = start_backend("us-east-1a", "a-1").await;
    let b = start_backend("us-east-1b", "b-1").await;
    let ads = start_ads(cla(&[("us-east-1a", 1, 0, &[a.addr])])).await;
    let client = client(&ads, "us-east-1a");
    client.balancer.wait_for_endpoints(Duration::from_secs(5)).await.unwrap();
    let report = load(&client, 50).await;
    assert_eq!(share(&report, "us-east-1a"), 1.0, "{report:?}");

    // Shift everything to b.
    ads.eds.send(cla(&[("us-east-1b", 1, 0, &[b.addr])])).unwrap();
    wait_for_table(&client, |t| t.addresses().collect::<Vec<_>>() == vec![b.addr]).await;
    let report = load(&client, 50).await;
    assert_eq!(share(&report, "us-east-1b"), 1.0, "{report:?}");

    // An invalid assignment (priorities 0 and 2): NACKed, b keeps serving.
    ads.eds.send(cla(&[("us-east-1a", 1, 0, &[a.addr]), ("us-east-1b", 1, 2, &[b.addr])])).unwrap();
    let nack = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let found = ads.requests.lock().unwrap().iter().find(|r| r.error_detail.is_some()).cloned();
            if let Some(r) = found {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a NACK");
    assert_eq!(nack.type_url, Kind::Endpoints.type_url());
    let detail = nack.error_detail.unwrap();
    assert!(detail.message.contains("contiguous"), "{}", detail.message);
    let report = load(&client, 50).await;
    assert_eq!(share(&report, "us-east-1b"), 1.0, "{report:?}");

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_control_plane_means_a_clear_timeout() {
    // A port nothing listens on.
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let bootstrap =
        Bootstrap::parse(&format!(r#"{{"xds_servers":[{{"server_uri":"{addr}"}}],"node":{{"id":"x"}}}}"#)).unwrap();
    let client = start_with(bootstrap, LISTENER).unwrap();
    let err = client.balancer.wait_for_endpoints(Duration::from_millis(700)).await.unwrap_err();
    assert!(err.to_string().contains("no usable endpoint"), "{err}");
    let err = client.balancer.describe(Duration::from_millis(100)).await.unwrap_err();
    assert!(err.to_string().contains("no endpoints yet"), "{err}");
}
