//! A counting HTTP proxy for Cloud Map calls: the control plane's
//! `AWS_ENDPOINT_URL` points here, every request is forwarded to moto and
//! counted by operation (the `X-Amz-Target` header of the AWS JSON
//! protocol). `GET /__loadgen/counts` returns the counts as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub const COUNTS_PATH: &str = "/__loadgen/counts";

/// What the proxy has counted: calls by operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub total: u64,
    pub by_operation: BTreeMap<String, u64>,
}

impl Counts {
    /// Calls per operation between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        let by_operation = self
            .by_operation
            .iter()
            .map(|(op, n)| (op.clone(), n - earlier.by_operation.get(op).copied().unwrap_or(0).min(*n)))
            .filter(|(_, n)| *n > 0)
            .collect();
        Counts { total: self.total.saturating_sub(earlier.total), by_operation }
    }
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    counts: Arc<Mutex<Counts>>,
}

/// The operation of an AWS JSON request: `Route53AutoNaming_v20170314.DiscoverInstances` → `DiscoverInstances`.
fn operation(headers: &HeaderMap) -> String {
    headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(|t| t.rsplit('.').next().unwrap_or(t).to_string())
        .unwrap_or_else(|| "other".to_string())
}

pub async fn serve(listen: SocketAddr, upstream: String) -> anyhow::Result<()> {
    let proxy = Proxy {
        upstream: upstream.trim_end_matches('/').to_string(),
        http: reqwest::Client::new(),
        counts: Arc::default(),
    };
    let app =
        Router::new()
            .route(
                COUNTS_PATH,
                get(|State(p): State<Proxy>| async move {
                    axum::Json(p.counts.lock().map(|c| c.clone()).unwrap_or_default())
                }),
            )
            .fallback(forward)
            .with_state(proxy);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the proxy address {listen}: {e}"))?;
    eprintln!("count-proxy: {listen} → {upstream}");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("reading the request: {e}")).into_response(),
    };
    {
        let mut counts = proxy.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total += 1;
        *counts.by_operation.entry(operation(&parts.headers)).or_insert(0) += 1;
    }
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut headers = parts.headers.clone();
    headers.remove(header::HOST);
    let sent =
        proxy.http.request(parts.method, format!("{}{path}", proxy.upstream)).headers(headers).body(body).send().await;
    let upstream = match sent {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("moto: {e}")).into_response(),
    };
    let status = upstream.status();
    let mut headers = upstream.headers().clone();
    for hop in [header::TRANSFER_ENCODING, header::CONNECTION, header::CONTENT_LENGTH] {
        headers.remove(hop);
    }
    match upstream.bytes().await {
        Ok(body) => (status, headers, body).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("moto: {e}")).into_response(),
    }
}

/// Read the counts of a running proxy.
pub async fn fetch(url: &str) -> anyhow::Result<Counts> {
    let response = reqwest::get(url).await?.error_for_status()?;
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_and_differences() {
        let mut h = HeaderMap::new();
        assert_eq!(operation(&h), "other");
        h.insert("x-amz-target", "Route53AutoNaming_v20170314.DiscoverInstancesRevision".parse().expect("value"));
        assert_eq!(operation(&h), "DiscoverInstancesRevision");
        let before = Counts { total: 3, by_operation: BTreeMap::from([("A".into(), 3)]) };
        let after = Counts { total: 10, by_operation: BTreeMap::from([("A".into(), 5), ("B".into(), 5)]) };
        let d = after.since(&before);
        assert_eq!(d.total, 7);
        assert_eq!(d.by_operation, BTreeMap::from([("A".into(), 2), ("B".into(), 5)]));
    }
}
