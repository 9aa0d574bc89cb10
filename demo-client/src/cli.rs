//! The command line: `demo-client serve` and `demo-client load`, and the
//! start-up they share (bootstrap → ADS client → balancer).
//!
//! Exit status: 0 on success; 1 on an error (bad bootstrap or target, no
//! endpoints before the deadline, every load call failed), with the error
//! chain on stderr.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tracing::info;

use crate::balancer::Balancer;
use crate::bootstrap::{Bootstrap, listener_name};
use crate::http::{self, AppState};
use crate::load::{self, LoadSpec, Report};
use crate::xds::{self, XdsHandle};

/// A Rust xDS client for the cloudmap-xds demo: follows LDS/RDS/CDS/EDS from
/// the control plane in $GRPC_XDS_BOOTSTRAP (or $GRPC_XDS_BOOTSTRAP_CONFIG)
/// and honours locality weights and priorities when calling Describe.
#[derive(Debug, Parser)]
#[command(name = "demo-client", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP: GET /describe makes one call, GET /healthz, GET /endpoints.
    Serve(ServeArgs),
    /// Fire N calls with C workers and report where they went.
    Load(LoadArgs),
}

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HTTP listen address.
    #[arg(long, env = "DEMO_CLIENT_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The xDS target to call.
    #[arg(long, env = "DEMO_TARGET", default_value = "xds:///echo.demo")]
    pub target: String,
    /// Deadline of one Describe call (retry included), e.g. 2s, 500ms.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Options of `load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The xDS target to call.
    #[arg(long, env = "DEMO_TARGET", default_value = "xds:///echo.demo")]
    pub target: String,
    /// Number of calls.
    #[arg(short = 'n', long = "requests", default_value_t = 1000)]
    pub requests: usize,
    /// Concurrent workers.
    #[arg(short = 'c', long = "concurrency", default_value_t = 8)]
    pub concurrency: usize,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Deadline of one Describe call (retry included), e.g. 2s, 500ms.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long to wait for endpoints from the xDS server before giving up.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Also write one line per call to this file: when it ended (ms since the
    /// Unix epoch) and the zone that answered, or `-` for a failed call.
    #[arg(long)]
    pub timeline: Option<std::path::PathBuf>,
}

/// Parses `2s`, `500ms`, `1.5s`, `1m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("invalid duration {text:?} (use e.g. 2s, 500ms, 1m)"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("duration {text:?} must be positive"));
    }
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("duration {text:?}: {e}"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(match cli.command {
        Command::Serve(_) => "info",
        Command::Load(_) => "warn",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo-client: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-client: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// The client machinery shared by both subcommands.
#[derive(Debug)]
pub struct Client {
    pub bootstrap: Bootstrap,
    pub xds: XdsHandle,
    pub balancer: Balancer,
}

/// Reads the bootstrap, starts the ADS client for `target` and a balancer.
pub fn start(target: &str) -> Result<Client> {
    let bootstrap = Bootstrap::from_env()?;
    let listener = listener_name(target)?;
    start_with(bootstrap, &listener)
}

/// Like [`start`] with a given bootstrap and listener name.
pub fn start_with(bootstrap: Bootstrap, listener: &str) -> Result<Client> {
    info!(
        server = %bootstrap.server_uri,
        listener,
        zone = %bootstrap.node.zone,
        "starting the ADS client"
    );
    let xds = xds::spawn(&bootstrap, listener);
    let caller = if bootstrap.node.id.is_empty() { "demo-client".to_string() } else { bootstrap.node.id.clone() };
    let balancer = Balancer::new(xds.tables.clone(), &caller);
    Ok(Client { bootstrap, xds, balancer })
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Load(args) => run_load(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let client = start(&args.target)?;
    let state = AppState {
        balancer: client.balancer.clone(),
        client_zone: client.bootstrap.node.zone.clone(),
        timeout: args.timeout,
        xds: client.xds.status.clone(),
    };
    http::serve(state, args.listen, shutdown_signal()).await
}

async fn run_load(args: LoadArgs) -> Result<()> {
    if args.requests == 0 {
        bail!("-n must be at least 1");
    }
    if args.concurrency == 0 {
        bail!("-c must be at least 1");
    }
    let client = start(&args.target)?;
    let endpoints = client.balancer.wait_for_endpoints(args.wait).await.with_context(|| {
        let status = client.xds.status.lock().map(|s| s.clone()).unwrap_or_else(|e| e.into_inner().clone());
        let mut why = format!("no endpoints for {} from {}", args.target, client.bootstrap.server_uri);
        if let Some(e) = status.last_error {
            why.push_str(&format!(" (last xDS error: {e})"));
        }
        if let Some(n) = status.last_nack {
            why.push_str(&format!(" (last NACK: {n})"));
        }
        why
    })?;
    info!(endpoints, "endpoints known; starting the load");
    let spec = LoadSpec {
        requests: args.requests,
        concurrency: args.concurrency,
        timeout: args.timeout,
        progress: !args.json && std::io::stderr().is_terminal(),
    };
    let timed = load::run_timed(&client.balancer, &spec).await;
    if let Some(path) = &args.timeline {
        let mut text = String::with_capacity(timed.len() * 24);
        for (at, sample) in &timed {
            let zone = match sample {
                load::Sample::Ok { zone, .. } => zone.as_str(),
                load::Sample::Failed { .. } => "-",
            };
            text.push_str(&format!("{at} {zone}\n"));
        }
        std::fs::write(path, text).with_context(|| format!("writing --timeline {}", path.display()))?;
    }
    let samples: Vec<load::Sample> = timed.into_iter().map(|(_, s)| s).collect();
    let report = Report::new(&samples, &client.bootstrap.node.zone);
    if args.json {
        let text = serde_json::to_string(&report).context("encoding the report")?;
        println!("{text}");
    } else {
        print!("{}", report.render());
    }
    if report.ok == 0 {
        bail!("all {} calls failed", report.total);
    }
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_command_lines() {
        let cli = Cli::try_parse_from([
            "demo-client",
            "load",
            "--target",
            "xds:///echo.demo",
            "-n",
            "1000",
            "-c",
            "8",
            "--json",
            "--timeout",
            "2s",
        ])
        .unwrap();
        let Command::Load(l) = cli.command else { panic!("not load") };
        assert_eq!((l.requests, l.concurrency, l.json), (1000, 8, true));
        assert_eq!(l.timeout, Duration::from_secs(2));

        let cli =
            Cli::try_parse_from(["demo-client", "serve", "--listen", "0.0.0.0:8080", "--target", "xds:///echo.demo"])
                .unwrap();
        let Command::Serve(s) = cli.command else { panic!("not serve") };
        assert_eq!(s.listen.port(), 8080);
        assert_eq!(s.target, "xds:///echo.demo");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "abc", "-1s", "0s", "2h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
