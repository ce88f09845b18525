//! The Unix socket listener: connection limits (in total and per uid),
//! peer credentials, line framing with a length limit, bytes in flight
//! bounded per connection and per socket, idle connections closed, and a
//! shutdown that lets calls in flight finish for a bounded drain, then
//! closes every connection (a peer that reads nothing cannot hold it open).
//! It notices a peer that went away (closed, killed: not a half-close) while
//! its calls are in flight, and tells them, so a waiting client that leaves
//! cancels its request instead of leaving it approvable by mistake.
//!
//! The per-connection loop ([`connection`]) is shared with the TCP listener
//! (`super::tcp`), which authenticates a connection before handing it over.

use super::handler::{parse_call, Handler, Peer};
use super::protocol::{response, RpcError};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::codec::{FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another Keyturn is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot use socket path {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket group `{0}` does not exist")]
    NoSuchGroup(String),
    #[error(
        "{path} is {what}, not a socket; refusing to replace it (remove it yourself, \
         or choose another socket path)"
    )]
    NotASocket { path: PathBuf, what: &'static str },
}

#[derive(Clone)]
pub struct SocketOptions {
    pub path: PathBuf,
    /// The admin socket: only admin uids may connect, and only here are
    /// admin methods served.
    pub admin: bool,
    pub mode: u32,
    pub group: Option<String>,
    pub max_connections: usize,
    pub max_line_bytes: usize,
    pub max_inflight: usize,
    /// Open connections from one uid (this socket only).
    pub max_connections_per_uid: usize,
    /// Bytes of request lines in flight on one connection.
    pub max_inflight_bytes_per_connection: usize,
    /// Bytes of request lines in flight on all of this socket's connections.
    pub max_inflight_bytes: usize,
    /// A connection with no call in flight and no line for this long is closed.
    pub idle_timeout: Duration,
    /// How long calls in flight may finish after `stop`, before every
    /// connection is closed.
    pub shutdown_drain: Duration,
}

/// What sits at a socket path.
enum AtPath {
    Nothing,
    Socket,
    /// Anything else, named for the error.
    Other(&'static str),
}

fn at_path(path: &Path) -> std::io::Result<AtPath> {
    use std::os::unix::fs::FileTypeExt;
    // symlink_metadata: a symlink is reported as one, never followed.
    let t = match std::fs::symlink_metadata(path) {
        Ok(m) => m.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AtPath::Nothing),
        Err(e) => return Err(e),
    };
    Ok(if t.is_socket() {
        AtPath::Socket
    } else if t.is_file() {
        AtPath::Other("a regular file")
    } else if t.is_dir() {
        AtPath::Other("a directory")
    } else if t.is_symlink() {
        AtPath::Other("a symbolic link")
    } else {
        AtPath::Other("a special file")
    })
}

/// Removes the socket file at `path`, and nothing else: whatever else is
/// there (say, the database a mistyped path points at) is left alone.
pub fn remove_socket(path: &Path) -> Result<(), BindError> {
    let io = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    match at_path(path).map_err(io)? {
        AtPath::Nothing => Ok(()),
        AtPath::Socket => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        },
        AtPath::Other(what) => Err(BindError::NotASocket {
            path: path.to_path_buf(),
            what,
        }),
    }
}

/// Binds the socket, replacing a stale socket file but never a live
/// listener, and never anything that is not a socket.
pub async fn bind(opts: &SocketOptions) -> Result<UnixListener, BindError> {
    let path = &opts.path;
    let io = |source| BindError::Io {
        path: path.clone(),
        source,
    };
    match at_path(path).map_err(io)? {
        AtPath::Nothing => {}
        AtPath::Socket => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(BindError::InUse(path.clone()));
            }
            remove_socket(path)?;
        }
        AtPath::Other(what) => {
            return Err(BindError::NotASocket {
                path: path.clone(),
                what,
            })
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.mode)).map_err(io)?;
    if let Some(group) = &opts.group {
        let gid = match group.parse::<u32>() {
            Ok(g) => g,
            Err(_) => nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
                .ok_or_else(|| BindError::NoSuchGroup(group.clone()))?,
        };
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?;
    }
    Ok(listener)
}

/// Accepts connections until `stop` is cancelled, then lets the calls in
/// flight finish and their replies flush for at most `shutdown_drain`,
/// closes whatever is still open, and removes the socket file.
pub async fn serve(
    listener: UnixListener,
    opts: SocketOptions,
    handler: Arc<Handler>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let per_uid = Arc::new(UidSlots::default());
    let tracker = TaskTracker::new();
    // Cancelled `shutdown_drain` after `stop`: every connection still open
    // is then closed, whatever it was doing (a blocked write included).
    let closed = CancellationToken::new();
    let inflight = Arc::new(AtomicUsize::new(0));
    let limits = Limits {
        admin: opts.admin,
        max_line: opts.max_line_bytes,
        max_inflight: opts.max_inflight,
        max_bytes: opts.max_inflight_bytes_per_connection,
        max_total_bytes: opts.max_inflight_bytes,
        idle: opts.idle_timeout,
    };
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of file descriptors and the like: back off briefly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracker.spawn(refuse(
                stream,
                "too_many_connections",
                format!(
                    "the server already has {} connections (server.max_connections)",
                    opts.max_connections
                ),
            ));
            continue;
        };
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no peer credentials; refusing");
                continue;
            }
        };
        let Some(uid_slot) = UidSlots::take(&per_uid, cred.uid(), opts.max_connections_per_uid)
        else {
            tracing::warn!(
                peer.uid = cred.uid(),
                "connection refused: too many connections from this uid"
            );
            tracker.spawn(refuse(
                stream,
                "too_many_connections",
                format!(
                    "uid {} already has {} connections (server.max_connections_per_uid)",
                    cred.uid(),
                    opts.max_connections_per_uid
                ),
            ));
            continue;
        };
        let peer = Peer::Local {
            uid: cred.uid(),
            pid: cred.pid(),
            admin_socket: opts.admin,
        };
        let (handler, stop, closed, inflight) = (
            handler.clone(),
            stop.clone(),
            closed.clone(),
            inflight.clone(),
        );
        let open = crate::app::metrics::global().connection(opts.admin);
        tracker.spawn(async move {
            if let Some(stream) = admit(stream, cred.uid(), &handler, limits.admin).await {
                let (read, write) = stream.into_split();
                let never = CancellationToken::new();
                let ends = Ends {
                    stop: &stop,
                    closed: &closed,
                    kicked: &never,
                };
                let lines = LineReader::new(read, limits.max_line);
                connection(
                    lines,
                    write,
                    peer_hung_up,
                    peer,
                    handler,
                    limits,
                    ends,
                    &inflight,
                )
                .await;
            }
            drop(open);
            drop(uid_slot);
            drop(permit);
        });
    }
    // New clients are refused at once from here on, not left unanswered.
    drop(listener);
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(opts.shutdown_drain) => {
            tracing::info!(
                socket = %opts.path.display(),
                "shutdown drain over (server.shutdown_drain); closing the remaining connections"
            );
            closed.cancel();
            tracker.wait().await;
        }
    }
    if let Err(e) = remove_socket(&opts.path) {
        tracing::warn!(error = %e, "socket file left in place");
    }
}

/// The open connections of each uid (or, over TCP, each IP address) on
/// one listener.
pub(super) struct Slots<K>(Mutex<HashMap<K, usize>>);

/// The open connections of each uid on one socket.
type UidSlots = Slots<u32>;

impl<K> Default for Slots<K> {
    fn default() -> Self {
        Slots(Mutex::new(HashMap::new()))
    }
}

/// One connection's place in [`Slots`], given back on drop.
pub(super) struct Slot<K: std::hash::Hash + Eq> {
    slots: Arc<Slots<K>>,
    uid: K,
}

impl<K: std::hash::Hash + Eq + Clone> Slots<K> {
    pub(super) fn take(slots: &Arc<Slots<K>>, uid: K, max: usize) -> Option<Slot<K>> {
        let mut m = slots.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: slots.clone(),
            uid,
        })
    }
}

impl<K: std::hash::Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut m = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// The bytes of a call in flight, counted in the socket's total until the
/// call ends or is dropped.
struct Charge<'a>(&'a AtomicUsize, usize);

impl<'a> Charge<'a> {
    fn take(total: &'a AtomicUsize, n: usize, max: usize) -> Option<Charge<'a>> {
        let before = total.fetch_add(n, Ordering::Relaxed);
        if before + n > max {
            total.fetch_sub(n, Ordering::Relaxed);
            return None;
        }
        Some(Charge(total, n))
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// What one connection may do.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub(super) admin: bool,
    pub(super) max_line: usize,
    pub(super) max_inflight: usize,
    pub(super) max_bytes: usize,
    pub(super) max_total_bytes: usize,
    pub(super) idle: Duration,
}

/// What ends a connection from outside: `stop` (read no more calls, let
/// those in flight finish), `closed` (the drain is over: close now), and
/// `kicked` (its credentials no longer hold: calls in flight end as for a
/// peer that left, and the connection is closed with an `unauthorized` line).
#[derive(Clone, Copy)]
pub(super) struct Ends<'a> {
    pub(super) stop: &'a CancellationToken,
    pub(super) closed: &'a CancellationToken,
    pub(super) kicked: &'a CancellationToken,
}

/// Writes one error line (with a null id) and closes the stream.
pub(super) async fn refuse<S: AsyncWrite + Unpin>(stream: S, code: &str, message: String) {
    let mut w = FramedWrite::new(stream, LinesCodec::new());
    let _ = w
        .send(response(
            &serde_json::Value::Null,
            Err(RpcError::new(code, message)),
        ))
        .await;
    drop(w);
    tracing::debug!(code, "refused a connection and closed it");
}

fn too_many(id: &serde_json::Value, message: String) -> Option<String> {
    Some(response(
        id,
        Err(RpcError::new("too_many_inflight", message)),
    ))
}

/// The Unix socket's admission by uid: admins only on the admin socket,
/// configured agents' and admins' uids on the agent socket. `None` when
/// refused (the peer was told why).
async fn admit(
    stream: UnixStream,
    uid: u32,
    handler: &Handler,
    admin_socket: bool,
) -> Option<UnixStream> {
    if admin_socket && !handler.gateway().is_admin_uid(uid) {
        tracing::warn!(
            peer.uid = uid,
            "admin socket connection from a uid that is not an admin"
        );
        refuse(
            stream,
            "not_admin",
            format!("uid {uid} may not use the admin socket (not in admin.uids)"),
        )
        .await;
        return None;
    }
    if !admin_socket && !handler.gateway().uid_may_connect(uid) {
        tracing::warn!(
            peer.uid = uid,
            "connection from a uid that is neither an agent nor an admin"
        );
        refuse(
            stream,
            "peer_refused",
            format!("uid {uid} may not connect (not a configured agent or admin uid)"),
        )
        .await;
        return None;
    }
    Some(stream)
}

/// Serves one admitted connection: calls read from `read`, answers written
/// to `write`; `hung_up` tells whether a peer that stopped sending has gone
/// for good (not merely half-closed) while its calls are in flight.
#[allow(clippy::too_many_arguments)]
pub(super) async fn connection<R, W>(
    mut lines: LineReader<R>,
    mut write: W,
    hung_up: fn(&W) -> bool,
    peer: Peer,
    handler: Arc<Handler>,
    limits: Limits,
    ends: Ends<'_>,
    inflight: &AtomicUsize,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Ends {
        stop,
        closed,
        kicked,
    } = ends;
    let (max_line, max_inflight) = (limits.max_line, limits.max_inflight);
    let mut was_kicked = false;
    // Bytes of this connection's calls in flight.
    let mut held = 0usize;
    // Idle and stalled-reader detection with one timer: `last_active` moves
    // on every line and answer (no timer work per call); the timer, when it
    // fires, is moved to `last_active + idle` unless that has passed.
    let mut last_active = Instant::now();
    let idle = tokio::time::sleep(limits.idle);
    tokio::pin!(idle);
    // Calls in flight, polled by this task: no task per call, and each reply
    // is written as soon as its call finishes. Dropping them (when the
    // shutdown drain is over) aborts them; their requests stay pending in
    // the store, and a reconnecting agent can `wait` again.
    let mut calls = FuturesUnordered::new();
    // Fires once the peer is gone (closed or killed, not merely half-closed):
    // its waiting calls then cancel their requests (`client_gone`) and end.
    let gone = CancellationToken::new();
    // On EOF the peer may only have half-closed (`echo … | socat`), so its
    // calls still get answers; each is bounded by its request's deadline,
    // and the peer is checked now and then for having gone away since.
    let mut reading = true;
    let mut draining = false;
    let mut recheck = tokio::time::interval(PEER_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while reading || !calls.is_empty() {
        let reply = tokio::select! {
            _ = closed.cancelled() => return,
            // Its credentials no longer hold: read nothing more; calls in
            // flight end as for a peer that left (a waiting one cancels its
            // request), and nothing more is answered.
            _ = kicked.cancelled(), if !was_kicked => {
                was_kicked = true;
                reading = false;
                gone.cancel();
                None
            }
            // Shutdown: read no more calls; those in flight may finish
            // until the drain is over.
            _ = stop.cancelled(), if !draining => {
                draining = true;
                reading = false;
                None
            }
            Some((n, reply)) = calls.next(), if !calls.is_empty() => {
                held -= n;
                last_active = Instant::now();
                reply
            }
            _ = &mut idle, if reading && calls.is_empty() => {
                if last_active.elapsed() < limits.idle {
                    idle.as_mut().reset(last_active + limits.idle);
                    None
                } else {
                    tracing::debug!(peer = ?peer.uid(), "idle connection closed");
                    reading = false;
                    Some(response(
                        &serde_json::Value::Null,
                        Err(RpcError::new(
                            "idle_timeout",
                            format!(
                                "no call for {} (server.idle_timeout); closing the connection",
                                humantime::format_duration(limits.idle)
                            ),
                        )),
                    ))
                }
            }
            _ = recheck.tick(), if !reading && !gone.is_cancelled() => {
                if hung_up(&write) {
                    gone.cancel();
                }
                None
            }
            next = lines.next_line(), if reading => match next {
                Ok(None) => {
                    reading = false;
                    if !calls.is_empty() && hung_up(&write) {
                        gone.cancel();
                    }
                    None
                }
                Ok(Some(Line::Ready)) => match lines.text() {
                    Err(why) => Some(response(
                        &serde_json::Value::Null,
                        Err(RpcError::new("parse_error", why)),
                    )),
                    Ok(line) if line.trim().is_empty() => None,
                    Ok(line) => {
                    last_active = Instant::now();
                    let n = line.len();
                    // Parsed straight from the read buffer: a call in
                    // flight holds its params, never a copy of its line.
                    match parse_call(line) {
                        Err(reply) => Some(reply),
                        Ok(call) => {
                            if calls.len() >= max_inflight {
                                too_many(call.id(), format!(
                                    "more than {max_inflight} calls in flight on this connection \
                                     (server.max_inflight_per_connection)"
                                ))
                            } else if held + n > limits.max_bytes {
                                too_many(call.id(), format!(
                                    "more than {} bytes of calls in flight on this connection \
                                     (server.max_inflight_bytes_per_connection)",
                                    limits.max_bytes
                                ))
                            } else if let Some(charge) =
                                Charge::take(inflight, n, limits.max_total_bytes)
                            {
                                held += n;
                                let (handler, gone, peer) = (handler.clone(), gone.clone(), peer.clone());
                                calls.push(async move {
                                    let reply = handler.handle_call(peer, call, &gone).await;
                                    drop(charge);
                                    (n, reply)
                                });
                                None
                            } else {
                                too_many(call.id(), format!(
                                    "more than {} bytes of calls in flight on this socket \
                                     (server.max_inflight_bytes)",
                                    limits.max_total_bytes
                                ))
                            }
                        }
                    }
                }
                },
                // The rest of the line was discarded; the connection stays usable.
                Ok(Some(Line::TooLong)) => {
                    last_active = Instant::now();
                    Some(response(
                        &serde_json::Value::Null,
                        Err(RpcError::new(
                            "line_too_long",
                            format!("line longer than {max_line} bytes (server.max_line_bytes)"),
                        )),
                    ))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "connection read failed");
                    reading = false;
                    gone.cancel();
                    None
                }
            },
        };
        if let Some(mut line) = reply {
            if gone.is_cancelled() {
                continue;
            }
            line.push('\n');
            // The write waits for a peer that does not read, but never past
            // the shutdown drain, nor for longer than `idle_timeout`.
            last_active = Instant::now();
            let write_one = write.write_all(line.as_bytes());
            tokio::pin!(write_one);
            let written = loop {
                tokio::select! {
                    r = &mut write_one => break r.is_ok(),
                    _ = closed.cancelled() => return,
                    _ = &mut idle => {
                        if last_active.elapsed() >= limits.idle {
                            tracing::debug!(peer = ?peer.uid(), "the peer reads no replies; giving up on it");
                            break false;
                        }
                        idle.as_mut().reset(last_active + limits.idle);
                    }
                }
            };
            if !written {
                // Nobody reads the answers: the rest of the calls end as
                // for a peer that left.
                reading = false;
                gone.cancel();
            }
        }
    }
    if was_kicked {
        let mut line = response(
            &serde_json::Value::Null,
            Err(RpcError::new(
                "unauthorized",
                "this connection's token was revoked or has expired; connection closed",
            )),
        );
        line.push('\n');
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = write.write_all(line.as_bytes()).await;
            let _ = write.shutdown().await;
        })
        .await;
    }
}

/// How often a half-closed peer with calls in flight is checked for having
/// gone away.
const PEER_RECHECK: Duration = Duration::from_millis(250);

/// Whether the peer has closed its end entirely (or died), not merely shut
/// down its writing half: Linux reports POLLHUP on a Unix stream socket only
/// once both directions are shut. Asked of the kernel directly, so it does
/// not depend on when the runtime last saw the socket's readiness.
fn peer_hung_up(write: &tokio::net::unix::OwnedWriteHalf) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let stream: &UnixStream = write.as_ref();
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        // Cannot tell: keep serving (the deadline still bounds every wait).
        Err(_) => false,
    }
}

/// What [`LineReader::next_line`] found.
pub(super) enum Line {
    /// A whole line, read with [`LineReader::text`].
    Ready,
    /// Longer than the limit; its bytes were discarded up to the newline.
    TooLong,
}

/// Capacity the line buffer keeps between lines; after a longer line it is
/// shrunk back, so no connection holds a buffer the size of its longest line.
const KEEP_LINE_BUFFER: usize = 16 * 1024;

/// Reads newline-terminated lines, never buffering more than `max` bytes:
/// an overlong line is skipped to its end and reported, and the next line
/// is read normally (a codec would end the stream after the error). One
/// buffer per connection, reused: no allocation per line.
pub(super) struct LineReader<R> {
    inner: BufReader<R>,
    max: usize,
    /// The line read so far: kept across calls, so a `next_line` dropped
    /// half-way (by a `select!`) loses nothing.
    buf: Vec<u8>,
    too_long: bool,
    /// `buf` holds a whole line, handed out by `text`; cleared on the next read.
    ready: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(super) fn new(r: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::new(r),
            max,
            buf: Vec::new(),
            too_long: false,
            ready: false,
        }
    }

    /// The line [`LineReader::next_line`] just reported as ready (without
    /// its `\r\n`), or why it is not text.
    pub(super) fn text(&self) -> Result<&str, &'static str> {
        let line = match self.buf.last() {
            Some(b'\r') => &self.buf[..self.buf.len() - 1],
            _ => &self.buf[..],
        };
        std::str::from_utf8(line).map_err(|_| "the line is not valid UTF-8")
    }

    /// Cancel-safe: bytes move from the reader into `buf` with no await in
    /// between.
    pub(super) async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        if std::mem::take(&mut self.ready) {
            self.buf.clear();
            self.buf.shrink_to(KEEP_LINE_BUFFER);
        }
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                // EOF: a final line without a newline still counts.
                if self.buf.is_empty() && !self.too_long {
                    return Ok(None);
                }
                break;
            }
            let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], Some(i + 1)),
                None => (chunk, None),
            };
            if !self.too_long {
                if self.buf.len() + part.len() > self.max {
                    self.too_long = true;
                    // Freed, not kept at the size of the longest line seen.
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            let used = done.unwrap_or(chunk.len());
            self.inner.consume(used);
            if done.is_some() {
                break;
            }
        }
        if std::mem::take(&mut self.too_long) {
            return Ok(Some(Line::TooLong));
        }
        self.ready = true;
        Ok(Some(Line::Ready))
    }
}
