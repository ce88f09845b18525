//! REST: the HTTP routes under `/api/v10`, their replies and what each call records.

use super::*;

pub(super) async fn attachment_download(
    AxumState(inner): AxumState<Arc<Inner>>,
    Path((_channel, id, _filename)): Path<(u64, u64, String)>,
) -> Response {
    let st = inner.lock();
    let found = st
        .messages
        .values()
        .flat_map(|m| m.attachments.iter())
        .find(|a| a.id == id);
    match found {
        Some(a) => ([("content-type", a.content_type.clone())], a.data.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: Option<Value>,
    pub(super) headers: Vec<(String, String)>,
}

impl Reply {
    pub(super) fn json(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
            headers: Vec::new(),
        }
    }

    pub(super) fn no_content() -> Reply {
        Reply {
            status: 204,
            body: None,
            headers: Vec::new(),
        }
    }

    pub(super) fn error(status: u16, code: u64, message: &str) -> Reply {
        Reply {
            status,
            body: Some(json!({"message": message, "code": code})),
            headers: Vec::new(),
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut builder = Response::builder().status(status);
        for (k, v) in &self.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let resp = match self.body {
            Some(b) => builder
                .header("content-type", "application/json")
                .body(b.to_string().into()),
            None => builder.body(axum::body::Body::empty()),
        };
        resp.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

pub(super) struct Req {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) segs: Vec<String>,
    pub(super) query: String,
    pub(super) body: Value,
    pub(super) files: Vec<RecordedFile>,
}

impl Req {
    pub(super) fn what(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// One field-level validation failure, reported in Discord's "Invalid Form Body" shape.
pub(super) struct Problem {
    pub(super) path: String,
    pub(super) code: &'static str,
    pub(super) message: String,
}

pub(super) async fn rest_entry(
    AxumState(inner): AxumState<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let silent_until = {
        let st = inner.lock();
        match st.outage {
            Some((until, OutageMode::Silence)) if until > Instant::now() => Some(until),
            _ => None,
        }
    };
    if let Some(until) = silent_until {
        tokio::time::sleep_until(until.into()).await;
    }
    let reply = inner.handle_rest(method.as_str(), &uri, &headers, &body);
    inner.bump();
    reply.into_response()
}

impl Inner {
    pub(super) fn handle_rest(
        &self,
        method: &str,
        uri: &Uri,
        headers: &HeaderMap,
        raw: &[u8],
    ) -> Reply {
        let full = uri.path();
        let (path, prefixed) = match full.strip_prefix("/api/v10") {
            Some(p) => (p.to_string(), true),
            None => (full.to_string(), false),
        };
        let query = uri.query().unwrap_or("").to_string();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut st = self.lock();
        let (body, files) = match parse_body(&content_type, raw) {
            Ok(x) => x,
            Err(e) => {
                self.violation(&mut st, format!("{method} {path}: unparseable body: {e}"));
                (Value::Null, Vec::new())
            }
        };
        let segs: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let req = Req {
            method: method.to_string(),
            path,
            segs,
            query,
            body,
            files,
        };
        let mut injected = false;
        let is_webhook = req
            .segs
            .first()
            .is_some_and(|s| s == "webhooks" || s == "interactions");
        let reply = if !prefixed {
            self.violation(&mut st, format!("{}: not under /api/v10", req.what()));
            Reply::error(404, 0, "404: Not Found")
        } else if !is_webhook && !self.token_ok(auth.strip_prefix("Bot ").unwrap_or("\u{0}")) {
            self.violation(
                &mut st,
                format!("{}: bad Authorization header {auth:?}", req.what()),
            );
            Reply::error(401, 0, "401: Unauthorized")
        } else if matches!(st.outage, Some((until, OutageMode::Unavailable)) if until > Instant::now())
        {
            injected = true;
            Reply::error(503, 0, "503: Service Unavailable")
        } else if let Some(pos) = st
            .failures
            .iter()
            .position(|f| pattern_matches(&f.pattern, &req.method, &req.path))
        {
            injected = true;
            let rule = st.failures.remove(pos);
            failure_reply(rule)
        } else if is_webhook {
            self.route(&mut st, &req)
        } else {
            match self.rate_limit(&mut st, &req) {
                Err(limited) => limited,
                Ok(headers) => {
                    let mut r = self.route(&mut st, &req);
                    r.headers.extend(headers);
                    r
                }
            }
        };
        if let Some(b) = &reply.body {
            if reply.status < 300 {
                if let Err(e) = check_reply(&req, b) {
                    self.violation(
                        &mut st,
                        format!(
                            "FAKE BUG: reply to {} does not deserialize in serenity: {e}",
                            req.what()
                        ),
                    );
                }
            }
        }
        let index = st.calls.len();
        st.calls.push(RecordedCall {
            index,
            method: req.method,
            path: req.path,
            query: req.query,
            body: req.body,
            files: req.files,
            status: reply.status,
            injected_failure: injected,
            at: Instant::now(),
        });
        reply
    }
}

impl Inner {
    pub(super) fn route(&self, st: &mut FakeState, req: &Req) -> Reply {
        let cfg = &self.cfg;
        let s: Vec<&str> = req.segs.iter().map(String::as_str).collect();
        let m = req.method.as_str();
        let id = |i: usize| s.get(i).and_then(|x| x.parse::<u64>().ok());
        match (m, s.as_slice()) {
            ("GET", ["gateway"]) => Reply::json(json!({"url": self.gateway_url()})),
            ("GET", ["gateway", "bot"]) => {
                Reply::json(json!({"url": self.gateway_url(), "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1}}))
            }
            ("GET", ["users", "@me"]) => Reply::json(current_user_json(cfg)),
            ("GET", ["users", _]) => match id(1) {
                Some(u) if u == cfg.bot_user_id || cfg.member(u).is_some() => {
                    Reply::json(user_json(cfg, u))
                }
                _ => Reply::error(404, 10013, "Unknown User"),
            },
            ("GET", ["oauth2", "applications", "@me"]) => Reply::json(app_info_json(cfg)),
            ("POST", ["users", "@me", "channels"]) => {
                let Some(user) = sf(&req.body["recipient_id"]) else {
                    return self.reject(
                        st,
                        req,
                        vec![problem(
                            "recipient_id",
                            "BASE_TYPE_REQUIRED",
                            "This field is required".into(),
                        )],
                    );
                };
                let channel = st.dm_channel(user);
                Reply::json(dm_channel_json(cfg, channel, user))
            }
            ("GET", ["channels", _]) => {
                let c = id(1).unwrap_or_default();
                if let Some(name) = cfg
                    .text_channels()
                    .into_iter()
                    .find(|(x, _)| *x == c)
                    .map(|(_, n)| n)
                {
                    Reply::json(guild_channel_json(cfg, c, &name, 0))
                } else if let Some(u) = st.dm_recipient(c) {
                    Reply::json(dm_channel_json(cfg, c, u))
                } else {
                    // Not a violation: a bot checking a configured channel id is legitimate.
                    Reply::error(404, 10003, "Unknown Channel")
                }
            }
            ("POST", ["channels", _, "messages"]) => {
                self.create_channel_message(st, req, id(1).unwrap_or_default())
            }
            ("GET", ["channels", _, "messages"]) => {
                let c = id(1).unwrap_or_default();
                let limit = query_param(&req.query, "limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(50usize);
                let mut msgs = channel_messages(st, c);
                msgs.reverse();
                msgs.truncate(limit.min(100));
                Reply::json(Value::Array(
                    msgs.iter()
                        .map(|m| message_json(cfg, &self.api_base(), m))
                        .collect(),
                ))
            }
            ("GET", ["channels", _, "messages", _]) => match self.find_message(st, id(1), id(3)) {
                Some(msg) => Reply::json(message_json(cfg, &self.api_base(), &msg)),
                None => self.not_found(st, req, 10008, "Unknown Message"),
            },
            ("PATCH", ["channels", _, "messages", _]) => {
                match self.find_message(st, id(1), id(3)) {
                    Some(msg) if msg.author_id != cfg.bot_user_id => {
                        self.violation(
                            st,
                            format!("{}: editing a message authored by another user", req.what()),
                        );
                        Reply::error(403, 50005, "Cannot edit a message authored by another user")
                    }
                    Some(msg) => self.edit_message(st, req, &req.body, msg.id),
                    None => self.not_found(st, req, 10008, "Unknown Message"),
                }
            }
            ("DELETE", ["channels", _, "messages", _]) => match self.find_message(st, id(1), id(3))
            {
                Some(msg) => {
                    st.messages.remove(&msg.id);
                    if st.gw.session_id.is_some() {
                        let mut d = json!({"id": msg.id.to_string(), "channel_id": msg.channel_id.to_string()});
                        if let Some(g) = msg.guild_id {
                            d["guild_id"] = json!(g.to_string());
                        }
                        self.dispatch(st, "MESSAGE_DELETE", d);
                    }
                    Reply::no_content()
                }
                None => self.not_found(st, req, 10008, "Unknown Message"),
            },
            ("POST", ["interactions", _, token, "callback"]) => {
                self.interaction_callback(st, req, id(1), token)
            }
            ("POST", ["webhooks", _, token]) => self.followup(st, req, id(1), token),
            ("GET" | "PATCH" | "DELETE", ["webhooks", _, token, "messages", which]) => {
                self.webhook_message(st, req, id(1), token, which)
            }
            ("PUT", ["applications", _, "commands"]) => self.put_commands(st, req, id(1), false),
            ("PUT", ["applications", _, "guilds", _, "commands"]) => {
                if id(3) != Some(cfg.guild_id) {
                    return self.not_found(st, req, 10004, "Unknown Guild");
                }
                self.put_commands(st, req, id(1), true)
            }
            ("GET", ["applications", _, "commands"]) => {
                Reply::json(Value::Array(st.global_commands.clone()))
            }
            ("GET", ["applications", _, "guilds", _, "commands"]) => {
                Reply::json(Value::Array(st.guild_commands.clone()))
            }
            ("GET", ["guilds", _]) if id(1) == Some(cfg.guild_id) => {
                Reply::json(guild_json(cfg, false))
            }
            ("GET", ["guilds", _, "roles"]) if id(1) == Some(cfg.guild_id) => Reply::json(
                Value::Array(cfg.roles.iter().map(|r| role_json(cfg, r)).collect()),
            ),
            ("GET", ["guilds", _, "channels"]) if id(1) == Some(cfg.guild_id) => {
                Reply::json(Value::Array(
                    cfg.text_channels()
                        .iter()
                        .enumerate()
                        .map(|(i, (c, n))| guild_channel_json(cfg, *c, n, i))
                        .collect(),
                ))
            }
            // Looking up a guild the bot is not in is legitimate (a wrong guild_id).
            ("GET", ["guilds", _]) => Reply::error(404, 10004, "Unknown Guild"),
            ("GET", ["guilds", _, "members", _]) if id(1) == Some(cfg.guild_id) => {
                match id(3).and_then(|u| member_json(cfg, u, true, false)) {
                    Some(mut m) => {
                        m["guild_id"] = json!(cfg.guild_id.to_string());
                        Reply::json(m)
                    }
                    // Not a violation: looking up someone who left is legitimate.
                    None => Reply::error(404, 10007, "Unknown Member"),
                }
            }
            _ => {
                self.violation(
                    st,
                    format!(
                        "{}: route not implemented by the fake (or not a Discord route)",
                        req.what()
                    ),
                );
                Reply::error(404, 0, "404: Not Found")
            }
        }
    }

    pub(super) fn not_found(
        &self,
        st: &mut FakeState,
        req: &Req,
        code: u64,
        message: &str,
    ) -> Reply {
        self.violation(st, format!("{}: {message}", req.what()));
        Reply::error(404, code, message)
    }

    pub(super) fn reject(&self, st: &mut FakeState, req: &Req, problems: Vec<Problem>) -> Reply {
        let mut errors = Map::new();
        for p in &problems {
            self.violation(st, format!("{}: {}: {}", req.what(), p.path, p.message));
            insert_error(&mut errors, &p.path, p.code, &p.message);
        }
        Reply {
            status: 400,
            body: Some(json!({"message": "Invalid Form Body", "code": 50035, "errors": errors})),
            headers: Vec::new(),
        }
    }

    pub(super) fn find_message(
        &self,
        st: &FakeState,
        channel: Option<u64>,
        message: Option<u64>,
    ) -> Option<StoredMessage> {
        st.messages
            .get(&message?)
            .filter(|m| Some(m.channel_id) == channel)
            .cloned()
    }

    pub(super) fn require_allowed_mentions(
        &self,
        st: &mut FakeState,
        req: &Req,
        body: &Value,
        creating: bool,
    ) {
        let has_content = body.get("content").is_some_and(|c| !c.is_null());
        if (creating || has_content) && body.get("allowed_mentions").is_none_or(Value::is_null) {
            let what = if creating {
                "message sent"
            } else {
                "message content edited"
            };
            self.violation(
                st,
                format!(
                    "{}: {what} without an explicit allowed_mentions",
                    req.what()
                ),
            );
        }
    }

    pub(super) fn create_channel_message(
        &self,
        st: &mut FakeState,
        req: &Req,
        channel: u64,
    ) -> Reply {
        let cfg = &self.cfg;
        let guild_id = if cfg.is_guild_channel(channel) {
            Some(cfg.guild_id)
        } else if let Some(user) = st.dm_recipient(channel) {
            if !cfg.member(user).is_some_and(|m| m.dms_open) {
                // A real-world condition the bot must handle, not a violation.
                return Reply::error(403, 50007, "Cannot send messages to this user");
            }
            None
        } else {
            return self.not_found(st, req, 10003, "Unknown Channel");
        };
        let mut problems = validate_message(&req.body, true, !req.files.is_empty());
        let attachments = match self.build_attachments(st, &req.body, &req.files, &[]) {
            Ok(a) => a,
            Err(p) => {
                problems.push(p);
                Vec::new()
            }
        };
        if !problems.is_empty() {
            return self.reject_message(st, req, problems);
        }
        self.require_allowed_mentions(st, req, &req.body, true);
        // `enforce_nonce`: the same nonce again (a retry, or another process
        // posting the same card) gets the message already created.
        let nonce = (req.body["enforce_nonce"] == true)
            .then(|| match &req.body["nonce"] {
                Value::String(n) => Some(n.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .flatten();
        if let Some(n) = &nonce {
            let key = (channel, n.clone());
            if let Some((id, at)) = st.nonces.get(&key).copied() {
                if at.elapsed() < super::state::NONCE_WINDOW {
                    if let Some(msg) = st.messages.get(&id) {
                        return Reply::json(message_json(cfg, &self.api_base(), msg));
                    }
                }
            }
        }
        let msg =
            self.store_new_message(st, channel, guild_id, &req.body, attachments, None, None, 0);
        if let Some(n) = nonce {
            st.nonces.insert((channel, n), (msg.id, Instant::now()));
        }
        self.echo_bot_message(st, "MESSAGE_CREATE", &msg);
        Reply::json(message_json(cfg, &self.api_base(), &msg))
    }

    pub(super) fn reject_message(
        &self,
        st: &mut FakeState,
        req: &Req,
        problems: Vec<Problem>,
    ) -> Reply {
        if let Some(p) = problems.iter().find(|p| p.code == "EMPTY_MESSAGE") {
            self.violation(st, format!("{}: {}", req.what(), p.message));
            return Reply::error(400, 50006, "Cannot send an empty message");
        }
        self.reject(st, req, problems)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn store_new_message(
        &self,
        st: &mut FakeState,
        channel: u64,
        guild_id: Option<u64>,
        body: &Value,
        attachments: Vec<StoredAttachment>,
        interaction_id: Option<u64>,
        interaction_metadata: Option<Value>,
        kind: u8,
    ) -> StoredMessage {
        let id = st.new_id();
        let msg = StoredMessage {
            id,
            channel_id: channel,
            guild_id,
            author_id: self.cfg.bot_user_id,
            content: body["content"].as_str().unwrap_or("").to_string(),
            embeds: normalize_embeds(&body["embeds"]),
            components: body["components"].as_array().cloned().unwrap_or_default(),
            allowed_mentions: body
                .get("allowed_mentions")
                .filter(|v| !v.is_null())
                .cloned(),
            attachments,
            flags: body["flags"].as_u64().unwrap_or(0),
            edit_count: 0,
            interaction_id,
            interaction_metadata,
            kind,
            created_ms: now_ms(),
            edited_ms: None,
        };
        st.messages.insert(id, msg.clone());
        msg
    }

    /// Applies an edit body to a stored bot message (PATCH message, @original, type 7).
    pub(super) fn edit_message(
        &self,
        st: &mut FakeState,
        req: &Req,
        body: &Value,
        message_id: u64,
    ) -> Reply {
        let Some(existing) = st.messages.get(&message_id).cloned() else {
            return self.not_found(st, req, 10008, "Unknown Message");
        };
        let mut problems = validate_message(body, false, !req.files.is_empty());
        let attachments = match self.build_attachments(st, body, &req.files, &existing.attachments)
        {
            Ok(a) => a,
            Err(p) => {
                problems.push(p);
                Vec::new()
            }
        };
        if !problems.is_empty() {
            return self.reject_message(st, req, problems);
        }
        self.require_allowed_mentions(st, req, body, false);
        let msg = self.apply_edit(st, message_id, body, attachments);
        Reply::json(message_json(&self.cfg, &self.api_base(), &msg))
    }

    pub(super) fn apply_edit(
        &self,
        st: &mut FakeState,
        message_id: u64,
        body: &Value,
        attachments: Vec<StoredAttachment>,
    ) -> StoredMessage {
        let Some(msg) = st.messages.get_mut(&message_id) else {
            return dummy_message();
        };
        if let Some(c) = body.get("content") {
            msg.content = c.as_str().unwrap_or("").to_string();
        }
        if body.get("embeds").is_some() {
            msg.embeds = normalize_embeds(&body["embeds"]);
        }
        if body.get("components").is_some() {
            msg.components = body["components"].as_array().cloned().unwrap_or_default();
        }
        if let Some(a) = body.get("allowed_mentions").filter(|v| !v.is_null()) {
            msg.allowed_mentions = Some(a.clone());
        }
        if let Some(f) = body.get("flags").and_then(Value::as_u64) {
            msg.flags = (msg.flags & FLAG_EPHEMERAL) | (f & !FLAG_EPHEMERAL);
        }
        msg.flags &= !FLAG_LOADING;
        msg.attachments = attachments;
        msg.edit_count += 1;
        msg.edited_ms = Some(now_ms());
        let msg = msg.clone();
        self.echo_bot_message(st, "MESSAGE_UPDATE", &msg);
        msg
    }

    /// Resolves `attachments` + `files[n]` into the message's attachment list. For edits,
    /// existing attachments survive only if listed (Discord semantics) or if `attachments`
    /// is absent.
    pub(super) fn build_attachments(
        &self,
        st: &mut FakeState,
        body: &Value,
        files: &[RecordedFile],
        existing: &[StoredAttachment],
    ) -> Result<Vec<StoredAttachment>, Problem> {
        let mut used = vec![false; files.len()];
        let mut out = Vec::new();
        let new_file = |st: &mut FakeState,
                        f: &RecordedFile,
                        filename: Option<&str>,
                        desc: Option<String>| StoredAttachment {
            id: st.new_id(),
            filename: filename.unwrap_or(&f.filename).to_string(),
            description: desc,
            content_type: f.content_type.clone(),
            data: f.data.clone(),
        };
        match body.get("attachments").and_then(Value::as_array) {
            Some(list) => {
                for (i, a) in list.iter().enumerate() {
                    if let Some(filename) = a["filename"].as_str() {
                        let n = sf(&a["id"]).unwrap_or(i as u64);
                        let field = format!("files[{n}]");
                        let Some(pos) = files.iter().position(|f| f.field == field) else {
                            return Err(problem(&format!("attachments.{i}"), "ATTACHMENT_NOT_FOUND",
                                format!("attachment {filename:?} refers to {field}, which was not uploaded")));
                        };
                        used[pos] = true;
                        let desc = a["description"].as_str().map(str::to_string);
                        out.push(new_file(st, &files[pos], Some(filename), desc));
                    } else {
                        let id = sf(&a["id"]).unwrap_or_default();
                        match existing.iter().find(|e| e.id == id) {
                            Some(e) => out.push(e.clone()),
                            None => {
                                return Err(problem(
                                    &format!("attachments.{i}"),
                                    "ATTACHMENT_NOT_FOUND",
                                    format!("unknown existing attachment id {id}"),
                                ));
                            }
                        }
                    }
                }
            }
            None => out.extend(existing.iter().cloned()),
        }
        for (i, f) in files.iter().enumerate() {
            if !used[i] && f.field.starts_with("files[") {
                out.push(new_file(st, f, None, None));
            }
        }
        Ok(out)
    }

    pub(super) fn interaction_callback(
        &self,
        st: &mut FakeState,
        req: &Req,
        id: Option<u64>,
        token: &str,
    ) -> Reply {
        let cfg = &self.cfg;
        let Some(i) = id
            .and_then(|id| st.interactions.get(&id))
            .filter(|i| i.handle.token == token)
        else {
            return self.not_found(st, req, 10062, "Unknown interaction");
        };
        let iid = i.handle.id;
        let kind = i.handle.kind;
        let label = i.label.clone();
        let elapsed = i.injected_at.elapsed();
        let channel = i.handle.channel_id;
        let source_message = i.handle.message_id;
        let guild = i.guild;
        let metadata = i.metadata.clone();
        let already = i.initial.is_some();
        let reject = |st: &mut FakeState, text: String| {
            if let Some(i) = st.interactions.get_mut(&iid) {
                i.rejections.push(text);
            }
        };
        if already {
            let text = format!(
                "interaction {iid} ({label}) answered twice: initial response already sent"
            );
            reject(st, text.clone());
            self.violation(st, text);
            return Reply::error(400, 40060, "Interaction has already been acknowledged.");
        }
        if elapsed > cfg.interaction_deadline {
            let text = format!(
                "interaction {iid} ({label}) answered after {elapsed:?} (limit {:?})",
                cfg.interaction_deadline
            );
            reject(st, text.clone());
            if let Some(i) = st.interactions.get_mut(&iid) {
                // One violation per late interaction, not also "never answered".
                i.reported_unanswered = true;
            }
            self.violation(st, text);
            return Reply::error(404, 10062, "Unknown interaction");
        }
        let rtype = req.body["type"].as_u64().unwrap_or(0);
        let data = req.body.get("data").cloned().unwrap_or(Value::Null);
        let allowed = match rtype {
            4 | 5 => matches!(kind, 2..=5),
            6 | 7 => kind == 3 || (kind == 5 && source_message.is_some()),
            8 => kind == 4,
            9 => matches!(kind, 2 | 3),
            _ => false,
        };
        if !allowed {
            let text = format!("interaction {iid} ({label}): response type {rtype} is not valid for interaction type {kind}");
            reject(st, text.clone());
            return self.reject(
                st,
                req,
                vec![problem("type", "INTERACTION_RESPONSE_TYPE_INVALID", text)],
            );
        }
        let mut problems = match rtype {
            4 | 7 => validate_message(&data, rtype == 4, !req.files.is_empty()),
            9 => validate_modal(&data),
            _ => Vec::new(),
        }
        .into_iter()
        .map(|mut p| {
            p.path = format!("data.{}", p.path);
            p
        })
        .collect::<Vec<_>>();
        let existing = source_message
            .and_then(|m| st.messages.get(&m))
            .map(|m| m.attachments.clone())
            .unwrap_or_default();
        let attachments = if matches!(rtype, 4 | 7) {
            match self.build_attachments(
                st,
                &data,
                &req.files,
                if rtype == 7 { &existing } else { &[] },
            ) {
                Ok(a) => a,
                Err(p) => {
                    problems.push(p);
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if !problems.is_empty() {
            reject(
                st,
                format!(
                    "invalid response: {}",
                    problems
                        .iter()
                        .map(|p| p.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            );
            return self.reject_message(st, req, problems);
        }
        if matches!(rtype, 4 | 7) {
            self.require_allowed_mentions(st, req, &data, rtype == 4);
        }
        let guild_id = guild.then_some(cfg.guild_id);
        let original = match rtype {
            4 | 5 => {
                let mut body = if rtype == 4 {
                    data.clone()
                } else {
                    json!({"content": ""})
                };
                let f = data["flags"].as_u64().unwrap_or(0);
                body["flags"] = json!(if rtype == 5 {
                    (f & FLAG_EPHEMERAL) | FLAG_LOADING
                } else {
                    f
                });
                let kind_of_msg = if kind == 2 { 20 } else { 19 };
                let msg = self.store_new_message(
                    st,
                    channel,
                    guild_id,
                    &body,
                    attachments,
                    Some(iid),
                    Some(metadata),
                    kind_of_msg,
                );
                self.echo_bot_message(st, "MESSAGE_CREATE", &msg);
                Some(msg.id)
            }
            6 => source_message,
            7 => {
                if let Some(mid) = source_message {
                    self.apply_edit(st, mid, &data, attachments);
                }
                source_message
            }
            _ => None,
        };
        if let Some(i) = st.interactions.get_mut(&iid) {
            i.initial = Some(req.body.clone());
            i.original_message_id = original;
            if rtype == 9 {
                i.modal = Some(data);
            }
        }
        Reply::no_content()
    }

    pub(super) fn webhook_interaction(
        &self,
        st: &mut FakeState,
        req: &Req,
        app: Option<u64>,
        token: &str,
    ) -> Result<u64, Reply> {
        match st.interaction_by_token(token) {
            Some(iid) if app == Some(self.cfg.application_id) => Ok(iid),
            _ => Err(self.not_found(st, req, 10015, "Unknown Webhook")),
        }
    }

    pub(super) fn followup(
        &self,
        st: &mut FakeState,
        req: &Req,
        app: Option<u64>,
        token: &str,
    ) -> Reply {
        let iid = match self.webhook_interaction(st, req, app, token) {
            Ok(i) => i,
            Err(r) => return r,
        };
        let Some(i) = st.interactions.get(&iid) else {
            return Reply::error(404, 10015, "Unknown Webhook");
        };
        if i.initial.is_none() {
            let text = format!(
                "interaction {iid} ({}): follow-up before the initial response",
                i.label
            );
            self.violation(st, text);
            return Reply::error(404, 10015, "Unknown Webhook");
        }
        let channel = i.handle.channel_id;
        let guild_id = i.guild.then_some(self.cfg.guild_id);
        let mut metadata = i.metadata.clone();
        if let Some(o) = i.original_message_id {
            metadata["original_response_message_id"] = json!(o.to_string());
        }
        let mut problems = validate_message(&req.body, true, !req.files.is_empty());
        let attachments = match self.build_attachments(st, &req.body, &req.files, &[]) {
            Ok(a) => a,
            Err(p) => {
                problems.push(p);
                Vec::new()
            }
        };
        if !problems.is_empty() {
            return self.reject_message(st, req, problems);
        }
        self.require_allowed_mentions(st, req, &req.body, true);
        let msg = self.store_new_message(
            st,
            channel,
            guild_id,
            &req.body,
            attachments,
            Some(iid),
            Some(metadata),
            0,
        );
        self.echo_bot_message(st, "MESSAGE_CREATE", &msg);
        Reply::json(message_json(&self.cfg, &self.api_base(), &msg))
    }

    pub(super) fn webhook_message(
        &self,
        st: &mut FakeState,
        req: &Req,
        app: Option<u64>,
        token: &str,
        which: &str,
    ) -> Reply {
        let iid = match self.webhook_interaction(st, req, app, token) {
            Ok(i) => i,
            Err(r) => return r,
        };
        let Some(i) = st.interactions.get(&iid) else {
            return Reply::error(404, 10015, "Unknown Webhook");
        };
        let target = if which == "@original" {
            if i.initial.is_none() {
                let text = format!(
                    "interaction {iid} ({}): @original used before the initial response",
                    i.label
                );
                self.violation(st, text);
                return Reply::error(404, 10008, "Unknown Message");
            }
            i.original_message_id
        } else {
            which.parse::<u64>().ok().filter(|m| {
                st.messages
                    .get(m)
                    .is_some_and(|msg| msg.interaction_id == Some(iid))
            })
        };
        let Some(mid) = target.filter(|m| st.messages.contains_key(m)) else {
            return self.not_found(st, req, 10008, "Unknown Message");
        };
        match req.method.as_str() {
            "GET" => {
                let msg = st.messages.get(&mid).cloned().unwrap_or_else(dummy_message);
                Reply::json(message_json(&self.cfg, &self.api_base(), &msg))
            }
            "DELETE" => {
                st.messages.remove(&mid);
                Reply::no_content()
            }
            _ => self.edit_message(st, req, &req.body, mid),
        }
    }

    pub(super) fn put_commands(
        &self,
        st: &mut FakeState,
        req: &Req,
        app: Option<u64>,
        guild: bool,
    ) -> Reply {
        let cfg = &self.cfg;
        if app != Some(cfg.application_id) {
            return self.not_found(st, req, 10002, "Unknown Application");
        }
        let Some(list) = req.body.as_array() else {
            return self.reject(
                st,
                req,
                vec![problem("", "BASE_TYPE_ARRAY", "Must be an array".into())],
            );
        };
        let problems = validate_commands(list);
        if !problems.is_empty() {
            return self.reject(st, req, problems);
        }
        let previous = if guild {
            st.guild_commands.clone()
        } else {
            st.global_commands.clone()
        };
        let mut echoed = Vec::new();
        for c in list {
            let name = c["name"].as_str().unwrap_or("").to_string();
            let id = previous
                .iter()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| sf(&p["id"]))
                .unwrap_or_else(|| st.new_id());
            let version = st.new_id();
            let mut e = json!({
                "id": id.to_string(),
                "application_id": cfg.application_id.to_string(),
                "version": version.to_string(),
                "type": c["type"].as_u64().unwrap_or(1),
                "name": name,
                "description": c["description"].as_str().unwrap_or(""),
                "options": c["options"].as_array().cloned().unwrap_or_default(),
                "default_member_permissions": c.get("default_member_permissions").cloned().unwrap_or(Value::Null),
                "dm_permission": c.get("dm_permission").cloned().unwrap_or(json!(true)),
                "nsfw": c.get("nsfw").cloned().unwrap_or(json!(false)),
            });
            if guild {
                e["guild_id"] = json!(cfg.guild_id.to_string());
            }
            echoed.push(e);
        }
        if guild {
            st.guild_commands = echoed.clone();
        } else {
            st.global_commands = echoed.clone();
        }
        Reply::json(Value::Array(echoed))
    }
}

pub(super) fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}
