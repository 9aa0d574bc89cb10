//! Micro-benchmarks of the pure stages for one service of 1,000 endpoints
//! (ECS-like instances: seven attributes each, three zones):
//!
//! - `translate`: Cloud Map instances → model endpoints;
//! - `policy/shares`, `policy/plan`, `resources/cluster_load_assignment`,
//!   and the three together (`eds/build`), as the cache runs them once per
//!   zone and client kind when endpoints change;
//! - `encode/cla`: packing that CLA into an `Any` (done once per variant);
//! - `push/per_client`: what each stream then does per push with the cached
//!   resource — resolve it (a memo hit) and frame it with its own version and
//!   nonce around the shared bytes (`server::wire`); `…/copied` is the
//!   former path, copying the resource into a response and encoding it;
//! - `index/1000x50`: the whole index of an estate of 1,000 services × 50
//!   instances — every service written, and every resource resolved for gRPC
//!   clients in three zones (all encodings done once);
//! - `census/one_zone/1000`: a census change that moves one zone's plan (zone
//!   a's clients go from 2 to 5 and back, b and c keep one each: a spills
//!   more or less, b and c stay local) applied, and the EDS resolved for all
//!   three zones: only zone a's variant is encoded again (checked before
//!   timing: the other two are the same `Arc`).
//!
//! Run: `cargo bench -p cloudmap-xds --bench pipeline`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use cloudmap_xds::builder::Builder;
use cloudmap_xds::cache::Client;
use cloudmap_xds::model::{ClientKind, ServiceName, Zone};
use cloudmap_xds::policy::{self, PerZone, Policy};
use cloudmap_xds::resources::{self, ResourceType};
use cloudmap_xds::server::wire::{self, Reply};
use cloudmap_xds::translate::{self, MetadataAttributes, RawInstance, TranslateOptions};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::util::pack_any;
use prost::Message;

const ENDPOINTS: usize = 1_000;
const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

fn instances(n: usize) -> Vec<RawInstance> {
    (0..n)
        .map(|i| {
            let attributes: BTreeMap<String, String> = [
                ("AWS_INSTANCE_IPV4", format!("10.0.{}.{}", i / 250, i % 250 + 1)),
                ("AWS_INSTANCE_PORT", "50051".to_string()),
                ("AVAILABILITY_ZONE", ZONES[i % 3].to_string()),
                ("REGION", "us-east-1".to_string()),
                ("ECS_CLUSTER_NAME", "prod".to_string()),
                ("ECS_SERVICE_NAME", "echo".to_string()),
                ("ECS_TASK_DEFINITION_FAMILY", "echo".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            RawInstance { instance_id: format!("task-{i:05}"), health: Some("HEALTHY".into()), attributes }
        })
        .collect()
}

fn stages(c: &mut Criterion) {
    let raw = instances(ENDPOINTS);
    // Every attribute published, as before `metadata_attributes`, so figures stay comparable.
    let options = TranslateOptions {
        default_region: "us-east-1".into(),
        weight_attribute: None,
        metadata_attributes: MetadataAttributes::All,
    };
    c.bench_function("translate/1000", |b| b.iter(|| translate::translate(black_box(&raw), &options)));

    let endpoints = translate::translate(&raw, &options).endpoints;
    assert_eq!(endpoints.endpoints.len(), ENDPOINTS);
    let capacity = endpoints.capacity();
    // Demand skewed to zone a, so zone-aware spills part of a's traffic (the costly path).
    let census: PerZone = [(ZONES[0], 5u64), (ZONES[1], 3), (ZONES[2], 2)].map(|(z, n)| (Zone::new(z), n)).into();
    let zone = Zone::new(ZONES[0]);
    let shares = policy::shares(Policy::ZoneAware, Some(&zone), &capacity, &census);
    let plan = policy::plan(&shares, &capacity);
    c.bench_function("policy/shares", |b| {
        b.iter(|| policy::shares(Policy::ZoneAware, Some(black_box(&zone)), &capacity, &census))
    });
    c.bench_function("policy/plan", |b| b.iter(|| policy::plan(black_box(&shares), &capacity)));
    c.bench_function("resources/cluster_load_assignment/1000", |b| {
        b.iter(|| resources::cluster_load_assignment("echo.prod", black_box(&endpoints), &plan, ClientKind::Grpc, 0))
    });
    c.bench_function("eds/build/1000", |b| {
        b.iter(|| {
            let shares = policy::shares(Policy::ZoneAware, Some(black_box(&zone)), &capacity, &census);
            let plan = policy::plan(&shares, &capacity);
            resources::cluster_load_assignment("echo.prod", &endpoints, &plan, ClientKind::Grpc, 0)
        })
    });

    let cla = resources::cluster_load_assignment("echo.prod", &endpoints, &plan, ClientKind::Grpc, 0);
    eprintln!("one CLA of {ENDPOINTS} endpoints encodes to {} bytes", cla.encoded_len());
    c.bench_function("encode/cla/1000", |b| b.iter_batched(|| cla.clone(), pack_any, BatchSize::LargeInput));

    let mut builder = Builder::default();
    builder.update_service(&ServiceName::new("prod", "echo"), endpoints.clone(), Policy::ZoneAware);
    builder.set_ready();
    let snapshot = builder.snapshot();
    let client = Client::new(Some(zone.clone()), ClientKind::Grpc, "bench");
    let eds = ResourceType::ClusterLoadAssignment;
    snapshot.resolve(eds, "echo.prod", &client).expect("served");
    c.bench_function("push/per_client/1000", |b| {
        b.iter(|| {
            let resource = snapshot.resolve(eds, black_box("echo.prod"), &client).expect("served");
            let reply = Reply {
                ty: eds,
                version: resource.version.clone(),
                nonce: 1,
                resources: vec![resource],
                removed: vec![],
            };
            wire::sotw(&reply)
        })
    });
    // What a push cost before the shared-bytes path: copy the resource into a
    // response and encode it (tonic's encoder copies it once more).
    let any = snapshot.resolve(eds, "echo.prod", &client).expect("served").resource();
    c.bench_function("push/per_client/1000/copied", |b| {
        b.iter(|| {
            let response = DiscoveryResponse {
                version_info: "v".to_string(),
                resources: vec![black_box(&any).clone()],
                type_url: eds.type_url().to_string(),
                nonce: "1".to_string(),
                ..Default::default()
            };
            response.encode_to_vec()
        })
    });

    // The whole index of an estate: 1,000 services × 50 instances, each
    // resolved as gRPC clients in three zones walk it (LDS, RDS, CDS, EDS).
    let estate: Vec<(ServiceName, cloudmap_xds::model::ServiceEndpoints)> = (0..1_000)
        .map(|i| {
            (ServiceName::new("prod", format!("svc-{i:04}")), translate::translate(&instances(50), &options).endpoints)
        })
        .collect();
    let clients: Vec<Client> =
        ZONES.iter().map(|z| Client::new(Some(Zone::new(*z)), ClientKind::Grpc, "bench")).collect();
    c.bench_function("index/1000x50", |b| {
        b.iter_batched(
            || estate.clone(),
            |estate| {
                let mut builder = Builder::default();
                for (name, endpoints) in estate {
                    builder.update_service(&name, endpoints, Policy::ZoneAware);
                }
                let snapshot = builder.snapshot();
                for name in snapshot.services.keys() {
                    for client in &clients {
                        for ty in ResourceType::ALL {
                            black_box(snapshot.resolve(ty, name, client));
                        }
                    }
                }
                builder
            },
            BatchSize::LargeInput,
        )
    });
}

/// A census change that touches one zone re-encodes only that zone's variant.
fn census(c: &mut Criterion) {
    let options = TranslateOptions {
        default_region: "us-east-1".into(),
        weight_attribute: None,
        metadata_attributes: MetadataAttributes::All,
    };
    let endpoints = translate::translate(&instances(ENDPOINTS), &options).endpoints;
    let clients: Vec<Client> =
        ZONES.iter().map(|z| Client::new(Some(Zone::new(*z)), ClientKind::Grpc, "bench")).collect();
    let eds = ResourceType::ClusterLoadAssignment;
    let resolve_all = |builder: &Builder| -> Vec<_> {
        let snapshot = builder.snapshot();
        clients.iter().map(|client| snapshot.resolve(eds, "echo.prod", client).expect("served")).collect()
    };
    // Two clients in zone a, one in b and one in c (a spills, b and c are
    // local), every variant encoded.
    let setup = || {
        let mut builder = Builder::default();
        builder.update_service(&ServiceName::new("prod", "echo"), endpoints.clone(), Policy::ZoneAware);
        builder.set_ready();
        for zone in [ZONES[0], ZONES[0], ZONES[1], ZONES[2]] {
            builder.census().join("echo.prod", &Zone::new(zone), &cloudmap_xds::census::Voter::unique());
        }
        assert!(builder.apply_census(), "the first census");
        let encoded = resolve_all(&builder);
        (builder, encoded)
    };
    // Three more clients in zone a: a spills more, b and c stay local.
    let change = |builder: &mut Builder| {
        for _ in 0..3 {
            builder.census().join("echo.prod", &Zone::new(ZONES[0]), &cloudmap_xds::census::Voter::unique());
        }
        assert!(builder.apply_census(), "the census change moves zone a's plan");
        resolve_all(builder)
    };
    let (mut builder, before) = setup();
    let after = change(&mut builder);
    assert!(!Arc::ptr_eq(&before[0], &after[0]), "zone a's EDS is encoded again");
    assert!(Arc::ptr_eq(&before[1], &after[1]) && Arc::ptr_eq(&before[2], &after[2]), "b's and c's are not");
    c.bench_function("census/one_zone/1000", |b| {
        b.iter_batched(setup, |(mut builder, encoded)| (change(&mut builder), builder, encoded), BatchSize::LargeInput)
    });
}

criterion_group!(benches, stages, census);
criterion_main!(benches);
