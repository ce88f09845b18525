//! Health: whether the socket, the store and (when configured) Discord are
//! up, as one report that `keyturn health` (over the socket) and `/healthz`
//! (over HTTP) both give. The store check really reads the database, with a
//! short time limit, so a locked or vanished database shows as down.
//! Socket state is the caller's to say: the socket handler knows it is up
//! because the question came through it; the HTTP adapter connects to it.

use super::connection::{ConnectionState, ConnectionStatus};
use super::Gateway;
use crate::domain::request::RequestId;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the store's read may take before the store counts as down.
pub const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One component's state.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub up: bool,
    /// `up`, `down`, `timeout`, or Discord's `connected`/`connecting`/`failed`.
    pub state: &'static str,
    /// Why it is down, for admins only (see [`HealthReport::without_details`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How long the store's read took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub millis: Option<u64>,
}

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// Every component is up.
    pub ok: bool,
    pub socket: Check,
    pub store: Check,
    /// The policy view: down while it cannot be loaded from the store (every
    /// call is then denied, `policy_unavailable`).
    pub policy: Check,
    /// `None` when Discord is not configured. On a follower it is
    /// `standby` (up): only the leader connects.
    pub discord: Option<Check>,
    /// `leader` or `follower` among the processes sharing the store (a
    /// store only one process uses always leads).
    pub role: &'static str,
    /// Names of the components that are down.
    pub down: Vec<&'static str>,
}

impl HealthReport {
    /// The same report without error texts (for the agent socket and HTTP,
    /// which need to know what is down, not why).
    pub fn without_details(mut self) -> HealthReport {
        self.store.detail = None;
        self.policy.detail = None;
        if let Some(d) = &mut self.discord {
            d.detail = None;
        }
        self
    }
}

/// The role's name in reports and metrics.
pub fn role(leading: bool) -> &'static str {
    if leading {
        "leader"
    } else {
        "follower"
    }
}

/// Asks each component; cheap enough to run on every probe.
#[derive(Clone)]
pub struct HealthProbe {
    gw: Arc<Gateway>,
    discord: Option<ConnectionStatus>,
    leader: tokio::sync::watch::Receiver<bool>,
}

impl HealthProbe {
    pub fn new(gw: Arc<Gateway>, discord: Option<ConnectionStatus>) -> HealthProbe {
        let leader = gw.leadership();
        HealthProbe {
            gw,
            discord,
            leader,
        }
    }

    pub async fn check(&self, socket_up: bool) -> HealthReport {
        let socket = Check {
            up: socket_up,
            state: if socket_up { "up" } else { "down" },
            detail: None,
            millis: None,
        };
        let store = self.store().await;
        let policy = match self.gw.policy_unavailable() {
            None => Check {
                up: true,
                state: "up",
                detail: None,
                millis: None,
            },
            Some(why) => Check {
                up: false,
                state: "down",
                detail: Some(why),
                millis: None,
            },
        };
        let discord = self.discord.as_ref().map(|s| {
            let st = s.get();
            Check {
                up: matches!(
                    st,
                    ConnectionState::Connected { .. } | ConnectionState::Standby { .. }
                ),
                state: st.as_str(),
                detail: match st {
                    ConnectionState::Connected { .. } | ConnectionState::Standby { .. } => None,
                    ConnectionState::Connecting { last_error, .. } => last_error,
                    ConnectionState::Failed { error, .. } => Some(error),
                },
                millis: None,
            }
        });
        let mut down = Vec::new();
        for (name, c) in [
            ("socket", Some(&socket)),
            ("store", Some(&store)),
            ("policy", Some(&policy)),
            ("discord", discord.as_ref()),
        ] {
            if c.is_some_and(|c| !c.up) {
                down.push(name);
            }
        }
        HealthReport {
            ok: down.is_empty(),
            socket,
            store,
            policy,
            discord,
            role: role(*self.leader.borrow()),
            down,
        }
    }

    /// Whether this process leads now.
    pub fn leading(&self) -> bool {
        *self.leader.borrow()
    }

    /// A primary-key read of a request that cannot exist: touches the
    /// database and its schema, costs one index probe.
    async fn store(&self) -> Check {
        let started = Instant::now();
        // Reads may still work on a store whose writes are refused for good
        // (its database file was deleted under it): that store is down.
        if let Some(why) = self.gw.store.write_failure() {
            return Check {
                up: false,
                state: "down",
                detail: Some(why),
                millis: Some(started.elapsed().as_millis() as u64),
            };
        }
        let read = self.gw.store.get_request(RequestId(uuid::Uuid::nil()));
        let (up, state, detail) = match tokio::time::timeout(STORE_CHECK_TIMEOUT, read).await {
            Ok(Ok(_)) => (true, "up", None),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "health check: the store read failed");
                (false, "down", Some(e.to_string()))
            }
            Err(_) => (
                false,
                "timeout",
                Some(format!(
                    "no answer within {} ms",
                    STORE_CHECK_TIMEOUT.as_millis()
                )),
            ),
        };
        Check {
            up,
            state,
            detail,
            millis: Some(started.elapsed().as_millis() as u64),
        }
    }
}
