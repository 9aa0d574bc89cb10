//! Endpoint picking as gRPC's xDS load-balancing tree does it, as plain data
//! and no I/O: `priority` → `weighted_target` → `round_robin`.
//!
//! * Priorities are tried in order (0 first); the first one with at least one
//!   READY locality is used. Failover to a higher number happens only when a
//!   whole priority has no ready locality, and goes back as soon as one is
//!   ready again.
//! * Within that priority a locality is chosen at random, weighted by its
//!   `load_balancing_weight`, among the READY localities only.
//! * Within the locality, picks go round robin over its ready endpoints.
//!
//! An endpoint is ready until [`Picker::mark_unready`] (the caller does that
//! after a connection failure / `UNAVAILABLE`) and again after
//! [`Picker::mark_ready`] (the caller's probe succeeded). New endpoints start
//! ready, like gRPC's IDLE subchannels. A locality is ready if any of its
//! endpoints is. When nothing at all is ready, [`Picker::pick`] returns `None`
//! so calls fail fast rather than wait on dead addresses.
//!
//! The random source is a parameter, so tests use a seeded RNG.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use rand::Rng;
use serde::Serialize;

/// Where an endpoint group sits: the Envoy `Locality` (here: an AZ).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityId {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// One locality of the table, with the usable (HEALTHY/UNKNOWN) endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityEntry {
    pub id: LocalityId,
    /// `load_balancing_weight`, never 0 (zero-weight localities are dropped
    /// before they get here).
    pub weight: u32,
    pub endpoints: Vec<SocketAddr>,
}

/// What the picker chooses from: `priorities[p]` holds the localities of
/// priority `p` (a level may be empty when all its localities were dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub priorities: Vec<Vec<LocalityEntry>>,
}

impl Table {
    /// Number of endpoints over all priorities.
    pub fn endpoint_count(&self) -> usize {
        self.localities().map(|(_, l)| l.endpoints.len()).sum()
    }

    /// Every endpoint address in the table.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.localities().flat_map(|(_, l)| l.endpoints.iter().copied())
    }

    /// `(priority, locality)` pairs in order.
    pub fn localities(&self) -> impl Iterator<Item = (usize, &LocalityEntry)> + '_ {
        self.priorities.iter().enumerate().flat_map(|(p, level)| level.iter().map(move |l| (p, l)))
    }
}

/// The outcome of one pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    pub addr: SocketAddr,
    pub priority: usize,
    pub locality: LocalityId,
}

/// Readiness and weights as the picker sees them right now (for `/endpoints`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// The priority picks currently go to, if any.
    pub active_priority: Option<usize>,
    pub localities: Vec<LocalitySnapshot>,
}

/// One locality in a [`Snapshot`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalitySnapshot {
    pub priority: usize,
    #[serde(flatten)]
    pub id: LocalityId,
    pub weight: u32,
    pub ready: bool,
    pub endpoints: Vec<EndpointSnapshot>,
}

/// One endpoint in a [`Snapshot`].
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    pub address: String,
    pub ready: bool,
}

/// Picks endpoints from a [`Table`]; keeps per-endpoint readiness and
/// per-locality round-robin positions across table updates.
#[derive(Debug)]
pub struct Picker<R> {
    table: Table,
    unready: HashSet<SocketAddr>,
    cursors: HashMap<(usize, LocalityId), usize>,
    rng: R,
}

impl<R: Rng> Picker<R> {
    /// An empty picker (no endpoints until [`Picker::update`]).
    pub fn new(rng: R) -> Self {
        Picker { table: Table::default(), unready: HashSet::new(), cursors: HashMap::new(), rng }
    }

    /// Replaces the table. Readiness is kept for addresses still present,
    /// round-robin positions for localities still present at the same priority.
    pub fn update(&mut self, table: Table) {
        let present: HashSet<SocketAddr> = table.addresses().collect();
        self.unready.retain(|a| present.contains(a));
        let keys: HashSet<(usize, LocalityId)> = table.localities().map(|(p, l)| (p, l.id.clone())).collect();
        self.cursors.retain(|k, _| keys.contains(k));
        self.table = table;
    }

    /// The current table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Whether `addr` is in the current table.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.table.addresses().any(|a| a == addr)
    }

    /// Whether `addr` is considered ready (unknown addresses are not).
    pub fn is_ready(&self, addr: SocketAddr) -> bool {
        self.contains(addr) && !self.unready.contains(&addr)
    }

    /// Marks an endpoint unready (after a connection failure). Returns true if
    /// it is in the table and was ready until now.
    pub fn mark_unready(&mut self, addr: SocketAddr) -> bool {
        self.contains(addr) && self.unready.insert(addr)
    }

    /// Marks an endpoint ready again (after a successful probe or call).
    pub fn mark_ready(&mut self, addr: SocketAddr) {
        self.unready.remove(&addr);
    }

    fn locality_ready(&self, l: &LocalityEntry) -> bool {
        l.endpoints.iter().any(|a| !self.unready.contains(a))
    }

    /// The first priority with at least one ready locality.
    pub fn active_priority(&self) -> Option<usize> {
        self.table.priorities.iter().position(|level| level.iter().any(|l| self.locality_ready(l)))
    }

    /// Chooses an endpoint, or `None` when no endpoint is ready.
    pub fn pick(&mut self) -> Option<Pick> {
        let priority = self.active_priority()?;
        let level = &self.table.priorities[priority];
        let ready: Vec<&LocalityEntry> = level.iter().filter(|l| self.locality_ready(l)).collect();
        let total: u64 = ready.iter().map(|l| u64::from(l.weight.max(1))).sum();
        let mut roll = self.rng.random_range(0..total.max(1));
        let mut chosen = ready.first().copied()?;
        for l in &ready {
            let w = u64::from(l.weight.max(1));
            if roll < w {
                chosen = l;
                break;
            }
            roll -= w;
        }
        let key = (priority, chosen.id.clone());
        let start = self.cursors.get(&key).copied().unwrap_or(0);
        let n = chosen.endpoints.len();
        let (offset, addr) = (0..n)
            .map(|i| (start + i) % n)
            .map(|i| (i, chosen.endpoints[i]))
            .find(|(_, a)| !self.unready.contains(a))?;
        let locality = chosen.id.clone();
        self.cursors.insert(key, (offset + 1) % n);
        Some(Pick { addr, priority, locality })
    }

    /// Readiness of every locality and endpoint.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            active_priority: self.active_priority(),
            localities: self
                .table
                .localities()
                .map(|(priority, l)| LocalitySnapshot {
                    priority,
                    id: l.id.clone(),
                    weight: l.weight,
                    ready: self.locality_ready(l),
                    endpoints: l
                        .endpoints
                        .iter()
                        .map(|a| EndpointSnapshot { address: a.to_string(), ready: !self.unready.contains(a) })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], n))
    }

    fn loc(zone: &str, weight: u32, ports: &[u16]) -> LocalityEntry {
        LocalityEntry {
            id: LocalityId { region: "us-east-1".into(), zone: zone.into(), sub_zone: String::new() },
            weight,
            endpoints: ports.iter().map(|&p| addr(p)).collect(),
        }
    }

    fn picker(table: Table) -> Picker<StdRng> {
        let mut p = Picker::new(StdRng::seed_from_u64(42));
        p.update(table);
        p
    }

    fn zone_counts(p: &mut Picker<StdRng>, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let pick = p.pick().expect("a pick");
            *counts.entry(pick.locality.zone).or_insert(0) += 1;
        }
        counts
    }

    fn share(counts: &HashMap<String, usize>, zone: &str, n: usize) -> f64 {
        counts.get(zone).copied().unwrap_or(0) as f64 / n as f64
    }

    #[test]
    fn empty_table_picks_nothing() {
        let mut p = picker(Table::default());
        assert_eq!(p.pick(), None);
        assert_eq!(p.active_priority(), None);
    }

    #[test]
    fn locality_weights_are_respected() {
        let mut p = picker(Table {
            priorities: vec![vec![loc("a", 70, &[1, 2]), loc("b", 20, &[3]), loc("c", 10, &[4, 5, 6])]],
        });
        let n = 20_000;
        let counts = zone_counts(&mut p, n);
        for (zone, want) in [("a", 0.70), ("b", 0.20), ("c", 0.10)] {
            let got = share(&counts, zone, n);
            assert!((got - want).abs() < 0.02, "zone {zone}: {got} vs {want}");
        }
    }

    #[test]
    fn endpoint_count_does_not_change_locality_shares() {
        // Weights are per locality: 1 endpoint in a and 5 in b at equal weight
        // still split 50/50.
        let mut p = picker(Table { priorities: vec![vec![loc("a", 1, &[1]), loc("b", 1, &[2, 3, 4, 5, 6])]] });
        let counts = zone_counts(&mut p, 10_000);
        assert!((share(&counts, "a", 10_000) - 0.5).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn priority_one_only_when_priority_zero_has_no_ready_locality() {
        let mut p = picker(Table {
            priorities: vec![vec![loc("a", 100, &[1, 2]), loc("b", 1, &[3])], vec![loc("c", 50, &[4])]],
        });
        let counts = zone_counts(&mut p, 2_000);
        assert!(!counts.contains_key("c"), "{counts:?}");

        // a down entirely: b (weight 1) takes everything, still priority 0.
        p.mark_unready(addr(1));
        p.mark_unready(addr(2));
        let counts = zone_counts(&mut p, 500);
        assert_eq!(counts.get("b"), Some(&500), "{counts:?}");
        assert_eq!(p.active_priority(), Some(0));

        // b down too: priority 1.
        p.mark_unready(addr(3));
        assert_eq!(p.active_priority(), Some(1));
        let pick = p.pick().unwrap();
        assert_eq!((pick.priority, pick.addr), (1, addr(4)));

        // One endpoint of priority 0 back: picks return there at once.
        p.mark_ready(addr(2));
        for _ in 0..100 {
            let pick = p.pick().unwrap();
            assert_eq!((pick.priority, pick.addr), (0, addr(2)));
        }
    }

    #[test]
    fn nothing_ready_means_no_pick() {
        let mut p = picker(Table { priorities: vec![vec![loc("a", 1, &[1])], vec![loc("b", 1, &[2])]] });
        assert!(p.mark_unready(addr(1)));
        assert!(!p.mark_unready(addr(1)), "already unready");
        assert!(p.mark_unready(addr(2)));
        assert_eq!(p.pick(), None);
        assert!(!p.mark_unready(addr(99)), "unknown address");
    }

    #[test]
    fn an_unready_locality_shifts_picks_to_the_others_by_weight() {
        let mut p =
            picker(Table { priorities: vec![vec![loc("a", 60, &[1]), loc("b", 30, &[2]), loc("c", 10, &[3])]] });
        p.mark_unready(addr(1));
        let n = 10_000;
        let counts = zone_counts(&mut p, n);
        assert!(!counts.contains_key("a"), "{counts:?}");
        assert!((share(&counts, "b", n) - 0.75).abs() < 0.02, "{counts:?}");
        assert!((share(&counts, "c", n) - 0.25).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn round_robin_within_a_locality_skips_unready_endpoints() {
        let mut p = picker(Table { priorities: vec![vec![loc("a", 1, &[1, 2, 3])]] });
        let seq: Vec<u16> = (0..6).map(|_| p.pick().unwrap().addr.port()).collect();
        assert_eq!(seq, vec![1, 2, 3, 1, 2, 3]);

        p.mark_unready(addr(2));
        let seq: Vec<u16> = (0..4).map(|_| p.pick().unwrap().addr.port()).collect();
        assert_eq!(seq, vec![1, 3, 1, 3]);
    }

    #[test]
    fn update_keeps_readiness_of_surviving_endpoints() {
        let mut p = picker(Table { priorities: vec![vec![loc("a", 1, &[1, 2])]] });
        p.mark_unready(addr(1));
        p.mark_unready(addr(2));
        // 2 leaves and comes back: it starts ready; 1 stays unready.
        p.update(Table { priorities: vec![vec![loc("a", 1, &[1])]] });
        p.update(Table { priorities: vec![vec![loc("a", 1, &[1, 2])]] });
        assert!(!p.is_ready(addr(1)));
        assert!(p.is_ready(addr(2)));
        assert_eq!(p.pick().unwrap().addr, addr(2));
    }

    #[test]
    fn empty_priority_levels_are_skipped() {
        let mut p = picker(Table { priorities: vec![vec![], vec![loc("b", 1, &[7])]] });
        let pick = p.pick().unwrap();
        assert_eq!((pick.priority, pick.addr), (1, addr(7)));
    }

    #[test]
    fn snapshot_reports_readiness() {
        let mut p = picker(Table { priorities: vec![vec![loc("a", 3, &[1])], vec![loc("b", 1, &[2])]] });
        p.mark_unready(addr(1));
        let s = p.snapshot();
        assert_eq!(s.active_priority, Some(1));
        assert!(!s.localities[0].ready);
        assert!(s.localities[1].ready);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["localities"][0]["zone"], "a");
        assert_eq!(json["localities"][0]["weight"], 3);
        assert_eq!(json["localities"][0]["endpoints"][0]["ready"], false);
    }
}
