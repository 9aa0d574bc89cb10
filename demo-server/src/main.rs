//! `demo-server`: the backend of the cloudmap-xds demo.
//!
//! It answers `demo.v1.Describer/Describe` with its instance id, availability
//! zone, region and listen address, plus how many requests this process has
//! served, so a gRPC client steered by the xDS control plane can see which
//! backend (and which zone) each call went to. It also serves the standard
//! `grpc.health.v1.Health` service, reporting SERVING for the whole server
//! (`""`) and for `demo.v1.Describer`.
//!
//! Identity is resolved once at start-up:
//!
//! * zone: `--zone` / `DEMO_ZONE`; else, on ECS, the `AvailabilityZone` of
//!   `${ECS_CONTAINER_METADATA_URI_V4}/task`; else `unknown`.
//! * region: `--region` / `DEMO_REGION`; else `AWS_REGION`; else the region
//!   part of the task metadata's `TaskARN`; else derived from the zone name
//!   (`us-east-1a` -> `us-east-1`); else `unknown`.
//! * instance id: `--instance-id` / `DEMO_INSTANCE_ID`; else the hostname;
//!   else `demo-server`.
//!
//! Once the listener is bound it prints exactly one line to stdout,
//! `demo-server listening on ADDR zone=ZONE instance=ID` (ADDR is the bound
//! address, so `--listen 127.0.0.1:0` reports the real port); logs go to
//! stderr. SIGTERM or Ctrl-C stop it gracefully.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use demo_proto::v1::describer_server::{Describer, DescriberServer};
use demo_proto::v1::{DescribeRequest, DescribeResponse};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// Value used for any identity field that cannot be determined.
const UNKNOWN: &str = "unknown";
/// How long to wait for each ECS / EC2 metadata request.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// Command line; every flag can also come from the environment.
#[derive(Debug, Clone, Parser)]
#[command(name = "demo-server", version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,

    /// Availability zone to report [default: from ECS task metadata, else EC2 instance metadata, else "unknown"].
    #[arg(long, env = "DEMO_ZONE")]
    zone: Option<String>,

    /// Instance id to report [default: the hostname, else "demo-server"].
    #[arg(long, env = "DEMO_INSTANCE_ID")]
    instance_id: Option<String>,

    /// Region to report [default: $AWS_REGION, else from ECS task metadata or the zone name].
    #[arg(long, env = "DEMO_REGION")]
    region: Option<String>,
}

/// What this server says about itself in every `Describe` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    instance_id: String,
    zone: String,
    region: String,
    /// The listen address as given on the command line.
    address: String,
}

/// The `demo.v1.Describer` implementation.
#[derive(Debug)]
struct DescriberService {
    identity: Identity,
    served: AtomicU64,
}

#[tonic::async_trait]
impl Describer for DescriberService {
    async fn describe(&self, request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        let caller = request.into_inner().caller;
        tracing::debug!(%caller, served, "describe");
        Ok(Response::new(DescribeResponse {
            instance_id: self.identity.instance_id.clone(),
            zone: self.identity.zone.clone(),
            region: self.identity.region.clone(),
            address: self.identity.address.clone(),
            served,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    init_tracing();
    let args = Args::parse();

    let identity = resolve_identity(&args).await;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr().context("reading the bound listen address")?;

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "demo-server listening on {bound} zone={} instance={}", identity.zone, identity.instance_id)
            .and_then(|()| out.flush())
            .context("writing the ready line to stdout")?;
    }
    info!(
        %bound,
        zone = %identity.zone,
        region = %identity.region,
        instance = %identity.instance_id,
        "serving demo.v1.Describer and grpc.health.v1.Health"
    );

    serve(identity, listener, shutdown_signal()).await?;
    info!("shut down");
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Serves `demo.v1.Describer` and `grpc.health.v1.Health` on `listener` until
/// `shutdown` completes, then drains in-flight calls and returns.
async fn serve(identity: Identity, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // The overall status ("") starts as SERVING; add the Describer service.
    health_reporter.set_serving::<DescriberServer<DescriberService>>().await;

    let describer = DescriberService { identity, served: AtomicU64::new(0) };

    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(DescriberServer::from_arc(Arc::new(describer)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("running the gRPC server")
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => info!("received Ctrl-C, shutting down"),
            Err(err) => {
                warn!(error = %err, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };

    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
                info!("received SIGTERM, shutting down");
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Works out instance id, zone and region from flags, environment and (only
/// when zone or region is still missing) ECS task metadata or EC2 instance
/// metadata (the `placement` crate, as `cloudmap-xds bootstrap` does).
async fn resolve_identity(args: &Args) -> Identity {
    let env = placement::Environment::from_process_env(METADATA_TIMEOUT);
    let region_arg = placement::non_empty(args.region.clone()).or_else(|| env.aws_region.clone());
    let (zone, region) = match placement::locate(&env, args.zone.clone(), region_arg.clone(), false).await {
        Ok(location) => {
            if location.zone.is_none() {
                warn!(ecs = ?location.ecs_error, imds = ?location.imds_error, "cannot find this server's zone: reporting \"unknown\" (pass --zone)");
            }
            (location.zone, location.region)
        }
        Err(e) => {
            warn!(error = format!("{e:#}"), "cannot look up this server's zone");
            (placement::non_empty(args.zone.clone()), region_arg)
        }
    };
    let zone = zone.unwrap_or_else(|| UNKNOWN.to_owned());
    let region = region.or_else(|| placement::region_from_zone(&zone)).unwrap_or_else(|| UNKNOWN.to_owned());
    let instance_id = placement::non_empty(args.instance_id.clone())
        .or_else(|| env.hostname.clone())
        .unwrap_or_else(|| "demo-server".to_owned());
    Identity { instance_id, zone, region, address: args.listen.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use demo_proto::v1::describer_client::DescriberClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    #[tokio::test]
    async fn describe_counts_calls_and_reports_identity() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let identity = Identity {
            instance_id: "i-test".to_owned(),
            zone: "us-east-1a".to_owned(),
            region: "us-east-1".to_owned(),
            address: "127.0.0.1:0".to_owned(),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(identity, listener, async {
            let _ = stop_rx.await;
        }));

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        let mut client = DescriberClient::new(channel.clone());
        for expected in 1..=2 {
            let reply = client.describe(DescribeRequest { caller: "test".to_owned() }).await?.into_inner();
            assert_eq!(reply.served, expected);
            assert_eq!(reply.zone, "us-east-1a");
            assert_eq!(reply.region, "us-east-1");
            assert_eq!(reply.instance_id, "i-test");
            assert_eq!(reply.address, "127.0.0.1:0");
        }

        let mut health = HealthClient::new(channel);
        for service in ["", "demo.v1.Describer"] {
            let status = health.check(HealthCheckRequest { service: service.to_owned() }).await?.into_inner().status;
            assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
        }

        drop(client);
        drop(health);
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), server).await???;
        Ok(())
    }
}
