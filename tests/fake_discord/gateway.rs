//! The gateway websocket: IDENTIFY, RESUME, heartbeats and the connection loop.

use super::*;

impl Inner {
    pub(super) fn on_gateway_frame(
        &self,
        conn_id: u64,
        tx: &mpsc::UnboundedSender<Outbound>,
        text: &str,
    ) {
        let mut st = self.lock();
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.violation(
                    &mut st,
                    format!("gateway: bot sent invalid JSON ({e}): {text}"),
                );
                let _ = tx.send(Outbound::Close(
                    4002,
                    "Error while decoding payload.".into(),
                ));
                return;
            }
        };
        let op = v["op"].as_u64().unwrap_or(u64::MAX);
        let d = &v["d"];
        match op {
            1 => {
                st.gw.heartbeat_count += 1;
                if st.gw.ack_heartbeats {
                    let _ = tx.send(Outbound::Text(json!({"op": 11}).to_string(), None));
                }
            }
            2 => self.identify(&mut st, conn_id, tx, d),
            6 => self.resume(&mut st, conn_id, tx, d),
            3 | 4 | 8 | 31 => {}
            _ => {
                self.violation(&mut st, format!("gateway: unexpected opcode {op}: {text}"));
                let _ = tx.send(Outbound::Close(4001, "Unknown opcode.".into()));
            }
        }
    }

    pub(super) fn token_ok(&self, token: &str) -> bool {
        let t = &self.cfg.token;
        token == t || token.strip_prefix("Bot ") == Some(t.as_str())
    }

    pub(super) fn identify(
        &self,
        st: &mut FakeState,
        conn_id: u64,
        tx: &mpsc::UnboundedSender<Outbound>,
        d: &Value,
    ) {
        if !self.token_ok(d["token"].as_str().unwrap_or("")) {
            self.violation(st, "gateway: IDENTIFY with a wrong token".to_string());
            let _ = tx.send(Outbound::Close(4004, "Authentication failed.".into()));
            return;
        }
        st.gw.identify_count += 1;
        let session = format!("fake-session-{}", st.gw.identify_count);
        st.gw.session_id = Some(session.clone());
        st.gw.seq = 0;
        st.gw.log.clear();
        st.gw.delivered_seq = 0;
        st.gw.intents = d["intents"].as_u64().unwrap_or(0);
        st.gw.identify = Some(d.clone());
        st.gw.conn = Some(Conn {
            id: conn_id,
            tx: tx.clone(),
        });
        let shard = d.get("shard").cloned().unwrap_or_else(|| json!([0, 1]));
        self.dispatch(
            st,
            "READY",
            ready_json(&self.cfg, &session, &self.gateway_url(), shard),
        );
        st.gw.ready_seq = self.dispatch(st, "GUILD_CREATE", guild_json(&self.cfg, true));
    }

    pub(super) fn resume(
        &self,
        st: &mut FakeState,
        conn_id: u64,
        tx: &mpsc::UnboundedSender<Outbound>,
        d: &Value,
    ) {
        let ok = self.token_ok(d["token"].as_str().unwrap_or(""))
            && st.gw.session_id.is_some()
            && d["session_id"].as_str() == st.gw.session_id.as_deref();
        if !ok {
            let _ = tx.send(Outbound::Text(
                json!({"op": 9, "d": false}).to_string(),
                None,
            ));
            return;
        }
        st.gw.resume_count += 1;
        let from = d["seq"].as_u64().unwrap_or(0);
        st.gw.conn = Some(Conn {
            id: conn_id,
            tx: tx.clone(),
        });
        st.gw.delivered_seq = from;
        for (seq, text) in st.gw.log.iter().filter(|(s, _)| *s > from) {
            let _ = tx.send(Outbound::Text(text.clone(), Some(*seq)));
        }
        self.dispatch(st, "RESUMED", json!({"_trace": ["fake-discord"]}));
    }

    pub(super) fn conn_wrote(&self, conn_id: u64, seq: u64) {
        let mut st = self.lock();
        if st.gw.conn.as_ref().is_some_and(|c| c.id == conn_id) && seq > st.gw.delivered_seq {
            st.gw.delivered_seq = seq;
        }
    }

    pub(super) fn conn_closed(&self, conn_id: u64) {
        let mut st = self.lock();
        if st.gw.conn.as_ref().is_some_and(|c| c.id == conn_id) {
            st.gw.conn = None;
        }
        st.gw.closed_conns.push(conn_id);
    }
}

pub(super) async fn gateway_upgrade(
    AxumState(inner): AxumState<Arc<Inner>>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |socket| gateway_connection(inner, socket))
}

pub(super) async fn gateway_connection(inner: Arc<Inner>, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let conn_id = {
        let mut st = inner.lock();
        st.gw.next_conn_id += 1;
        st.gw.next_conn_id
    };
    let hello = json!({"op": 10, "d": {"heartbeat_interval": inner.cfg.heartbeat_interval_ms}});
    if socket
        .send(WsMessage::Text(hello.to_string().into()))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                incoming = socket.recv() => match incoming {
                    Some(Ok(WsMessage::Text(t))) => {
                        inner.on_gateway_frame(conn_id, &tx, t.as_str());
                        inner.bump();
                    }
                    Some(Ok(WsMessage::Binary(_))) => {
                        let mut st = inner.lock();
                        inner.violation(&mut st, "gateway: bot sent a binary frame".into());
                    }
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                out = rx.recv() => match out {
                    Some(Outbound::Text(text, seq)) => {
                        if socket.send(WsMessage::Text(text.into())).await.is_err() {
                            break;
                        }
                        if let Some(seq) = seq {
                            inner.conn_wrote(conn_id, seq);
                            inner.bump();
                        }
                    }
                    Some(Outbound::Close(code, reason)) => {
                        let frame = CloseFrame { code, reason: reason.into() };
                        let _ = socket.send(WsMessage::Close(Some(frame))).await;
                        break;
                    }
                    None => break,
                },
            }
        }
    }
    inner.conn_closed(conn_id);
    inner.bump();
}
