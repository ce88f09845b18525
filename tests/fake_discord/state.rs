//! Internal state: gateway connections, interactions, injected failures, all under one lock.

use super::*;

pub(super) enum Outbound {
    Text(String, Option<u64>),
    Close(u16, String),
}

pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) tx: mpsc::UnboundedSender<Outbound>,
}

#[derive(Default)]
pub(super) struct GatewayState {
    pub(super) session_id: Option<String>,
    pub(super) seq: u64,
    pub(super) log: Vec<(u64, String)>,
    pub(super) conn: Option<Conn>,
    pub(super) next_conn_id: u64,
    pub(super) closed_conns: Vec<u64>,
    pub(super) identify_count: usize,
    pub(super) resume_count: usize,
    pub(super) heartbeat_count: usize,
    pub(super) ready_seq: u64,
    pub(super) delivered_seq: u64,
    pub(super) intents: u64,
    pub(super) identify: Option<Value>,
    pub(super) ack_heartbeats: bool,
}

pub(super) struct InteractionState {
    pub(super) handle: InteractionHandle,
    pub(super) label: String,
    pub(super) guild: bool,
    pub(super) injected_at: Instant,
    pub(super) initial: Option<Value>,
    pub(super) rejections: Vec<String>,
    pub(super) original_message_id: Option<u64>,
    pub(super) modal: Option<Value>,
    pub(super) metadata: Value,
    pub(super) reported_unanswered: bool,
}

pub(super) struct FailRule {
    pub(super) pattern: String,
    pub(super) status: u16,
    pub(super) body: Value,
}

pub(super) struct FakeState {
    pub(super) next_id: u64,
    pub(super) calls: Vec<RecordedCall>,
    pub(super) violations: Vec<String>,
    pub(super) messages: BTreeMap<u64, StoredMessage>,
    pub(super) dm_channels: BTreeMap<u64, u64>,
    pub(super) interactions: BTreeMap<u64, InteractionState>,
    pub(super) failures: Vec<FailRule>,
    /// Per bucket and major parameter: (window end, calls in the window).
    pub(super) buckets: BTreeMap<String, (Instant, u32)>,
    /// Arrival times of recent calls, for the global limit.
    pub(super) global_recent: std::collections::VecDeque<Instant>,
    /// 429s the rate limits produced (not injected ones).
    pub(super) rate_limited: usize,
    /// An outage in progress: its end and mode.
    pub(super) outage: Option<(Instant, OutageMode)>,
    pub(super) guild_commands: Vec<Value>,
    pub(super) global_commands: Vec<Value>,
    /// Messages created with `enforce_nonce`, by (channel, nonce): a second
    /// create with the same nonce within [`NONCE_WINDOW`] returns the first
    /// message instead of posting another, as Discord does.
    pub(super) nonces: BTreeMap<(u64, String), (u64, Instant)>,
    pub(super) gw: GatewayState,
}

/// How long Discord remembers an enforced nonce ("a few minutes").
pub(super) const NONCE_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

impl FakeState {
    /// Nothing recorded yet, with this gateway state.
    pub(super) fn new(gw: GatewayState) -> FakeState {
        FakeState {
            next_id: FIRST_SNOWFLAKE,
            calls: Vec::new(),
            violations: Vec::new(),
            messages: BTreeMap::new(),
            dm_channels: BTreeMap::new(),
            interactions: BTreeMap::new(),
            failures: Vec::new(),
            buckets: BTreeMap::new(),
            global_recent: std::collections::VecDeque::new(),
            rate_limited: 0,
            outage: None,
            guild_commands: Vec::new(),
            global_commands: Vec::new(),
            nonces: BTreeMap::new(),
            gw,
        }
    }

    pub(super) fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn dm_recipient(&self, channel_id: u64) -> Option<u64> {
        self.dm_channels
            .iter()
            .find(|(_, c)| **c == channel_id)
            .map(|(u, _)| *u)
    }

    pub(super) fn dm_channel(&mut self, user_id: u64) -> u64 {
        if let Some(c) = self.dm_channels.get(&user_id) {
            return *c;
        }
        let id = self.new_id();
        self.dm_channels.insert(user_id, id);
        id
    }

    pub(super) fn interaction_by_token(&self, token: &str) -> Option<u64> {
        self.interactions
            .values()
            .find(|i| i.handle.token == token)
            .map(|i| i.handle.id)
    }
}

pub(super) struct Inner {
    pub(super) cfg: FakeDiscordConfig,
    pub(super) port: u16,
    pub(super) state: Mutex<FakeState>,
    pub(super) changed: watch::Sender<u64>,
}
