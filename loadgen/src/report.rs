//! Results: latency summaries, and how a run is printed (a table, or JSON).

use serde::Serialize;

use crate::procfs::Usage;
use crate::proxy::Counts;

/// A latency distribution, in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    /// Receipts measured.
    pub count: usize,
    /// Receipts expected (changes × clients); `count` below it means some
    /// clients did not get some change in time.
    pub expected: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut seconds: Vec<f64>, expected: usize) -> Latency {
        seconds.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            if seconds.is_empty() {
                return 0.0;
            }
            let i = ((p / 100.0) * seconds.len() as f64).ceil() as usize;
            seconds[i.clamp(1, seconds.len()) - 1] * 1000.0
        };
        Latency { count: seconds.len(), expected, p50_ms: rank(50.0), p99_ms: rank(99.0), max_ms: rank(100.0) }
    }
}

/// Memory and CPU of an external control plane over a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlPlaneCost {
    pub pid: u32,
    /// Before any client connected.
    pub before: Usage,
    /// Every client connected and idle (after `settle`).
    pub idle: Usage,
    /// (idle − before) RSS ÷ clients.
    pub rss_per_stream_bytes: f64,
    /// CPU use while idle (watcher polls, scrapes), per second; subtracted below.
    pub idle_cpu_per_second: f64,
    /// CPU time spent during the changes, less the idle rate over that time.
    pub changes_cpu_seconds: f64,
    /// `changes_cpu_seconds` ÷ (changes × clients).
    pub cpu_per_push_per_client_us: f64,
}

/// Cloud Map calls counted at the proxy while the clients were connected and idle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiCalls {
    pub window_seconds: f64,
    pub per_minute: f64,
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// `in-process` (library + Cloud Map test double) or `external` (process + moto).
    pub mode: &'static str,
    pub protocol: &'static str,
    pub clients: usize,
    pub connections: usize,
    pub changes: u64,
    pub service: String,
    /// Time until every client had its first EDS.
    pub connect_seconds: f64,
    pub propagation: Latency,
    /// Per change, the p99 (ms): shows whether one slow change dominates.
    pub p99_per_change_ms: Vec<f64>,
    /// This process's CPU time during the changes ÷ (changes × clients): the
    /// clients' cost, and in-process also the control plane's. Against
    /// cloudmap-xds the Cloud Map registration calls are left out.
    pub own_cpu_per_push_per_client_us: f64,
    /// Responses (of any type) each client received per change: 1 when only the EDS is re-sent.
    pub responses_per_push_per_client: f64,
    /// This process's RSS with every client connected and idle.
    pub own_rss_idle_bytes: u64,
    pub failed_clients: usize,
    pub first_error: Option<String>,
    pub control_plane: Option<ControlPlaneCost>,
    pub api_calls: Option<ApiCalls>,
}

impl RunReport {
    /// Whether the run measured what it was meant to: every client connected
    /// and received every change.
    pub fn ok(&self) -> bool {
        self.failed_clients == 0 && self.propagation.count == self.propagation.expected && self.propagation.count > 0
    }

    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("mode".into(), format!("{} ({})", self.mode, self.protocol)),
            ("clients / connections".into(), format!("{} / {}", self.clients, self.connections)),
            ("service".into(), self.service.clone()),
            ("all clients had their first EDS after".into(), format!("{:.2} s", self.connect_seconds)),
            ("changes".into(), self.changes.to_string()),
            (
                "receipts (measured / expected)".into(),
                format!("{} / {}", self.propagation.count, self.propagation.expected),
            ),
            ("propagation p50".into(), format!("{:.1} ms", self.propagation.p50_ms)),
            ("propagation p99".into(), format!("{:.1} ms", self.propagation.p99_ms)),
            ("propagation max".into(), format!("{:.1} ms", self.propagation.max_ms)),
            ("failed clients".into(), self.failed_clients.to_string()),
            ("responses per change per client".into(), format!("{:.2}", self.responses_per_push_per_client)),
            ("loadgen RSS, clients idle".into(), format!("{:.1} MiB", mib(self.own_rss_idle_bytes))),
            (
                format!(
                    "loadgen CPU per push per client{}",
                    if self.mode == "in-process" { " (incl. control plane)" } else { "" }
                ),
                format!("{:.1} µs", self.own_cpu_per_push_per_client_us),
            ),
        ];
        if let Some(cp) = &self.control_plane {
            rows.push(("control plane RSS before clients".into(), format!("{:.1} MiB", mib(cp.before.rss_bytes))));
            rows.push(("control plane RSS, clients idle".into(), format!("{:.1} MiB", mib(cp.idle.rss_bytes))));
            rows.push((
                "RSS per idle stream".into(),
                format!("{:.0} B ({:.1} KiB)", cp.rss_per_stream_bytes, cp.rss_per_stream_bytes / 1024.0),
            ));
            rows.push(("idle CPU".into(), format!("{:.1} ms/s", cp.idle_cpu_per_second * 1000.0)));
            rows.push(("CPU during changes (less idle)".into(), format!("{:.2} s", cp.changes_cpu_seconds)));
            rows.push(("CPU per push per client".into(), format!("{:.1} µs", cp.cpu_per_push_per_client_us)));
        }
        if let Some(api) = &self.api_calls {
            rows.push((
                "Cloud Map calls per minute".into(),
                format!("{:.1} (over {:.0} s)", api.per_minute, api.window_seconds),
            ));
            for (op, n) in &api.counts.by_operation {
                rows.push((format!("  {op}"), format!("{:.1}/min", *n as f64 * 60.0 / api.window_seconds)));
            }
        }
        if let Some(e) = &self.first_error {
            rows.push(("first error".into(), e.clone()));
        }
        let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
        rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(|i| f64::from(i) / 1000.0).collect();
        let l = Latency::of(samples, 100);
        assert_eq!((l.count, l.p50_ms, l.p99_ms, l.max_ms), (100, 50.0, 99.0, 100.0));
        let one = Latency::of(vec![0.002], 4);
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (2.0, 2.0, 2.0));
        assert_eq!(Latency::of(Vec::new(), 0).max_ms, 0.0);
    }
}
