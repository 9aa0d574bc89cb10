//! The single writer of the index. Its inputs are the Cloud Map watchers'
//! writes (each under a [`Claim`]), census changes (the debouncer in
//! [`crate::census`] says when) and readiness; its output is the next
//! immutable [`Snapshot`] with the set of keys that changed, published to the
//! [`Cache`] that the streams read. No other code changes what is served.
//!
//! [`Builder`] is the state and its transitions: plain methods, no I/O, used
//! directly by tests, benchmarks and tools. In the binary it is moved into one
//! task ([`Builder::spawn`]) and fed over a channel through [`Writer`]
//! handles, so writes are applied one at a time, in the order sent, and a
//! watcher's write is answered with what it did.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::cache::{Cache, ServiceEntry, ServiceOptions, Snapshot};
use crate::census::Census;
use crate::model::{Routing, ServiceEndpoints, ServiceName};
use crate::policy::{self, PerZone, Policy};
use crate::resources;
use crate::status::Status;
use crate::wakeup::{Changed, Scope};

/// The right of one Cloud Map watcher to write one service (see
/// [`Builder::claim`]). A watcher whose service was removed, or claimed again
/// by a newer watcher, can no longer write: its claim is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub name: ServiceName,
    owner: u64,
}

/// What a claimed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Changed,
    Unchanged,
    /// The claim was revoked (the service was removed or re-claimed): nothing written.
    Revoked,
}

/// The index's state: every service as served, and who may write each.
#[derive(Debug)]
pub struct Builder {
    cache: Arc<Cache>,
    census: Arc<Census>,
    status: Arc<Status>,
    services: BTreeMap<String, Arc<ServiceEntry>>,
    /// The current claim per service dial name; writes under any other are refused.
    owners: BTreeMap<String, u64>,
    /// Shared with the [`Writer`]s, which hand out claims without a round trip.
    next_owner: Arc<AtomicU64>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::standalone(None)
    }
}

/// The census a service's plans read: the whole service's, and each subset's
/// (the streams join the EDS name `SERVICE.NAMESPACE/SUBSET`).
///
/// A subset's demand is the count of clients subscribed to it per zone, not
/// weighed by the share of calls routes send there: zone-aware shares depend
/// only on how demand divides between zones, and every client of a service
/// has the same routes, so a per-client weight common to all of them cancels.
fn census_of(census: &Census, dial: &str, routing: &Routing) -> (PerZone, BTreeMap<String, PerZone>) {
    let subsets = routing.subsets.keys().map(|s| (s.clone(), census.live(&format!("{dial}/{s}")))).collect();
    (census.live(dial), subsets)
}

impl Builder {
    /// The writer of `cache`, planning from `census` and recording sync
    /// status in `status`. There must be one per cache.
    pub fn new(cache: Arc<Cache>, census: Arc<Census>, status: Arc<Status>) -> Builder {
        let services = cache.snapshot().services.clone();
        Builder { cache, census, status, services, owners: BTreeMap::new(), next_owner: Arc::new(AtomicU64::new(1)) }
    }

    /// A builder with a cache, census and status of its own (tests, tools);
    /// `egress`: where Envoy's egress listener binds.
    pub fn standalone(egress: Option<SocketAddr>) -> Builder {
        Builder::new(Arc::new(Cache::new(egress)), Arc::default(), Arc::default())
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn census(&self) -> &Arc<Census> {
        &self.census
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    /// The snapshot last published.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.cache.snapshot()
    }

    /// Make a new watcher the only writer of `name`, revoking any earlier claim.
    pub fn claim(&mut self, name: &ServiceName) -> Claim {
        let claim = Claim { name: name.clone(), owner: self.next_owner.fetch_add(1, Ordering::Relaxed) };
        self.record(&claim);
        claim
    }

    fn record(&mut self, claim: &Claim) {
        self.owners.insert(claim.name.dial_name(), claim.owner);
    }

    fn owns(&self, claim: &Claim) -> bool {
        self.owners.get(&claim.name.dial_name()) == Some(&claim.owner)
    }

    /// Write under `claim`; refused once the claim is revoked, so a watcher
    /// that is being removed can never write its service back.
    pub fn write(&mut self, claim: &Claim, endpoints: ServiceEndpoints, options: impl Into<ServiceOptions>) -> Write {
        if !self.owns(claim) {
            return Write::Revoked;
        }
        if self.put(&claim.name, endpoints, options.into()) { Write::Changed } else { Write::Unchanged }
    }

    /// Set a service's endpoints and options (a bare [`Policy`] keeps the
    /// default limits) without a claim (tests, tools); `false`: nothing
    /// changed, nothing published.
    pub fn update_service(
        &mut self,
        name: &ServiceName,
        endpoints: ServiceEndpoints,
        options: impl Into<ServiceOptions>,
    ) -> bool {
        self.put(name, endpoints, options.into())
    }

    fn put(&mut self, name: &ServiceName, endpoints: ServiceEndpoints, options: ServiceOptions) -> bool {
        let dial = name.dial_name();
        let scope = match self.services.get(&dial) {
            Some(old) if *old.endpoints == endpoints && old.options() == options => return false,
            // Same options: listener, routes and clusters are made of name + options, so only EDS differs.
            Some(old) if old.options() == options => Scope::Endpoints,
            _ => Scope::All,
        };
        let (census, subset_census) = census_of(&self.census, &dial, &options.routing);
        let entry = ServiceEntry::new(name.clone(), Arc::new(endpoints), options, census, &subset_census);
        self.services.insert(dial.clone(), Arc::new(entry));
        self.publish(changes([(dial, scope)]));
        true
    }

    /// Remove the service of `claim` and revoke the claim; `false` (nothing
    /// removed) when the claim was already revoked.
    pub fn retire(&mut self, claim: &Claim) -> bool {
        if !self.owns(claim) {
            return false;
        }
        let dial = claim.name.dial_name();
        self.owners.remove(&dial);
        self.status.forget(&dial);
        self.remove(&dial)
    }

    /// Remove a service without a claim (tests, tools).
    pub fn remove_service(&mut self, name: &ServiceName) -> bool {
        self.remove(&name.dial_name())
    }

    fn remove(&mut self, dial: &str) -> bool {
        if self.services.remove(dial).is_none() {
            return false;
        }
        self.publish(changes([(dial.to_string(), Scope::All)]));
        true
    }

    /// A Cloud Map call under `claim` just succeeded; ignored once the claim is revoked.
    pub fn mark_synced_by(&self, claim: &Claim) {
        if self.owns(claim) {
            self.status.mark_synced(&claim.name.dial_name());
        }
    }

    /// First Cloud Map sync done: streams may now be answered.
    pub fn set_ready(&self) {
        self.cache.set_ready();
    }

    /// Move services to the live census where that shifts some share by at
    /// least [`policy::SHARE_THRESHOLD`]; returns whether anything was published.
    pub fn apply_census(&mut self) -> bool {
        let live = self.census.all();
        let mut moved = BTreeMap::new();
        for (dial, entry) in self.services.iter_mut() {
            if entry.policy != Policy::ZoneAware {
                continue;
            }
            let new = live.get(dial).cloned().unwrap_or_default();
            let new_subsets: BTreeMap<String, PerZone> = entry
                .subsets
                .keys()
                .map(|s| (s.clone(), live.get(&format!("{dial}/{s}")).cloned().unwrap_or_default()))
                .collect();
            let shifts = |capacity: &PerZone, old: &PerZone, new: &PerZone| {
                new != old && policy::shares_moved(entry.policy, capacity, old, new)
            };
            let shifted = shifts(&entry.capacity, &entry.census, &new)
                || entry.subsets.iter().any(|(s, subset)| shifts(&subset.capacity, &subset.census, &new_subsets[s]));
            if shifted {
                *entry = Arc::new(entry.with_census(new, &new_subsets));
                // The same endpoints and options under another census: only EDS differs.
                moved.insert(dial.clone(), Scope::Endpoints);
            }
        }
        if moved.is_empty() {
            return false;
        }
        self.publish(Changed::Keys(moved));
        true
    }

    fn publish(&self, changed: Changed) {
        self.cache.publish(self.services.clone(), changed);
    }

    /// Move the builder into its own task; it applies what the returned
    /// [`Writer`]s send, in order, until the last of them is dropped.
    pub fn spawn(self) -> Writer {
        let (inputs, mut received) = mpsc::unbounded_channel();
        let writer = Writer { inputs, next_owner: self.next_owner.clone() };
        let mut builder = self;
        tokio::spawn(async move {
            while let Some(input) = received.recv().await {
                builder.apply(input);
            }
        });
        writer
    }

    fn apply(&mut self, input: Input) {
        match input {
            Input::Claim(claim) => self.record(&claim),
            Input::Write { claim, endpoints, options, done } => {
                let _ = done.send(self.write(&claim, endpoints, options));
            }
            Input::Retire(claim) => {
                self.retire(&claim);
            }
            Input::Synced(claim) => self.mark_synced_by(&claim),
            Input::Census => {
                if self.apply_census() {
                    tracing::debug!("census changed zone shares");
                }
            }
            Input::Ready(done) => {
                self.set_ready();
                let _ = done.send(());
            }
        }
    }
}

/// `keys`, plus the egress listener's key when a change is not only of
/// endpoints: its routes list every service and its options.
fn changes(keys: impl IntoIterator<Item = (String, Scope)>) -> Changed {
    let mut keys: BTreeMap<String, Scope> = keys.into_iter().collect();
    if keys.values().any(|s| *s == Scope::All) {
        keys.insert(resources::EGRESS.to_string(), Scope::All);
    }
    Changed::Keys(keys)
}

/// What a [`Writer`] sends the builder's task.
enum Input {
    Claim(Claim),
    Write { claim: Claim, endpoints: ServiceEndpoints, options: ServiceOptions, done: oneshot::Sender<Write> },
    Retire(Claim),
    Synced(Claim),
    Census,
    Ready(oneshot::Sender<()>),
}

/// A handle on the builder's task (cheap to clone). The channel is
/// unbounded but cannot run away: each watcher awaits its write, and claims,
/// retirements and census ticks are one per watcher or per debounce.
#[derive(Debug, Clone)]
pub struct Writer {
    inputs: mpsc::UnboundedSender<Input>,
    next_owner: Arc<AtomicU64>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Claim(_) => "Claim",
            Input::Write { .. } => "Write",
            Input::Retire(_) => "Retire",
            Input::Synced(_) => "Synced",
            Input::Census => "Census",
            Input::Ready(_) => "Ready",
        })
    }
}

impl Writer {
    /// [`Builder::claim`]: applied before anything sent after it.
    pub fn claim(&self, name: &ServiceName) -> Claim {
        let claim = Claim { name: name.clone(), owner: self.next_owner.fetch_add(1, Ordering::Relaxed) };
        let _ = self.inputs.send(Input::Claim(claim.clone()));
        claim
    }

    /// [`Builder::write`]; [`Write::Revoked`] once the builder has stopped.
    pub async fn write(&self, claim: &Claim, endpoints: ServiceEndpoints, options: impl Into<ServiceOptions>) -> Write {
        let (done, outcome) = oneshot::channel();
        let input = Input::Write { claim: claim.clone(), endpoints, options: options.into(), done };
        if self.inputs.send(input).is_err() {
            return Write::Revoked;
        }
        outcome.await.unwrap_or(Write::Revoked)
    }

    /// [`Builder::retire`].
    pub fn retire(&self, claim: &Claim) {
        let _ = self.inputs.send(Input::Retire(claim.clone()));
    }

    /// [`Builder::mark_synced_by`].
    pub fn mark_synced_by(&self, claim: &Claim) {
        let _ = self.inputs.send(Input::Synced(claim.clone()));
    }

    /// [`Builder::apply_census`].
    pub fn apply_census(&self) {
        let _ = self.inputs.send(Input::Census);
    }

    /// [`Builder::set_ready`], after everything sent before it; returns once done.
    pub async fn set_ready(&self) {
        let (done, applied) = oneshot::channel();
        if self.inputs.send(Input::Ready(done)).is_ok() {
            let _ = applied.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::endpoints;
    use crate::census::Voter;
    use crate::model::Zone;

    #[test]
    fn each_snapshot_says_which_services_changed() {
        let mut b = Builder::standalone(Some("127.0.0.1:15001".parse().expect("addr")));
        let keys = |names: &[(&str, Scope)]| Changed::Keys(names.iter().map(|(k, s)| (k.to_string(), *s)).collect());
        let (echo, other) = (ServiceName::new("demo", "echo"), ServiceName::new("demo", "other"));
        b.update_service(&echo, endpoints(&["a"]), Policy::ZoneAware);
        let (new, endpoints_only) = (Scope::All, Scope::Endpoints);
        assert_eq!(b.snapshot().changed, keys(&[("echo.demo", new), (resources::EGRESS, new)]), "a new service");
        b.update_service(&other, endpoints(&["a"]), Policy::ZoneAware);
        b.update_service(&echo, endpoints(&["a", "b"]), Policy::ZoneAware);
        assert_eq!(b.snapshot().changed, keys(&[("echo.demo", endpoints_only)]), "new endpoints: its EDS");
        b.update_service(&echo, endpoints(&["a", "b"]), Policy::LocalFirst);
        assert_eq!(
            b.snapshot().changed,
            keys(&[("echo.demo", Scope::All), (resources::EGRESS, Scope::All)]),
            "new options"
        );
        b.update_service(&echo, endpoints(&["a", "b"]), Policy::ZoneAware);
        b.census().join("echo.demo", &Zone::new("a"), &Voter::unique());
        assert!(b.apply_census());
        assert_eq!(b.snapshot().changed, keys(&[("echo.demo", endpoints_only)]), "a census move: its EDS");
        b.remove_service(&other);
        assert_eq!(b.snapshot().changed, keys(&[("other.demo", Scope::All), (resources::EGRESS, Scope::All)]));
    }

    #[test]
    fn unchanged_update_publishes_nothing() {
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        assert!(b.update_service(&name, endpoints(&["a", "b"]), Policy::ZoneAware));
        let g = b.snapshot().generation;
        let mut reversed = endpoints(&["a", "b"]).endpoints;
        reversed.reverse();
        let reordered = ServiceEndpoints::new(reversed, false);
        assert!(!b.update_service(&name, reordered, Policy::ZoneAware));
        assert_eq!(b.snapshot().generation, g);
        assert!(b.update_service(&name, endpoints(&["a"]), Policy::ZoneAware));
        assert!(b.remove_service(&name));
        assert!(!b.remove_service(&name));
    }

    #[test]
    fn a_revoked_claim_never_writes_again() {
        // The race of issue 11, step by step: a watcher is between its
        // DiscoverInstances and its write when its service is removed.
        let mut b = Builder::default();
        let name = ServiceName::new("demo", "echo");
        let old = b.claim(&name);
        assert_eq!(b.write(&old, endpoints(&["a"]), Policy::ZoneAware), Write::Changed);
        b.mark_synced_by(&old);
        assert!(b.retire(&old), "removal by the namespace task");
        assert!(!b.snapshot().services.contains_key("echo.demo"));
        assert!(b.status().sync_ages().is_empty());
        // The old watcher's read completes now: refused, nothing comes back.
        let generation = b.snapshot().generation;
        assert_eq!(b.write(&old, endpoints(&["a", "b"]), Policy::ZoneAware), Write::Revoked);
        b.mark_synced_by(&old);
        assert!(!b.snapshot().services.contains_key("echo.demo"));
        assert_eq!(b.snapshot().generation, generation, "a refused write publishes nothing");
        assert!(b.status().sync_ages().is_empty());
        assert!(!b.retire(&old));
        // The service reappears: the new watcher writes, the old one still cannot clobber it.
        let new = b.claim(&name);
        assert_eq!(b.write(&new, endpoints(&["c"]), Policy::ZoneAware), Write::Changed);
        assert_eq!(b.write(&old, endpoints(&["a"]), Policy::ZoneAware), Write::Revoked);
        assert!(!b.retire(&old), "an old claim cannot remove the new watcher's service");
        assert_eq!(b.snapshot().services["echo.demo"].endpoints.endpoints[0].zone, Zone::new("c"));
        assert_eq!(b.write(&new, endpoints(&["c"]), Policy::ZoneAware), Write::Unchanged);
    }

    #[tokio::test]
    async fn the_task_applies_writes_in_the_order_sent() {
        let b = Builder::default();
        let (cache, status) = (b.cache().clone(), b.status().clone());
        let writer = b.spawn();
        let name = ServiceName::new("demo", "echo");
        // Claimed and written without waiting for the claim: the write comes after it.
        let claim = writer.claim(&name);
        assert_eq!(writer.write(&claim, endpoints(&["a"]), Policy::ZoneAware).await, Write::Changed);
        assert_eq!(writer.write(&claim, endpoints(&["a"]), Policy::ZoneAware).await, Write::Unchanged);
        writer.mark_synced_by(&claim);
        // Readiness follows the writes sent before it: a ready cache already holds them.
        writer.set_ready().await;
        assert!(cache.is_ready());
        assert!(cache.snapshot().services.contains_key("echo.demo"));
        assert!(status.sync_ages().contains_key("echo.demo"));
        // A newer claim revokes the older one, and retiring it removes the service.
        let newer = writer.claim(&name);
        assert_eq!(writer.write(&claim, endpoints(&["b"]), Policy::ZoneAware).await, Write::Revoked);
        writer.retire(&newer);
        writer.set_ready().await;
        assert!(!cache.snapshot().services.contains_key("echo.demo"));
        assert!(status.sync_ages().is_empty());
    }
}
