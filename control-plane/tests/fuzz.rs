//! Property-based fuzzing of the inputs that come from outside: DiscoveryRequests
//! (SotW and Delta, as decoded messages and as raw bytes) and Cloud Map
//! instance attributes. Each target runs `FUZZ_CASES` inputs (default 25,000;
//! five targets, so CI covers 125k in total); 0 panics allowed, plus protocol invariants,
//! and SotW EDS subscriptions are checked against a model of the protocol (a server that
//! never answers, or answers a name twice or not at all, fails it). Endpoint building is
//! fuzzed too: ClusterLoadAssignments over random weights, health, zones, censuses, policies
//! and client kinds must pass a gRPC client's checks (demo-client's `table_from_cla`, the
//! rules in shared/notes/xds-rules.md) and reach every healthy endpoint.
//!
//! Long run: `FUZZ_CASES=5000000 cargo test --release -p cloudmap-xds --test fuzz`.

use std::collections::BTreeMap;

use cloudmap_xds::builder::Builder;
use cloudmap_xds::model::{Endpoint, Health, ServiceEndpoints, ServiceName, Zone};
use cloudmap_xds::policy::Policy;
use cloudmap_xds::resources::ResourceType;
use cloudmap_xds::server::Protocol;
use cloudmap_xds::server::delta::DeltaState;
use cloudmap_xds::server::sotw::SotwState;
use cloudmap_xds::translate::{self, RawInstance, TranslateOptions};
use cloudmap_xds::wakeup::Changed;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(25_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

fn builder() -> Builder {
    let mut builder = Builder::standalone(Some("127.0.0.1:15001".parse().expect("addr")));
    for (i, (ns, svc)) in [("demo", "echo"), ("grpc.demo", "echo"), ("demo", "other")].iter().enumerate() {
        let endpoints = (0..3u8)
            .map(|z| Endpoint {
                instance_id: format!("i-{i}-{z}"),
                ip: std::net::IpAddr::from([10, i as u8, z, 1]),
                port: 50051,
                zone: Zone::new(format!("z{z}")),
                region: "r".into(),
                health: if z == 2 { Health::Unhealthy } else { Health::Healthy },
                weight: 1,
                attributes: BTreeMap::new(),
                metadata: Default::default(),
            })
            .collect();
        builder.update_service(
            &ServiceName::new(*ns, *svc),
            ServiceEndpoints::new(endpoints, false),
            Policy::ZoneAware,
        );
    }
    builder.set_ready();
    builder
}

fn type_url() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(ResourceType::ALL.iter().map(|t| t.type_url().to_string()).collect::<Vec<_>>()),
        1 => Just(String::new()),
        1 => ".{0,40}".prop_map(|s| s),
    ]
}

fn names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(vec![
                "echo.demo",
                "echo.demo:50051",
                "echo.grpc.demo",
                "other.demo",
                "*",
                "",
                "cloudmap-xds-egress"
            ])
            .prop_map(String::from),
            ".{0,20}",
        ],
        0..5,
    )
}

fn node() -> impl Strategy<Value = Option<Node>> {
    prop::option::of(
        (".{0,10}", prop::sample::select(vec!["envoy", "gRPC Go", "gRPC Rust tonic-xds", ""]), ".{0,8}").prop_map(
            |(id, agent, zone)| Node {
                id,
                user_agent_name: agent.into(),
                locality: Some(Locality { zone, ..Default::default() }),
                ..Default::default()
            },
        ),
    )
}

/// Nonces a client might send: recent ones the server used (small numbers), or garbage.
fn nonce() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), (1u64..12).prop_map(|n| n.to_string()), ".{0,6}"]
}

fn error_detail() -> impl Strategy<Value = Option<rpc::Status>> {
    prop::option::weighted(0.3, ".{0,10}".prop_map(|message| rpc::Status { code: 3, message, ..Default::default() }))
}

fn sotw_request() -> impl Strategy<Value = DiscoveryRequest> {
    (type_url(), names(), nonce(), ".{0,8}", node(), error_detail()).prop_map(
        |(type_url, resource_names, response_nonce, version_info, node, error_detail)| DiscoveryRequest {
            type_url,
            resource_names,
            response_nonce,
            version_info,
            node,
            error_detail,
            ..Default::default()
        },
    )
}

fn delta_request() -> impl Strategy<Value = DeltaDiscoveryRequest> {
    (type_url(), names(), names(), nonce(), node(), error_detail(), names()).prop_map(
        |(type_url, subscribe, unsubscribe, response_nonce, node, error_detail, initial)| DeltaDiscoveryRequest {
            type_url,
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            response_nonce,
            node,
            error_detail,
            initial_resource_versions: initial.into_iter().map(|n| (n, "v".to_string())).collect(),
            ..Default::default()
        },
    )
}

#[test]
fn sotw_requests_never_panic_and_nothing_is_resent_without_news() {
    let builder = builder();
    runner()
        .run(&prop::collection::vec(sotw_request(), 1..8), |requests| {
            let mut state = SotwState::default();
            for request in &requests {
                if state.on_request(request).is_err() {
                    // A malformed request ends the stream with a status.
                    return Ok(());
                }
                state.responses(&builder.snapshot(), &Changed::All);
                // Asked again with nothing new (after an ACK, a NACK or garbage): nothing is
                // sent, so a NACKed version is never re-sent in a loop.
                prop_assert!(state.responses(&builder.snapshot(), &Changed::All).is_empty());
            }
            Ok(())
        })
        .expect("SotW state machine");
}

/// SotW EDS against a model of the protocol: subscriptions change at random (names that exist
/// and names that do not), each request carrying the newest nonce. After each, the responses
/// carry exactly the subscribed names that exist and the client does not hold yet — each once
/// (one resource per response); a name unsubscribed and named again is sent again.
#[test]
fn sotw_eds_answers_every_subscribed_known_name_once_per_version() {
    let builder = builder();
    let snapshot = builder.snapshot();
    const POOL: [&str; 5] = ["echo.demo", "other.demo", "echo.grpc.demo", "ghost.demo", "echo.demo:1"];
    let known: std::collections::BTreeSet<&str> = ["echo.demo", "other.demo", "echo.grpc.demo"].into();
    let subsets = prop::collection::vec(prop::collection::btree_set(prop::sample::select(POOL.to_vec()), 0..5), 1..10);
    runner()
        .run(&subsets, |steps| {
            let mut state = SotwState::default();
            let mut held: std::collections::BTreeSet<&str> = Default::default();
            let mut nonce = String::new();
            for (i, names) in steps.iter().enumerate() {
                let request = DiscoveryRequest {
                    type_url: ResourceType::ClusterLoadAssignment.type_url().into(),
                    resource_names: names.iter().map(|n| n.to_string()).collect(),
                    response_nonce: nonce.clone(),
                    node: (i == 0).then(|| Node {
                        id: "model".into(),
                        user_agent_name: "gRPC Go".into(),
                        locality: Some(Locality { zone: "z0".into(), ..Default::default() }),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                state.on_request(&request).map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
                held.retain(|n| names.contains(n));
                let replies = state.responses(&snapshot, &Changed::All);
                let mut sent = Vec::new();
                for reply in &replies {
                    prop_assert_eq!(reply.resources.len(), 1, "one EDS resource per response");
                    sent.push(reply.resources[0].name.clone());
                    nonce = reply.nonce.to_string();
                }
                let want: Vec<String> =
                    names.iter().filter(|n| known.contains(*n) && !held.contains(*n)).map(|n| n.to_string()).collect();
                let mut got = sent.clone();
                got.sort();
                prop_assert_eq!(&got, &want, "step {}: subscribed {:?}, held {:?}", i, names, held);
                held.extend(names.iter().filter(|n| known.contains(*n)));
                prop_assert!(state.responses(&snapshot, &Changed::All).is_empty(), "nothing more without news");
            }
            Ok(())
        })
        .expect("SotW EDS model");
}

#[test]
fn delta_requests_never_panic_and_settle() {
    let builder = builder();
    runner()
        .run(&prop::collection::vec(delta_request(), 1..8), |requests| {
            let mut state = DeltaState::default();
            for request in &requests {
                if state.on_request(request).is_err() {
                    return Ok(());
                }
                state.responses(&builder.snapshot(), &Changed::All);
                prop_assert!(
                    state.responses(&builder.snapshot(), &Changed::All).is_empty(),
                    "responses settle without input"
                );
            }
            Ok(())
        })
        .expect("Delta state machine");
}

#[test]
fn raw_request_bytes_never_panic() {
    let builder = builder();
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..200), |bytes| {
            if let Ok(request) = DiscoveryRequest::decode(bytes.as_slice()) {
                let mut state = SotwState::default();
                if state.on_request(&request).is_ok() {
                    state.responses(&builder.snapshot(), &Changed::All);
                }
            }
            if let Ok(request) = DeltaDiscoveryRequest::decode(bytes.as_slice()) {
                let mut state = DeltaState::default();
                if state.on_request(&request).is_ok() {
                    state.responses(&builder.snapshot(), &Changed::All);
                }
            }
            Ok(())
        })
        .expect("decoding and handling arbitrary bytes");
}

fn attribute_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "(10|192|fd00::|::1|255)\\.?[0-9]{0,3}\\.?[0-9]{0,3}\\.?[0-9]{0,3}",
        "[0-9]{0,6}",
        "-?[0-9]{1,12}",
        ".{0,16}",
        Just(String::new()),
    ]
}

fn instance() -> impl Strategy<Value = RawInstance> {
    let key = prop::sample::select(vec![
        "AWS_INSTANCE_IPV4",
        "AWS_INSTANCE_IPV6",
        "AWS_INSTANCE_PORT",
        "AVAILABILITY_ZONE",
        "REGION",
        "weight",
        "ECS_SERVICE_NAME",
    ]);
    (
        "i-[0-9a-f]{1,3}",
        prop::option::of(prop::sample::select(vec!["HEALTHY", "UNHEALTHY", "UNKNOWN", "bogus"])),
        prop::collection::btree_map(key.prop_map(String::from), attribute_value(), 0..7),
    )
        .prop_map(|(instance_id, health, attributes)| RawInstance {
            instance_id,
            health: health.map(String::from),
            attributes,
        })
}

#[test]
fn cloudmap_attributes_never_panic_and_yield_valid_endpoints() {
    let options = TranslateOptions {
        default_region: "us-east-1".into(),
        weight_attribute: Some("weight".into()),
        ..Default::default()
    };
    runner()
        .run(&prop::collection::vec(instance(), 0..8), |instances| {
            let t = translate::translate(&instances, &options);
            let mut addresses = std::collections::HashSet::new();
            for e in &t.endpoints.endpoints {
                prop_assert!(e.port > 0);
                prop_assert!(e.weight >= 1);
                prop_assert!(addresses.insert((e.ip, e.port)), "duplicate address served");
            }
            let ids: std::collections::HashSet<&str> = instances.iter().map(|i| i.instance_id.as_str()).collect();
            // Every distinct instance is either served, skipped with a reason, or drained (weight 0).
            prop_assert!(t.endpoints.endpoints.len() + t.skipped.len() <= instances.len());
            prop_assert!(t.endpoints.endpoints.len() <= ids.len());
            Ok(())
        })
        .expect("attribute translation");
}

fn cla_endpoint(index: usize) -> impl Strategy<Value = Endpoint> {
    let zone = prop::sample::select(vec!["us-east-1a", "us-east-1b", "us-east-1c", ""]);
    let health = prop::sample::select(vec![Health::Healthy, Health::Unhealthy, Health::Unknown]);
    // Small weights, and huge ones that stress gRPC's per-priority sum limit (u32::MAX).
    let weight = prop_oneof![4 => 1u32..10, 1 => any::<u32>().prop_map(|w| w.max(1))];
    (zone, health, weight).prop_map(move |(zone, health, weight)| Endpoint {
        instance_id: format!("i-{index}"),
        ip: std::net::IpAddr::from([10, 1, (index / 250) as u8, (index % 250) as u8 + 1]),
        port: 50051,
        zone: Zone::new(zone),
        region: "us-east-1".into(),
        health,
        weight,
        attributes: BTreeMap::new(),
        metadata: Default::default(),
    })
}

fn cla_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::ZoneAware),
        Just(Policy::LocalFirst),
        Just(Policy::None),
        (0.0f64..=1.0).prop_map(|local_share| Policy::FixedShare { local_share }),
    ]
}

#[test]
fn endpoint_assignments_pass_grpc_checks_and_reach_every_healthy_endpoint() {
    use cloudmap_xds::cache::Client;
    use cloudmap_xds::census::Voter;
    use cloudmap_xds::model::ClientKind;
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;

    let endpoints = (1usize..12).prop_flat_map(|n| (0..n).map(cla_endpoint).collect::<Vec<_>>());
    let census = prop::collection::vec(0u32..4, 4);
    let client_zone =
        prop::option::of(prop::sample::select(vec!["us-east-1a", "us-east-1b", "us-east-1c", "us-west-2a"]));
    let kind = prop::sample::select(vec![ClientKind::Grpc, ClientKind::Envoy, ClientKind::Flat]);
    let cases = Config { cases: (cases() / 10).max(200), failure_persistence: None, ..Config::default() };
    TestRunner::new(cases)
        .run(
            &(endpoints, census, client_zone, kind, cla_policy(), any::<u16>()),
            |(endpoints, census, zone, kind, policy, node)| {
                let mut builder = Builder::default();
                for (zone, n) in ["us-east-1a", "us-east-1b", "us-east-1c", "us-west-2a"].iter().zip(&census) {
                    for _ in 0..*n {
                        builder.census().join("echo.demo", &Zone::new(*zone), &Voter::unique());
                    }
                }
                builder.update_service(
                    &ServiceName::new("demo", "echo"),
                    ServiceEndpoints::new(endpoints.clone(), false),
                    policy,
                );
                let client = Client::new(zone.map(Zone::new), kind, &format!("node-{node}"));
                let encoded = builder.snapshot().resolve(ResourceType::ClusterLoadAssignment, "echo.demo", &client);
                let encoded = encoded.ok_or_else(|| TestCaseError::fail("no EDS for a served service"))?;
                let cla = ClusterLoadAssignment::decode(encoded.resource().value.as_slice())
                    .map_err(|e| TestCaseError::fail(format!("EDS does not decode: {e}")))?;
                // What a gRPC client checks before it accepts the response (a NACK otherwise).
                let table = demo_client::xds::table_from_cla(&cla)
                    .map_err(|e| TestCaseError::fail(format!("a gRPC client NACKs: {e}")))?;
                let mut per_priority: BTreeMap<u32, u64> = BTreeMap::new();
                for group in &cla.endpoints {
                    let weight = group.load_balancing_weight.as_ref().map_or(0, |w| w.value);
                    prop_assert!(weight >= 1, "locality {:?} has weight 0 (gRPC drops it)", group.locality);
                    *per_priority.entry(group.priority).or_default() += u64::from(weight);
                    for lb in &group.lb_endpoints {
                        let health = HealthStatus::try_from(lb.health_status).unwrap_or(HealthStatus::Unknown);
                        if kind != ClientKind::Envoy {
                            prop_assert!(
                                health != HealthStatus::Unhealthy,
                                "an UNHEALTHY endpoint sent to a gRPC client"
                            );
                        }
                        prop_assert!(matches!(lb.host_identifier, Some(HostIdentifier::Endpoint(_))));
                    }
                }
                for (priority, sum) in &per_priority {
                    prop_assert!(*sum <= u64::from(u32::MAX), "priority {priority}: weights sum to {sum} > u32::MAX");
                }
                // No blackhole: while any endpoint is healthy, the client reaches every healthy one
                // (flat clients get a subset: at least one).
                let healthy: std::collections::BTreeSet<std::net::SocketAddr> = endpoints
                    .iter()
                    .filter(|e| e.health != Health::Unhealthy)
                    .map(|e| std::net::SocketAddr::new(e.ip, e.port))
                    .collect();
                let reached: std::collections::BTreeSet<std::net::SocketAddr> =
                    table.priorities.iter().flatten().flat_map(|l| l.endpoints.iter().copied()).collect();
                if kind == ClientKind::Flat {
                    prop_assert!(healthy.is_empty() || !reached.is_empty(), "a flat client reaches no endpoint");
                    prop_assert!(reached.is_subset(&healthy));
                } else {
                    prop_assert_eq!(&reached, &healthy, "the client does not reach exactly the healthy endpoints");
                }
                Ok(())
            },
        )
        .expect("endpoint assignments");
}
