//! One measurement: connect the clients, let them settle, sample the
//! control plane idle (memory, CPU, Cloud Map calls), then make the changes
//! one at a time and time each client's receipt of each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic::transport::{Channel, Endpoint};

use crate::cli::RunArgs;
use crate::client::{self, ClientSpec};
use crate::procfs::{self, Usage};
use crate::report::{ApiCalls, ControlPlaneCost, Latency, RunReport};
use crate::target::{External, FloorProcess, InProcess, Target};
use crate::tracker::Tracker;
use crate::{ZONES, proxy};

/// How long the control plane's idle CPU rate is sampled when no API-call window is asked for.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

pub async fn run(args: &RunArgs) -> anyhow::Result<RunReport> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let mut target = match (&args.control_plane, &args.admin, &args.cloudmap) {
        _ if args.in_process => {
            Target::InProcess(InProcess::start(&args.namespace, &args.service, args.endpoints).await?)
        }
        (Some(xds), Some(admin), None) if args.floor => {
            Target::Floor(FloorProcess::connect(*xds, *admin, &args.namespace, &args.service).await?)
        }
        (Some(xds), Some(admin), Some(cloudmap)) => {
            let external = External::connect(*xds, *admin, cloudmap, &args.namespace, &args.service).await?;
            external.wait_ready(Duration::from_secs(120)).await?;
            Target::External(external)
        }
        _ => bail!(
            "say where the control plane is: --in-process, --control-plane and --admin with --cloudmap \
             (cloudmap-xds) or --floor (loadgen floor)"
        ),
    };
    let pid = args.control_plane_pid;
    let before = pid.map(procfs::sample).transpose()?;

    let connections = args.connections();
    let channels = connect(&target, connections).await?;
    let tracker = Arc::new(Tracker::new(args.clients));
    let started = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|index| {
            let spec =
                ClientSpec { index, zone: ZONES[index % ZONES.len()], target: args.dial_name(), delta: args.delta };
            tokio::spawn(client::run(channels[index % connections].clone(), spec, tracker.clone()))
        })
        .collect();
    let _abort = AbortOnDrop(clients);
    let n = args.clients;
    let all_connected = tracker.wait(args.connect_timeout, |t| t.with_eds() + t.failed() >= n).await;
    let connect_seconds = started.elapsed().as_secs_f64();
    if !all_connected || tracker.failed() > 0 {
        bail!(
            "{} of {n} clients received an EDS within {:?}, {} failed; first error: {}",
            tracker.with_eds(),
            args.connect_timeout,
            tracker.failed(),
            tracker.first_error().unwrap_or_else(|| "none".into())
        );
    }

    // Idle: census pushes settle, then memory, CPU rate and Cloud Map calls.
    tokio::time::sleep(args.settle).await;
    let idle = pid.map(procfs::sample).transpose()?;
    let own_idle = procfs::sample(std::process::id())?;
    let idle_started = Instant::now();
    let api_calls = match &args.api_counter {
        Some(url) => {
            let first = proxy::fetch(url).await.with_context(|| format!("reading the API counter {url}"))?;
            tokio::time::sleep(args.api_window).await;
            let counts = proxy::fetch(url).await?.since(&first);
            let window_seconds = idle_started.elapsed().as_secs_f64();
            Some(ApiCalls { window_seconds, per_minute: counts.total as f64 * 60.0 / window_seconds, counts })
        }
        None => {
            if pid.is_some() {
                tokio::time::sleep(IDLE_WINDOW).await;
            }
            None
        }
    };
    let idle_end = pid.map(procfs::sample).transpose()?;
    let idle_seconds = idle_started.elapsed().as_secs_f64();

    // Changes, one at a time.
    let base = tracker.newest().unwrap_or(0);
    let changes_started = Instant::now();
    let own_before = procfs::sample(std::process::id())?;
    let responses_before = tracker.responses();
    let mut latencies = Vec::new();
    let mut p99_per_change_ms = Vec::new();
    // Making an external change is an AWS SDK call (~25 ms of CPU here): not the clients'
    // cost. cloudmap-xds notices it on its next poll, after the call, so no push overlaps it.
    // The floor applies a change inside the call, so there the call stays in.
    let mut change_cpu_seconds = 0.0;
    for k in base + 1..=base + args.changes {
        let before_change = procfs::sample(std::process::id())?.cpu_seconds;
        target.change(k).await?;
        if matches!(target, Target::External(_)) {
            change_cpu_seconds += procfs::sample(std::process::id())?.cpu_seconds - before_change;
        }
        tracker.wait(args.change_timeout, |t| t.count(k) + t.failed() >= n).await;
        let applied = target.applied_at(k).await?;
        let change: Vec<f64> = tracker.receipts(k).iter().map(|received| received - applied).collect();
        p99_per_change_ms.push(Latency::of(change.clone(), n).p99_ms);
        latencies.extend(change);
        tokio::time::sleep(args.interval).await;
    }
    let after = pid.map(procfs::sample).transpose()?;
    let changes_seconds = changes_started.elapsed().as_secs_f64();
    let own = procfs::sample(std::process::id())?.cpu_seconds - own_before.cpu_seconds - change_cpu_seconds;
    let pushes = (args.changes as usize * n).max(1) as f64;
    let responses = (tracker.responses() - responses_before) as f64;

    let control_plane = match (pid, before, idle, idle_end, after) {
        (Some(pid), Some(before), Some(idle), Some(idle_end), Some(after)) => {
            Some(cost(pid, args, before, idle, idle_end, idle_seconds, after, changes_seconds))
        }
        _ => None,
    };
    Ok(RunReport {
        mode: target.mode(),
        protocol: if args.delta { "delta" } else { "sotw" },
        clients: n,
        connections,
        changes: args.changes,
        service: args.dial_name(),
        connect_seconds,
        propagation: Latency::of(latencies, n * args.changes as usize),
        p99_per_change_ms,
        own_cpu_per_push_per_client_us: own / pushes * 1e6,
        responses_per_push_per_client: responses / pushes,
        own_rss_idle_bytes: own_idle.rss_bytes,
        failed_clients: tracker.failed(),
        first_error: tracker.first_error(),
        control_plane,
        api_calls,
    })
}

#[allow(clippy::too_many_arguments)]
fn cost(
    pid: u32,
    args: &RunArgs,
    before: Usage,
    idle: Usage,
    idle_end: Usage,
    idle_seconds: f64,
    after: Usage,
    changes_seconds: f64,
) -> ControlPlaneCost {
    let idle_cpu_per_second = (idle_end.cpu_seconds - idle.cpu_seconds) / idle_seconds;
    let changes_cpu_seconds =
        (after.cpu_seconds - idle_end.cpu_seconds - idle_cpu_per_second * changes_seconds).max(0.0);
    let pushes = (args.changes as usize * args.clients).max(1) as f64;
    ControlPlaneCost {
        pid,
        before,
        idle,
        rss_per_stream_bytes: (idle.rss_bytes as f64 - before.rss_bytes as f64) / args.clients as f64,
        idle_cpu_per_second,
        changes_cpu_seconds,
        cpu_per_push_per_client_us: changes_cpu_seconds / pushes * 1e6,
    }
}

/// `count` HTTP/2 connections to the control plane; client streams are spread over them.
async fn connect(target: &Target, count: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{}", target.xds()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(endpoint.connect().await.with_context(|| format!("connecting to {}", target.xds()))?);
    }
    Ok(channels)
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
