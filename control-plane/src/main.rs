//! The `cloudmap-xds` binary: parses flags, wires the stages, runs until
//! SIGTERM or Ctrl-C. All logic lives in the library modules.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cloudmap_xds::budget::Budget;
use cloudmap_xds::builder::Builder;
use cloudmap_xds::cache::Cache;
use cloudmap_xds::cloudmap::{AwsCloudMap, Timing, Watcher};
use cloudmap_xds::config::{Cli, Command, FileConfig, LogFormat, ServeArgs};
use cloudmap_xds::connection_age::{self, ConnectionAge};
use cloudmap_xds::peers;
use cloudmap_xds::server::csds::CsdsServer;
use cloudmap_xds::server::registry::Registry;
use cloudmap_xds::server::{AdsServer, Limits};
use cloudmap_xds::tls;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;
use tokio::sync::watch;

/// mimalloc: the push path allocates and frees small buffers per response and
/// per request on both cores; glibc's malloc spent ~15 % of the control
/// plane's CPU at 10,000 streams (BENCHMARKS.md, "Push path").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `arena_eager_commit` (`mimalloc.h`'s `mi_option_e`; the same in
/// its v2 and v3).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// Commit mimalloc's arenas on demand, not up front. By default, on Linux
/// (overcommit) it maps each 1 GiB arena read-write at once, and then keeps
/// far more of what the process freed resident: 13 KiB of RSS per idle
/// stream at 1,000 streams and 19 KiB with a 990-instance service, against
/// 9.6 and 9.4 KiB on demand (BENCHMARKS.md, "Push path").
///
/// It must be set before the first arena is reserved, which happens before
/// `main` (mimalloc initialises in a constructor of priority 101, and the
/// runtime allocates before `main`): so this runs as a constructor of
/// priority 100, the one before mimalloc's. `MIMALLOC_ARENA_EAGER_COMMIT`,
/// when set, wins. `/proc/PID/maps` shows the effect: the 1 GiB arena is
/// `---p` (reserved) rather than `rw-p`.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = configure_allocator;

#[cfg(target_os = "linux")]
extern "C" fn configure_allocator() {
    unsafe extern "C" {
        fn getenv(name: *const std::ffi::c_char) -> *const std::ffi::c_char;
    }
    // SAFETY: `getenv` with a NUL-terminated name before any thread exists,
    // and mimalloc's option setter, which only stores the value; neither
    // allocates.
    unsafe {
        if getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Bootstrap(args)) => return cloudmap_xds_bootstrap::run(*args).await,
        Some(Command::Check(args)) => {
            init_logging(LogFormat::Text);
            let code = cloudmap_xds::check::run(args).await?;
            std::process::exit(code);
        }
        None => cli.serve,
    };
    init_logging(args.log_format);
    if let Err(e) = serve(args).await {
        // One line that says what to do, and out: no second copy with a backtrace
        // (with RUST_BACKTRACE set, symbolising one can take seconds on a busy host).
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    file.clients.rules().install();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("cloudmap_xds_cloudmap_call_seconds".into()),
            &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    cloudmap_xds::server::register_metrics();

    // Both ports first: a start that cannot serve stops here, before any Cloud Map call.
    let admin_listener = cloudmap_xds::admin::bind(args.admin_listen).await?;
    let listener = tokio::net::TcpListener::bind(args.xds_listen).await.with_context(|| {
        format!("cannot bind the xDS address {}; free the port or choose another with --xds-listen", args.xds_listen)
    })?;
    tracing::info!(address = %listener.local_addr().unwrap_or(args.xds_listen), "xDS (ADS) listening");

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::ReloadingTls::new(tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        })?),
        (None, None) if args.tls_client_ca.is_none() => None,
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)"),
    };

    // [authz] decides by client certificate: without mTLS there is none to decide by.
    let authz = match &file.authz {
        Some(_) if args.tls_client_ca.is_none() => {
            anyhow::bail!(
                "[authz] needs client certificates: serve mTLS with --tls-client-ca (and --tls-cert, --tls-key)"
            )
        }
        Some(table) => Some(cloudmap_xds::authz::Authz::new(table)?),
        None => None,
    };

    let sdk = aws_config::load_from_env().await;
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
    if region.is_empty() {
        tracing::warn!("no AWS region configured (set AWS_REGION); Cloud Map calls will fail");
    }
    let egress = args.envoy_egress_port.map(|port| std::net::SocketAddr::new(args.envoy_egress_address, port));
    let builder = Builder::new(Arc::new(Cache::new(egress)), Arc::default(), Arc::default());
    let (cache, census, status) = (builder.cache().clone(), builder.census().clone(), builder.status().clone());
    // The only writer of what is served: the watchers and the census debouncer feed it.
    let writer = builder.spawn();
    let api = Arc::new(AwsCloudMap::new(&sdk));
    let budget = Arc::new(Budget::new(args.api_rate));
    let watcher = Watcher {
        api: api.clone(),
        writer: writer.clone(),
        census: census.clone(),
        status: status.clone(),
        config: Arc::new(file),
        timing: Timing {
            revision_interval: args.revision_interval,
            refresh_interval: args.refresh_interval,
            services_interval: args.services_interval,
            max_backoff: args.max_backoff,
        },
        default_region: region,
        budget: budget.clone(),
    };
    metrics::gauge!("cloudmap_xds_api_rate").set(args.api_rate);
    metrics::gauge!("cloudmap_xds_max_streams").set(args.max_streams as f64);
    tracing::info!(namespaces = ?args.namespaces, api_rate = args.api_rate, "watching Cloud Map");
    let watching = tokio::spawn(watcher.run(args.namespaces.clone()));
    let following = tokio::spawn(cloudmap_xds::census::follow(census.clone(), writer, args.census_debounce));

    let (stop_tx, stop_rx) = watch::channel(false);
    let streams_stop = stop_rx.clone();
    let streams_stop_peers = stop_rx.clone();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let registry = Arc::new(Registry::new(args.max_streams).with_max_per_connection(args.max_streams_per_connection));
    // The admin address is the operator's: CSDS there answers everyone who reaches it.
    let csds = CsdsServer {
        cache: cache.clone(),
        registry: registry.clone(),
        max_response: args.csds_max_response_size,
        authz: None,
    };

    // ---- replicas (issue 14): the census shared with peers ----
    let replica = peers::replica_id();
    let peering = peers::Peering::new(
        census.clone(),
        replica.clone(),
        args.peer_timeout,
        peers::PeerTls {
            ca: args.peer_tls_ca.clone(),
            identity: args.tls_cert.clone().zip(args.tls_key.clone()),
            server_name: args.peer_tls_server_name.clone(),
        },
    );
    let peer_source = match (&args.peer_service, args.peers.is_empty()) {
        (Some(service), _) => Some(peers::PeerSource::CloudMap {
            service: service.clone(),
            every: args.peer_discovery_interval,
            default_port: args.xds_listen.port(),
        }),
        (None, false) => Some(peers::PeerSource::Fixed(peers::check_addresses(&args.peers)?)),
        (None, true) => None,
    };
    if let Some(source) = peer_source {
        tracing::info!(%replica, ?source, timeout = ?args.peer_timeout, "sharing the census with peer replicas");
        tokio::spawn(peering.clone().run(source, api.clone(), budget.clone()));
    }

    let sources = cloudmap_xds::admin::Sources {
        cache: cache.clone(),
        census: census.clone(),
        status,
        registry: registry.clone(),
        peering: peering.clone(),
    };
    let admin_router = cloudmap_xds::admin::router(sources, metrics, args.ready_staleness, csds.clone());
    let admin = tokio::spawn(cloudmap_xds::admin::serve(admin_listener, admin_router, stopped()));

    let limits = Limits {
        max_resource_names: args.max_resource_names,
        max_names_per_stream: args.max_names_per_stream,
        census_per_address: args.census_per_address,
        send_timeout: args.stream_send_timeout,
        max_message_size: args.max_message_size,
    };
    let mut ads = AdsServer::new(cache.clone(), census.clone(), registry.clone(), limits).with_shutdown(streams_stop);
    if let Some(authz) = &authz {
        ads = ads.with_authz(authz.clone());
    }
    // CSDS shows every client: on the admin address (above), on the xDS port only when asked.
    let csds_on_xds = args.csds_on_xds_port.then(|| {
        if authz.is_none() {
            tracing::warn!(
                "CSDS is served on the xDS port (--csds-on-xds-port): anyone who reaches it sees every client"
            );
        }
        let csds = CsdsServer { authz: authz.clone(), ..csds };
        ClientStatusDiscoveryServiceServer::new(csds).max_decoding_message_size(args.max_message_size)
    });
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(ads)
        .add_optional_service(csds_on_xds)
        .add_service(peers::CensusService::new(census, replica, streams_stop_peers));
    let age = ConnectionAge { max: args.max_connection_age, grace: args.max_connection_age_grace };
    let xds = match tls {
        Some(tls) => {
            tracing::info!(mtls = args.tls_client_ca.is_some(), "xDS port serves TLS");
            tokio::spawn(tls.clone().watch(std::time::Duration::from_secs(2)));
            tokio::spawn(connection_age::serve(router, tls::incoming(listener, tls), age, stopped))
        }
        None => tokio::spawn(connection_age::serve(router, connection_age::accepted(listener), age, stopped)),
    };

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    watching.abort();
    following.abort();
    // Streams end when the server stops; give them a moment, then go.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = xds.await;
        let _ = admin.await;
    })
    .await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
