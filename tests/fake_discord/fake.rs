//! The fake: [`FakeDiscord`], what tests start, inspect, wait on and inject through.

use super::*;

/// A running fake Discord. Dropping it stops the HTTP server.
pub struct FakeDiscord {
    pub(super) inner: Arc<Inner>,
    pub(super) server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        // Close the bot's socket too: it lives in its own task, not in the server task.
        if let Some(c) = self.inner.lock().gw.conn.take() {
            let _ =
                c.tx.send(Outbound::Close(1001, "fake discord stopped".into()));
        }
        self.server.abort();
    }
}

impl FakeDiscord {
    /// Binds `127.0.0.1:0` and serves REST and the gateway.
    pub async fn start(cfg: FakeDiscordConfig) -> FakeDiscord {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", cfg.port.unwrap_or(0)))
            .await
            .expect("fake discord: bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("fake discord: local addr")
            .port();
        let (changed, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            cfg: cfg.normalized(),
            port,
            state: Mutex::new(FakeState::new(GatewayState {
                ack_heartbeats: true,
                ..GatewayState::default()
            })),
            changed,
        });
        let app = Router::new()
            .route("/gateway", get(gateway_upgrade))
            .route(
                "/attachments/{channel}/{id}/{filename}",
                get(attachment_download),
            )
            .fallback(rest_entry)
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app).await;
        });
        FakeDiscord { inner, server }
    }

    /// The value for `HttpBuilder::proxy`: `http://127.0.0.1:PORT`.
    pub fn api_base(&self) -> String {
        self.inner.api_base()
    }

    /// What `GET /api/v10/gateway` returns: `ws://127.0.0.1:PORT/gateway`.
    pub fn gateway_url(&self) -> String {
        self.inner.gateway_url()
    }

    pub fn config(&self) -> &FakeDiscordConfig {
        &self.inner.cfg
    }

    /// Waits until a bot identified and READY + GUILD_CREATE were written to its socket.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        self.inner
            .wait_until(timeout, |st| {
                let g = &st.gw;
                (g.conn.is_some() && g.ready_seq > 0 && g.delivered_seq >= g.ready_seq)
                    .then_some(())
            })
            .await
            .map_err(|_| {
                let g = self.gateway_stats();
                format!("no bot became ready within {timeout:?} (gateway: {g:?})")
            })
    }

    /// Waits for a REST call matching `pred` (calls already made count too).
    pub async fn wait_for_call(
        &self,
        pred: impl Fn(&RecordedCall) -> bool,
        timeout: Duration,
    ) -> Result<RecordedCall, String> {
        self.inner
            .wait_until(timeout, |st| st.calls.iter().find(|c| pred(c)).cloned())
            .await
            .map_err(|_| {
                let calls: Vec<String> = self
                    .calls()
                    .iter()
                    .map(|c| format!("{} {} -> {}", c.method, c.path, c.status))
                    .collect();
                format!("no matching REST call within {timeout:?}; calls so far: {calls:#?}")
            })
    }

    /// Waits for a REST call matching a [`RecordedCall::matches`] pattern.
    pub async fn wait_for_route(
        &self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<RecordedCall, String> {
        self.wait_for_call(|c| c.matches(pattern), timeout).await
    }

    /// Waits until `pred` holds for the messages currently in `channel_id`.
    pub async fn wait_for_messages<T>(
        &self,
        channel_id: u64,
        pred: impl Fn(&[StoredMessage]) -> Option<T>,
        timeout: Duration,
    ) -> Result<T, String> {
        self.inner
            .wait_until(timeout, |st| pred(&channel_messages(st, channel_id)))
            .await
            .map_err(|_| {
                let msgs: Vec<String> = self
                    .messages_in(channel_id)
                    .iter()
                    .map(|m| format!("{}: {:?}", m.id, m.all_text()))
                    .collect();
                format!("channel {channel_id}: condition not met within {timeout:?}; messages: {msgs:#?}")
            })
    }

    /// Waits until the gateway counters satisfy `pred`.
    pub async fn wait_gateway(
        &self,
        pred: impl Fn(&GatewayStats) -> bool,
        timeout: Duration,
    ) -> Result<GatewayStats, String> {
        self.inner
            .wait_until(timeout, |st| {
                let s = gateway_stats(&st.gw);
                pred(&s).then_some(s)
            })
            .await
            .map_err(|_| {
                format!(
                    "gateway condition not met within {timeout:?}: {:?}",
                    self.gateway_stats()
                )
            })
    }

    /// Every REST call so far, in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.inner.lock().calls.clone()
    }

    /// REST calls matching a [`RecordedCall::matches`] pattern.
    pub fn calls_matching(&self, pattern: &str) -> Vec<RecordedCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.matches(pattern))
            .collect()
    }

    /// Commands registered with `PUT /applications/{app}/guilds/{g}/commands` (as echoed).
    pub fn guild_commands(&self) -> Vec<Value> {
        self.inner.lock().guild_commands.clone()
    }

    /// Commands registered with `PUT /applications/{app}/commands` (as echoed).
    pub fn global_commands(&self) -> Vec<Value> {
        self.inner.lock().global_commands.clone()
    }

    /// Injects a button (or select) click on a stored message: INTERACTION_CREATE type 3 with
    /// the member (roles from the config) and the message as currently stored. Panics if the
    /// message or an enabled component with `custom_id` does not exist (Discord could not
    /// deliver such a click); use [`FakeDiscord::inject_interaction`] to forge one.
    pub async fn click_button(
        &self,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .click_locked(&mut st, message_id, custom_id, user_id)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord click_button: {e}"))
    }

    /// Injects a string-select pick on a stored message: like [`FakeDiscord::click_button`],
    /// with `values` picked (each must be one of the select's options). Panics otherwise.
    pub async fn select_option(
        &self,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
        values: &[&str],
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .select_locked(&mut st, message_id, custom_id, user_id, values)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord select_option: {e}"))
    }

    /// Injects a MODAL_SUBMIT (type 5) for a modal the bot opened (type-9 response) from a
    /// component on `message_id`. `fields` are (text input custom_id, value); inputs not
    /// given are submitted empty. Panics if no such modal was opened for this user.
    pub async fn submit_modal(
        &self,
        message_id: u64,
        custom_id: &str,
        user_id: u64,
        fields: &[(&str, &str)],
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .modal_locked(&mut st, Some(message_id), custom_id, user_id, fields)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord submit_modal: {e}"))
    }

    /// Like [`FakeDiscord::submit_modal`] for a modal opened from a slash command.
    pub async fn submit_command_modal(
        &self,
        custom_id: &str,
        user_id: u64,
        fields: &[(&str, &str)],
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .modal_locked(&mut st, None, custom_id, user_id, fields)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord submit_command_modal: {e}"))
    }

    /// Injects a slash command (type 2) in the approvals channel. `options` is the Discord
    /// `data.options` array (e.g. `[{"name":"user","type":6,"value":"100"}]`); user, role,
    /// mentionable and channel options get `data.resolved` filled in. Using a command that
    /// was never registered is recorded as a violation.
    pub async fn slash_command(
        &self,
        name: &str,
        options: Value,
        user_id: u64,
    ) -> InteractionHandle {
        let channel = self.inner.cfg.approvals_channel_id;
        self.slash_command_in(channel, name, options, user_id).await
    }

    /// [`FakeDiscord::slash_command`] in any channel; a DM channel id (see
    /// [`FakeDiscord::dm_channel_of`]) gives a DM command without `guild_id`/`member`.
    pub async fn slash_command_in(
        &self,
        channel_id: u64,
        name: &str,
        options: Value,
        user_id: u64,
    ) -> InteractionHandle {
        let res = {
            let mut st = self.inner.lock();
            self.inner
                .command_locked(&mut st, channel_id, name, options, user_id)
        };
        self.inner.bump();
        res.unwrap_or_else(|e| panic!("fake discord slash_command: {e}"))
    }

    /// Low-level escape hatch: dispatches INTERACTION_CREATE with `d` as given, after filling
    /// in `id`, `token`, `application_id`, `version`, `locale`, `entitlements` and
    /// `attachment_size_limit` when absent. The interaction is tracked like any other.
    pub async fn inject_interaction(&self, d: Value) -> InteractionHandle {
        let h = {
            let mut st = self.inner.lock();
            self.inner.inject_raw_locked(&mut st, d)
        };
        self.inner.bump();
        h
    }

    /// A user DMs the bot: MESSAGE_CREATE without `guild_id`. Returns the message id.
    pub async fn send_dm(&self, user_id: u64, content: &str) -> u64 {
        let id = {
            let mut st = self.inner.lock();
            let channel = st.dm_channel(user_id);
            self.inner
                .user_message_locked(&mut st, channel, user_id, content)
        };
        self.inner.bump();
        id
    }

    /// A member posts in a guild channel: MESSAGE_CREATE with `guild_id` and `member`
    /// (content empty unless the bot asked for MESSAGE_CONTENT). Returns the message id.
    pub async fn post_as(&self, channel_id: u64, user_id: u64, content: &str) -> u64 {
        let id = {
            let mut st = self.inner.lock();
            self.inner
                .user_message_locked(&mut st, channel_id, user_id, content)
        };
        self.inner.bump();
        id
    }

    /// Waits for the accepted initial response (the callback body) of an interaction. Fails
    /// early if a response was rejected (late, invalid) and none was accepted.
    pub async fn wait_interaction_response(
        &self,
        h: &InteractionHandle,
        timeout: Duration,
    ) -> Result<Value, String> {
        let id = h.id;
        let r = self
            .inner
            .wait_until(timeout, |st| {
                let i = st.interactions.get(&id)?;
                if let Some(v) = &i.initial {
                    return Some(Ok(v.clone()));
                }
                (!i.rejections.is_empty()).then(|| Err(i.rejections.join("; ")))
            })
            .await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("interaction {id}: response rejected: {e}")),
            Err(_) => Err(format!("interaction {id}: no response within {timeout:?}")),
        }
    }

    /// The accepted initial response of an interaction, if any.
    pub fn interaction_response(&self, h: &InteractionHandle) -> Option<Value> {
        self.inner
            .lock()
            .interactions
            .get(&h.id)
            .and_then(|i| i.initial.clone())
    }

    /// The message the interaction's `@original` refers to (the reply, or the clicked
    /// message for type 6/7 responses).
    pub fn original_response(&self, h: &InteractionHandle) -> Option<StoredMessage> {
        let st = self.inner.lock();
        let mid = st.interactions.get(&h.id)?.original_message_id?;
        st.messages.get(&mid).cloned()
    }

    /// Non-ephemeral messages currently in a channel, oldest first.
    pub fn messages_in(&self, channel_id: u64) -> Vec<StoredMessage> {
        channel_messages(&self.inner.lock(), channel_id)
    }

    /// Every stored message (including ephemeral ones and DMs), oldest first.
    pub fn all_messages(&self) -> Vec<StoredMessage> {
        self.inner.lock().messages.values().cloned().collect()
    }

    pub fn message(&self, message_id: u64) -> Option<StoredMessage> {
        self.inner.lock().messages.get(&message_id).cloned()
    }

    /// The DM channel id of a user, once one was opened (by the bot or by [`Self::send_dm`]).
    pub fn dm_channel_of(&self, user_id: u64) -> Option<u64> {
        self.inner.lock().dm_channels.get(&user_id).copied()
    }

    /// Messages the bot sent to a user's DM channel, oldest first.
    pub fn dms_to(&self, user_id: u64) -> Vec<StoredMessage> {
        let st = self.inner.lock();
        let Some(c) = st.dm_channels.get(&user_id).copied() else {
            return Vec::new();
        };
        let bot = self.inner.cfg.bot_user_id;
        st.messages
            .values()
            .filter(|m| m.channel_id == c && m.author_id == bot)
            .cloned()
            .collect()
    }

    /// The next REST call matching `pattern` (see [`RecordedCall::matches`]) gets `status`
    /// with `body` instead of being served. A 429 gets `Retry-After` (from
    /// `body.retry_after`) and rate-limit headers. One-shot; several calls queue.
    pub fn fail_next(&self, pattern: &str, status: u16, body: Value) {
        self.inner.lock().failures.push(FailRule {
            pattern: pattern.to_string(),
            status,
            body,
        });
    }

    /// From now on, for `length`, every REST call fails the way `mode` says; then the fake
    /// recovers by itself. Returns the instant of recovery.
    pub fn outage(&self, length: Duration, mode: OutageMode) -> Instant {
        let until = Instant::now() + length;
        self.inner.lock().outage = Some((until, mode));
        until
    }

    /// Ends an outage now.
    pub fn end_outage(&self) {
        self.inner.lock().outage = None;
        self.inner.bump();
    }

    /// How many 429s the rate limits produced so far.
    pub fn rate_limited_count(&self) -> usize {
        self.inner.lock().rate_limited
    }

    /// A ready-made Discord 429 body.
    pub fn rate_limit_body(retry_after: f64) -> Value {
        json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": false})
    }

    /// Closes the bot's gateway socket with code 4000 (resumable) and waits until it is closed.
    /// Dispatches injected meanwhile are replayed when the bot RESUMEs.
    pub async fn disconnect_gateway(&self) {
        self.close_gateway(4000, "fake discord: disconnect").await;
    }

    /// Closes the bot's gateway socket with any close code and waits until it is closed.
    pub async fn close_gateway(&self, code: u16, reason: &str) {
        let conn_id = {
            let mut st = self.inner.lock();
            st.gw.conn.take().map(|c| {
                let _ = c.tx.send(Outbound::Close(code, reason.to_string()));
                c.id
            })
        };
        self.inner.bump();
        if let Some(id) = conn_id {
            let r = self
                .inner
                .wait_until(Duration::from_secs(5), |st| {
                    st.gw.closed_conns.contains(&id).then_some(())
                })
                .await;
            assert!(
                r.is_ok(),
                "fake discord: gateway connection {id} did not close"
            );
        }
    }

    /// Whether heartbeats are ACKed (default true). Without ACKs serenity reconnects.
    pub fn set_heartbeat_ack(&self, ack: bool) {
        self.inner.lock().gw.ack_heartbeats = ack;
    }

    pub fn identify_count(&self) -> usize {
        self.inner.lock().gw.identify_count
    }

    pub fn resume_count(&self) -> usize {
        self.inner.lock().gw.resume_count
    }

    pub fn gateway_stats(&self) -> GatewayStats {
        gateway_stats(&self.inner.lock().gw)
    }

    /// Rule breaches so far, including interactions left unanswered past the deadline.
    pub fn violations(&self) -> Vec<String> {
        let mut st = self.inner.lock();
        let mut v = st.violations.clone();
        v.extend(unanswered(&mut st, &self.inner.cfg, false));
        v
    }

    /// Returns the violations and forgets them (for tests that provoke one on purpose).
    pub fn take_violations(&self) -> Vec<String> {
        let mut st = self.inner.lock();
        let mut v = std::mem::take(&mut st.violations);
        v.extend(unanswered(&mut st, &self.inner.cfg, true));
        v
    }

    /// Panics with the list of violations, if any.
    pub fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(
            v.is_empty(),
            "fake discord recorded {} violation(s):\n{}",
            v.len(),
            v.join("\n")
        );
    }
}

pub(super) fn channel_messages(st: &FakeState, channel_id: u64) -> Vec<StoredMessage> {
    st.messages
        .values()
        .filter(|m| m.channel_id == channel_id && !m.is_ephemeral())
        .cloned()
        .collect()
}

pub(super) fn gateway_stats(g: &GatewayState) -> GatewayStats {
    GatewayStats {
        connected: g.conn.is_some(),
        session_id: g.session_id.clone(),
        identify_count: g.identify_count,
        resume_count: g.resume_count,
        heartbeat_count: g.heartbeat_count,
        last_seq: g.seq,
        delivered_seq: g.delivered_seq,
        intents: g.intents,
        identify: g.identify.clone(),
    }
}

pub(super) fn unanswered(st: &mut FakeState, cfg: &FakeDiscordConfig, mark: bool) -> Vec<String> {
    let mut out = Vec::new();
    for i in st.interactions.values_mut() {
        if i.initial.is_none()
            && !i.reported_unanswered
            && i.injected_at.elapsed() > cfg.interaction_deadline
        {
            out.push(format!(
                "interaction {} ({}) was not answered within {:?}",
                i.handle.id, i.label, cfg.interaction_deadline
            ));
            if mark {
                i.reported_unanswered = true;
            }
        }
    }
    out
}
