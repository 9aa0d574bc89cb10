//! `demo-client load`: fires N `Describe` calls from C concurrent workers and
//! reports where they went: per zone and per instance (count, share, p50/p99
//! latency), the share that stayed in the client's own zone, and failures.
//!
//! Shares are of the successful calls. The report is a text table, or one
//! JSON object with `--json`:
//! `{"total","ok","failed","sameZoneShare","clientZone","zones":{Z:{"count",
//! "share","p50Ms","p99Ms"}},"instances":{ID:{"zone","count","share","p50Ms",
//! "p99Ms"}},"errors":{MESSAGE:COUNT}}`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::balancer::Balancer;

/// What one call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Ok { zone: String, instance: String, latency_ms: f64 },
    Failed { error: String },
}

/// Load parameters.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub requests: usize,
    pub concurrency: usize,
    pub timeout: Duration,
    pub progress: bool,
}

/// Runs the load and returns one sample per call.
pub async fn run(balancer: &Balancer, spec: &LoadSpec) -> Vec<Sample> {
    run_timed(balancer, spec).await.into_iter().map(|(_, s)| s).collect()
}

/// Milliseconds since the Unix epoch, now.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// [`run`], with when each call ended (milliseconds since the Unix epoch), so a
/// caller can tell the calls before an event from those after it.
pub async fn run_timed(balancer: &Balancer, spec: &LoadSpec) -> Vec<(u64, Sample)> {
    let bar = if spec.progress {
        let bar = ProgressBar::with_draw_target(Some(spec.requests as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} calls, eta {eta}")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let next = Arc::new(AtomicUsize::new(0));
    let workers = spec.concurrency.clamp(1, spec.requests.max(1));
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let next = Arc::clone(&next);
        let balancer = balancer.clone();
        let bar = bar.clone();
        let (n, timeout) = (spec.requests, spec.timeout);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let sample = match balancer.describe(timeout).await {
                    Ok(ok) => Sample::Ok {
                        zone: ok.response.zone,
                        instance: ok.response.instance_id,
                        latency_ms: ok.latency.as_secs_f64() * 1000.0,
                    },
                    Err(err) => Sample::Failed { error: err.summary() },
                };
                samples.push((unix_ms(), sample));
                bar.inc(1);
            }
            samples
        }));
    }
    let mut samples = Vec::with_capacity(spec.requests);
    for task in tasks {
        match task.await {
            Ok(mut s) => samples.append(&mut s),
            Err(e) => samples.push((unix_ms(), Sample::Failed { error: format!("worker failed: {e}") })),
        }
    }
    bar.finish_and_clear();
    samples
}

/// Per-zone figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZoneStats {
    pub count: usize,
    pub share: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Per-instance figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStats {
    pub zone: String,
    pub count: usize,
    pub share: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
    pub same_zone_share: f64,
    pub client_zone: String,
    pub zones: BTreeMap<String, ZoneStats>,
    pub instances: BTreeMap<String, InstanceStats>,
    pub errors: BTreeMap<String, usize>,
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

impl Report {
    /// Summarises samples for a client in `client_zone`.
    pub fn new(samples: &[Sample], client_zone: &str) -> Report {
        let mut zones: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut instances: BTreeMap<String, (String, Vec<f64>)> = BTreeMap::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for s in samples {
            match s {
                Sample::Ok { zone, instance, latency_ms } => {
                    zones.entry(zone.clone()).or_default().push(*latency_ms);
                    instances.entry(instance.clone()).or_insert_with(|| (zone.clone(), Vec::new())).1.push(*latency_ms);
                }
                Sample::Failed { error } => *errors.entry(error.clone()).or_default() += 1,
            }
        }
        let ok: usize = zones.values().map(Vec::len).sum();
        let share = |count: usize| {
            if ok == 0 { 0.0 } else { count as f64 / ok as f64 }
        };
        let same = zones.get(client_zone).map_or(0, Vec::len);
        Report {
            total: samples.len(),
            ok,
            failed: samples.len() - ok,
            same_zone_share: share(same),
            client_zone: client_zone.to_string(),
            zones: zones
                .into_iter()
                .map(|(z, lat)| {
                    let lat = sorted(lat);
                    let stats = ZoneStats {
                        count: lat.len(),
                        share: share(lat.len()),
                        p50_ms: percentile(&lat, 50.0),
                        p99_ms: percentile(&lat, 99.0),
                    };
                    (z, stats)
                })
                .collect(),
            instances: instances
                .into_iter()
                .map(|(id, (zone, lat))| {
                    let lat = sorted(lat);
                    let stats = InstanceStats {
                        zone,
                        count: lat.len(),
                        share: share(lat.len()),
                        p50_ms: percentile(&lat, 50.0),
                        p99_ms: percentile(&lat, 99.0),
                    };
                    (id, stats)
                })
                .collect(),
            errors,
        }
    }

    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let zone_label = if self.client_zone.is_empty() { "(unset)" } else { &self.client_zone };
        let _ = writeln!(out, "{} calls: {} ok, {} failed; client zone {zone_label}", self.total, self.ok, self.failed);
        let _ = writeln!(out);
        let _ = writeln!(out, "{:<24} {:>7} {:>7} {:>9} {:>9}", "zone", "count", "%", "p50 ms", "p99 ms");
        for (zone, s) in &self.zones {
            let mark = if *zone == self.client_zone { " *" } else { "" };
            let _ = writeln!(
                out,
                "{:<24} {:>7} {:>6.1}% {:>9.2} {:>9.2}{mark}",
                zone,
                s.count,
                s.share * 100.0,
                s.p50_ms,
                s.p99_ms
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:>7} {:>7} {:>9} {:>9}",
            "instance", "zone", "count", "%", "p50 ms", "p99 ms"
        );
        for (id, s) in &self.instances {
            let _ = writeln!(
                out,
                "{:<24} {:<16} {:>7} {:>6.1}% {:>9.2} {:>9.2}",
                id,
                s.zone,
                s.count,
                s.share * 100.0,
                s.p50_ms,
                s.p99_ms
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "same-zone share: {:.1}% ({} of {} ok calls in {zone_label})",
            self.same_zone_share * 100.0,
            self.zones.get(&self.client_zone).map_or(0, |z| z.count),
            self.ok
        );
        let _ = writeln!(out, "failed calls: {}", self.failed);
        for (error, count) in &self.errors {
            let _ = writeln!(out, "  {count:>6} × {error}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(zone: &str, instance: &str, ms: f64) -> Sample {
        Sample::Ok { zone: zone.into(), instance: instance.into(), latency_ms: ms }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn report_counts_zones_instances_and_failures() {
        let samples = vec![
            ok("a", "i1", 1.0),
            ok("a", "i1", 3.0),
            ok("a", "i2", 2.0),
            ok("b", "i3", 10.0),
            Sample::Failed { error: "Unavailable: down".into() },
        ];
        let r = Report::new(&samples, "a");
        assert_eq!((r.total, r.ok, r.failed), (5, 4, 1));
        assert_eq!(r.same_zone_share, 0.75);
        assert_eq!(r.zones["a"].count, 3);
        assert_eq!(r.zones["a"].p50_ms, 2.0);
        assert_eq!(r.zones["b"].share, 0.25);
        assert_eq!(r.instances["i1"].zone, "a");
        assert_eq!(r.instances["i1"].count, 2);
        assert_eq!(r.errors["Unavailable: down"], 1);

        let json = serde_json::to_value(&r).unwrap();
        for key in ["total", "ok", "failed", "sameZoneShare", "clientZone", "zones", "instances"] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(json["zones"]["a"]["p99Ms"], 3.0);
        assert_eq!(json["instances"]["i3"]["zone"], "b");

        let text = r.render();
        assert!(text.contains("same-zone share: 75.0%"), "{text}");
        assert!(text.contains("failed calls: 1"), "{text}");
    }

    #[test]
    fn all_failed_report_has_zero_shares() {
        let r = Report::new(&[Sample::Failed { error: "x".into() }], "a");
        assert_eq!(r.ok, 0);
        assert_eq!(r.same_zone_share, 0.0);
        assert!(r.zones.is_empty());
    }
}
