//! The census: which zones the connected clients of each service are in,
//! written by the ADS streams as they subscribe to and leave a service's
//! endpoints, and [`follow`], the debouncer that tells the index's writer
//! ([`crate::builder`]) to move the plans to it once bursts of connects settle. The binary and the load generator run
//! the same [`follow`].
//!
//! The census counts **voters, not streams**: each stream joins on behalf of
//! a [`Voter`] (its connection, its client certificate, or its source
//! address — see `server::voter_of`), and a voter has one vote per service,
//! in the zone of its first stream of that service. Opening more streams, or
//! claiming other zones and node ids on them, buys a client nothing.
//!
//! Other replicas' counts come in through [`Census::set_peer`] (see
//! [`crate::peers`]): [`Census::all`] and [`Census::live`], which the plans
//! read, are this replica's own counts plus every live peer's, so every
//! replica plans from the same clients. [`Census::local`] is what this
//! replica offers its peers; [`Census::has_subscribers`] stays local (it
//! decides what this replica encodes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::builder::Writer;
use crate::model::Zone;
use crate::policy::PerZone;

/// Who a census vote belongs to: a hash of the connection, client
/// certificate or source address the streams came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Voter(u64);

impl Voter {
    /// The voter named by `identity` (e.g. `conn:10.0.0.1:53211`, `cert:…`).
    pub fn new(identity: &str) -> Voter {
        Voter(crate::cache::stable_hash(&identity))
    }

    /// A voter of its own, shared with no one (a stream whose connection is unknown; tests).
    pub fn unique() -> Voter {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Voter::new(&format!("unique:{}", NEXT.fetch_add(1, Ordering::Relaxed)))
    }
}

/// One voter's streams of one service: the zones they claimed, in the order
/// first claimed, with a stream count each. The vote is in the first zone.
type Ballot = Vec<(Zone, u32)>;

/// Clients per zone per service (by dial name), and subscribers with or without a zone.
#[derive(Debug, Default)]
pub struct Census {
    /// Streams subscribed to each service's endpoints, with or without a zone.
    subscribers: DashMap<String, usize>,
    /// Votes: per service, per voter, its ballot. Behind the same lock as `zones`.
    ballots: Mutex<Votes>,
    changed: Notify,
    new_zone: AtomicBool,
    /// Each live peer's own census, by peer (its address).
    peers: Mutex<BTreeMap<String, BTreeMap<String, PerZone>>>,
}

/// Add `other`'s counts into `sum`.
fn add_into(sum: &mut BTreeMap<String, PerZone>, other: &BTreeMap<String, PerZone>) {
    for (dial, per_zone) in other {
        let into = sum.entry(dial.clone()).or_default();
        for (zone, count) in per_zone {
            *into.entry(zone.clone()).or_insert(0) += count;
        }
    }
}

#[derive(Debug, Default)]
struct Votes {
    ballots: HashMap<(String, Voter), Ballot>,
    /// Voters per zone, per service: what `ballots` counts to, kept in step.
    zones: BTreeMap<String, PerZone>,
}

impl Votes {
    fn count(&mut self, dial: &str, zone: &Zone, up: bool) -> bool {
        if up {
            let count = self.zones.entry(dial.to_string()).or_default().entry(zone.clone()).or_insert(0);
            *count += 1;
            return *count == 1;
        }
        if let Some(per_zone) = self.zones.get_mut(dial) {
            if let Some(count) = per_zone.get_mut(zone) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_zone.remove(zone);
                }
            }
            if per_zone.is_empty() {
                self.zones.remove(dial);
            }
        }
        false
    }
}

impl Census {
    /// A stream of `voter` in `zone` subscribed to service `dial`'s endpoints.
    /// Clients without a zone count as subscribers but not in any zone. The
    /// voter's vote moves only when its first zone's streams are all gone.
    pub fn join(&self, dial: &str, zone: &Zone, voter: &Voter) {
        *self.subscribers.entry(dial.to_string()).or_insert(0) += 1;
        if zone.is_unknown() {
            return;
        }
        let mut votes = self.ballots.lock().unwrap_or_else(|e| e.into_inner());
        let ballot = votes.ballots.entry((dial.to_string(), *voter)).or_default();
        let new_vote = ballot.is_empty();
        match ballot.iter_mut().find(|(z, _)| z == zone) {
            Some((_, n)) => *n += 1,
            None => ballot.push((zone.clone(), 1)),
        }
        let new_zone = new_vote && votes.count(dial, zone, true);
        drop(votes);
        if new_zone {
            // A zone new to this service changes its shares the most (from
            // "by capacity" to "local"); there are few zones, so apply soon.
            self.new_zone.store(true, Ordering::Release);
        }
        if new_vote {
            self.changed.notify_one();
        }
    }

    /// The stream of `voter` in `zone` left service `dial`.
    pub fn leave(&self, dial: &str, zone: &Zone, voter: &Voter) {
        if let dashmap::Entry::Occupied(mut n) = self.subscribers.entry(dial.to_string()) {
            *n.get_mut() = n.get().saturating_sub(1);
            if *n.get() == 0 {
                n.remove();
            }
        }
        if zone.is_unknown() {
            return;
        }
        let mut votes = self.ballots.lock().unwrap_or_else(|e| e.into_inner());
        let key = (dial.to_string(), *voter);
        let Some(ballot) = votes.ballots.get_mut(&key) else { return };
        let Some(i) = ballot.iter().position(|(z, _)| z == zone) else { return };
        ballot[i].1 -= 1;
        if ballot[i].1 > 0 {
            return;
        }
        ballot.remove(i);
        let next = (i == 0).then(|| ballot.first().map(|(z, _)| z.clone()));
        if ballot.is_empty() {
            votes.ballots.remove(&key);
        }
        let Some(next) = next else { return };
        // The vote was in this zone: it moves to the voter's next zone, or goes.
        votes.count(dial, zone, false);
        let new_zone = next.is_some_and(|z| votes.count(dial, &z, true));
        drop(votes);
        if new_zone {
            self.new_zone.store(true, Ordering::Release);
        }
        self.changed.notify_one();
    }

    /// This replica's own counts: voters per zone per service.
    fn local_counts(&self) -> BTreeMap<String, PerZone> {
        self.ballots.lock().unwrap_or_else(|e| e.into_inner()).zones.clone()
    }

    /// Clients per zone connected now for service `dial`: to this replica
    /// and to every live peer.
    pub fn live(&self, dial: &str) -> PerZone {
        let mut per_zone =
            self.ballots.lock().unwrap_or_else(|e| e.into_inner()).zones.get(dial).cloned().unwrap_or_default();
        for census in self.peers.lock().unwrap_or_else(|e| e.into_inner()).values() {
            for (zone, count) in census.get(dial).into_iter().flatten() {
                *per_zone.entry(zone.clone()).or_insert(0) += count;
            }
        }
        per_zone
    }

    /// Clients per zone of every service: this replica's and every live peer's.
    pub fn all(&self) -> BTreeMap<String, PerZone> {
        let mut sum = self.local_counts();
        for census in self.peers.lock().unwrap_or_else(|e| e.into_inner()).values() {
            add_into(&mut sum, census);
        }
        sum
    }

    /// This replica's own clients per zone of every service: what it offers its peers.
    pub fn local(&self) -> BTreeMap<String, PerZone> {
        self.local_counts()
    }

    /// Peer `peer` reported its own census. Wakes [`Census::changed`] only when
    /// the report differs from the last one (heartbeats wake no one), with the
    /// new-zone flag when a zone appears in the summed census of a service.
    pub fn set_peer(&self, peer: &str, census: BTreeMap<String, PerZone>) {
        let census: BTreeMap<String, PerZone> = census
            .into_iter()
            .map(|(dial, per_zone)| (dial, per_zone.into_iter().filter(|(_, n)| *n > 0).collect::<PerZone>()))
            .filter(|(_, per_zone)| !per_zone.is_empty())
            .collect();
        let before = self.all();
        {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            if peers.get(peer) == Some(&census) {
                return;
            }
            peers.insert(peer.to_string(), census);
        }
        let after = self.all();
        let new_zone = after.iter().any(|(dial, per_zone)| {
            per_zone.keys().any(|zone| !before.get(dial).is_some_and(|old| old.contains_key(zone)))
        });
        if new_zone {
            self.new_zone.store(true, Ordering::Release);
        }
        self.changed.notify_one();
    }

    /// Peer `peer` is gone (or unreachable for too long): its counts leave the sum.
    pub fn forget_peer(&self, peer: &str) {
        let removed = self.peers.lock().unwrap_or_else(|e| e.into_inner()).remove(peer);
        if removed.is_some_and(|census| !census.is_empty()) {
            self.changed.notify_one();
        }
    }

    /// Each live peer's census as last reported (for `/config_dump`).
    pub fn peers(&self) -> BTreeMap<String, BTreeMap<String, PerZone>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether any stream subscribes to service `dial`'s endpoints.
    pub fn has_subscribers(&self, dial: &str) -> bool {
        self.subscribers.get(dial).is_some_and(|n| *n > 0)
    }

    /// Resolves when the census changed since the last call; `true` when a
    /// zone joined a service's census (worth applying without the full debounce).
    pub async fn changed(&self) -> bool {
        self.changed.notified().await;
        self.new_zone.swap(false, Ordering::AcqRel)
    }
}

/// Have `writer` move the plans to `census` after bursts of connects and
/// disconnects settle: `debounce` after a change, at most 100 ms when a zone
/// is new to a service. Runs until the task is dropped.
pub async fn follow(census: Arc<Census>, writer: Writer, debounce: Duration) {
    // Connects that arrive together (a deploy, a control-plane restart) are
    // gathered; a zone new to a service waits only a short moment.
    let new_zone_debounce = debounce.min(Duration::from_millis(100));
    loop {
        let new_zone = census.changed().await;
        tokio::time::sleep(if new_zone { new_zone_debounce } else { debounce }).await;
        writer.apply_census();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_forgets_empty_zones_and_counts_zoneless_subscribers() {
        let census = Census::default();
        let (v1, v2) = (Voter::unique(), Voter::unique());
        census.join("echo.demo", &Zone::new("a"), &v1);
        census.join("echo.demo", &Zone::default(), &v2);
        assert!(census.has_subscribers("echo.demo"));
        assert_eq!(census.live("echo.demo").len(), 1);
        census.leave("echo.demo", &Zone::new("a"), &v1);
        assert!(census.live("echo.demo").is_empty());
        assert!(census.has_subscribers("echo.demo"), "the zoneless one is still there");
        census.leave("echo.demo", &Zone::default(), &v2);
        assert!(!census.has_subscribers("echo.demo"));
    }

    #[test]
    fn a_voter_has_one_vote_per_service_however_many_streams_and_zones() {
        let census = Census::default();
        let (honest, hostile) = (Voter::new("conn:honest"), Voter::new("conn:hostile"));
        census.join("echo.demo", &Zone::new("b"), &honest);
        for _ in 0..100 {
            census.join("echo.demo", &Zone::new("b"), &hostile);
        }
        census.join("echo.demo", &Zone::new("a"), &hostile);
        assert_eq!(census.live("echo.demo"), PerZone::from([(Zone::new("b"), 2)]), "one vote each, first zone");
        // Other services are voted on separately.
        census.join("other.demo", &Zone::new("c"), &hostile);
        assert_eq!(census.live("other.demo"), PerZone::from([(Zone::new("c"), 1)]));
        // The b streams leave: the hostile vote moves to its remaining zone.
        for _ in 0..100 {
            census.leave("echo.demo", &Zone::new("b"), &hostile);
        }
        assert_eq!(census.live("echo.demo"), PerZone::from([(Zone::new("a"), 1), (Zone::new("b"), 1)]));
        census.leave("echo.demo", &Zone::new("a"), &hostile);
        census.leave("echo.demo", &Zone::new("b"), &honest);
        assert!(!census.all().contains_key("echo.demo"));
        assert!(!census.has_subscribers("echo.demo"));
        assert!(census.has_subscribers("other.demo"));
    }

    #[tokio::test(start_paused = true)]
    async fn follow_applies_after_the_debounce() {
        use crate::model::{Endpoint, Health, ServiceEndpoints, ServiceName};
        use crate::policy::Policy;
        let mut builder = crate::builder::Builder::default();
        let endpoints = ServiceEndpoints::new(
            ["a", "b"]
                .iter()
                .enumerate()
                .map(|(i, z)| Endpoint {
                    instance_id: format!("i-{i}"),
                    ip: std::net::IpAddr::from([10, 0, 0, i as u8 + 1]),
                    port: 1,
                    zone: Zone::new(*z),
                    region: "r".into(),
                    health: Health::Healthy,
                    weight: 1,
                    attributes: Default::default(),
                    metadata: Default::default(),
                })
                .collect(),
            false,
        );
        builder.update_service(&ServiceName::new("demo", "echo"), endpoints, Policy::ZoneAware);
        let (cache, census) = (builder.cache().clone(), builder.census().clone());
        let task = tokio::spawn(follow(census.clone(), builder.spawn(), Duration::from_secs(1)));
        tokio::task::yield_now().await;
        census.join("echo.demo", &Zone::new("a"), &Voter::unique());
        // A new zone: applied within ~100 ms, not the full second.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(cache.snapshot().services["echo.demo"].census.get(&Zone::new("a")), Some(&1));
        task.abort();
    }

    fn one(dial: &str, zone: &str, n: u64) -> BTreeMap<String, PerZone> {
        BTreeMap::from([(dial.to_string(), PerZone::from([(Zone::new(zone), n)]))])
    }

    #[test]
    fn plans_read_local_plus_peers_and_peers_read_local_only() {
        let census = Census::default();
        census.join("echo.demo", &Zone::new("a"), &Voter::unique());
        census.set_peer("10.0.0.2:18000", one("echo.demo", "b", 2));
        census.set_peer("10.0.0.3:18000", one("echo.demo", "a", 3));
        let live = census.live("echo.demo");
        assert_eq!(live.get(&Zone::new("a")), Some(&4));
        assert_eq!(live.get(&Zone::new("b")), Some(&2));
        assert_eq!(census.all()["echo.demo"], live);
        assert_eq!(census.local(), one("echo.demo", "a", 1), "peers are offered only our own clients");
        assert!(!census.has_subscribers("other.demo"));
        census.forget_peer("10.0.0.2:18000");
        assert!(!census.live("echo.demo").contains_key(&Zone::new("b")));
        assert_eq!(census.peers().len(), 1);
    }

    #[tokio::test]
    async fn set_peer_wakes_only_on_a_change_and_flags_new_zones() {
        let census = Census::default();
        census.set_peer("p", one("echo.demo", "b", 1));
        assert!(census.changed().await, "zone b is new to echo.demo");
        census.set_peer("p", one("echo.demo", "b", 2));
        assert!(!census.changed().await, "a count moved, no zone is new");
        // The same report again (a heartbeat) wakes no one.
        census.set_peer("p", one("echo.demo", "b", 2));
        let woken = tokio::time::timeout(Duration::from_millis(50), census.changed()).await;
        assert!(woken.is_err(), "a heartbeat must not wake the debouncer");
        census.forget_peer("p");
        assert!(!census.changed().await);
        assert!(census.all().is_empty());
    }
}
