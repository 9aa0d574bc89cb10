//! `loadgen`: a load generator for the cloudmap-xds control plane.
//!
//! It opens thousands of simulated proxyless gRPC clients ([`client`]) that
//! walk LDS → RDS → CDS → EDS like gRPC's xDS client and ACK every response,
//! multiplexed over a few HTTP/2 connections. A [`target`] then makes changes
//! to one service — in an external control plane through Cloud Map (moto), or
//! in the control-plane library running in this process — and the
//! [`tracker`] records, for each change and each client, how long after the
//! control plane applied the change the client received the new EDS.
//! [`run`] orchestrates one measurement and [`report`] prints it.
//!
//! [`floor`] is the bare-stack ADS server every run is compared with.
//! Helpers for the benchmark script: [`cloudmap`] seeds moto, [`procfs`]
//! reads a process's memory and CPU, [`proxy`] counts Cloud Map API calls,
//! [`startup`] times a control plane from process start to ready.

pub mod cli;
pub mod client;
pub mod cloudmap;
pub mod floor;
pub mod procfs;
pub mod proxy;
pub mod report;
pub mod run;
pub mod startup;
pub mod target;
pub mod tracker;

/// The zones clients and instances are spread over, round robin.
pub const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];
pub const REGION: &str = "us-east-1";

/// Wall-clock time as Unix seconds, the clock the control plane's
/// `cloudmap_xds_service_updated_timestamp_seconds` uses.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
