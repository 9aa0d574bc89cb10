//! Calls `demo.v1.Describer/Describe` through the [`Picker`]: one lazily
//! connected tonic [`Channel`] per endpoint address (reused across xDS
//! updates, dropped when the address leaves the table), readiness tracking,
//! probing, and one retry.
//!
//! * A call that fails with `UNAVAILABLE` (connection refused/reset, server
//!   gone; see [`is_connection_failure`]) marks its endpoint unready and is
//!   retried once on another pick, within the same overall deadline.
//! * An unready endpoint is probed in the background with
//!   `grpc.health.v1.Health/Check` (after 1 s, then doubling to 8 s, with
//!   jitter) and is ready again once the probe answers SERVING (or
//!   UNIMPLEMENTED: reachable, just without a health service). Real calls
//!   never go to an endpoint known to be down.
//! * The picker's table follows the xDS client's `watch` channel; it is
//!   refreshed synchronously before each pick, so a caller that saw the
//!   channel change also sees the new endpoints.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use demo_proto::v1::describer_client::DescriberClient;
use demo_proto::v1::{DescribeRequest, DescribeResponse};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, info, warn};

use crate::picker::{Picker, Snapshot, Table};

/// Connection attempts to an endpoint give up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// First probe delay after an endpoint goes unready; doubles up to the max.
const PROBE_START: Duration = Duration::from_secs(1);
const PROBE_MAX: Duration = Duration::from_secs(8);
/// Deadline of one health probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A successful call.
#[derive(Debug, Clone)]
pub struct CallOk {
    pub response: DescribeResponse,
    /// The endpoint that answered.
    pub endpoint: SocketAddr,
    /// Zone of the locality the endpoint was picked from.
    pub locality_zone: String,
    pub priority: usize,
    /// 1, or 2 when the first attempt failed with a connection failure.
    pub attempts: u32,
    /// Wall time of the whole call, retries included.
    pub latency: Duration,
}

/// A failed call.
#[derive(Debug, Clone)]
pub enum CallError {
    /// No endpoint could be picked (none known yet, or none ready).
    NoEndpoint(String),
    /// The RPC failed (after the retry, if one was made).
    Rpc { status: Status, endpoint: SocketAddr },
}

impl CallError {
    /// The gRPC code this error amounts to.
    pub fn code(&self) -> Code {
        match self {
            CallError::NoEndpoint(_) => Code::Unavailable,
            CallError::Rpc { status, .. } => status.code(),
        }
    }

    /// A short, stable description (used to group errors).
    pub fn summary(&self) -> String {
        match self {
            CallError::NoEndpoint(m) => m.clone(),
            CallError::Rpc { status, .. } => {
                format!("{:?}: {}", status.code(), status.message())
            }
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoEndpoint(m) => f.write_str(m),
            CallError::Rpc { status, endpoint } => {
                write!(f, "call to {endpoint} failed: {:?}: {}", status.code(), status.message())
            }
        }
    }
}

impl std::error::Error for CallError {}

struct Inner {
    picker: Picker<StdRng>,
    tables: watch::Receiver<Option<Arc<Table>>>,
    /// Whether any table has been received.
    have_table: bool,
    channels: HashMap<SocketAddr, Channel>,
    probing: HashSet<SocketAddr>,
}

/// Picks endpoints and makes calls; cheap to clone.
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Mutex<Inner>>,
    tables: watch::Receiver<Option<Arc<Table>>>,
    caller: Arc<str>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer").field("caller", &self.caller).finish_non_exhaustive()
    }
}

impl Balancer {
    /// A balancer following `tables`; `caller` goes into each request.
    pub fn new(tables: watch::Receiver<Option<Arc<Table>>>, caller: &str) -> Self {
        Balancer::with_rng(tables, caller, StdRng::from_os_rng())
    }

    /// Like [`Balancer::new`] with a given random source.
    pub fn with_rng(tables: watch::Receiver<Option<Arc<Table>>>, caller: &str, rng: StdRng) -> Self {
        let mut rx = tables.clone();
        rx.mark_changed();
        Balancer {
            inner: Arc::new(Mutex::new(Inner {
                picker: Picker::new(rng),
                tables: rx,
                have_table: false,
                channels: HashMap::new(),
                probing: HashSet::new(),
            })),
            tables,
            caller: caller.into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the picker half
        // updated in a way that matters; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the xDS client has delivered at least one endpoint.
    pub async fn wait_for_endpoints(&self, limit: Duration) -> Result<usize> {
        let mut rx = self.tables.clone();
        let wait = rx.wait_for(|t| t.as_ref().is_some_and(|t| t.endpoint_count() > 0));
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(t)) => Ok(t.as_ref().map_or(0, |t| t.endpoint_count())),
            Ok(Err(_)) => bail!("the xDS client stopped before any endpoints arrived"),
            Err(_) => {
                let why = match self.tables.borrow().as_ref() {
                    None => "no usable endpoint configuration arrived from the xDS server",
                    Some(_) => "the xDS server reports no endpoints for the target",
                };
                bail!("{why} within {limit:?}")
            }
        }
    }

    /// The picker's view: localities, weights, readiness.
    pub fn snapshot(&self) -> Snapshot {
        let mut inner = self.lock();
        refresh(&mut inner);
        inner.picker.snapshot()
    }

    /// One `Describe` call with `timeout` as the overall deadline, retried
    /// once on another endpoint after UNAVAILABLE.
    pub async fn describe(&self, timeout: Duration) -> Result<CallOk, CallError> {
        let start = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (pick, channel) = self.pick()?;
            let remaining = timeout.saturating_sub(start.elapsed());
            if remaining.is_zero() {
                return Err(CallError::Rpc {
                    status: Status::deadline_exceeded("deadline exceeded before the retry"),
                    endpoint: pick.addr,
                });
            }
            let mut request = tonic::Request::new(DescribeRequest { caller: self.caller.to_string() });
            request.set_timeout(remaining);
            let mut client = DescriberClient::new(channel);
            let result = match tokio::time::timeout(remaining, client.describe(request)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer within {timeout:?}"))),
            };
            match result {
                Ok(response) => {
                    return Ok(CallOk {
                        response: response.into_inner(),
                        endpoint: pick.addr,
                        locality_zone: pick.locality.zone,
                        priority: pick.priority,
                        attempts,
                        latency: start.elapsed(),
                    });
                }
                Err(status) if is_connection_failure(&status) => {
                    debug!(endpoint = %pick.addr, error = %status.message(), "endpoint unavailable");
                    self.endpoint_failed(pick.addr);
                    if attempts >= 2 {
                        return Err(CallError::Rpc { status, endpoint: pick.addr });
                    }
                }
                Err(status) => {
                    return Err(CallError::Rpc { status, endpoint: pick.addr });
                }
            }
        }
    }

    fn pick(&self) -> Result<(crate::picker::Pick, Channel), CallError> {
        let mut inner = self.lock();
        refresh(&mut inner);
        let Some(pick) = inner.picker.pick() else {
            let why = if !inner.have_table {
                "no endpoints yet: waiting for the xDS server"
            } else if inner.picker.table().endpoint_count() == 0 {
                "the xDS server reports no endpoints for the target"
            } else {
                "no ready endpoint: all endpoints are failing"
            };
            return Err(CallError::NoEndpoint(why.to_string()));
        };
        let channel = channel_for(&mut inner, pick.addr)
            .map_err(|e| CallError::NoEndpoint(format!("endpoint {}: {e}", pick.addr)))?;
        Ok((pick, channel))
    }

    fn endpoint_failed(&self, addr: SocketAddr) {
        let mut inner = self.lock();
        if inner.picker.mark_unready(addr) {
            info!(endpoint = %addr, "endpoint unready; probing it");
        }
        if inner.picker.contains(addr) && inner.probing.insert(addr) {
            tokio::spawn(self.clone().probe(addr));
        }
    }

    /// Probes `addr` until it answers or leaves the table.
    async fn probe(self, addr: SocketAddr) {
        let mut delay = PROBE_START;
        loop {
            tokio::time::sleep(delay.mul_f64(rand::random_range(0.8..1.2))).await;
            let channel = {
                let mut inner = self.lock();
                refresh(&mut inner);
                if !inner.picker.contains(addr) {
                    inner.probing.remove(&addr);
                    return;
                }
                match channel_for(&mut inner, addr) {
                    Ok(c) => c,
                    Err(_) => {
                        inner.probing.remove(&addr);
                        return;
                    }
                }
            };
            if health_check(channel).await {
                let mut inner = self.lock();
                inner.picker.mark_ready(addr);
                inner.probing.remove(&addr);
                info!(endpoint = %addr, "endpoint ready again");
                return;
            }
            delay = (delay * 2).min(PROBE_MAX);
        }
    }
}

/// Whether a failed call means the endpoint (or the connection to it) is
/// gone: `UNAVAILABLE`, or the transport cancelling a call on a connection
/// that closed under it (`CANCELLED`: this client never cancels calls
/// itself, its own deadline yields `DEADLINE_EXCEEDED`), or a raw transport
/// error. Such calls never reached the application, so a retry is safe.
pub fn is_connection_failure(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Cancelled => true,
        Code::Unknown => status.message().contains("transport error"),
        _ => false,
    }
}

/// True when the endpoint answers the health service with SERVING, or is
/// reachable but has no health service.
async fn health_check(channel: Channel) -> bool {
    let mut client = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
    request.set_timeout(PROBE_TIMEOUT);
    match tokio::time::timeout(PROBE_TIMEOUT, client.check(request)).await {
        Ok(Ok(r)) => r.into_inner().status == ServingStatus::Serving as i32,
        Ok(Err(status)) => status.code() == Code::Unimplemented,
        Err(_) => false,
    }
}

/// Applies a new table from the watch channel, if there is one, and drops
/// the channels of addresses that left.
fn refresh(inner: &mut Inner) {
    if !inner.tables.has_changed().unwrap_or(false) {
        return;
    }
    let table = inner.tables.borrow_and_update().clone();
    let Some(table) = table else { return };
    inner.have_table = true;
    let present: HashSet<SocketAddr> = table.addresses().collect();
    inner.channels.retain(|a, _| present.contains(a));
    inner.picker.update((*table).clone());
}

fn channel_for(inner: &mut Inner, addr: SocketAddr) -> Result<Channel> {
    if let Some(c) = inner.channels.get(&addr) {
        return Ok(c.clone());
    }
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy();
    inner.channels.insert(addr, channel.clone());
    if inner.channels.len() > 1024 {
        warn!(channels = inner.channels.len(), "many endpoint channels");
    }
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_told_apart() {
        assert!(is_connection_failure(&Status::unavailable("tcp connect error")));
        assert!(is_connection_failure(&Status::cancelled("operation was canceled")));
        assert!(is_connection_failure(&Status::unknown("transport error")));
        assert!(!is_connection_failure(&Status::unknown("handler panicked")));
        assert!(!is_connection_failure(&Status::deadline_exceeded("slow")));
        assert!(!is_connection_failure(&Status::internal("bug")));
        assert!(!is_connection_failure(&Status::resource_exhausted("busy")));
    }

    #[tokio::test]
    async fn no_table_yet_is_a_clear_unavailable() {
        let (_tx, rx) = watch::channel(None);
        let b = Balancer::with_rng(rx, "t", StdRng::seed_from_u64(1));
        let err = b.describe(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.to_string().contains("no endpoints yet"), "{err}");
    }

    #[tokio::test]
    async fn an_empty_table_is_reported_as_such() {
        let (_tx, rx) = watch::channel(Some(Arc::new(Table::default())));
        let b = Balancer::with_rng(rx, "t", StdRng::seed_from_u64(1));
        let err = b.describe(Duration::from_millis(50)).await.unwrap_err();
        assert!(err.to_string().contains("reports no endpoints"), "{err}");
    }
}
