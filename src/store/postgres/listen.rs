//! Hearing what other processes commit: a task that LISTENs on its
//! schema's channel ([`notify::channel`]) over a connection of its own and publishes each note
//! from another store as a [`Change`] on this process's feed, so waiters,
//! the policy view, the deadline sweep, the card outbox and the runs this
//! process started (a kill asked for elsewhere) follow writes made by
//! other replicas as they follow local ones.
//!
//! Notes from this store's own origin are skipped (their changes were
//! published locally at commit). A `Resolved` note carries only the id: the
//! request is re-read through the loader the store passes in (so this file
//! knows nothing of the store's tables) and published as `DecidedElsewhere`
//! (the deciding process counts it in its metrics), and a read that fails
//! becomes a `Resync`. Notifications are not queued for a connection that is down,
//! so when the connection comes back the feed gets a `Resync` (everyone
//! re-reads), and a second task publishes a `Resync` every `recheck`
//! anyway: a lost notification can delay a waiter or a revoke by at most
//! that. Both tasks end when the store's stop token is cancelled.

use super::notify::{self, Envelope, Note};
use crate::app::ports::{Change, Feed, StoreResult};
use crate::domain::request::{ApprovalRequest, RequestId};
use crate::store::error::sqlx as db;
use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Reads a request by id (from the store's pool), for `Resolved` notes.
pub type Load = Arc<
    dyn Fn(RequestId) -> BoxFuture<'static, StoreResult<Option<ApprovalRequest>>> + Send + Sync,
>;

/// First and longest pause between two failed attempts to listen again.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the listener needs from its store.
pub struct Listen {
    /// The database to listen on (the store's own connect options).
    pub connect: PgConnectOptions,
    /// The store's origin: its own notes are skipped.
    pub origin: String,
    /// Where changes are published.
    pub feed: Arc<Feed>,
    /// How often to publish a `Resync` whatever was heard (`store.recheck`).
    pub recheck: Duration,
    pub load: Load,
}

/// The running tasks; they end when the stop token is cancelled.
pub struct Listening {
    pub listener: JoinHandle<()>,
    pub recheck: JoinHandle<()>,
}

/// Connects and LISTENs (so every change committed after this returns is
/// heard), then starts the tasks. Fails if the first connection fails.
pub async fn start(l: Listen, stop: CancellationToken) -> StoreResult<Listening> {
    let first = listen(&l.connect).await?;
    let recheck = tokio::spawn(recheck(l.feed.clone(), l.recheck, stop.clone()));
    let listener = tokio::spawn(run(l, first, stop));
    Ok(Listening { listener, recheck })
}

/// A listener on a dedicated connection (a pool of one that never expires
/// it, which the listener uses to reconnect), LISTENing on the channel.
async fn listen(connect: &PgConnectOptions) -> StoreResult<PgListener> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(CONNECT_TIMEOUT)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(connect.clone())
        .await
        .map_err(db)?;
    // Asked on the pool's one connection, which then goes back for the
    // listener to take.
    let channel = {
        let mut c = pool.acquire().await.map_err(db)?;
        notify::channel(&mut c).await?
    };
    let mut l = PgListener::connect_with(&pool).await.map_err(db)?;
    // Closing the store stops this task through the token.
    l.ignore_pool_close_event(true);
    l.listen(&channel).await.map_err(db)?;
    Ok(l)
}

async fn run(l: Listen, mut listener: PgListener, stop: CancellationToken) {
    loop {
        let got = tokio::select! {
            _ = stop.cancelled() => break,
            got = listener.try_recv() => got,
        };
        match got {
            Ok(Some(n)) => heard(&l, n.payload()).await,
            // The connection dropped and the listener connected and
            // LISTENed again: whatever was sent meanwhile is lost.
            Ok(None) => {
                tracing::warn!(
                    "the change listener's connection dropped and is back; everyone re-reads"
                );
                l.feed.publish(Change::Resync);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the change listener's connection failed; listening again");
                drop(listener);
                let Some(again) = reconnect(&l.connect, &stop).await else {
                    break;
                };
                listener = again;
                tracing::info!("listening for other processes' changes again; everyone re-reads");
                l.feed.publish(Change::Resync);
            }
        }
    }
    tracing::debug!("change listener stopped");
}

/// Connects and LISTENs again, retrying with a growing pause; `None` once
/// stopped.
async fn reconnect(connect: &PgConnectOptions, stop: &CancellationToken) -> Option<PgListener> {
    let mut pause = RETRY_FIRST;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, listen(connect));
        match tokio::select! {
            _ = stop.cancelled() => return None,
            r = attempt => r,
        } {
            Ok(Ok(l)) => return Some(l),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, retry_in = ?pause, "cannot listen for other processes' changes")
            }
            Err(_) => {
                tracing::warn!(retry_in = ?pause, "cannot listen for other processes' changes: no answer")
            }
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Publishes what one payload says, unless this store sent it.
async fn heard(l: &Listen, payload: &str) {
    let Some(Envelope { origin, note }) = notify::parse(payload) else {
        // Another build's note, or not ours: re-read rather than miss it.
        tracing::warn!(
            payload = %payload.chars().take(200).collect::<String>(),
            "unknown change note; everyone re-reads"
        );
        l.feed.publish(Change::Resync);
        return;
    };
    if origin == l.origin {
        return;
    }
    if let Some(change) = change_of(note, &l.load).await {
        l.feed.publish(change);
    }
}

/// The change a note from another process stands for (`Resync` when its
/// request id does not parse or a resolved request cannot be read).
async fn change_of(note: Note, load: &Load) -> Option<Change> {
    let id = |s: &str| s.parse::<RequestId>().ok();
    Some(match note {
        Note::Queued {
            id: raw,
            agent,
            deadline_ms,
        } => match id(&raw) {
            Some(id) => Change::Queued {
                id,
                agent,
                deadline_ms,
            },
            None => Change::Resync,
        },
        Note::Voted { id: raw } => match id(&raw) {
            Some(id) => Change::Voted { id },
            None => Change::Resync,
        },
        Note::Resolved { id: raw } => {
            let Some(rid) = id(&raw) else {
                return Some(Change::Resync);
            };
            match load(rid).await {
                Ok(Some(r)) if r.state.is_terminal() => Change::DecidedElsewhere(Arc::new(r)),
                Ok(Some(_)) | Ok(None) => {
                    tracing::warn!(request.id = %rid, "a request resolved elsewhere does not read as decided; everyone re-reads");
                    Change::Resync
                }
                Err(e) => {
                    tracing::warn!(request.id = %rid, error = %e, "cannot read a request resolved elsewhere; everyone re-reads");
                    Change::Resync
                }
            }
        }
        Note::PolicyChanged => Change::PolicyChanged,
        Note::CardsDue => Change::CardsDue,
        Note::KillRun { run_id } => Change::KillRun { run_id },
    })
}

/// Publishes a `Resync` every `every`, until stopped.
async fn recheck(feed: Arc<Feed>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: everything was just read at start.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => feed.publish(Change::Resync),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdb::Schema;
    use super::*;
    use crate::domain::request::State;
    use tokio::sync::broadcast;

    const WITHIN: Duration = Duration::from_secs(10);

    fn loader(found: Option<ApprovalRequest>) -> Load {
        Arc::new(move |_| {
            let found = found.clone();
            Box::pin(async move { Ok(found) })
        })
    }

    async fn send(s: &Schema, origin: &str, note: Note) {
        let mut c = s.connect().await;
        notify::send(&mut c, origin, note).await.unwrap();
    }

    /// The next change that is not a periodic re-check.
    async fn next(rx: &mut broadcast::Receiver<Change>) -> Change {
        tokio::time::timeout(WITHIN, async {
            loop {
                match rx.recv().await.unwrap() {
                    Change::Resync => continue,
                    c => return c,
                }
            }
        })
        .await
        .expect("a change within 10 s")
    }

    fn listening(s: &Schema, load: Load, recheck: Duration) -> (Listen, Arc<Feed>) {
        let feed = Arc::new(Feed::default());
        (
            Listen {
                connect: s.options(),
                origin: "me".into(),
                feed: feed.clone(),
                recheck,
                load,
            },
            feed,
        )
    }

    #[tokio::test]
    async fn notes_from_elsewhere_become_changes_and_our_own_are_skipped() {
        let Some(s) = Schema::new().await else { return };
        let mut decided = crate::domain::request::tests::pending(1, 1);
        decided.state = State::Approved;
        let rid = decided.id;
        let (l, feed) = listening(&s, loader(Some(decided)), Duration::from_secs(3600));
        let mut rx = feed.subscribe();
        let stop = CancellationToken::new();
        let tasks = start(l, stop.clone()).await.unwrap();

        // Ours first: if it were published it would come before the rest.
        send(&s, "me", Note::PolicyChanged).await;
        let id = RequestId(uuid::Uuid::now_v7());
        send(
            &s,
            "other",
            Note::Queued {
                id: id.to_string(),
                agent: "a".into(),
                deadline_ms: 7,
            },
        )
        .await;
        match next(&mut rx).await {
            Change::Queued {
                id: got,
                agent,
                deadline_ms,
            } => {
                assert_eq!((got, agent.as_str(), deadline_ms), (id, "a", 7));
            }
            other => panic!("expected Queued, got {other:?} (our own note was not skipped?)"),
        }
        send(
            &s,
            "other",
            Note::Resolved {
                id: rid.to_string(),
            },
        )
        .await;
        match next(&mut rx).await {
            Change::DecidedElsewhere(r) => assert_eq!((r.id, r.state), (rid, State::Approved)),
            other => panic!("expected Resolved, got {other:?}"),
        }
        send(&s, "other", Note::Voted { id: id.to_string() }).await;
        assert!(matches!(next(&mut rx).await, Change::Voted { id: v } if v == id));
        send(&s, "other", Note::PolicyChanged).await;
        assert!(matches!(next(&mut rx).await, Change::PolicyChanged));
        send(&s, "other", Note::CardsDue).await;
        assert!(matches!(next(&mut rx).await, Change::CardsDue));
        send(
            &s,
            "other",
            Note::KillRun {
                run_id: "r1".into(),
            },
        )
        .await;
        assert!(matches!(next(&mut rx).await, Change::KillRun { run_id } if run_id == "r1"));

        stop.cancel();
        tasks.listener.await.unwrap();
        tasks.recheck.await.unwrap();
    }

    #[tokio::test]
    async fn notes_of_another_schema_are_not_heard() {
        let Some(s) = Schema::new().await else { return };
        let Some(elsewhere) = Schema::new().await else {
            return;
        };
        let (l, feed) = listening(&s, loader(None), Duration::from_secs(3600));
        let mut rx = feed.subscribe();
        let stop = CancellationToken::new();
        let _tasks = start(l, stop.clone()).await.unwrap();
        send(&elsewhere, "other", Note::PolicyChanged).await;
        send(&s, "other", Note::CardsDue).await;
        let got = next(&mut rx).await;
        assert!(
            matches!(got, Change::CardsDue),
            "another schema's note was heard: {got:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_resolved_request_that_cannot_be_read_is_a_resync() {
        let Some(s) = Schema::new().await else { return };
        let failing: Load = Arc::new(|_| {
            Box::pin(async { Err(crate::app::ports::StoreError::unavailable("down")) })
        });
        let (l, feed) = listening(&s, failing, Duration::from_secs(3600));
        let mut rx = feed.subscribe();
        let stop = CancellationToken::new();
        let _tasks = start(l, stop.clone()).await.unwrap();
        let id = RequestId(uuid::Uuid::now_v7());
        send(&s, "other", Note::Resolved { id: id.to_string() }).await;
        let got = tokio::time::timeout(WITHIN, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(got, Change::Resync), "{got:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_dropped_connection_is_a_resync_and_listening_resumes() {
        let Some(s) = Schema::new().await else { return };
        let (l, feed) = listening(&s, loader(None), Duration::from_secs(3600));
        let mut rx = feed.subscribe();
        let stop = CancellationToken::new();
        let _tasks = start(l, stop.clone()).await.unwrap();

        let mut c = s.connect().await;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'LISTEN %' \
             AND pid <> pg_backend_pid()) t",
        )
        .bind(s.application_name())
        .fetch_one(&mut c)
        .await
        .unwrap();
        assert_eq!(killed, 1, "the listener's backend was found and terminated");
        let got = tokio::time::timeout(WITHIN, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(got, Change::Resync), "{got:?}");
        // Listening again: a note sent now arrives.
        send(&s, "other", Note::CardsDue).await;
        assert!(matches!(next(&mut rx).await, Change::CardsDue));
        stop.cancel();
    }

    #[tokio::test]
    async fn the_recheck_publishes_resyncs() {
        let Some(s) = Schema::new().await else { return };
        let (l, feed) = listening(&s, loader(None), Duration::from_millis(50));
        let mut rx = feed.subscribe();
        let stop = CancellationToken::new();
        let tasks = start(l, stop.clone()).await.unwrap();
        for _ in 0..3 {
            let got = tokio::time::timeout(WITHIN, rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(got, Change::Resync), "{got:?}");
        }
        stop.cancel();
        tasks.recheck.await.unwrap();
        tasks.listener.await.unwrap();
    }
}
