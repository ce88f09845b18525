//! Inner: the shared state behind the fake, waiting on it, violations and dispatches.

use super::*;

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn api_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(super) fn gateway_url(&self) -> String {
        format!("ws://127.0.0.1:{}/gateway", self.port)
    }

    /// Event-driven wait: re-checks `check` after every state change, until `timeout`.
    pub(super) async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&mut FakeState) -> Option<T>,
    ) -> Result<T, ()> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = check(&mut self.lock()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return check(&mut self.lock()).ok_or(()),
            }
        }
    }

    pub(super) fn violation(&self, st: &mut FakeState, text: String) {
        eprintln!("fake discord violation: {text}");
        st.violations.push(text);
    }

    /// Sends a dispatch (op 0) to the current connection and logs it for RESUME replay.
    pub(super) fn dispatch(&self, st: &mut FakeState, t: &str, d: Value) -> u64 {
        if st.gw.session_id.is_none() {
            self.violation(
                st,
                format!("test bug: {t} dispatched before any bot identified"),
            );
        }
        st.gw.seq += 1;
        let seq = st.gw.seq;
        let frame = json!({"op": 0, "s": seq, "t": t, "d": d});
        if let Err(e) = check_dispatch(&frame) {
            self.violation(
                st,
                format!("FAKE BUG: {t} dispatch does not deserialize in serenity: {e}"),
            );
        }
        let text = frame.to_string();
        st.gw.log.push((seq, text.clone()));
        if let Some(c) = &st.gw.conn {
            let _ = c.tx.send(Outbound::Text(text, Some(seq)));
        }
        seq
    }
}
