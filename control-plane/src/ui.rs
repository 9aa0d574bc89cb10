//! The operator page: what `/ui` on the admin address shows, as data.
//!
//! [`view`] turns what the control plane serves (the snapshot, the live
//! census, the connected streams, Cloud Map sync state) into the JSON the
//! page polls from `/ui/state`: per service its zones (endpoints, healthy
//! capacity, clients), the traffic matrix — for clients in each zone, the
//! share of their calls each server zone gets, read from the plans the
//! clients were sent — with the cross-zone share as one number, the skipped
//! instances and why, and the clients with their ACK/NACK state. Pure: the
//! admin server gathers the inputs and serves [`PAGE`], [`SCRIPT`] and
//! [`STYLE`], which are compiled into the binary (no CDN, nothing to build).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cache::{ServiceEntry, Snapshot};
use crate::model::{Health, Zone};
use crate::policy::{PerZone, Shares};
use crate::server::registry::StreamStatus;
use crate::status::NamespaceState;
use crate::translate::Skipped;

pub const PAGE: &str = include_str!("../ui/index.html");
pub const SCRIPT: &str = include_str!("../ui/ui.js");
pub const STYLE: &str = include_str!("../ui/ui.css");

/// Everything [`view`] reads, gathered by the admin server.
pub struct Inputs<'a> {
    pub snapshot: &'a Snapshot,
    pub ready: bool,
    pub namespaces: BTreeMap<String, NamespaceState>,
    pub sync_ages: BTreeMap<String, Duration>,
    /// The live census per service (the plans may use an older one).
    pub live_census: BTreeMap<String, PerZone>,
    pub skipped: BTreeMap<String, Vec<Skipped>>,
    pub routing_errors: BTreeMap<String, String>,
    pub streams: &'a [StreamStatus],
}

/// One row of a service's traffic matrix: clients in `zone` (`None`: clients
/// without a zone) and the share of their calls each server zone gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub zone: Option<Zone>,
    /// Clients counted in the census the plans use (0 for the zoneless row).
    pub clients: u64,
    pub shares: Shares,
}

/// Rows for every zone with capacity or clients, then the zoneless row.
pub fn matrix(entry: &ServiceEntry) -> Vec<Row> {
    let zones: BTreeSet<&Zone> = entry.capacity.keys().chain(entry.census.keys()).collect();
    let mut rows: Vec<Row> = zones
        .into_iter()
        .map(|z| Row {
            zone: Some(z.clone()),
            clients: entry.census.get(z).copied().unwrap_or(0),
            shares: entry.plan(Some(z)).shares(),
        })
        .collect();
    rows.push(Row { zone: None, clients: 0, shares: entry.plan(None).shares() });
    rows
}

/// The share of all zoned clients' calls that leave the client's zone,
/// weighting each zone's row by its clients; `None` without zoned clients.
pub fn cross_zone_share(rows: &[Row]) -> Option<f64> {
    let mut clients = 0u64;
    let mut crossing = 0.0;
    for row in rows {
        let Some(zone) = &row.zone else { continue };
        if row.clients == 0 {
            continue;
        }
        let local = row.shares.get(zone).copied().unwrap_or(0.0);
        clients += row.clients;
        crossing += row.clients as f64 * (1.0 - local);
    }
    (clients > 0).then(|| crossing / clients as f64)
}

fn percent(share: f64) -> f64 {
    (share * 1000.0).round() / 10.0
}

fn namespace_state(state: &NamespaceState) -> Value {
    match state {
        NamespaceState::Synced => json!({"state": "synced"}),
        NamespaceState::Pending => json!({"state": "pending"}),
        NamespaceState::Missing => json!({"state": "missing", "error": "not found in Cloud Map"}),
        NamespaceState::Error(e) => json!({"state": "error", "error": e}),
    }
}

fn service(entry: &ServiceEntry, inputs: &Inputs) -> Value {
    let dial = entry.name.dial_name();
    let live = inputs.live_census.get(&dial).cloned().unwrap_or_default();
    let mut per_zone: BTreeMap<&Zone, (u64, u64)> = BTreeMap::new();
    for e in &entry.endpoints.endpoints {
        let (all, healthy) = per_zone.entry(&e.zone).or_default();
        *all += 1;
        *healthy += u64::from(e.health != Health::Unhealthy);
    }
    let zone_names: BTreeSet<&Zone> = per_zone.keys().copied().chain(entry.census.keys()).chain(live.keys()).collect();
    let zones: Vec<Value> = zone_names
        .into_iter()
        .map(|z| {
            let (endpoints, healthy) = per_zone.get(z).copied().unwrap_or_default();
            json!({
                "zone": z.as_str(),
                "endpoints": endpoints,
                "healthy": healthy,
                "capacity": entry.capacity.get(z).copied().unwrap_or(0),
                "clients": entry.census.get(z).copied().unwrap_or(0),
                "live_clients": live.get(z).copied().unwrap_or(0),
            })
        })
        .collect();
    let rows = matrix(entry);
    let server_zones: Vec<&str> = entry.capacity.iter().filter(|(_, c)| **c > 0).map(|(z, _)| z.as_str()).collect();
    let rows_json: Vec<Value> = rows
        .iter()
        .map(|r| {
            let shares: serde_json::Map<String, Value> =
                r.shares.iter().map(|(z, s)| (z.as_str().to_string(), json!(percent(*s)))).collect();
            json!({"zone": r.zone.as_ref().map(Zone::as_str), "clients": r.clients, "percent": shares})
        })
        .collect();
    let skipped: Vec<Value> = inputs
        .skipped
        .get(&dial)
        .map(|s| s.iter().map(|s| json!({"instance_id": s.instance_id, "reason": s.reason})).collect())
        .unwrap_or_default();
    json!({
        "name": dial,
        "policy": entry.policy,
        "fail_open": entry.endpoints.fail_open,
        "zones": zones,
        "server_zones": server_zones,
        "matrix": rows_json,
        "cross_zone_percent": cross_zone_share(&rows).map(percent),
        "skipped": skipped,
        "sync_age_seconds": inputs.sync_ages.get(&dial).map(|a| (a.as_secs_f64() * 10.0).round() / 10.0),
        "routing_error": inputs.routing_errors.get(&dial),
    })
}

fn client(stream: &StreamStatus) -> Value {
    let nacks: Vec<Value> = stream
        .types
        .iter()
        .filter_map(|t| t.nack.as_ref().map(|n| json!({"type_url": t.type_url, "message": n.message})))
        .collect();
    let waiting = stream.types.iter().filter(|t| t.sent.is_some() && t.sent != t.acked && t.nack.is_none()).count();
    let state = if !nacks.is_empty() {
        "nack"
    } else if waiting > 0 {
        "waiting"
    } else {
        "acked"
    };
    let info = stream.client.as_ref();
    json!({
        "stream": stream.id,
        "node_id": info.map(|c| c.node_id.as_str()),
        "kind": info.map(|c| c.kind),
        "zone": info.and_then(|c| c.zone.as_ref().map(Zone::as_str)),
        "protocol": stream.protocol,
        "services": stream.types.iter().map(|t| t.subscribed.len()).max().unwrap_or(0),
        "state": state,
        "nacks": nacks,
    })
}

/// The JSON `/ui/state` answers.
pub fn view(inputs: &Inputs) -> Value {
    let services: Vec<Value> = inputs.snapshot.services.values().map(|e| service(e, inputs)).collect();
    let namespaces: serde_json::Map<String, Value> =
        inputs.namespaces.iter().map(|(n, s)| (n.clone(), namespace_state(s))).collect();
    let mut streams: Vec<&StreamStatus> = inputs.streams.iter().collect();
    streams.sort_by_key(|s| (s.client.as_ref().map(|c| c.node_id.clone()), s.id));
    let clients: Vec<Value> = streams.into_iter().map(client).collect();
    json!({
        "ready": inputs.ready,
        "generation": inputs.snapshot.generation,
        "namespaces": namespaces,
        "services": services,
        "clients": clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(zone: Option<&str>, clients: u64, shares: &[(&str, f64)]) -> Row {
        Row { zone: zone.map(Zone::new), clients, shares: shares.iter().map(|(z, s)| (Zone::new(*z), *s)).collect() }
    }

    #[test]
    fn cross_zone_share_weighs_each_zone_by_its_clients() {
        let cases: &[(&str, Vec<Row>, Option<f64>)] = &[
            ("no clients", vec![row(Some("a"), 0, &[("a", 1.0)]), row(None, 0, &[("a", 1.0)])], None),
            ("all local", vec![row(Some("a"), 3, &[("a", 1.0)]), row(Some("b"), 1, &[("b", 1.0)])], Some(0.0)),
            // Zone a (4 clients) keeps half, b (2 clients) all: 4 × 0.5 / 6.
            (
                "skewed",
                vec![row(Some("a"), 4, &[("a", 0.5), ("b", 0.25), ("c", 0.25)]), row(Some("b"), 2, &[("b", 1.0)])],
                Some(2.0 / 6.0),
            ),
            // A zone without capacity sends everything away; the zoneless row is not counted.
            ("no local capacity", vec![row(Some("x"), 1, &[("a", 1.0)]), row(None, 0, &[("a", 1.0)])], Some(1.0)),
        ];
        for (name, rows, expected) in cases {
            let got = cross_zone_share(rows);
            match (got, expected) {
                (Some(g), Some(e)) => assert!((g - e).abs() < 1e-9, "{name}: {g} != {e}"),
                (g, e) => assert_eq!(g, *e, "{name}"),
            }
        }
    }

    #[test]
    fn the_matrix_reads_the_plans_clients_were_sent() {
        use crate::builder::Builder;
        use crate::model::{Endpoint, ServiceEndpoints, ServiceName};
        use crate::policy::Policy;
        let endpoint = |id: &str, zone: &str| Endpoint {
            instance_id: id.into(),
            ip: "10.0.0.1".parse().expect("ip"),
            port: 50051,
            zone: Zone::new(zone),
            region: "us-east-1".into(),
            health: Health::Healthy,
            weight: 1,
            attributes: Default::default(),
            metadata: Default::default(),
        };
        let mut builder = Builder::default();
        // Servers 2/2/2; clients 4 in a, 1 in b, 1 in c: a keeps half (the zone-aware worked example).
        for (zone, n) in [("a", 4), ("b", 1), ("c", 1)] {
            for _ in 0..n {
                builder.census().join("echo.demo", &Zone::new(zone), &crate::census::Voter::unique());
            }
        }
        let endpoints: Vec<Endpoint> = ["a", "b", "c"]
            .iter()
            .flat_map(|z| [endpoint(&format!("{z}1"), z), endpoint(&format!("{z}2"), z)])
            .collect();
        builder.update_service(
            &ServiceName::new("demo", "echo"),
            ServiceEndpoints::new(endpoints, false),
            Policy::ZoneAware,
        );
        let snapshot = builder.snapshot();
        let entry = snapshot.lookup("echo.demo").expect("served");
        let rows = matrix(entry);
        let a = rows.iter().find(|r| r.zone == Some(Zone::new("a"))).expect("row a");
        assert_eq!(a.clients, 4);
        assert!((a.shares[&Zone::new("a")] - 0.5).abs() < 1e-3, "{a:?}");
        let b = rows.iter().find(|r| r.zone == Some(Zone::new("b"))).expect("row b");
        assert!((b.shares[&Zone::new("b")] - 1.0).abs() < 1e-3, "{b:?}");
        let zoneless = rows.last().expect("zoneless row");
        assert_eq!(zoneless.zone, None);
        assert!((zoneless.shares.values().sum::<f64>() - 1.0).abs() < 1e-9);
        // 4 × 0.5 cross of 6 clients.
        assert!((cross_zone_share(&rows).expect("clients") - 2.0 / 6.0).abs() < 1e-3);
    }
}
