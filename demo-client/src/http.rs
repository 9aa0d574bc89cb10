//! `demo-client serve`: a small HTTP front (axum) for the demo.
//!
//! * `GET /describe` makes one `Describe` call through the balancer and
//!   answers `{"requestId","zone","instanceId","clientZone","latencyMs",...}`;
//!   a failure answers `{"error","requestId","clientZone"}` with 503
//!   (unavailable / no endpoints), 504 (deadline) or 502 (anything else).
//! * `GET /healthz` answers 200 `ok`.
//! * `GET /endpoints` shows what the client knows: xDS status and the
//!   picker's localities, weights and readiness.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tonic::Code;
use tracing::info;

use crate::balancer::{Balancer, CallError};
use crate::xds::XdsStatus;

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub balancer: Balancer,
    pub client_zone: String,
    pub timeout: Duration,
    pub xds: Arc<Mutex<XdsStatus>>,
}

/// The successful `/describe` body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeBody {
    pub request_id: String,
    pub zone: String,
    pub instance_id: String,
    pub client_zone: String,
    pub latency_ms: f64,
    pub region: String,
    pub endpoint: String,
    pub priority: usize,
    pub attempts: u32,
}

/// The error `/describe` body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: String,
    pub request_id: String,
    pub client_zone: String,
}

/// The HTTP status for a failed call: 503 unavailable, 504 deadline, 502 else.
pub fn http_status(err: &CallError) -> StatusCode {
    match err.code() {
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// The router with all routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/describe", get(describe))
        .route("/healthz", get(|| async { "ok" }))
        .route("/endpoints", get(endpoints))
        .with_state(state)
}

fn request_id() -> String {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string()
}

async fn describe(State(state): State<AppState>) -> Response {
    let request_id = request_id();
    match state.balancer.describe(state.timeout).await {
        Ok(ok) => Json(DescribeBody {
            request_id,
            zone: ok.response.zone,
            instance_id: ok.response.instance_id,
            client_zone: state.client_zone,
            latency_ms: ok.latency.as_secs_f64() * 1000.0,
            region: ok.response.region,
            endpoint: ok.endpoint.to_string(),
            priority: ok.priority,
            attempts: ok.attempts,
        })
        .into_response(),
        Err(err) => {
            (http_status(&err), Json(ErrorBody { error: err.to_string(), request_id, client_zone: state.client_zone }))
                .into_response()
        }
    }
}

async fn endpoints(State(state): State<AppState>) -> Response {
    let xds = state.xds.lock().map(|s| s.clone()).unwrap_or_else(|e| e.into_inner().clone());
    Json(json!({
        "clientZone": state.client_zone,
        "xds": xds,
        "picker": state.balancer.snapshot(),
    }))
    .into_response()
}

/// Serves until `shutdown` completes.
pub async fn serve(
    state: AppState,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    info!(%bound, client_zone = %state.client_zone, "demo-client serving HTTP");
    eprintln!("demo-client listening on http://{bound} (GET /describe, /healthz, /endpoints)");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await.context("running the HTTP server")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn statuses_map_to_http() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let rpc = |s: Status| CallError::Rpc { status: s, endpoint: addr };
        assert_eq!(http_status(&CallError::NoEndpoint("none".into())), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(&rpc(Status::unavailable("x"))), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(&rpc(Status::deadline_exceeded("x"))), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(http_status(&rpc(Status::internal("x"))), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn request_ids_are_uuids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_ne!(id, request_id());
    }
}
