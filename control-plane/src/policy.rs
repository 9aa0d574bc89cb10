//! Traffic shares per zone: the pure heart of same-zone routing.
//!
//! Inputs are the healthy capacity per zone of one service and the census
//! (connected clients per zone subscribed to it); the output is, for a
//! client in a given zone, the share of its traffic each zone should get,
//! and the [`Plan`] that expresses those shares as xDS priorities and
//! locality weights. No I/O; every policy is a function of its inputs.
//! See `shared/notes/zone-aware.md` for the algorithm and a worked example.

use std::collections::BTreeMap;

use crate::model::Zone;

/// Locality weights are shares scaled to this total (never 0: gRPC drops a
/// locality of weight 0).
pub const WEIGHT_SCALE: f64 = 10_000.0;

/// How a service divides a client's traffic between zones.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, Default)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum Policy {
    /// Envoy's zone-aware algorithm with the census of connected clients as
    /// the local cluster: stay local while the zone has capacity for its
    /// clients, spill the excess to zones with spare capacity.
    #[default]
    ZoneAware,
    /// Priority 0 = own zone, priority 1 = the rest.
    LocalFirst,
    /// Keep `local_share` of the traffic in the own zone, the rest by capacity.
    FixedShare { local_share: f64 },
    /// The same capacity-weighted localities for everyone.
    None,
}

/// Per-zone counts: capacity (healthy endpoint weight) or demand (clients).
pub type PerZone = BTreeMap<Zone, u64>;

/// The fraction of a client's traffic each zone receives; sums to 1 over
/// zones with capacity, or is empty when no zone has capacity.
pub type Shares = BTreeMap<Zone, f64>;

/// One locality of a priority and its weight (≥ 1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Weighted {
    pub zone: Zone,
    pub weight: u32,
}

/// Shares expressed for a priority-aware client: `priorities[0]` holds every
/// zone with a share > 0; `priorities[1]` (if any) holds zones with capacity
/// but no share, weighted by capacity, so clients still fail over to them
/// when the zones of priority 0 die. Never an empty priority.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Plan {
    pub priorities: Vec<Vec<Weighted>>,
}

impl Plan {
    /// The weight given to `zone`, with its priority.
    pub fn find(&self, zone: &Zone) -> Option<(u32, u32)> {
        self.priorities
            .iter()
            .enumerate()
            .find_map(|(p, localities)| localities.iter().find(|l| &l.zone == zone).map(|l| (p as u32, l.weight)))
    }

    /// The shares a client given this plan sends to each zone while every
    /// zone is healthy: priority 0's weights, normalised (the other
    /// priorities are failover only). Empty for an empty plan.
    pub fn shares(&self) -> Shares {
        let Some(first) = self.priorities.first() else { return Shares::new() };
        let total: u64 = first.iter().map(|l| u64::from(l.weight)).sum();
        if total == 0 {
            return Shares::new();
        }
        first.iter().map(|l| (l.zone.clone(), f64::from(l.weight) / total as f64)).collect()
    }
}

/// Shares for a client in `client_zone` (`None` or unknown zone = no preference).
pub fn shares(policy: Policy, client_zone: Option<&Zone>, capacity: &PerZone, census: &PerZone) -> Shares {
    let capacity: PerZone = capacity.iter().filter(|(_, c)| **c > 0).map(|(z, c)| (z.clone(), *c)).collect();
    let total_capacity: u64 = capacity.values().sum();
    if total_capacity == 0 {
        return Shares::new();
    }
    let by_capacity = proportional(&capacity, None);
    let local = match client_zone.filter(|z| !z.is_unknown()) {
        Some(z) if capacity.contains_key(z) => z,
        // A client in a zone without capacity (or with no zone) has nothing local to prefer.
        _ => return by_capacity,
    };
    match policy {
        Policy::None => by_capacity,
        Policy::LocalFirst => BTreeMap::from([(local.clone(), 1.0)]),
        Policy::FixedShare { local_share } => {
            let local_share = if local_share.is_finite() { local_share.clamp(0.0, 1.0) } else { 0.5 };
            with_local(local, local_share, &capacity)
        }
        Policy::ZoneAware => {
            // Demand counts only zones that also have capacity: clients in a zone without
            // servers spread by capacity (above), adding the same load per unit of capacity
            // everywhere, so counting them would only make the other zones look emptier.
            let census: PerZone = census
                .iter()
                .filter(|(z, d)| **d > 0 && !z.is_unknown() && capacity.contains_key(*z))
                .map(|(z, d)| (z.clone(), *d))
                .collect();
            let total_demand: u64 = census.values().sum();
            let demand_here = census.get(local).copied().unwrap_or(0);
            if total_demand == 0 || demand_here == 0 {
                return by_capacity;
            }
            let upstream = |z: &Zone| capacity.get(z).copied().unwrap_or(0) as f64 / total_capacity as f64;
            let demand = |z: &Zone| census.get(z).copied().unwrap_or(0) as f64 / total_demand as f64;
            let (up_local, demand_local) = (upstream(local), demand(local));
            if up_local >= demand_local {
                return BTreeMap::from([(local.clone(), 1.0)]);
            }
            let keep = up_local / demand_local;
            let residual: BTreeMap<Zone, f64> = capacity
                .keys()
                .filter(|z| *z != local)
                .map(|z| (z.clone(), (upstream(z) - demand(z)).max(0.0)))
                .collect();
            let total_residual: f64 = residual.values().sum();
            let mut out = BTreeMap::from([(local.clone(), keep)]);
            if total_residual > 0.0 {
                for (z, r) in residual {
                    if r > 0.0 {
                        out.insert(z, (1.0 - keep) * r / total_residual);
                    }
                }
            } else {
                // Every zone is short of capacity: spread the excess by capacity.
                for (z, share) in proportional(&capacity, Some(local)) {
                    out.insert(z, (1.0 - keep) * share);
                }
            }
            out
        }
    }
}

/// `local_share` in `local`, the rest over the other zones by capacity.
fn with_local(local: &Zone, local_share: f64, capacity: &PerZone) -> Shares {
    let others = proportional(capacity, Some(local));
    if others.is_empty() {
        return BTreeMap::from([(local.clone(), 1.0)]);
    }
    let mut out: Shares = others.into_iter().map(|(z, s)| (z, s * (1.0 - local_share))).collect();
    out.insert(local.clone(), local_share);
    out
}

/// Capacity-proportional shares, leaving out `except`.
fn proportional(capacity: &PerZone, except: Option<&Zone>) -> Shares {
    let total: u64 = capacity.iter().filter(|(z, _)| Some(*z) != except).map(|(_, c)| *c).sum();
    if total == 0 {
        return Shares::new();
    }
    capacity
        .iter()
        .filter(|(z, c)| Some(*z) != except && **c > 0)
        .map(|(z, c)| (z.clone(), *c as f64 / total as f64))
        .collect()
}

/// Express shares as priorities for a priority-aware client (see [`Plan`]).
/// Every priority's weights sum to at most [`WEIGHT_SUM_MAX`].
pub fn plan(shares: &Shares, capacity: &PerZone) -> Plan {
    let mut first = Vec::new();
    for (zone, share) in shares {
        // Shares below half a weight unit round to 0: leave such zones to the failover priority.
        let weight = (share * WEIGHT_SCALE).round();
        if weight >= 1.0 {
            first.push((zone.clone(), weight as u64));
        }
    }
    let rest: Vec<(Zone, u64)> = capacity
        .iter()
        .filter(|(z, c)| **c > 0 && !first.iter().any(|(w, _)| w == *z))
        .map(|(z, c)| (z.clone(), *c))
        .collect();
    let priorities = [first, rest]
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| {
            let weights = fit_weights(&p.iter().map(|(_, w)| *w).collect::<Vec<_>>());
            p.into_iter().zip(weights).map(|((zone, _), weight)| Weighted { zone, weight }).collect()
        })
        .collect();
    Plan { priorities }
}

/// Census changes that move no zone's share by this much or more are not pushed.
pub const SHARE_THRESHOLD: f64 = 0.02;

/// The plan for a client in `zone`. The census counts the asking zone at
/// least once, so a client is planned for as one of the clients it joins.
pub fn plan_for(policy: Policy, zone: Option<&Zone>, capacity: &PerZone, census: &PerZone) -> Plan {
    let census = with_self(census, zone);
    plan(&shares(policy, zone, capacity, &census), capacity)
}

fn with_self(census: &PerZone, zone: Option<&Zone>) -> PerZone {
    let mut census = census.clone();
    if let Some(zone) = zone.filter(|z| !z.is_unknown()) {
        let count = census.entry(zone.clone()).or_insert(0);
        *count = (*count).max(1);
    }
    census
}

/// Whether moving from census `old` to `new` shifts any zone's share by
/// [`SHARE_THRESHOLD`] or more, for a client in any zone.
pub fn shares_moved(policy: Policy, capacity: &PerZone, old: &PerZone, new: &PerZone) -> bool {
    let zones: std::collections::BTreeSet<&Zone> = capacity.keys().chain(old.keys()).chain(new.keys()).collect();
    zones.into_iter().any(|zone| {
        let before = shares(policy, Some(zone), capacity, &with_self(old, Some(zone)));
        let after = shares(policy, Some(zone), capacity, &with_self(new, Some(zone)));
        let destinations: std::collections::BTreeSet<&Zone> = before.keys().chain(after.keys()).collect();
        destinations.into_iter().any(|d| {
            let b = before.get(d).copied().unwrap_or(0.0);
            let a = after.get(d).copied().unwrap_or(0.0);
            (a - b).abs() >= SHARE_THRESHOLD
        })
    })
}

/// The most the weights of one priority (localities) or of one locality
/// (endpoints) may sum to: gRPC (grpc-go `parseEDSRespProto`, C-core
/// `EdsResourceParse`) and Envoy (`normalizeLocalityWeights`,
/// `normalizeHostWeights`) reject a ClusterLoadAssignment beyond it.
pub const WEIGHT_SUM_MAX: u64 = u32::MAX as u64;

/// `weights` scaled down, if need be, so they sum to at most
/// [`WEIGHT_SUM_MAX`]; every weight stays ≥ 1 (0 drops a locality in gRPC
/// and is a NACK for an endpoint) and the proportions are kept as far as
/// integers allow. Weights that already fit are returned unchanged.
pub fn fit_weights(weights: &[u64]) -> Vec<u32> {
    let weights: Vec<u64> = weights.iter().map(|w| (*w).max(1)).collect();
    let total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    if total <= u128::from(WEIGHT_SUM_MAX) {
        return weights.iter().map(|w| *w as u32).collect();
    }
    // Scaling to (MAX - n) leaves room for the n weights that flooring lifts back to 1:
    // Σ max(1, ⌊w·f⌋) ≤ Σ (w·f + 1) = MAX - n + n.
    let n = weights.len() as u128;
    let room = u128::from(WEIGHT_SUM_MAX).saturating_sub(n).max(1);
    weights.iter().map(|w| (u128::from(*w) * room / total).clamp(1, u128::from(u32::MAX)) as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zones(pairs: &[(&str, u64)]) -> PerZone {
        pairs.iter().map(|(z, c)| (Zone::new(*z), *c)).collect()
    }

    fn approx(shares: &Shares, expected: &[(&str, f64)]) {
        let got: Vec<(String, f64)> = shares.iter().map(|(z, s)| (z.0.clone(), *s)).collect();
        assert_eq!(got.len(), expected.len(), "got {got:?}, expected {expected:?}");
        for ((gz, gs), (ez, es)) in got.iter().zip(expected) {
            assert_eq!(gz, ez, "got {got:?}");
            assert!((gs - es).abs() < 1e-9, "zone {gz}: got {gs}, expected {es} ({got:?})");
        }
    }

    const THIRD: f64 = 1.0 / 3.0;

    #[test]
    fn table() {
        let even = zones(&[("a", 2), ("b", 2), ("c", 2)]);
        let balanced = zones(&[("a", 1), ("b", 1), ("c", 1)]);
        let skewed = zones(&[("a", 4), ("b", 1), ("c", 1)]);
        let za = Policy::ZoneAware;
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Policy, Option<&str>, PerZone, PerZone, Vec<(&str, f64)>)> = vec![
            // The worked example of notes/zone-aware.md: a keeps 50 %, sends 25 % to b and c.
            (
                "worked example, a",
                za,
                Some("a"),
                even.clone(),
                skewed.clone(),
                vec![("a", 0.5), ("b", 0.25), ("c", 0.25)],
            ),
            ("worked example, b", za, Some("b"), even.clone(), skewed.clone(), vec![("b", 1.0)]),
            ("balanced stays local", za, Some("a"), even.clone(), balanced.clone(), vec![("a", 1.0)]),
            (
                "no census: by capacity",
                za,
                Some("a"),
                even.clone(),
                PerZone::new(),
                vec![("a", THIRD), ("b", THIRD), ("c", THIRD)],
            ),
            (
                "no zone: by capacity",
                za,
                None,
                zones(&[("a", 1), ("b", 3)]),
                balanced.clone(),
                vec![("a", 0.25), ("b", 0.75)],
            ),
            (
                "unknown zone: by capacity",
                za,
                Some(""),
                zones(&[("a", 1), ("b", 3)]),
                balanced.clone(),
                vec![("a", 0.25), ("b", 0.75)],
            ),
            (
                "own zone empty: by capacity",
                za,
                Some("d"),
                even.clone(),
                balanced.clone(),
                vec![("a", THIRD), ("b", THIRD), ("c", THIRD)],
            ),
            (
                "own zone not in census",
                za,
                Some("a"),
                even.clone(),
                zones(&[("b", 5)]),
                vec![("a", THIRD), ("b", THIRD), ("c", THIRD)],
            ),
            ("one zone only", za, Some("a"), zones(&[("a", 3)]), zones(&[("a", 9)]), vec![("a", 1.0)]),
            ("zero capacity", za, Some("a"), zones(&[("a", 0), ("b", 0)]), balanced.clone(), vec![]),
            (
                // a: upstream 1/4, demand 1/2 → keeps 1/2; b saturated, c has residual → all excess to c.
                "residual goes where capacity is spare",
                za,
                Some("a"),
                zones(&[("a", 1), ("b", 1), ("c", 2)]),
                zones(&[("a", 2), ("b", 1), ("c", 1)]),
                vec![("a", 0.5), ("c", 0.5)],
            ),
            (
                // Clients in x (no servers) spread by capacity and are left out of the demand:
                // a and b have equal demand (1/2 each, not 1/4) and equal capacity.
                "census zone without servers",
                za,
                Some("a"),
                zones(&[("a", 1), ("b", 1)]),
                zones(&[("a", 1), ("b", 1), ("x", 2)]),
                vec![("a", 1.0)],
            ),
            (
                // Issue 11: demand over {a, b} is 1/2 each; a has 1/4 of the capacity, so it
                // keeps 1/2 and sends the rest to b. Counting x made a's demand 1/4 and kept a
                // 100 % local at 3 units of load per unit of capacity against 1.67 in b.
                "census zone without servers does not dilute demand",
                za,
                Some("a"),
                zones(&[("a", 1), ("b", 3)]),
                zones(&[("a", 2), ("b", 2), ("x", 4)]),
                vec![("a", 0.5), ("b", 0.5)],
            ),
            (
                "census zone without servers, the roomy zone stays local",
                za,
                Some("b"),
                zones(&[("a", 1), ("b", 3)]),
                zones(&[("a", 2), ("b", 2), ("x", 4)]),
                vec![("b", 1.0)],
            ),
            ("local-first", Policy::LocalFirst, Some("b"), even.clone(), skewed.clone(), vec![("b", 1.0)]),
            (
                "local-first, own zone dead",
                Policy::LocalFirst,
                Some("b"),
                zones(&[("a", 2), ("c", 2)]),
                skewed.clone(),
                vec![("a", 0.5), ("c", 0.5)],
            ),
            (
                "fixed-share 0.5",
                Policy::FixedShare { local_share: 0.5 },
                Some("a"),
                even.clone(),
                skewed.clone(),
                vec![("a", 0.5), ("b", 0.25), ("c", 0.25)],
            ),
            (
                "fixed-share 0",
                Policy::FixedShare { local_share: 0.0 },
                Some("a"),
                even.clone(),
                skewed.clone(),
                vec![("a", 0.0), ("b", 0.5), ("c", 0.5)],
            ),
            (
                "fixed-share NaN = 0.5",
                Policy::FixedShare { local_share: f64::NAN },
                Some("a"),
                zones(&[("a", 1), ("b", 1)]),
                skewed.clone(),
                vec![("a", 0.5), ("b", 0.5)],
            ),
            (
                "fixed-share alone",
                Policy::FixedShare { local_share: 0.3 },
                Some("a"),
                zones(&[("a", 1)]),
                skewed.clone(),
                vec![("a", 1.0)],
            ),
            (
                "none",
                Policy::None,
                Some("a"),
                zones(&[("a", 1), ("b", 3)]),
                skewed.clone(),
                vec![("a", 0.25), ("b", 0.75)],
            ),
        ];
        for (name, policy, zone, capacity, census, expected) in cases {
            let zone = zone.map(Zone::new);
            let got = shares(policy, zone.as_ref(), &capacity, &census);
            eprintln!("case {name}");
            approx(&got, &expected);
        }
    }

    #[test]
    fn spill_over_follows_residual_capacity() {
        // a: upstream 1/2, demand 6/10 → keeps 5/6; b: upstream 1/2, demand 4/10 → takes the rest.
        let capacity = zones(&[("a", 1), ("b", 1)]);
        let s = shares(Policy::ZoneAware, Some(&Zone::new("a")), &capacity, &zones(&[("a", 6), ("b", 4)]));
        approx(&s, &[("a", 0.5 / 0.6), ("b", 1.0 - 0.5 / 0.6)]);
        // Three zones: a up .25 / demand .4 keeps .625; b residual .05, c residual .1 → 1:2.
        let capacity = zones(&[("a", 1), ("b", 1), ("c", 2)]);
        let s = shares(Policy::ZoneAware, Some(&Zone::new("a")), &capacity, &zones(&[("a", 40), ("b", 20), ("c", 40)]));
        approx(&s, &[("a", 0.625), ("b", 0.125), ("c", 0.25)]);
    }

    #[test]
    fn serverless_census_zone_leaves_load_per_capacity_even() {
        // The example, as load: every client sends 1 unit; x's clients spread by capacity.
        let capacity = zones(&[("a", 1), ("b", 3)]);
        let census = zones(&[("a", 2), ("b", 2), ("x", 4)]);
        let mut load: BTreeMap<Zone, f64> = BTreeMap::new();
        for (zone, clients) in &census {
            for (to, share) in shares(Policy::ZoneAware, Some(zone), &capacity, &census) {
                *load.entry(to).or_default() += *clients as f64 * share;
            }
        }
        for (zone, c) in &capacity {
            let per_capacity = load[zone] / *c as f64;
            assert!((per_capacity - 2.0).abs() < 1e-9, "zone {zone}: {per_capacity} per unit ({load:?})");
        }
    }

    #[test]
    fn weights_fit_the_per_priority_sum() {
        assert_eq!(fit_weights(&[1, 2, 3]), vec![1, 2, 3]);
        assert_eq!(fit_weights(&[0, 5]), vec![1, 5]);
        let max = u64::from(u32::MAX);
        for weights in [vec![max, max], vec![max, 1, 1, 1], vec![max / 2 + 1, max / 2 + 1], vec![max; 1000]] {
            let fitted = fit_weights(&weights);
            let sum: u64 = fitted.iter().map(|w| u64::from(*w)).sum();
            assert!(sum <= WEIGHT_SUM_MAX, "{weights:?} → sum {sum}");
            assert!(fitted.iter().all(|w| *w >= 1));
        }
        // Proportions survive scaling.
        let fitted = fit_weights(&[max, max / 3]);
        let ratio = f64::from(fitted[0]) / f64::from(fitted[1]);
        assert!((ratio - 3.0).abs() < 1e-6, "{fitted:?}");
        // Huge capacities in the failover priority (they used to be passed on raw).
        let capacity = zones(&[("a", 1), ("b", max), ("c", max)]);
        let p = plan(&shares(Policy::LocalFirst, Some(&Zone::new("a")), &capacity, &PerZone::new()), &capacity);
        let sum: u64 = p.priorities[1].iter().map(|l| u64::from(l.weight)).sum();
        assert!(sum <= WEIGHT_SUM_MAX, "priority 1 sums to {sum}");
        assert_eq!(p.priorities[1].len(), 2);
    }

    #[test]
    fn plan_expresses_shares_as_two_priorities() {
        let capacity = zones(&[("a", 2), ("b", 2), ("c", 2)]);
        let s = shares(Policy::LocalFirst, Some(&Zone::new("a")), &capacity, &PerZone::new());
        let p = plan(&s, &capacity);
        assert_eq!(p.priorities.len(), 2);
        assert_eq!(p.find(&Zone::new("a")), Some((0, 10_000)));
        assert_eq!(p.find(&Zone::new("b")), Some((1, 2)));
        assert_eq!(p.find(&Zone::new("c")), Some((1, 2)));

        let s = shares(Policy::ZoneAware, Some(&Zone::new("a")), &capacity, &zones(&[("a", 4), ("b", 1), ("c", 1)]));
        let p = plan(&s, &capacity);
        assert_eq!(p.priorities.len(), 1);
        assert_eq!(p.find(&Zone::new("a")), Some((0, 5_000)));
        assert_eq!(p.find(&Zone::new("b")), Some((0, 2_500)));

        let s = shares(Policy::None, None, &capacity, &PerZone::new());
        assert_eq!(plan(&s, &capacity).priorities.len(), 1);
        assert_eq!(plan(&Shares::new(), &PerZone::new()), Plan::default());
    }

    fn per_zone() -> impl Strategy<Value = PerZone> {
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c", "d", "e", ""]).prop_map(Zone::new),
            prop_oneof![0u64..50, Just(u64::from(u32::MAX)), 0u64..=u64::from(u32::MAX) * 8],
            0..6,
        )
    }

    fn policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::ZoneAware),
            Just(Policy::LocalFirst),
            Just(Policy::None),
            (0.0f64..=1.0).prop_map(|local_share| Policy::FixedShare { local_share }),
        ]
    }

    proptest! {
        #[test]
        fn shares_are_a_distribution_over_capacity(
            policy in policy(),
            capacity in per_zone(),
            census in per_zone(),
            zone in prop::option::of(prop::sample::select(vec!["a", "b", "c", "x", ""]).prop_map(Zone::new)),
        ) {
            let s = shares(policy, zone.as_ref(), &capacity, &census);
            let total_capacity: u64 = capacity.values().sum();
            if total_capacity == 0 {
                prop_assert!(s.is_empty());
            } else {
                let sum: f64 = s.values().sum();
                prop_assert!((sum - 1.0).abs() < 1e-9, "sum {sum} for {s:?}");
                for (z, share) in &s {
                    prop_assert!(*share >= 0.0 && share.is_finite());
                    prop_assert!(capacity.get(z).copied().unwrap_or(0) > 0, "share for zone without capacity");
                }
            }
            let p = plan(&s, &capacity);
            prop_assert!(p.priorities.len() <= 2);
            // What the plan tells a client is the shares it came from (to rounding).
            let told = p.shares();
            for (z, share) in &s {
                let got = told.get(z).copied().unwrap_or(0.0);
                prop_assert!((got - share).abs() < 1e-3, "zone {z:?}: planned {share}, told {got}");
            }
            prop_assert!(told.keys().all(|z| s.contains_key(z)), "told a zone without a share: {told:?}");
            for priority in &p.priorities {
                let sum: u64 = priority.iter().map(|l| u64::from(l.weight)).sum();
                prop_assert!(sum <= WEIGHT_SUM_MAX, "priority sums to {sum}");
            }
            let mut listed = std::collections::BTreeSet::new();
            for priority in &p.priorities {
                prop_assert!(!priority.is_empty(), "empty priority (priorities must be contiguous)");
                for l in priority {
                    prop_assert!(l.weight >= 1, "locality weight 0");
                    prop_assert!(listed.insert(l.zone.clone()), "zone listed twice");
                }
            }
            // Every zone with capacity is reachable for failover.
            for (z, c) in &capacity {
                if *c > 0 {
                    prop_assert!(listed.contains(z), "zone {z} with capacity missing from plan");
                }
            }
        }
    }
}
