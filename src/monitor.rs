//! The optional HTTP listener (`[metrics] listen`): `/healthz` and
//! `/metrics` (Prometheus/OpenMetrics text, encoded by `prometheus-client`).
//! An adapter: it reads the app's metrics port ([`crate::app::metrics`]),
//! its health probe and gateway, and imports no other adapter (it checks
//! the agent socket by connecting to its path, like any client would).
//!
//! Off by default and loopback by default (config validation refuses a
//! remote address unless `metrics.allow_remote`). It serves nothing else,
//! reads no request body, and bounds its connections (how many, how long).

use crate::app::connection::{ConnectionState, ConnectionStatus};
use crate::app::health::HealthProbe;
use crate::app::{metrics, Gateway};
use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// The longest a connection lives, whatever it sends (or does not send):
/// a client that stalls cannot hold a slot for longer.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// How long `/healthz` waits to connect to the agent socket.
const SOCKET_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers read.
#[derive(Clone)]
pub struct Monitor {
    pub gw: Arc<Gateway>,
    pub probe: HealthProbe,
    pub discord: Option<ConnectionStatus>,
    /// The agent socket, connected to by `/healthz`.
    pub socket_path: PathBuf,
}

/// Binds `addr`; a failure is a start-up error naming the key.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("while binding the health and metrics listener metrics.listen = {addr}")
    })
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, monitor: Monitor, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .with_state(Arc::new(monitor));
    let listener = Bounded {
        inner: listener,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "the health and metrics listener stopped");
    }
}

async fn healthz(State(m): State<Arc<Monitor>>) -> Response {
    let socket_up = matches!(
        tokio::time::timeout(
            SOCKET_CHECK_TIMEOUT,
            tokio::net::UnixStream::connect(&m.socket_path)
        )
        .await,
        Ok(Ok(_))
    );
    let report = m.probe.check(socket_up).await.without_details();
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

async fn metrics_text(State(m): State<Arc<Monitor>>) -> Response {
    let pending: Option<usize> = match m.gw.pending_counts().await {
        Ok(counts) => Some(counts.values().sum()),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot count the pending requests");
            None
        }
    };
    let backlog = match &m.discord {
        Some(_) => match m.gw.cards_backlog().await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot count the card outbox");
                None
            }
        },
        None => None,
    };
    let snapshot = Snapshot {
        pending: pending.map(|n| n as i64),
        backlog,
        discord: m.discord.as_ref().map(ConnectionStatus::get),
        leading: m.probe.leading(),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics: encoding failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The values read at scrape time, plus the app's counters.
#[derive(Debug)]
struct Snapshot {
    /// Left out when the store cannot be read.
    pending: Option<i64>,
    /// Only with Discord configured (and readable).
    backlog: Option<u64>,
    discord: Option<ConnectionState>,
    /// Whether this process leads the processes sharing the store.
    leading: bool,
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = metrics::global();

        let mut e = enc.encode_descriptor(
            "keyturn_decisions",
            "Requests that reached a terminal state, by outcome and by who decided",
            None,
            MetricType::Counter,
        )?;
        for (outcome, by, n) in m.decisions() {
            let labels = [("outcome", outcome), ("decided_by", by)];
            e.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }

        if let Some(pending) = self.pending {
            enc.encode_descriptor(
                "keyturn_pending_requests",
                "Requests waiting for a human (queue depth)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&pending)?;
        }

        for (name, help, h) in [
            (
                "keyturn_time_to_decision",
                "From a request's creation to the vote that decided it (human decisions)",
                &m.time_to_decision,
            ),
            (
                "keyturn_store_commit",
                "Duration of one group commit of the store's writer",
                &m.commit_latency,
            ),
        ] {
            let s = h.snapshot();
            enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
                .encode_histogram::<NoLabelSet>(s.sum_s, s.count, &s.buckets, None)?;
        }

        let (agent, admin) = m.connections();
        let mut e = enc.encode_descriptor(
            "keyturn_connections",
            "Open socket connections, by socket",
            None,
            MetricType::Gauge,
        )?;
        e.encode_family(&[("socket", "agent")])?
            .encode_gauge(&agent)?;
        e.encode_family(&[("socket", "admin")])?
            .encode_gauge(&admin)?;

        let mut e = enc.encode_descriptor(
            "keyturn_role",
            "This process's role among those sharing the store: 1 for the current one",
            None,
            MetricType::Gauge,
        )?;
        for leading in [true, false] {
            let v: i64 = (self.leading == leading).into();
            e.encode_family(&[("role", crate::app::health::role(leading))])?
                .encode_gauge(&v)?;
        }

        if let Some(n) = self.backlog {
            enc.encode_descriptor(
                "keyturn_discord_outbox_backlog",
                "Approval cards waiting to be posted or edited on Discord",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(n as i64))?;
        }
        if let Some(state) = &self.discord {
            let mut e = enc.encode_descriptor(
                "keyturn_discord_state",
                "The Discord connection's state: 1 for the current one",
                None,
                MetricType::Gauge,
            )?;
            for name in ConnectionState::NAMES {
                let v: i64 = (state.as_str() == name).into();
                e.encode_family(&[("state", name)])?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }
}

/// The TCP listener with a bound on open connections and on each one's
/// lifetime (axum's own listener has neither).
struct Bounded {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Wait for a free slot before accepting: the rest queue in the backlog.
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                // Never closed; wait rather than spin if it were.
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let io = BoundedStream {
                        stream,
                        deadline: Box::pin(tokio::time::sleep(CONNECTION_LIFETIME)),
                        _permit: permit,
                    };
                    return (io, addr);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that holds its slot, and fails its reads and writes once
/// its lifetime is over (the server then closes it).
struct BoundedStream {
    stream: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl BoundedStream {
    fn expired(&mut self, cx: &mut TaskContext<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn too_long() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "metrics connection open too long",
    )
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(too_long()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(too_long()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
