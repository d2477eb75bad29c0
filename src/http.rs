//! One HTTP listener for operators: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (Redis answers, the breaker is closed and the group exists).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerState};
use crate::error::{Error, Result};

/// How long a readiness check may wait for Redis.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// What the handlers need.
pub struct Health {
    /// Where Redis is.
    pub client: crate::connection::Client,
    /// Events stream.
    pub stream: String,
    /// Consumer group.
    pub group: String,
    /// The worker's breaker.
    pub breaker: Breaker,
    /// The consumer loops' liveness.
    pub loops: Vec<std::sync::Arc<crate::worker::watchdog::Progress>>,
    /// A loop silent for half of this is reported not ready (the watchdog restarts it at the
    /// whole).
    pub stall_limit: Duration,
    /// Renders the metrics.
    pub metrics: PrometheusHandle,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address (useful with port 0).
/// An address already in use is an [`Error::Io`] of kind `AddrInUse`.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => Error::Io(e),
            _ => Error::Config(format!("--http-addr {addr}: cannot listen: {e}")),
        })?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "HTTP listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    h.metrics.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4")],
        h.metrics.render(),
    )
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    match check(&h).await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Why the worker is not ready, if it is not.
async fn check(h: &Health) -> std::result::Result<(), String> {
    if h.breaker.state() != BreakerState::Closed {
        return Err(format!("circuit breaker {}", h.breaker.state().as_str()));
    }
    if let Some(stuck) = h.loops.iter().find(|p| p.silent_for() > h.stall_limit / 2) {
        return Err(format!(
            "consumer loop of {} silent for {}s in step {:?}",
            stuck.name(),
            stuck.silent_for().as_secs(),
            stuck.step()
        ));
    }
    let probe = async {
        let mut con = crate::connection::connect(&h.client, READY_TIMEOUT).await?;
        crate::retention::groups(&mut con, &h.stream).await
    };
    match tokio::time::timeout(READY_TIMEOUT * 2, probe).await {
        Err(_) => Err("Redis does not answer".into()),
        Ok(Err(e)) => Err(format!(
            "Redis unreachable: {}",
            crate::redact::redact(&e.to_string())
        )),
        Ok(Ok(groups)) if !groups.iter().any(|g| g.name == h.group) => {
            Err(format!("consumer group {:?} missing", h.group))
        }
        Ok(Ok(_)) => Ok(()),
    }
}
