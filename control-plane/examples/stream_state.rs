//! Heap bytes one stream's protocol state holds after a gRPC client's walk
//! (LDS → RDS → CDS → EDS, each ACKed), for SotW and Delta — the part of
//! the per-stream memory this crate owns (h2, hyper and tokio add theirs).
//! Counted exactly, with a counting global allocator.
//!
//! Run: `cargo run --release -p cloudmap-xds --example stream_state`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use cloudmap_xds::builder::Builder;
use cloudmap_xds::cache::Cache;
use cloudmap_xds::model::{Endpoint, Health, ServiceEndpoints, ServiceName, Zone};
use cloudmap_xds::policy::Policy;
use cloudmap_xds::resources::ResourceType;
use cloudmap_xds::server::Protocol;
use cloudmap_xds::server::delta::DeltaState;
use cloudmap_xds::server::sotw::SotwState;
use cloudmap_xds::wakeup::Changed;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn node(i: usize) -> Node {
    Node {
        id: format!("client-{i}"),
        user_agent_name: "gRPC Go".into(),
        locality: Some(Locality { zone: "us-east-1a".into(), ..Default::default() }),
        ..Default::default()
    }
}

const NAMES: [(ResourceType, &str); 4] = [
    (ResourceType::Listener, "echo.demo"),
    (ResourceType::RouteConfiguration, "echo.demo"),
    (ResourceType::Cluster, "echo.demo"),
    (ResourceType::ClusterLoadAssignment, "echo.demo"),
];

fn sotw(cache: &Cache, i: usize) -> Box<SotwState> {
    let mut s = Box::new(SotwState::default());
    for (ty, name) in NAMES {
        let request = DiscoveryRequest {
            node: (ty == ResourceType::Listener).then(|| node(i)),
            type_url: ty.type_url().into(),
            resource_names: vec![name.into()],
            ..Default::default()
        };
        s.on_request(&request).expect("request");
        for reply in s.responses(&cache.snapshot(), &Changed::All) {
            let ack = DiscoveryRequest {
                type_url: reply.ty.type_url().into(),
                resource_names: vec![name.into()],
                version_info: reply.version.to_string(),
                response_nonce: reply.nonce.to_string(),
                ..Default::default()
            };
            s.on_request(&ack).expect("ack");
        }
    }
    s
}

fn delta(cache: &Cache, i: usize) -> Box<DeltaState> {
    let mut s = Box::new(DeltaState::default());
    for (ty, name) in NAMES {
        let request = DeltaDiscoveryRequest {
            node: (ty == ResourceType::Listener).then(|| node(i)),
            type_url: ty.type_url().into(),
            resource_names_subscribe: vec![name.into()],
            ..Default::default()
        };
        s.on_request(&request).expect("request");
        for reply in s.responses(&cache.snapshot(), &Changed::All) {
            let ack = DeltaDiscoveryRequest {
                type_url: reply.ty.type_url().into(),
                response_nonce: reply.nonce.to_string(),
                ..Default::default()
            };
            s.on_request(&ack).expect("ack");
        }
    }
    s
}

fn measure<T>(what: &str, n: usize, make: impl Fn(usize) -> T) {
    let before = LIVE.load(Ordering::Relaxed);
    let held: Vec<T> = (0..n).map(make).collect();
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before) as f64 / n as f64;
    println!("{what}: {per:.0} bytes per stream (state after the walk, ACKed; {n} streams)");
    drop(held);
}

fn main() {
    let mut builder = Builder::default();
    let endpoints = (0..30)
        .map(|i| Endpoint {
            instance_id: format!("i-{i}"),
            ip: std::net::IpAddr::from([10, 0, 0, i as u8 + 1]),
            port: 50051,
            zone: Zone::new(["us-east-1a", "us-east-1b", "us-east-1c"][i % 3]),
            region: "us-east-1".into(),
            health: Health::Healthy,
            weight: 1,
            attributes: Default::default(),
            metadata: Default::default(),
        })
        .collect();
    builder.update_service(
        &ServiceName::new("demo", "echo"),
        ServiceEndpoints::new(endpoints, false),
        Policy::ZoneAware,
    );
    builder.set_ready();
    let cache = builder.cache();
    // Warm the cache's memo so only per-stream state is counted.
    drop(sotw(cache, 0));
    drop(delta(cache, 0));
    measure("SotW", 1000, |i| sotw(cache, i));
    measure("Delta", 1000, |i| delta(cache, i));
}
