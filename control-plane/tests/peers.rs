//! Replicas over mTLS, in process: a replica watches a peer's census through
//! the peer's TLS listener (presenting its certificate), sums it, and drops
//! it after the peer timeout once the peer is gone; a watcher without a
//! certificate gets nothing; a replica dialing itself recognises itself; the
//! maximum connection age ends a connection and the next one is served.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cloudmap_xds::census::{Census, Voter};
use cloudmap_xds::connection_age::{self, ConnectionAge};
use cloudmap_xds::model::Zone;
use cloudmap_xds::peers::proto::WatchRequest;
use cloudmap_xds::peers::proto::census_client::CensusClient;
use cloudmap_xds::peers::{CensusService, PeerTls, Peering};
use cloudmap_xds::tls::{self, ReloadingTls, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::sync::watch;

/// A CA and one certificate for 127.0.0.1, used by every replica as server and client.
fn pki(dir: &Path) -> (TlsFiles, std::path::PathBuf) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("ca params");
    ca_params.distinguished_name.push(DnType::CommonName, "replicas test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().expect("key");
    let cert =
        CertificateParams::new(vec!["127.0.0.1".into()]).expect("params").signed_by(&key, &issuer).expect("cert");
    std::fs::write(dir.join("replica.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("replica.key"), key.serialize_pem()).expect("write");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
    let files =
        TlsFiles { cert: dir.join("replica.pem"), key: dir.join("replica.key"), client_ca: Some(dir.join("ca.pem")) };
    (files, dir.join("ca.pem"))
}

/// A replica's xDS port serving only the census, over mTLS; returns its address.
async fn serve_replica(
    census: Arc<Census>,
    replica: &str,
    files: TlsFiles,
    age: ConnectionAge,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let router = tonic::transport::Server::builder().add_service(CensusService::new(census, replica.into(), stop_rx));
    let tls = ReloadingTls::new(files).expect("tls");
    let server = tokio::spawn(async move {
        let _keep = _stop_tx;
        connection_age::serve(router, tls::incoming(listener, tls), age, std::future::pending::<()>).await;
    });
    (address, server)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const LONG: ConnectionAge = ConnectionAge { max: Duration::from_secs(600), grace: Duration::from_secs(10) };

#[tokio::test]
async fn replicas_share_their_census_over_mtls_and_forget_a_peer_that_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, ca) = pki(dir.path());
    let peer_census = Arc::new(Census::default());
    peer_census.join("echo.demo", &Zone::new("a"), &Voter::unique());
    peer_census.join("echo.demo", &Zone::new("a"), &Voter::unique());
    let (peer, server) = serve_replica(peer_census.clone(), "replica-b", files.clone(), LONG).await;

    // With a certificate from the CA: the peer's clients join our census.
    let census = Arc::new(Census::default());
    let tls =
        PeerTls { ca: Some(ca.clone()), identity: Some((files.cert.clone(), files.key.clone())), server_name: None };
    let timeout = Duration::from_millis(800);
    let peering = Peering::new(census.clone(), "replica-a".into(), timeout, tls);
    let watching = tokio::spawn(peering.clone().run_fixed(vec![peer.clone()]));
    eventually("the peer's census", || census.live("echo.demo").get(&Zone::new("a")) == Some(&2)).await;
    assert!(census.local().is_empty(), "the peer's clients are not ours to offer");
    let status = peering.status();
    assert_eq!(status[&peer].replica.as_deref(), Some("replica-b"));
    assert!(status[&peer].connected && !status[&peer].is_self);

    // A change on the peer arrives without waiting for a heartbeat's worth of time twice.
    peer_census.join("echo.demo", &Zone::new("b"), &Voter::unique());
    eventually("the peer's new zone", || census.live("echo.demo").get(&Zone::new("b")) == Some(&1)).await;

    // Without a client certificate the peer (mTLS) refuses: nothing joins, errors are counted.
    let lonely = Arc::new(Census::default());
    let no_cert = Peering::new(
        lonely.clone(),
        "replica-c".into(),
        timeout,
        PeerTls { ca: Some(ca.clone()), identity: None, server_name: None },
    );
    let refused = tokio::spawn(no_cert.clone().run_fixed(vec![peer.clone()]));
    eventually("a refused watch counted as an error", || no_cert.status().get(&peer).is_some_and(|s| s.errors >= 1))
        .await;
    assert!(lonely.all().is_empty());
    refused.abort();

    // A replica that dials itself says so and stops.
    let myself = Peering::new(
        peer_census.clone(),
        "replica-b".into(),
        timeout,
        PeerTls { ca: Some(ca), identity: Some((files.cert.clone(), files.key.clone())), server_name: None },
    );
    let own = tokio::spawn(myself.clone().run_fixed(vec![peer.clone()]));
    eventually("the own address marked self", || myself.status().get(&peer).is_some_and(|s| s.is_self)).await;
    assert!(peer_census.peers().is_empty(), "its own clients are not counted twice");
    own.abort();

    // The peer goes away (its connections with it): after the timeout its clients leave our sum.
    server.abort();
    let gone = std::time::Instant::now();
    eventually("the dead peer forgotten", || census.all().is_empty()).await;
    let took = gone.elapsed();
    assert!(took >= timeout / 2 && took < timeout * 4, "forgotten after {took:?}, timeout {timeout:?}");
    watching.abort();
}

#[tokio::test]
async fn a_connection_past_its_age_ends_and_the_next_one_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, ca) = pki(dir.path());
    let census = Arc::new(Census::default());
    census.join("echo.demo", &Zone::new("a"), &Voter::unique());
    let age = ConnectionAge { max: Duration::from_millis(400), grace: Duration::from_millis(300) };
    let (address, server) = serve_replica(census, "replica-b", files.clone(), age).await;

    let config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&ca).expect("ca")))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&files.cert).expect("cert"),
            std::fs::read(&files.key).expect("key"),
        ));
    let channel = || async {
        tonic::transport::Endpoint::from_shared(format!("https://{address}"))
            .expect("uri")
            .tls_config(config.clone())
            .expect("tls")
            .connect()
            .await
            .expect("connect")
    };
    let mut stream = CensusClient::new(channel().await)
        .watch(WatchRequest { replica: "watcher".into(), heartbeat_ms: 100 })
        .await
        .expect("watch")
        .into_inner();
    let started = std::time::Instant::now();
    // Reports keep coming until the connection's age + grace, then the stream ends.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Ok(Err(_)) => break started.elapsed(),
            Err(_) => panic!("the stream outlived its connection's age"),
        }
    };
    assert!(ended >= Duration::from_millis(300) && ended < Duration::from_secs(3), "ended after {ended:?}");
    // A new connection is served as before.
    let mut again = CensusClient::new(channel().await)
        .watch(WatchRequest { replica: "watcher".into(), heartbeat_ms: 100 })
        .await
        .expect("watch again")
        .into_inner();
    assert!(again.message().await.expect("report").is_some());
    server.abort();
}
