//! The optional TCP listener (`[tcp]`): the agent socket's protocol for
//! agents on other hosts, over TLS (rustls) unless bound to loopback.
//!
//! A connection's first line must be `auth` with an agent's bearer token,
//! within [`AUTH_TIMEOUT`] of connecting (the TLS handshake included); a
//! valid live token binds the connection to its agent, and from then on it
//! is served by the Unix socket's connection loop ([`super::server`]: the
//! same limits, idle timeout, bytes in flight and shutdown drain), as a
//! [`Peer::Remote`]: no uid, never an admin. Connections whose token is
//! revoked or expires are closed within about a second (re-checked on
//! every policy change and on a one-second tick). Connections are capped in
//! total and per IP address. A client that fails the TLS handshake (say,
//! plaintext against the TLS port) is closed and logged at debug level.

use super::handler::{Handler, Peer};
use super::protocol::{response, RpcError};
use super::server::{connection, refuse, Ends, Limits, Line, LineReader, Slots, SocketOptions};
use crate::app::ports::Change;
use crate::app::tokens::Bearer;
use crate::app::Gateway;
use crate::config::TlsFiles;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a new connection has to finish the TLS handshake and send a
/// valid `auth` line.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// How often live connections' tokens are re-checked, besides on every
/// policy change.
const RECHECK: Duration = Duration::from_secs(1);

/// Why the TCP listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("tcp.tls_cert: cannot read the certificate chain {path}: {why}")]
    Cert { path: String, why: String },
    #[error("tcp.tls_key: cannot read the private key {path}: {why}")]
    Key { path: String, why: String },
    #[error("tcp.tls_cert / tcp.tls_key: the certificate and key are not usable together: {0}")]
    Tls(String),
    #[error("tcp.listen: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the listener's certificate chain and key (PEM) into a rustls
/// server configuration; a clear error naming the key when either is
/// unreadable or invalid, or they do not match.
pub fn load_tls(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TcpError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let shown = |p: &Path| p.display().to_string();
    let cert_err = |why: String| TcpError::Cert {
        path: shown(&files.cert),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no CERTIFICATE in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TcpError::Key {
        path: shown(&files.key),
        why: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TcpError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TcpError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// The TCP listener's settings: the agent socket's limits, with the TLS
/// configuration (`None`: plaintext, loopback only) and a per-IP cap.
#[derive(Clone)]
pub struct TcpOptions {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections_per_ip: usize,
    /// Limits, idle timeout and drain (its path, mode and group unused).
    pub socket: SocketOptions,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TcpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TcpError::Bind { addr, source })
}

/// Live connections and their tokens, for the re-check.
#[derive(Default)]
struct Live {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (Arc<Bearer>, CancellationToken)>>,
}

/// A connection's place in [`Live`], removed on drop.
struct Registered<'a> {
    live: &'a Live,
    id: u64,
}

impl Live {
    fn register(&self, bearer: Arc<Bearer>, kick: CancellationToken) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (bearer, kick));
        Registered { live: self, id }
    }

    fn snapshot(&self) -> Vec<(Arc<Bearer>, CancellationToken)> {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Closes the connections whose token is no longer live: by the clock
/// alone, and (with `read_store`) by the store's rows (a revoke, a
/// rotation's overlap, made here or by another process).
async fn recheck(gw: &Gateway, live: &Live, read_store: bool) {
    let conns = live.snapshot();
    if conns.is_empty() {
        return;
    }
    let now = crate::app::now_ms();
    let mut dead: HashMap<String, &'static str> = HashMap::new();
    for (b, _) in &conns {
        if b.expires_ms.is_some_and(|e| e <= now) {
            dead.insert(b.token_id.clone(), "expired");
        }
    }
    if read_store {
        let mut ids: Vec<String> = conns.iter().map(|(b, _)| b.token_id.clone()).collect();
        ids.sort();
        ids.dedup();
        match gw.dead_tokens(&ids, now).await {
            Ok(found) => dead.extend(found),
            // The clock still bounds every token; the next tick reads again.
            Err(e) => tracing::warn!(error = %e, "cannot re-check the tokens of TCP connections"),
        }
    }
    for (b, kick) in conns {
        if let Some(why) = dead.get(&b.token_id) {
            if !kick.is_cancelled() {
                tracing::info!(token.id = %b.token_id, agent = %b.agent, why, "closing a TCP connection: its token is no longer live");
                kick.cancel();
            }
        }
    }
}

/// Accepts connections until `stop` is cancelled, then drains as the Unix
/// socket does.
pub async fn serve(
    listener: TcpListener,
    opts: TcpOptions,
    handler: Arc<Handler>,
    stop: CancellationToken,
) {
    let s = &opts.socket;
    let slots = Arc::new(Semaphore::new(s.max_connections));
    let per_ip: Arc<Slots<IpAddr>> = Arc::default();
    let tracker = TaskTracker::new();
    let closed = CancellationToken::new();
    let inflight = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(Live::default());
    let limits = Limits {
        admin: false,
        max_line: s.max_line_bytes,
        max_inflight: s.max_inflight,
        max_bytes: s.max_inflight_bytes_per_connection,
        max_total_bytes: s.max_inflight_bytes,
        idle: s.idle_timeout,
    };
    // The re-check runs until every connection is gone.
    let watching = CancellationToken::new();
    let watcher = tokio::spawn(watch_tokens(
        handler.gateway().clone(),
        live.clone(),
        watching.clone(),
    ));
    loop {
        let (stream, addr) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(peer.addr = %addr, "tcp connection refused: server.max_connections");
            continue;
        };
        let Some(ip_slot) = Slots::take(&per_ip, addr.ip(), opts.max_connections_per_ip) else {
            tracing::debug!(peer.addr = %addr, "tcp connection refused: too many connections from this address (tcp.max_connections_per_ip)");
            continue;
        };
        let (handler, stop, closed, inflight, live, tls) = (
            handler.clone(),
            stop.clone(),
            closed.clone(),
            inflight.clone(),
            live.clone(),
            opts.tls.clone(),
        );
        tracker.spawn(async move {
            let open = crate::app::metrics::global().connection(false);
            // The handshake and the auth line share one deadline.
            let auth_by = tokio::time::Instant::now() + AUTH_TIMEOUT;
            let ends = Ends {
                stop: &stop,
                closed: &closed,
                kicked: &CancellationToken::new(),
            };
            match tls {
                Some(cfg) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    let handshake = tokio::time::timeout_at(auth_by, acceptor.accept(stream));
                    let shake = tokio::select! {
                        r = handshake => r,
                        _ = closed.cancelled() => return,
                    };
                    match shake {
                        Ok(Ok(tls)) => {
                            let c = (addr, auth_by);
                            serve_one(tls, c, handler, limits, ends, &inflight, &live).await
                        }
                        Ok(Err(e)) => tracing::debug!(peer.addr = %addr, error = %e, "TLS handshake failed; connection closed"),
                        Err(_) => tracing::debug!(peer.addr = %addr, "no TLS handshake within the auth timeout; connection closed"),
                    }
                }
                None => {
                    let c = (addr, auth_by);
                    serve_one(stream, c, handler, limits, ends, &inflight, &live).await
                }
            }
            drop(open);
            drop(ip_slot);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(s.shutdown_drain) => {
            tracing::info!("tcp shutdown drain over (server.shutdown_drain); closing the remaining connections");
            closed.cancel();
            tracker.wait().await;
        }
    }
    watching.cancel();
    let _ = watcher.await;
}

async fn watch_tokens(gw: Arc<Gateway>, live: Arc<Live>, done: CancellationToken) {
    let mut changes = gw.changes();
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => recheck(&gw, &live, true).await,
            c = changes.recv() => match c {
                Ok(Change::PolicyChanged | Change::Resync)
                | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    recheck(&gw, &live, true).await
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    // No feed: the tick alone re-checks.
                    changes = gw.changes();
                    tokio::select! {
                        _ = done.cancelled() => return,
                        _ = tokio::time::sleep(RECHECK) => {}
                    }
                }
            },
        }
    }
}

/// Authenticates one connection (its first line, by `auth_by`: what is
/// left of [`AUTH_TIMEOUT`] after the handshake), then serves it as its
/// token's agent.
async fn serve_one<S>(
    stream: S,
    (addr, auth_by): (SocketAddr, tokio::time::Instant),
    handler: Arc<Handler>,
    limits: Limits,
    ends: Ends<'_>,
    inflight: &AtomicUsize,
    live: &Live,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = LineReader::new(read, limits.max_line);
    let first = tokio::select! {
        r = tokio::time::timeout_at(auth_by, lines.next_line()) => r,
        _ = ends.closed.cancelled() => return,
        _ = ends.stop.cancelled() => return,
    };
    let line = match first {
        Err(_) => {
            tracing::debug!(peer.addr = %addr, "no auth line within the auth timeout; connection closed");
            refuse(
                write,
                "unauthorized",
                format!(
                    "no `auth` call within {} s of connecting: send {{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"auth\",\"params\":{{\"token\":\"kt_…\"}}}} first",
                    AUTH_TIMEOUT.as_secs()
                ),
            )
            .await;
            return;
        }
        Ok(Ok(Some(Line::Ready))) => match lines.text() {
            Ok(l) => l.to_string(),
            Err(_) => String::new(),
        },
        Ok(Ok(Some(Line::TooLong))) => String::new(),
        Ok(Ok(None)) | Ok(Err(_)) => {
            tracing::debug!(peer.addr = %addr, "connection closed before auth");
            return;
        }
    };
    let (id, token) = read_auth(&line);
    let Some(token) = token else {
        tracing::info!(peer.addr = %addr, "tcp connection refused: the first call is not `auth`");
        let _ = write_line(
            &mut write,
            response(
                &id,
                Err(RpcError::new(
                    "unauthorized",
                    "the first call on a TCP connection must be `auth` with params {\"token\": \"kt_…\"} (the agent's token from `keyturn token issue`)",
                )),
            ),
        )
        .await;
        return;
    };
    let gw = handler.gateway().clone();
    let bearer = match gw.authenticate_bearer(&token).await {
        Ok(Ok(b)) => Arc::new(b),
        Ok(Err(refused)) => {
            tracing::warn!(
                peer.addr = %addr,
                token.id = refused.token_id.as_deref().unwrap_or("-"),
                why = refused.why,
                "tcp connection refused: token not accepted"
            );
            let e: RpcError = crate::app::AppError::Unauthorized.into();
            let _ = write_line(&mut write, response(&id, Err(e))).await;
            return;
        }
        Err(e) => {
            let e: RpcError = e.into();
            let _ = write_line(&mut write, response(&id, Err(e))).await;
            return;
        }
    };
    let ok = json!({"agent": bearer.agent, "token_id": bearer.token_id, "expires_ms": bearer.expires_ms});
    if !write_line(&mut write, response(&id, Ok(ok))).await {
        return;
    }
    tracing::debug!(peer.addr = %addr, token.id = %bearer.token_id, agent = %bearer.agent, "tcp connection authenticated");
    let kick = CancellationToken::new();
    let _registered = live.register(bearer.clone(), kick.clone());
    let peer = Peer::Remote { addr, bearer };
    let ends = Ends {
        kicked: &kick,
        ..ends
    };
    // A peer that stops sending over TCP is gone: our clients never half-close.
    connection(
        lines,
        write,
        |_| true,
        peer,
        handler,
        limits,
        ends,
        inflight,
    )
    .await;
}

/// The call id and the token of an `auth` line; no token when the line is
/// anything else.
fn read_auth(line: &str) -> (Value, Option<String>) {
    let Ok(Value::Object(mut m)) = crate::domain::canonical::parse_strict(line) else {
        return (Value::Null, None);
    };
    let id = match m.remove("id") {
        Some(v @ (Value::Number(_) | Value::String(_))) => v,
        _ => Value::Null,
    };
    let is_auth = m.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
        && m.get("method").and_then(Value::as_str) == Some("auth");
    let token = m
        .get("params")
        .and_then(|p| p.get("token"))
        .and_then(Value::as_str)
        .filter(|_| is_auth)
        .map(str::to_string);
    (id, token)
}

async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, mut line: String) -> bool {
    line.push('\n');
    tokio::time::timeout(AUTH_TIMEOUT, async {
        w.write_all(line.as_bytes()).await?;
        w.flush().await
    })
    .await
    .is_ok_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_auth_line_carries_a_token() {
        let (id, t) =
            read_auth(r#"{"jsonrpc":"2.0","id":3,"method":"auth","params":{"token":"kt_x"}}"#);
        assert_eq!((id, t.as_deref()), (json!(3), Some("kt_x")));
        let (_, t) =
            read_auth(r#"{"jsonrpc":"2.0","id":3,"method":"submit","params":{"token":"kt_x"}}"#);
        assert_eq!(t, None);
        let (id, t) = read_auth("GET / HTTP/1.1");
        assert_eq!((id, t), (Value::Null, None));
    }
}
