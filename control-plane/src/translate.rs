//! Cloud Map instances → model endpoints. Pure: the watcher hands in what
//! `DiscoverInstances` returned, this decides which instances are usable and
//! why the others are skipped, and which of their attributes are published
//! as endpoint metadata. The watcher logs each skip once.
//!
//! Endpoint metadata is what makes an EDS resource big: Cloud Map allows 30
//! attributes of up to 1,024 characters per instance, and gRPC clients never
//! read them. So only the attributes a service's `metadata_attributes` names
//! are published (none by default), and when those would still take more
//! than [`METADATA_BUDGET`] bytes for one service, none are: one EDS resource
//! must stay under the 4 MiB that grpc-go and tonic accept by default.
//! Every attribute stays in [`Endpoint::attributes`] either way.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Endpoint, Health, ServiceEndpoints, Zone};

pub const ATTR_IPV4: &str = "AWS_INSTANCE_IPV4";
pub const ATTR_IPV6: &str = "AWS_INSTANCE_IPV6";
pub const ATTR_PORT: &str = "AWS_INSTANCE_PORT";
pub const ATTR_ZONE: &str = "AVAILABILITY_ZONE";
pub const ATTR_REGION: &str = "REGION";

/// One instance as `DiscoverInstances` returned it, stripped of SDK types.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawInstance {
    pub instance_id: String,
    /// `HEALTHY`, `UNHEALTHY`, `UNKNOWN`, or absent.
    pub health: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

/// Most bytes of endpoint metadata one service may publish; beyond it none
/// is published. Leaves half of a 4 MiB response for the endpoints themselves
/// (~60–100 bytes each without metadata: room for over 20,000).
pub const METADATA_BUDGET: usize = 2 * 1024 * 1024;

/// Which instance attributes become endpoint metadata (setting `metadata_attributes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum MetadataAttributes {
    /// None (the default): gRPC clients ignore endpoint metadata.
    #[default]
    None,
    /// Every attribute (`["*"]`).
    All,
    /// These attributes, where an instance has them.
    Named(BTreeSet<String>),
}

impl MetadataAttributes {
    /// From the setting's list: empty → none, `"*"` anywhere → all.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        if names.iter().any(|n| n.as_ref() == "*") {
            return MetadataAttributes::All;
        }
        let named: BTreeSet<String> =
            names.iter().map(|n| n.as_ref().trim().to_string()).filter(|n| !n.is_empty()).collect();
        if named.is_empty() { MetadataAttributes::None } else { MetadataAttributes::Named(named) }
    }

    pub fn selects(&self, attribute: &str) -> bool {
        match self {
            MetadataAttributes::None => false,
            MetadataAttributes::All => true,
            MetadataAttributes::Named(names) => names.contains(attribute),
        }
    }
}

/// How to read instances; from the per-service configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TranslateOptions {
    /// Region for instances without a `REGION` attribute.
    pub default_region: String,
    /// Attribute holding the endpoint weight (a positive integer); `None` = weight 1.
    pub weight_attribute: Option<String>,
    /// Attributes published as endpoint metadata.
    pub metadata_attributes: MetadataAttributes,
}

/// An instance that could not be served, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Skipped {
    pub instance_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Translation {
    pub endpoints: ServiceEndpoints,
    pub skipped: Vec<Skipped>,
    /// The selected metadata would have taken this many bytes, over
    /// [`METADATA_BUDGET`], so none is published (worth a warning).
    pub metadata_dropped: Option<usize>,
}

pub fn translate(instances: &[RawInstance], options: &TranslateOptions) -> Translation {
    let mut sorted: Vec<&RawInstance> = instances.iter().collect();
    // A stable order makes "first registration wins" for duplicates deterministic.
    sorted.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));

    let mut endpoints = Vec::with_capacity(sorted.len());
    let mut skipped = Vec::new();
    let mut seen_addresses = HashSet::new();
    let mut seen_ids = HashSet::new();
    for instance in sorted {
        if !seen_ids.insert(instance.instance_id.as_str()) {
            // moto returns a re-registered id twice; AWS updates in place. Keep the first.
            skipped.push(skip(instance, "duplicate instance id".to_string()));
            continue;
        }
        match endpoint(instance, options) {
            Ok(Some(endpoint)) => {
                if seen_addresses.insert((endpoint.ip, endpoint.port)) {
                    endpoints.push(endpoint);
                } else {
                    let reason = format!(
                        "duplicate address {} already served by another instance",
                        socket(endpoint.ip, endpoint.port)
                    );
                    skipped.push(skip(instance, reason));
                }
            }
            Ok(None) => {}
            Err(reason) => skipped.push(skip(instance, reason)),
        }
    }

    // Cloud Map's HEALTHY_OR_ELSE_ALL returns every instance when none is healthy.
    // gRPC clients drop UNHEALTHY endpoints, so serving them as such would leave
    // clients with nothing: fail open and let clients try them.
    let fail_open = !endpoints.is_empty() && endpoints.iter().all(|e| e.health == Health::Unhealthy);
    if fail_open {
        for e in &mut endpoints {
            e.health = Health::Unknown;
        }
    }
    let metadata_bytes: usize = endpoints.iter().map(|e| metadata_size(&e.metadata)).sum();
    let metadata_dropped = (metadata_bytes > METADATA_BUDGET).then_some(metadata_bytes);
    if metadata_dropped.is_some() {
        for e in &mut endpoints {
            e.metadata.clear();
        }
    }
    Translation { endpoints: ServiceEndpoints::new(endpoints, fail_open), skipped, metadata_dropped }
}

/// Encoded size of one endpoint's metadata, a little over the protobuf
/// size: each `Struct` field costs its key, its value and ~10 bytes of tags
/// and lengths; the `filter_metadata` entry around them ~24.
pub fn metadata_size(metadata: &BTreeMap<String, String>) -> usize {
    if metadata.is_empty() {
        return 0;
    }
    24 + metadata.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>()
}

fn skip(instance: &RawInstance, reason: String) -> Skipped {
    Skipped { instance_id: instance.instance_id.clone(), reason }
}

fn socket(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// `Ok(None)` means deliberately not served (weight 0 = drained).
fn endpoint(instance: &RawInstance, options: &TranslateOptions) -> Result<Option<Endpoint>, String> {
    let attrs = &instance.attributes;
    let ip = match (attrs.get(ATTR_IPV4), attrs.get(ATTR_IPV6)) {
        (Some(v4), _) => v4
            .trim()
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| format!("{ATTR_IPV4}={v4:?} is not an IPv4 address"))?,
        (None, Some(v6)) => v6
            .trim()
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| format!("{ATTR_IPV6}={v6:?} is not an IPv6 address"))?,
        (None, None) => {
            return Err(format!(
                "no {ATTR_IPV4} or {ATTR_IPV6} attribute (hostname-only instances cannot be served over EDS)"
            ));
        }
    };
    let port = match attrs.get(ATTR_PORT) {
        None => return Err(format!("no {ATTR_PORT} attribute")),
        Some(p) => match p.trim().parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("{ATTR_PORT}={p:?} is not a port number (1-65535)")),
        },
    };
    let weight = match &options.weight_attribute {
        None => 1,
        Some(name) => match attrs.get(name) {
            None => 1,
            Some(w) => match w.trim().parse::<u32>() {
                Ok(0) => return Ok(None),
                Ok(w) => w,
                Err(_) => return Err(format!("{name}={w:?} is not a non-negative integer weight")),
            },
        },
    };
    let zone = Zone::new(attrs.get(ATTR_ZONE).map(|z| z.trim()).unwrap_or_default());
    let region = attrs
        .get(ATTR_REGION)
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| options.default_region.clone());
    let health = match instance.health.as_deref() {
        Some("HEALTHY") => Health::Healthy,
        Some("UNHEALTHY") => Health::Unhealthy,
        _ => Health::Unknown,
    };
    Ok(Some(Endpoint {
        instance_id: instance.instance_id.clone(),
        ip,
        port,
        zone,
        region,
        health,
        weight,
        metadata: attrs
            .iter()
            .filter(|(k, _)| options.metadata_attributes.selects(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        attributes: attrs.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, health: &str, attrs: &[(&str, &str)]) -> RawInstance {
        RawInstance {
            instance_id: id.into(),
            health: Some(health.into()),
            attributes: attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn ecs(id: &str, ip: &str, port: &str, zone: &str) -> RawInstance {
        inst(id, "HEALTHY", &[(ATTR_IPV4, ip), (ATTR_PORT, port), (ATTR_ZONE, zone), (ATTR_REGION, "us-east-1")])
    }

    fn opts() -> TranslateOptions {
        TranslateOptions {
            default_region: "eu-west-1".into(),
            weight_attribute: Some("weight".into()),
            ..Default::default()
        }
    }

    #[test]
    fn ecs_instance_becomes_endpoint() {
        let t = translate(&[ecs("i-1", "10.0.0.1", "50051", "us-east-1a")], &opts());
        assert!(t.skipped.is_empty());
        let e = &t.endpoints.endpoints[0];
        assert_eq!(e.ip.to_string(), "10.0.0.1");
        assert_eq!(e.port, 50051);
        assert_eq!(e.zone, Zone::new("us-east-1a"));
        assert_eq!(e.region, "us-east-1");
        assert_eq!(e.health, Health::Healthy);
        assert_eq!(e.weight, 1);
        assert_eq!(e.attributes.get(ATTR_ZONE).map(String::as_str), Some("us-east-1a"));
    }

    #[test]
    fn skips_unusable_instances_with_a_reason() {
        let cases: &[(RawInstance, &str)] = &[
            (inst("no-ip", "HEALTHY", &[(ATTR_PORT, "1")]), "no AWS_INSTANCE_IPV4"),
            (inst("bad-ip", "HEALTHY", &[(ATTR_IPV4, "not-an-ip"), (ATTR_PORT, "1")]), "not an IPv4"),
            (inst("v6-in-v4", "HEALTHY", &[(ATTR_IPV4, "::1"), (ATTR_PORT, "1")]), "not an IPv4"),
            (inst("no-port", "HEALTHY", &[(ATTR_IPV4, "10.0.0.1")]), "no AWS_INSTANCE_PORT"),
            (inst("bad-port", "HEALTHY", &[(ATTR_IPV4, "10.0.0.1"), (ATTR_PORT, "abc")]), "not a port"),
            (inst("zero-port", "HEALTHY", &[(ATTR_IPV4, "10.0.0.1"), (ATTR_PORT, "0")]), "not a port"),
            (inst("big-port", "HEALTHY", &[(ATTR_IPV4, "10.0.0.1"), (ATTR_PORT, "70000")]), "not a port"),
            (inst("bad-weight", "HEALTHY", &[(ATTR_IPV4, "10.0.0.1"), (ATTR_PORT, "1"), ("weight", "-3")]), "weight"),
        ];
        for (instance, reason) in cases {
            let t = translate(&[instance.clone(), ecs("good", "10.9.9.9", "80", "a")], &opts());
            assert_eq!(t.endpoints.endpoints.len(), 1, "{}", instance.instance_id);
            assert_eq!(t.endpoints.endpoints[0].instance_id, "good");
            assert_eq!(t.skipped.len(), 1);
            assert_eq!(t.skipped[0].instance_id, instance.instance_id);
            assert!(t.skipped[0].reason.contains(reason), "{}: {}", instance.instance_id, t.skipped[0].reason);
        }
    }

    #[test]
    fn ipv6_and_defaults() {
        let t = translate(&[inst("v6", "UNKNOWN", &[(ATTR_IPV6, "fd00::1"), (ATTR_PORT, "443")])], &opts());
        let e = &t.endpoints.endpoints[0];
        assert_eq!(e.ip.to_string(), "fd00::1");
        assert!(e.zone.is_unknown());
        assert_eq!(e.region, "eu-west-1");
        assert_eq!(e.health, Health::Unknown);
    }

    #[test]
    fn duplicate_address_keeps_first_instance_id() {
        let t = translate(&[ecs("i-2", "10.0.0.1", "80", "a"), ecs("i-1", "10.0.0.1", "80", "b")], &opts());
        assert_eq!(t.endpoints.endpoints.len(), 1);
        assert_eq!(t.endpoints.endpoints[0].instance_id, "i-1");
        assert_eq!(t.skipped[0].instance_id, "i-2");
    }

    #[test]
    fn duplicate_instance_id_keeps_one() {
        let t = translate(&[ecs("i-1", "10.0.0.1", "80", "a"), ecs("i-1", "10.0.0.2", "80", "a")], &opts());
        assert_eq!(t.endpoints.endpoints.len(), 1);
        assert_eq!(t.skipped.len(), 1);
    }

    #[test]
    fn weights_from_attribute() {
        let mut heavy = ecs("heavy", "10.0.0.1", "80", "a");
        heavy.attributes.insert("weight".into(), "5".into());
        let mut drained = ecs("drained", "10.0.0.2", "80", "a");
        drained.attributes.insert("weight".into(), "0".into());
        let t = translate(&[heavy, drained], &opts());
        assert!(t.skipped.is_empty());
        assert_eq!(t.endpoints.endpoints.len(), 1);
        assert_eq!(t.endpoints.endpoints[0].weight, 5);
    }

    #[test]
    fn all_unhealthy_fails_open() {
        let mut a = ecs("a", "10.0.0.1", "80", "a");
        let mut b = ecs("b", "10.0.0.2", "80", "b");
        a.health = Some("UNHEALTHY".into());
        b.health = Some("UNHEALTHY".into());
        let t = translate(&[a.clone(), b], &opts());
        assert!(t.endpoints.fail_open);
        assert!(t.endpoints.endpoints.iter().all(|e| e.health == Health::Unknown));

        // One healthy instance: no fail-open, the unhealthy one stays unhealthy.
        let t = translate(&[a, ecs("c", "10.0.0.3", "80", "c")], &opts());
        assert!(!t.endpoints.fail_open);
        assert_eq!(t.endpoints.endpoints.iter().filter(|e| e.health == Health::Unhealthy).count(), 1);
    }

    #[test]
    fn metadata_attributes_choose_what_is_published_and_all_is_kept() {
        let mut i = ecs("i-1", "10.0.0.1", "80", "a");
        i.attributes.insert("stage".into(), "prod".into());
        for (names, published) in [
            (vec![], vec![]),
            (vec!["stage", "missing", " "], vec!["stage"]),
            (vec!["stage", "*"], vec![ATTR_ZONE, ATTR_IPV4, ATTR_PORT, ATTR_REGION, "stage"]),
        ] {
            let options = TranslateOptions { metadata_attributes: MetadataAttributes::from_names(&names), ..opts() };
            let t = translate(std::slice::from_ref(&i), &options);
            let e = &t.endpoints.endpoints[0];
            let mut want: Vec<&str> = published.clone();
            want.sort_unstable();
            assert_eq!(e.metadata.keys().map(String::as_str).collect::<Vec<_>>(), want, "{names:?}");
            assert_eq!(e.attributes.len(), 5, "{names:?}: every attribute is kept in the model");
            assert_eq!(t.metadata_dropped, None);
        }
        assert_eq!(MetadataAttributes::from_names::<&str>(&[]), MetadataAttributes::None);
    }

    #[test]
    fn metadata_over_the_budget_is_dropped_for_the_whole_service() {
        // 1,000 instances × 30 attributes × ~1 KB: Cloud Map's limits, 30 MB of metadata.
        let instances: Vec<RawInstance> = (0..1000)
            .map(|k| {
                let mut i = ecs(&format!("i-{k}"), &format!("10.0.{}.{}", k / 250, k % 250 + 1), "80", "a");
                for n in 0..26 {
                    i.attributes.insert(format!("custom_{n:02}"), "v".repeat(1000));
                }
                i
            })
            .collect();
        let all = TranslateOptions { metadata_attributes: MetadataAttributes::All, ..opts() };
        let t = translate(&instances, &all);
        assert!(t.metadata_dropped.is_some_and(|b| b > 26 * 1000 * 1000), "{:?}", t.metadata_dropped);
        assert!(t.endpoints.endpoints.iter().all(|e| e.metadata.is_empty() && e.attributes.len() == 30));
        // A few small attributes fit.
        let few = TranslateOptions { metadata_attributes: MetadataAttributes::from_names(&[ATTR_ZONE]), ..opts() };
        let t = translate(&instances, &few);
        assert_eq!(t.metadata_dropped, None);
        assert!(t.endpoints.endpoints.iter().all(|e| e.metadata.len() == 1));
    }

    #[test]
    fn order_does_not_matter() {
        let a = ecs("a", "10.0.0.1", "80", "z2");
        let b = ecs("b", "10.0.0.2", "80", "z1");
        assert_eq!(translate(&[a.clone(), b.clone()], &opts()), translate(&[b, a], &opts()));
    }
}
