//! The admin HTTP server: liveness, readiness, Prometheus metrics, a JSON
//! dump of what is served, and CSDS (gRPC). Reads the cache, the census and
//! the watchers' status; changes nothing.
//! Binds to loopback by default: it tells anyone who can reach it the whole
//! topology and every client.
//!
//! CSDS shares this port rather than having one of its own: gRPC is HTTP/2,
//! which the server speaks beside HTTP/1 (prior knowledge, as gRPC clients
//! connect), and its requests are told apart by their path
//! (`/envoy.service.status.v3.ClientStatusDiscoveryService/…`). One port
//! means one address to keep on loopback and one flag (`--admin-listen`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::cache::Cache;
use crate::census::Census;
use crate::peers::Peering;
use crate::server::csds::CsdsServer;
use crate::server::registry::{Registry, ResourceState, StreamStatus};
use crate::status::{NamespaceState, Status};
use crate::ui;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Sources {
    pub cache: Arc<Cache>,
    pub census: Arc<Census>,
    pub status: Arc<Status>,
    pub registry: Arc<Registry>,
    pub peering: Arc<Peering>,
}

#[derive(Clone)]
struct AdminState {
    cache: Arc<Cache>,
    census: Arc<Census>,
    status: Arc<Status>,
    registry: Arc<Registry>,
    metrics: PrometheusHandle,
    staleness: Option<Duration>,
    peering: Arc<Peering>,
}

/// `staleness`: `/ready` answers 503 when a service's last successful Cloud
/// Map call is older than this (`None`: never, serving the last good state is ready).
pub fn router(sources: Sources, metrics: PrometheusHandle, staleness: Option<Duration>, csds: CsdsServer) -> Router {
    let Sources { cache, census, status, registry, peering } = sources;
    let csds = ClientStatusDiscoveryServiceServer::new(csds);
    Router::new()
        .route_service("/envoy.service.status.v3.ClientStatusDiscoveryService/{*method}", csds)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/config_dump", get(config_dump))
        .route("/ui", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], ui::PAGE) }))
        .route("/ui/ui.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], ui::SCRIPT) }))
        .route("/ui/ui.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], ui::STYLE) }))
        .route("/ui/state", get(ui_state))
        .with_state(AdminState { cache, census, status, registry, metrics, staleness, peering })
}

/// Bind the admin address, before anything is served: a port already taken
/// must stop the start (the health check would otherwise reach whatever
/// holds it), not leave a control plane without `/ready` and `/metrics`.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot bind the admin address {listen}: {e}; free the port or choose another with --admin-listen"
        )
    })?;
    tracing::info!(address = %listener.local_addr().unwrap_or(listen), "admin HTTP listening");
    Ok(listener)
}

/// Serve `router` (from [`router`]) on the bound admin listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// What `/ready` says about namespaces that are not served: one line each.
fn namespace_lines(status: &Status) -> String {
    status
        .namespace_states()
        .iter()
        .filter_map(|(name, state)| match state {
            NamespaceState::Synced => None,
            NamespaceState::Missing => {
                Some(format!("namespace {name}: not found in Cloud Map (check --namespace and AWS_REGION)\n"))
            }
            NamespaceState::Pending => Some(format!("namespace {name}: first sync in progress\n")),
            NamespaceState::Error(e) => Some(format!("namespace {name}: {e}\n")),
        })
        .collect()
}

async fn ready(State(state): State<AdminState>) -> Response {
    let namespaces = namespace_lines(&state.status);
    if !state.cache.is_ready() {
        let body = format!("waiting for the first Cloud Map sync\n{namespaces}");
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    if let Some(bound) = state.staleness {
        let stale: Vec<String> = state
            .status
            .sync_ages()
            .into_iter()
            .filter(|(_, age)| *age > bound)
            .map(|(service, age)| format!("{service} (last sync {}s ago)", age.as_secs()))
            .collect();
        if !stale.is_empty() {
            let body = format!("stale: serving the last good state of {}\n", stale.join(", "));
            return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
        }
    }
    (StatusCode::OK, format!("ready\n{namespaces}")).into_response()
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    for (service, age) in state.status.sync_ages() {
        metrics::gauge!("cloudmap_xds_seconds_since_last_sync", "service" => service).set(age.as_secs_f64());
    }
    // The cross-zone share each service's plans give its zoned clients (what the alert reads).
    let snapshot = state.cache.snapshot();
    for entry in snapshot.services.values() {
        if let Some(share) = ui::cross_zone_share(&ui::matrix(entry)) {
            metrics::gauge!("cloudmap_xds_cross_zone_share", "service" => entry.name.dial_name()).set(share);
        }
    }
    state.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn ui_state(State(state): State<AdminState>) -> Response {
    let snapshot = state.cache.snapshot();
    let streams = state.registry.list();
    let dials: Vec<String> = snapshot.services.keys().cloned().collect();
    let inputs = ui::Inputs {
        snapshot: &snapshot,
        ready: state.cache.is_ready(),
        namespaces: state.status.namespace_states(),
        sync_ages: state.status.sync_ages(),
        live_census: state.census.all(),
        skipped: dials.iter().map(|d| (d.clone(), state.status.skipped(d))).collect(),
        routing_errors: dials.iter().filter_map(|d| state.status.routing_error(d).map(|e| (d.clone(), e))).collect(),
        streams: &streams,
    };
    axum::Json(ui::view(&inputs)).into_response()
}

async fn config_dump(State(state): State<AdminState>) -> Response {
    let snapshot = state.cache.snapshot();
    let services: Vec<_> = snapshot
        .services
        .values()
        .map(|entry| {
            let endpoints: Vec<_> = entry
                .endpoints
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "instance_id": e.instance_id,
                        "address": std::net::SocketAddr::new(e.ip, e.port).to_string(),
                        "zone": e.zone.as_str(),
                        "region": e.region,
                        "health": format!("{:?}", e.health).to_ascii_uppercase(),
                        "weight": e.weight,
                    })
                })
                .collect();
            let capacity: serde_json::Map<_, _> =
                entry.capacity.iter().map(|(z, c)| (z.as_str().to_string(), json!(c))).collect();
            let census: serde_json::Map<_, _> =
                entry.census.iter().map(|(z, c)| (z.as_str().to_string(), json!(c))).collect();
            let live: serde_json::Map<_, _> = state
                .census
                .live(&entry.name.dial_name())
                .iter()
                .map(|(z, c)| (z.as_str().to_string(), json!(c)))
                .collect();
            // Each subset: its members, and the census its plans use (clients of `SERVICE/SUBSET`).
            let subsets: serde_json::Map<_, _> = entry
                .subsets
                .iter()
                .map(|(name, subset)| {
                    let census: serde_json::Map<_, _> =
                        subset.census.iter().map(|(z, c)| (z.as_str().to_string(), json!(c))).collect();
                    let members: Vec<&str> =
                        subset.endpoints.endpoints.iter().map(|e| e.instance_id.as_str()).collect();
                    (name.clone(), json!({ "census": census, "instances": members }))
                })
                .collect();
            let skipped: Vec<_> = state
                .status
                .skipped(&entry.name.dial_name())
                .into_iter()
                .map(|s| json!({"instance_id": s.instance_id, "reason": s.reason}))
                .collect();
            json!({
                "skipped": skipped,
                "subsets": subsets,
                "routes": entry.routing.routes.len(),
                // Set while the service's Cloud Map routing attributes are refused (the last good routing is served).
                "routing_error": state.status.routing_error(&entry.name.dial_name()),
                "name": entry.name.dial_name(),
                "namespace": entry.name.namespace,
                "service": entry.name.service,
                "policy": entry.policy,
                "fail_open": entry.endpoints.fail_open,
                "capacity": capacity,
                // The census the plans use (zone-aware only; moves ≥ 2 points), and the live one.
                "census": census,
                "live_census": live,
                "endpoints": endpoints,
            })
        })
        .collect();
    let clients: Vec<_> = state.registry.list().iter().map(client_json).collect();
    axum::Json(json!({
        "ready": state.cache.is_ready(),
        "namespaces": state.status.namespace_states(),
        "generation": snapshot.generation,
        "services": services,
        "clients": clients,
        "peering": peering_json(&state.peering, &state.census),
    }))
    .into_response()
}

/// This replica's id, and each peer: whether it is in the census now, its
/// last contact and the census it reported (what the plans add to our own).
fn peering_json(peering: &Peering, census: &Census) -> serde_json::Value {
    let censuses = census.peers();
    let peers: Vec<_> = peering
        .status()
        .into_iter()
        .map(|(address, status)| {
            let census = censuses.get(&address);
            let census: serde_json::Map<_, _> = census
                .into_iter()
                .flatten()
                .map(|(dial, per_zone)| {
                    let zones: serde_json::Map<_, _> =
                        per_zone.iter().map(|(z, n)| (z.as_str().to_string(), json!(n))).collect();
                    (dial.clone(), serde_json::Value::Object(zones))
                })
                .collect();
            json!({
                "address": address,
                "replica": status.replica,
                "self": status.is_self,
                "connected": status.connected,
                "in_census": censuses.contains_key(&address),
                "last_contact_seconds_ago": status.last_contact.map(|t| t.elapsed().as_secs_f64()),
                "errors": status.errors,
                "last_error": status.last_error,
                "census": census,
            })
        })
        .collect();
    json!({
        "replica": peering.replica(),
        "peer_timeout_seconds": peering.timeout().as_secs_f64(),
        "peers": peers,
    })
}

/// One connected client: who it is, what it subscribed to, what it holds,
/// and what it last ACKed or NACKed.
fn client_json(stream: &StreamStatus) -> serde_json::Value {
    let types: Vec<_> = stream
        .types
        .iter()
        .map(|t| {
            json!({
                "type_url": t.type_url,
                "subscribed": t.subscribed,
                "last_sent": t.sent,
                "last_acked": t.acked,
                "last_nack": t.nack.as_ref().map(|n| json!({"version": n.version, "message": n.message})),
                "resources": t.resources,
                // Per resource where tracked (SotW): acked, requested (pending) or nacked.
                "resource_status": t.states.iter().map(|(name, state)| {
                    let status = match state {
                        ResourceState::Acked => "acked",
                        ResourceState::Requested => "requested",
                        ResourceState::Nacked(_) => "nacked",
                    };
                    (name.clone(), json!(status))
                }).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let connected = stream.connected_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    json!({
        "stream": stream.id,
        "protocol": stream.protocol,
        "peer": stream.peer.map(|p| p.to_string()),
        "connected_at_unix": connected,
        "node_id": stream.client.as_ref().map(|c| c.node_id.clone()),
        "zone": stream.client.as_ref().and_then(|c| c.zone.as_ref().map(|z| z.as_str().to_string())),
        "user_agent": stream.client.as_ref().map(|c| c.user_agent.clone()),
        "kind": stream.client.as_ref().map(|c| c.kind),
        "types": types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Builder;
    use crate::model::{ServiceEndpoints, ServiceName};
    use crate::policy::Policy;

    fn state(staleness: Option<Duration>) -> (AdminState, Builder) {
        let builder = Builder::default();
        let state = AdminState {
            cache: builder.cache().clone(),
            census: builder.census().clone(),
            status: builder.status().clone(),
            registry: Arc::new(Registry::new(10)),
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle(),
            staleness,
            peering: Peering::new(builder.census().clone(), "test".into(), Duration::from_secs(10), Default::default()),
        };
        (state, builder)
    }

    #[tokio::test]
    async fn a_taken_admin_port_is_an_error_naming_the_flag() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = taken.local_addr().expect("addr");
        let error = bind(address).await.expect_err("the port is taken").to_string();
        assert!(error.contains("--admin-listen") && error.contains(&address.to_string()), "{error}");
    }

    #[tokio::test]
    async fn ready_waits_for_the_first_sync_and_reports_staleness() {
        let (s, mut builder) = state(Some(Duration::from_millis(50)));
        assert_eq!(ready(State(s.clone())).await.status(), StatusCode::SERVICE_UNAVAILABLE);
        let name = ServiceName::new("demo", "echo");
        builder.update_service(&name, ServiceEndpoints::default(), Policy::ZoneAware);
        s.status.mark_synced(&name.dial_name());
        builder.set_ready();
        assert_eq!(ready(State(s.clone())).await.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(ready(State(s.clone())).await.status(), StatusCode::SERVICE_UNAVAILABLE, "stale");
        s.status.mark_synced(&name.dial_name());
        assert_eq!(ready(State(s.clone())).await.status(), StatusCode::OK, "recovered");

        // A missing namespace is listed, and does not make the others unready.
        s.status.set_namespace_state("demo", NamespaceState::Synced);
        s.status.set_namespace_state("typo", NamespaceState::Missing);
        let r = ready(State(s.clone())).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 4096).await.expect("body");
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("namespace typo: not found") && !body.contains("namespace demo"), "{body}");

        // Without a bound, serving the last good state is ready.
        let (unbounded, builder) = state(None);
        builder.set_ready();
        assert_eq!(ready(State(unbounded)).await.status(), StatusCode::OK);
    }
}
