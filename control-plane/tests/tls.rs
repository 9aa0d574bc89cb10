//! mTLS on the xDS port, end to end in process: a client without a
//! certificate is rejected, one with a certificate from the client CA is
//! served, and a certificate reload lets new clients in with the new
//! certificates without dropping a stream opened before it. The census
//! counts one vote per client certificate, however many connections and
//! streams it opens.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cloudmap_xds::builder::Builder;
use cloudmap_xds::model::{Endpoint, Health, ServiceEndpoints, ServiceName, Zone};
use cloudmap_xds::policy::Policy;
use cloudmap_xds::resources::ResourceType;
use cloudmap_xds::server::csds::CsdsServer;
use cloudmap_xds::server::registry::Registry;
use cloudmap_xds::server::{AdsServer, Limits};
use cloudmap_xds::tls::{self, ReloadingTls, TlsFiles};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    other_client: (String, String),
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate.
fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("ca params");
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf = |sans: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(sans).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec!["client.test".into()]),
        other_client: leaf(vec!["other.test".into()]),
    }
}

fn write(dir: &Path, pki: &Pki) -> TlsFiles {
    std::fs::write(dir.join("server.pem"), &pki.server.0).expect("write");
    std::fs::write(dir.join("server.key"), &pki.server.1).expect("write");
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).expect("write");
    TlsFiles { cert: dir.join("server.pem"), key: dir.join("server.key"), client_ca: Some(dir.join("ca.pem")) }
}

async fn channel(port: u16, pki: &Pki, with_cert: bool) -> Result<Channel, tonic::transport::Error> {
    channel_as(port, pki, with_cert.then_some(&pki.client)).await
}

async fn channel_as(
    port: u16,
    pki: &Pki,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    if let Some((cert, key)) = client {
        config = config.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("uri")
        .tls_config(config)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn csds_ok(port: u16, pki: &Pki, with_cert: bool) -> bool {
    let Ok(channel) = channel(port, pki, with_cert).await else { return false };
    let mut client = ClientStatusDiscoveryServiceClient::new(channel);
    tokio::time::timeout(Duration::from_secs(5), client.fetch_client_status(ClientStatusRequest::default()))
        .await
        .is_ok_and(|r| r.is_ok())
}

fn eds_request(nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ResourceType::ClusterLoadAssignment.type_url().into(),
        resource_names: vec!["echo.demo".into()],
        response_nonce: nonce.into(),
        version_info: version.into(),
        ..Default::default()
    }
}

fn endpoints(last_octet: u8) -> ServiceEndpoints {
    ServiceEndpoints::new(
        vec![Endpoint {
            instance_id: "i-1".into(),
            ip: std::net::IpAddr::from([10, 0, 0, last_octet]),
            port: 50051,
            zone: Zone::new("us-east-1a"),
            region: "us-east-1".into(),
            health: Health::Healthy,
            weight: 1,
            attributes: Default::default(),
            metadata: Default::default(),
        }],
        false,
    )
}

#[tokio::test]
async fn mtls_rejects_clients_without_a_certificate_and_reloads_without_dropping_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = pki("first");
    let files = write(dir.path(), &first);
    let reloading = ReloadingTls::new(files).expect("tls config");

    let mut builder = Builder::default();
    let cache = builder.cache().clone();
    let name = ServiceName::new("demo", "echo");
    builder.update_service(&name, endpoints(1), Policy::ZoneAware);
    builder.set_ready();
    let registry = Arc::new(Registry::new(100));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tonic::transport::Server::builder()
        .add_service(AdsServer::new(cache.clone(), builder.census().clone(), registry.clone(), Limits::default()))
        .add_service(ClientStatusDiscoveryServiceServer::new(CsdsServer {
            cache: cache.clone(),
            registry,
            max_response: 4 << 20,
            authz: None,
        }))
        .serve_with_incoming(tls::incoming(listener, reloading.clone()));
    let server = tokio::spawn(server);

    assert!(!csds_ok(port, &first, false).await, "a client without a certificate must be rejected");
    assert!(csds_ok(port, &first, true).await, "a client with a certificate from the client CA is served");

    // An ADS stream opened before the reload.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel(port, &first, true).await.expect("connect"));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(eds_request("", "")).await.expect("send");
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first_response = responses.message().await.expect("response").expect("some");
    tx.send(eds_request(&first_response.nonce, &first_response.version_info)).await.expect("ack");

    // New certificates from a new CA; the old ones are no longer accepted for new connections.
    let second = pki("second");
    write(dir.path(), &second);
    assert!(reloading.reload_if_changed(), "changed files are reloaded");
    assert!(!reloading.reload_if_changed(), "unchanged files are not reloaded again");
    assert!(csds_ok(port, &second, true).await, "new connections use the new certificates");
    assert!(!csds_ok(port, &first, true).await, "the old CA is no longer trusted");

    // The stream from before the reload still works: an endpoint change reaches it.
    builder.update_service(&name, endpoints(2), Policy::ZoneAware);
    let update = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("update in time")
        .expect("stream alive")
        .expect("some");
    assert_ne!(update.version_info, first_response.version_info);

    // A broken file keeps the previous configuration.
    std::fs::write(dir.path().join("server.key"), "not a key").expect("write");
    assert!(!reloading.reload_if_changed());
    assert!(csds_ok(port, &second, true).await, "a bad reload keeps serving with the last good certificates");
    server.abort();
}

#[tokio::test]
async fn the_census_counts_one_vote_per_client_certificate() {
    use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki("votes");
    let reloading = ReloadingTls::new(write(dir.path(), &pki)).expect("tls config");
    let mut builder = Builder::default();
    builder.update_service(&ServiceName::new("demo", "echo"), endpoints(1), Policy::ZoneAware);
    builder.set_ready();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tonic::transport::Server::builder()
        .add_service(AdsServer::new(
            builder.cache().clone(),
            builder.census().clone(),
            Arc::new(Registry::new(100)),
            Limits::default(),
        ))
        .serve_with_incoming(tls::incoming(listener, reloading));
    let server = tokio::spawn(server);

    // Three connections with one certificate, two streams each; one connection with another.
    let mut streams = Vec::new();
    for (i, client) in [&pki.client, &pki.client, &pki.client, &pki.other_client].into_iter().enumerate() {
        let channel = channel_as(port, &pki, Some(client)).await.expect("connect");
        for j in 0..2 {
            let mut ads = AggregatedDiscoveryServiceClient::new(channel.clone());
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let node = Node {
                id: format!("node-{i}-{j}"),
                locality: Some(Locality { zone: "us-east-1a".into(), ..Default::default() }),
                ..Default::default()
            };
            tx.send(DiscoveryRequest { node: Some(node), ..eds_request("", "") }).await.expect("send");
            let mut responses = ads
                .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("stream")
                .into_inner();
            responses.message().await.expect("response").expect("some");
            streams.push((tx, responses));
        }
    }
    let live = builder.census().live("echo.demo");
    assert_eq!(live.get(&Zone::new("us-east-1a")), Some(&2), "two certificates, two votes: {live:?}");
    drop(streams);
    server.abort();
}
