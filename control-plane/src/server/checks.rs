//! What the xDS port checks of a client before it keeps anything of it: the
//! size and characters of the Node (its zone becomes a census vote and, when
//! the zone has endpoints, a metric label; its id and user agent go to logs
//! and `/config_dump`), and a rate limit on the log lines client mistakes
//! cause, so a client repeating one cannot fill the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use prost::Message;
use tonic::Status;

/// Largest Node accepted, encoded (an Envoy's, with its extension list, is ~10 KB).
pub const MAX_NODE_BYTES: usize = 64 * 1024;
/// Longest zone name (AWS names such as `us-east-1a` or zone ids `use1-az1` are ~12).
pub const MAX_ZONE_LEN: usize = 64;
/// Longest user agent name.
pub const MAX_USER_AGENT_LEN: usize = 128;
/// Longest node id.
pub const MAX_NODE_ID_LEN: usize = 1024;

/// A Node this server will keep: at most [`MAX_NODE_BYTES`] encoded; a zone
/// of letters, digits, `-`, `_` and `.`; a node id and user agent of
/// printable ASCII; all within their lengths. Otherwise INVALID_ARGUMENT
/// saying which field is wrong.
pub fn node(node: &Node) -> Result<(), Status> {
    let size = node.encoded_len();
    if size > MAX_NODE_BYTES {
        return Err(Status::invalid_argument(format!(
            "the Node is {size} bytes; at most {MAX_NODE_BYTES} are accepted (trim its metadata)"
        )));
    }
    if let Some(locality) = &node.locality {
        let zone = &locality.zone;
        if zone.len() > MAX_ZONE_LEN
            || !zone.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(Status::invalid_argument(format!(
                "Node.locality.zone must be at most {MAX_ZONE_LEN} letters, digits, '-', '_' or '.' (got {} bytes)",
                zone.len()
            )));
        }
    }
    printable("Node.user_agent_name", &node.user_agent_name, MAX_USER_AGENT_LEN)?;
    printable("Node.id", &node.id, MAX_NODE_ID_LEN)?;
    Ok(())
}

fn printable(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Status::invalid_argument(format!(
            "{field} must be at most {max} printable ASCII characters (got {} bytes)",
            value.len()
        )));
    }
    Ok(())
}

/// A log line allowance: at most `burst` lines per `window`, then silence
/// until the window ends; the next line says how many were left out.
#[derive(Debug)]
pub struct LogLimit {
    burst: u64,
    window: Duration,
    /// Milliseconds since [`epoch`] when the current window started.
    started: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogLimit {
    pub const fn new(burst: u64, window: Duration) -> Self {
        LogLimit { burst, window, started: AtomicU64::new(0), used: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when a line may be logged now (`n` lines were left out
    /// before it), `None` when it must be left out.
    pub fn allow(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let started = self.started.load(Ordering::Relaxed);
        let window = self.window.as_millis() as u64;
        if now.saturating_sub(started) >= window
            && self.started.compare_exchange(started, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Locality;

    fn with_zone(zone: &str) -> Node {
        Node { locality: Some(Locality { zone: zone.into(), ..Default::default() }), ..Default::default() }
    }

    #[test]
    fn nodes_are_checked_field_by_field() {
        assert!(node(&with_zone("us-east-1a")).is_ok());
        assert!(node(&with_zone("use1-az1")).is_ok());
        assert!(node(&Node::default()).is_ok());
        for bad in ["a b", "zone\n", "z\u{e9}", &"a".repeat(MAX_ZONE_LEN + 1), "{evil=\"x\"}"] {
            let e = node(&with_zone(bad)).expect_err(bad);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("zone"), "{}", e.message());
        }
        let agent = Node { user_agent_name: "x".repeat(MAX_USER_AGENT_LEN + 1), ..Default::default() };
        assert!(node(&agent).expect_err("long agent").message().contains("user_agent_name"));
        let id = Node { id: "a\u{7}".into(), ..Default::default() };
        assert!(node(&id).expect_err("bell").message().contains("Node.id"));
        let big = Node { cluster: "x".repeat(MAX_NODE_BYTES), ..Default::default() };
        assert!(node(&big).expect_err("big").message().contains("bytes"));
    }

    #[test]
    fn log_limit_allows_a_burst_per_window_and_counts_the_rest() {
        let limit = LogLimit::new(2, Duration::from_millis(50));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.allow(), Some(2), "the first line of the next window says two were left out");
    }
}
