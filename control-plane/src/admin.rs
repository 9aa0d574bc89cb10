//! The admin HTTP server: liveness, readiness, Prometheus metrics and a JSON
//! dump of what is served. Reads the cache; changes nothing. Binds to
//! loopback by default: it tells anyone who can reach it the whole topology.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::cache::Cache;

#[derive(Clone)]
struct AdminState {
    cache: Arc<Cache>,
    metrics: PrometheusHandle,
}

pub fn router(cache: Arc<Cache>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/config_dump", get(config_dump))
        .with_state(AdminState { cache, metrics })
}

pub async fn serve(
    listen: SocketAddr,
    cache: Arc<Cache>,
    metrics: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the admin address {listen}: {e} (set --admin-listen)"))?;
    tracing::info!(address = %listen, "admin HTTP listening");
    axum::serve(listener, router(cache, metrics)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn ready(State(state): State<AdminState>) -> Response {
    if state.cache.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first Cloud Map sync\n").into_response()
    }
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    state.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
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
            json!({
                "name": entry.name.dial_name(),
                "namespace": entry.name.namespace,
                "service": entry.name.service,
                "policy": entry.policy,
                "fail_open": entry.endpoints.fail_open,
                "capacity": capacity,
                "census": census,
                "endpoints": endpoints,
            })
        })
        .collect();
    axum::Json(json!({
        "ready": state.cache.is_ready(),
        "generation": snapshot.generation,
        "services": services,
    }))
    .into_response()
}
