//! The command line. `loadgen [run] …` measures push propagation; the other
//! subcommands are helpers the benchmark script (`scripts/bench.sh`) uses.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cloudmap_xds::config::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Simulated gRPC xDS clients against cloudmap-xds: push propagation latency, memory and CPU per stream."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect N clients, make K changes, report propagation p50/p99/max (the default).
    Run(RunArgs),
    /// Create a namespace, services and instances in Cloud Map (moto) for the control plane to serve.
    Seed(SeedArgs),
    /// Start a control plane and time it from process start to /ready answering 200.
    Startup(StartupArgs),
    /// An HTTP proxy in front of moto that counts Cloud Map API calls by operation.
    CountProxy(ProxyArgs),
    /// The bare-stack floor: an ADS server that encodes each response once and sends the
    /// same bytes to every stream (drive it with `run --floor`).
    Floor(FloorArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Run the control plane library in this process, with a Cloud Map test double
    /// (changes go straight into its cache). For runs with many changes.
    #[arg(long, conflicts_with_all = ["control_plane", "admin", "cloudmap"])]
    pub in_process: bool,

    /// xDS address of an external cloudmap-xds process (with --cloudmap), or of a
    /// `loadgen floor` process (with --floor).
    #[arg(long, requires = "admin")]
    pub control_plane: Option<SocketAddr>,

    /// The external control plane is `loadgen floor`: a change is `POST /change?k=K`
    /// on its admin port instead of a Cloud Map registration.
    #[arg(long, requires = "control_plane", conflicts_with = "cloudmap")]
    pub floor: bool,

    /// Admin address of that process (/ready, and /metrics for when it applied each change).
    #[arg(long)]
    pub admin: Option<SocketAddr>,

    /// Cloud Map endpoint the external control plane reads (moto), e.g. http://127.0.0.1:5000;
    /// changes are instance registrations there.
    #[arg(long)]
    pub cloudmap: Option<String>,

    /// PID of the external control plane: sample its RSS and CPU time from /proc.
    #[arg(long, requires = "control_plane")]
    pub control_plane_pid: Option<u32>,

    /// Simulated clients (one ADS stream each).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,

    /// HTTP/2 connections the streams are spread over [default: one per 100 clients].
    #[arg(long)]
    pub connections: Option<usize>,

    /// Use Delta xDS instead of State of the World.
    #[arg(long)]
    pub delta: bool,

    /// Changes to make, one at a time (each waits until every client has it).
    #[arg(long, default_value_t = 10)]
    pub changes: u64,

    /// Cloud Map namespace of the watched service.
    #[arg(long, default_value = "loadgen")]
    pub namespace: String,

    /// Cloud Map service the clients dial (as `SERVICE.NAMESPACE`) and the changes touch.
    #[arg(long, default_value = "bench")]
    pub service: String,

    /// Endpoints of the service in the in-process mode (the seed decides for moto).
    #[arg(long, default_value_t = 30)]
    pub endpoints: usize,

    /// Quiet time after every client has its first EDS (census pushes settle), before
    /// the idle memory sample.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Pause between one change reaching every client and the next change.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub interval: Duration,

    /// Longest wait for every client to receive its first EDS.
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Longest wait for every client to receive one change.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub change_timeout: Duration,

    /// URL of `loadgen count-proxy`'s counter (…/__loadgen/counts): count Cloud Map
    /// API calls while the clients are connected and idle.
    #[arg(long)]
    pub api_counter: Option<String>,

    /// How long to count API calls.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub api_window: Duration,

    /// Print the result as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    pub fn connections(&self) -> usize {
        self.connections.unwrap_or(self.clients.div_ceil(100)).clamp(1, self.clients.max(1))
    }

    pub fn dial_name(&self) -> String {
        format!("{}.{}", self.service, self.namespace)
    }
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// Cloud Map endpoint (moto), e.g. http://127.0.0.1:5000.
    #[arg(long)]
    pub cloudmap: String,
    #[arg(long, default_value = "loadgen")]
    pub namespace: String,
    /// Service name; with --services above 1, names are SERVICE-000, SERVICE-001, …
    #[arg(long, default_value = "bench")]
    pub service: String,
    #[arg(long, default_value_t = 1)]
    pub services: usize,
    /// Instances per service, spread over the three zones.
    #[arg(long, default_value_t = 30)]
    pub instances: usize,
    /// Concurrent registrations.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

#[derive(Debug, Clone, Args)]
pub struct StartupArgs {
    /// Admin address the started control plane listens on.
    #[arg(long)]
    pub admin: SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The control plane command line, after `--`.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Where to serve ADS, e.g. 127.0.0.1:18000.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where to serve /ready, /metrics and POST /change?k=K.
    #[arg(long)]
    pub admin: SocketAddr,
    #[arg(long, default_value = "loadgen")]
    pub namespace: String,
    /// The service served (`SERVICE.NAMESPACE`), as `loadgen seed --service`.
    #[arg(long, default_value = "bench")]
    pub service: String,
    /// Instances of the service before any change, as `loadgen seed --instances`.
    #[arg(long, visible_alias = "instances", default_value_t = 30)]
    pub endpoints: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Where to listen, e.g. 127.0.0.1:5001.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where moto is, e.g. http://127.0.0.1:5000.
    #[arg(long)]
    pub upstream: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_is_the_default_and_modes_exclude_each_other() {
        let cli = Cli::try_parse_from(["loadgen", "--in-process", "--clients", "250"]).expect("parses");
        assert!(cli.command.is_none() && cli.run.in_process);
        assert_eq!(cli.run.connections(), 3);
        assert_eq!(cli.run.dial_name(), "bench.loadgen");
        assert!(Cli::try_parse_from(["loadgen", "--in-process", "--control-plane", "127.0.0.1:1"]).is_err());
        assert!(Cli::try_parse_from(["loadgen", "--control-plane", "127.0.0.1:1"]).is_err(), "needs --admin too");
        let floor = ["loadgen", "--control-plane", "127.0.0.1:1", "--admin", "127.0.0.1:2", "--floor"];
        assert!(Cli::try_parse_from(floor).expect("parses").run.floor);
        assert!(Cli::try_parse_from([&floor[..], &["--cloudmap", "http://x"]].concat()).is_err());
        let cli = Cli::try_parse_from(["loadgen", "floor", "--listen", "127.0.0.1:1", "--admin", "127.0.0.1:2"])
            .expect("parses");
        assert!(matches!(cli.command, Some(Command::Floor(f)) if f.endpoints == 30 && f.service == "bench"));
        let cli = Cli::try_parse_from(["loadgen", "startup", "--admin", "127.0.0.1:9901", "--", "cp", "--x"])
            .expect("parses");
        match cli.command {
            Some(Command::Startup(s)) => assert_eq!(s.command, vec!["cp", "--x"]),
            other => panic!("{other:?}"),
        }
    }
}
