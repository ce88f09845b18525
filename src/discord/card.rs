//! Rendering of approval cards: a request in, a Discord message body out.
//!
//! Pure: no serenity, no I/O, no clock. Everything that came from an agent
//! (arguments, justification, agent and tool names, ids) or from a Discord
//! user (names, reasons) is untrusted and goes through one of the escapers
//! of [`super::escape`], so that it cannot close a code block, render markdown or masked
//! links, mention anyone, fake a line of Discord UI, hide characters, or
//! overflow Discord's limits. When something had to be cut, the full
//! (already redacted) request is attached as `request-<id>.json`.
//!
//! A request of a run-tool also shows the exact argv Keyturn will run (a
//! JSON array, so every element's spaces, quotes and backticks are
//! unambiguous), where it runs (a host-profile run says loudly that it is
//! not sandboxed), and once it started, the run: running since when with
//! which pid and a Kill button, or how it ended and how long it took.

// `fit` and `plain` are also what the rest of the Discord adapter reaches
// for through this module.
use super::escape::{code_block, inline_code, is_hidden, length, tidy, trusted, SHORT_BUDGET};
pub use super::escape::{fit, plain};
use super::routing::{AllowForOption, Route};
use crate::app::ports::RunRecord;
use crate::domain::request::{ApprovalRequest, State, CLIENT_GONE};
use crate::domain::run::{Profile, RunState};
use crate::domain::Risk;
use serde_json::{json, Value};

/// Discord's documented limits (counted in characters).
pub mod limits {
    pub const CONTENT: usize = 2000;
    pub const EMBED_TITLE: usize = 256;
    pub const EMBED_DESCRIPTION: usize = 4096;
    pub const EMBED_FIELDS: usize = 25;
    pub const EMBED_FIELD_NAME: usize = 256;
    pub const EMBED_FIELD_VALUE: usize = 1024;
    pub const EMBED_FOOTER: usize = 2048;
    pub const EMBED_TOTAL: usize = 6000;
}

/// Our own budgets, chosen so that the sum stays under [`limits::EMBED_TOTAL`].
const TITLE_BUDGET: usize = 200;
const JUSTIFICATION_BUDGET: usize = 1500;
const ARGS_BUDGET: usize = limits::EMBED_FIELD_VALUE;
const RULE_BUDGET: usize = 600;
const FLAGS_BUDGET: usize = 400;
const REASON_BUDGET: usize = 700;
/// A run-tool card carries three fields more (the argv, the sandbox, the
/// run), so its justification and arguments (which the argv repeats) get
/// less room, keeping the worst case under [`limits::EMBED_TOTAL`].
const RUN_JUSTIFICATION_BUDGET: usize = 900;
const RUN_ARGS_BUDGET: usize = 400;
/// The argv as a JSON array in a code block.
pub const ARGV_BUDGET: usize = limits::EMBED_FIELD_VALUE;
const SANDBOX_BUDGET: usize = 400;
const RUN_STATE_BUDGET: usize = 400;

/// Embed colours: pending by risk, then by final state.
pub mod colour {
    pub const LOW: u32 = 0x2E_CC_71;
    pub const MEDIUM: u32 = 0xF1_C4_0F;
    pub const HIGH: u32 = 0xE6_7E_22;
    pub const CRITICAL: u32 = 0xE7_4C_3C;
    pub const APPROVED: u32 = 0x1F_8B_4C;
    pub const DENIED: u32 = 0x99_2D_22;
    pub const TIMED_OUT: u32 = 0x95_A5_A6;
    pub const CANCELLED: u32 = 0x60_7D_8B;
}

/// Who may be pinged, from the config.
#[derive(Debug, Clone, Default)]
pub struct CardSettings {
    pub approver_role_id: Option<u64>,
    pub admin_role_id: Option<u64>,
    pub ping_approvers: bool,
    pub ping_admins: bool,
}

/// A file sent with a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardFile {
    pub filename: String,
    pub data: Vec<u8>,
}

/// A message body ready for `POST`/`PATCH /channels/{c}/messages`.
#[derive(Debug, Clone)]
pub struct RenderedCard {
    /// JSON body (`payload_json` when there is a file).
    pub payload: Value,
    /// The full request, when the card had to be truncated (posts only).
    pub file: Option<CardFile>,
    /// Whether anything was cut.
    pub truncated: bool,
}

/// `allowed_mentions` that pings nobody, for every message the bot sends.
pub fn no_mentions() -> Value {
    json!({"parse": [], "users": [], "roles": [], "replied_user": false})
}

/// The colour of a card.
pub fn colour_of(req: &ApprovalRequest) -> u32 {
    match req.state {
        State::Pending => match req.risk {
            Risk::Low => colour::LOW,
            Risk::Medium => colour::MEDIUM,
            Risk::High => colour::HIGH,
            Risk::Critical => colour::CRITICAL,
        },
        State::Approved => colour::APPROVED,
        State::Denied => colour::DENIED,
        State::TimedOut => colour::TIMED_OUT,
        State::Cancelled => colour::CANCELLED,
    }
}

fn state_label(s: State) -> &'static str {
    match s {
        State::Pending => "Approval needed",
        State::Approved => "Approved",
        State::Denied => "Denied",
        State::TimedOut => "Timed out",
        State::Cancelled => "Cancelled",
    }
}

fn icon(s: State) -> &'static str {
    match s {
        State::Pending => "⏳",
        State::Approved => "✅",
        State::Denied => "⛔",
        State::TimedOut => "⌛",
        State::Cancelled => "✖",
    }
}

/// The role to ping for a pending card, if the config asks for one.
pub fn ping_role(req: &ApprovalRequest, s: &CardSettings) -> Option<u64> {
    if req.state != State::Pending {
        return None;
    }
    match req.risk {
        Risk::Critical if s.ping_admins => s.admin_role_id,
        Risk::High if s.ping_approvers => s.approver_role_id,
        _ => None,
    }
}

/// Renders `req` as a card. `creating`: a new message (may carry the file)
/// rather than an edit (which keeps the attachments already there).
pub fn render(req: &ApprovalRequest, s: &CardSettings, creating: bool) -> RenderedCard {
    render_with_votes(req, s, creating, &[])
}

/// [`render`], showing who has approved so far (`approvers`: display names)
/// when a request needs several approvals.
pub fn render_with_votes(
    req: &ApprovalRequest,
    s: &CardSettings,
    creating: bool,
    approvers: &[String],
) -> RenderedCard {
    render_card(req, s, creating, approvers, None)
}

/// [`render_with_votes`], and for a run-tool request (`req.run` set) the
/// argv and sandbox it runs with, and `run`: its registry row once it was
/// started (`None`: not run yet, or the row could not be loaded).
pub fn render_card(
    req: &ApprovalRequest,
    s: &CardSettings,
    creating: bool,
    approvers: &[String],
    run: Option<&RunRecord>,
) -> RenderedCard {
    let is_run_tool = req.run.is_some();
    let (justification_budget, args_budget) = if is_run_tool {
        (RUN_JUSTIFICATION_BUDGET, RUN_ARGS_BUDGET)
    } else {
        (JUSTIFICATION_BUDGET, ARGS_BUDGET)
    };
    // What the request held at creation was cut: the file attached to the
    // first post has it all. A decision reason is not in that file.
    let mut truncated = false;
    let mut cut = |(text, was_cut): (String, bool)| {
        truncated |= was_cut;
        text
    };
    let tool = inline_code(&req.tool, SHORT_BUDGET);
    let title = fit(
        &format!(
            "{} {}: {}",
            icon(req.state),
            state_label(req.state),
            plain(&req.tool)
        ),
        TITLE_BUDGET,
    )
    .0;
    let tidy_justification = tidy(&req.justification);
    let justification = if tidy_justification.is_empty() {
        "*No justification given.*".to_string()
    } else {
        cut(code_block(
            &tidy_justification,
            "text",
            justification_budget,
        ))
    };
    let description = format!("**Justification**\n{justification}");
    let args_pretty =
        serde_json::to_string_pretty(&req.args).unwrap_or_else(|_| req.args.to_string());
    let args = cut(code_block(&args_pretty, "json", args_budget));
    let risk = match (req.risk, req.admin_only) {
        (r, true) => format!("{} (admins only)", r.as_str().to_uppercase()),
        (r, false) => r.as_str().to_uppercase(),
    };
    let on_behalf = match &req.user_id {
        Some(u) if is_snowflake(u) => format!("<@{u}> (`{u}`)"),
        Some(u) => inline_code(u, SHORT_BUDGET),
        None => "—".into(),
    };
    let channel = match &req.channel_id {
        Some(c) if is_snowflake(c) => format!("<#{c}> (`{c}`)"),
        Some(c) => inline_code(c, SHORT_BUDGET),
        None => "—".into(),
    };
    let secs = req.deadline_ms.div_euclid(1000);
    let deadline = if req.state == State::Pending {
        format!("<t:{secs}:R> (<t:{secs}:f>)")
    } else {
        format!("was <t:{secs}:f>")
    };
    let why = cut(fit(
        &format!(
            "{} — {}",
            inline_code(&req.rule, SHORT_BUDGET),
            trusted(&req.rule_detail)
        ),
        RULE_BUDGET,
    ));
    let mut fields = vec![
        field("Tool", tool, true),
        field("Risk", risk, true),
        field("Agent", inline_code(&req.agent, SHORT_BUDGET), true),
        field("On behalf of", on_behalf, true),
        field("Channel", channel, true),
        field("Deadline", deadline, true),
        field("Why policy asked", why, false),
        field("Arguments", args, false),
    ];
    if let Some(plan) = &req.run {
        fields.push(field(
            "Will run",
            cut(code_block(&argv_json(&plan.argv), "json", ARGV_BUDGET)),
            false,
        ));
        fields.push(field("Sandbox", sandbox_line(plan), false));
    }
    if let Some(r) = run {
        fields.push(field("Run", run_status(r), false));
    }
    if let Some(e) = &req.edit {
        fields.push(field(
            "Approved with edits",
            edit_summary(
                e,
                &req.args,
                if is_run_tool {
                    RUN_EDIT_BUDGET
                } else {
                    EDIT_BUDGET
                },
            ),
            false,
        ));
    }
    if let Some(t) = &req.task_id {
        fields.push(field("Task", inline_code(t, SHORT_BUDGET), true));
    }
    if req.approvals_required > 1 && req.state == State::Pending {
        let who = if approvers.is_empty() {
            String::new()
        } else {
            format!(": {}", plain(&approvers.join(", ")))
        };
        let text = format!(
            "{} of {}{who}",
            approvers.len().min(req.approvals_required as usize),
            req.approvals_required
        );
        fields.push(field("Approvals", fit(&text, 300).0, true));
    }
    if !req.flags.is_empty() {
        let flags = serde_json::to_string(&req.flags).unwrap_or_default();
        fields.push(field(
            "Flags",
            cut(code_block(&flags, "json", FLAGS_BUDGET)),
            false,
        ));
    }
    let mut reason_cut = false;
    if req.state.is_terminal() {
        let who = req
            .decided_who
            .as_deref()
            .map(|w| fit(&plain(w), SHORT_BUDGET * 2).0)
            .unwrap_or_else(|| match req.state {
                State::TimedOut => "nobody (timeout)".into(),
                _ => "—".into(),
            });
        let when = req
            .decided_ms
            .map(|ms| format!(" <t:{}:f>", ms.div_euclid(1000)))
            .unwrap_or_default();
        fields.push(field(
            "Decision",
            format!("**{}** by {who}{when}", state_label(req.state)),
            false,
        ));
        let reason = req.decided_reason.as_deref().map(tidy).unwrap_or_default();
        if req.state == State::Cancelled && reason == CLIENT_GONE {
            fields.push(field(
                "Reason",
                "cancelled: the agent's client went away".into(),
                false,
            ));
        } else if !reason.is_empty() {
            let (text, was_cut) = code_block(&reason, "text", REASON_BUDGET);
            reason_cut = was_cut;
            fields.push(field("Reason", text, false));
        }
    }
    let mut footer = format!("request {}", req.id);
    if truncated {
        // Attached to the first post (and kept by every edit): the content
        // cut here is all there, as it was at creation.
        footer.push_str(&format!(
            " · truncated: full request in request-{}.json",
            req.id
        ));
    } else if reason_cut {
        footer.push_str(" · reason truncated");
    }
    let embed = json!({
        "title": title,
        "description": description,
        "color": colour_of(req),
        "fields": fields,
        "footer": {"text": footer},
    });
    let ping = ping_role(req, s);
    let headline = format!(
        "{} {}: {}",
        icon(req.state),
        state_label(req.state),
        inline_code(&req.tool, SHORT_BUDGET)
    );
    let content = match ping {
        Some(role) => format!("<@&{role}> {headline}"),
        None => headline,
    };
    let mut allowed = no_mentions();
    if let Some(role) = ping {
        allowed["roles"] = json!([role.to_string()]);
    }
    let mut rows = Vec::new();
    if req.state == State::Pending {
        rows.push(json!({
            "type": 1,
            "components": [
                {"type": 2, "style": 3, "label": "Approve", "custom_id": Route::Approve(req.id).custom_id()},
                {"type": 2, "style": 4, "label": "Deny", "custom_id": Route::Deny(req.id).custom_id()},
                {"type": 2, "style": 2, "label": "Deny with reason…", "custom_id": Route::DenyWithReason(req.id).custom_id()},
                {"type": 2, "style": 1, "label": "Edit & approve…", "custom_id": Route::Edit(req.id).custom_id()},
            ]
        }));
        // "Allow for…": only where one approval decides (a grant never
        // stands in for a second person), and not for a tool Keyturn runs
        // itself (each run is approved on its exact argv).
        if req.approvals_required <= 1 && req.run.is_none() {
            let options: Vec<Value> = AllowForOption::offered(req.user_id.is_some())
                .iter()
                .map(|o| json!({"label": o.label(), "value": o.value()}))
                .collect();
            let placeholder = if req.admin_only {
                "Allow for… (admins only: critical tool)"
            } else {
                "Allow for…"
            };
            rows.push(json!({
                "type": 1,
                "components": [{
                    "type": 3,
                    "custom_id": Route::AllowFor(req.id).custom_id(),
                    "placeholder": placeholder,
                    "min_values": 1,
                    "max_values": 1,
                    "options": options,
                }]
            }));
        }
    }
    if let Some(kill) = run.and_then(kill_route) {
        rows.push(json!({
            "type": 1,
            "components": [
                {"type": 2, "style": 4, "label": "Kill", "custom_id": kill.custom_id()},
            ]
        }));
    }
    let components = Value::Array(rows);
    let mut payload = json!({
        "content": content,
        "embeds": [embed],
        "components": components,
        "allowed_mentions": allowed,
    });
    if creating {
        // Discord drops a second create with the same nonce (for a few
        // minutes): a post retried after a lost reply is not shown twice.
        let nonce: String = req.id.0.simple().to_string().chars().take(25).collect();
        payload["nonce"] = json!(nonce);
        payload["enforce_nonce"] = json!(true);
    }
    let file = (creating && truncated).then(|| CardFile {
        filename: format!("request-{}.json", req.id),
        data: full_payload(req),
    });
    if let Some(f) = &file {
        payload["attachments"] = json!([{
            "id": 0,
            "filename": f.filename,
            "description": "The full request (secrets redacted)",
        }]);
    }
    RenderedCard {
        payload,
        file,
        truncated: truncated || reason_cut,
    }
}

/// Room for the "Approved with edits" field: who edited, and the diff
/// (little on a run-tool card: its argv and run fields take the room, and
/// its "Will run" field already shows the edited argv).
const EDIT_BUDGET: usize = 450;
const RUN_EDIT_BUDGET: usize = 120;

/// "by … <t:…>" and the masked diff of an approver's edit, escaped and
/// bounded (the arguments field above shows the edited arguments).
fn edit_summary(e: &crate::domain::request::ArgsEdit, args: &Value, budget: usize) -> String {
    let by = fit(&plain(&e.by), budget / 3).0;
    let lines = crate::domain::edit::diff(&e.original_args, args);
    let diff = if lines.is_empty() {
        "(no visible change: only masked or equal values)".to_string()
    } else {
        lines.join("\n")
    };
    let head = format!("by {by} <t:{}:f>\n", e.at_ms.div_euclid(1000));
    let room = budget.saturating_sub(length(&head));
    format!("{head}{}", code_block(&diff, "diff", room).0)
}

/// The full (already redacted) request as attached to truncated cards.
pub fn full_payload(req: &ApprovalRequest) -> Vec<u8> {
    let v = json!({
        "id": req.id,
        "agent": req.agent,
        "tool": req.tool,
        "args": req.args,
        "justification": req.justification,
        "user_id": req.user_id,
        "channel_id": req.channel_id,
        "task_id": req.task_id,
        "risk": req.risk,
        "rule": req.rule,
        "rule_detail": req.rule_detail,
        "flags": req.flags,
        "created_ms": req.created_ms,
        "deadline_ms": req.deadline_ms,
        "run": req.run,
    });
    serde_json::to_vec_pretty(&v).unwrap_or_default()
}

/// The argv as a pretty JSON array, one element a line: spaces, quotes and
/// empty elements are plain to see. Backticks and hidden characters are
/// written as `\uXXXX` escapes, so the code block cannot be closed early,
/// nothing is hidden, and parsing the text as JSON gives the argv exactly.
pub fn argv_json(argv: &[String]) -> String {
    let pretty = serde_json::to_string_pretty(argv).unwrap_or_else(|_| "[]".into());
    let mut out = String::with_capacity(pretty.len());
    let mut units = [0u16; 2];
    for c in pretty.chars() {
        if c == '`' || is_hidden(c) {
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where a run happens, as one line; a host-profile run first says, in
/// bold, that it is not sandboxed.
fn sandbox_line(plan: &crate::domain::run::RunPlan) -> String {
    let warning = match plan.profile {
        Profile::Host => "⚠️ **NOT SANDBOXED**: runs on the host itself.\n",
        Profile::Bwrap => "",
    };
    let line = fit(
        &plain(&plan.describe()),
        SANDBOX_BUDGET.saturating_sub(length(warning)),
    )
    .0;
    format!("{warning}{line}")
}

/// The Kill button's route, for a run that is still running.
pub fn kill_route(run: &RunRecord) -> Option<Route> {
    if run.state != RunState::Running {
        return None;
    }
    uuid::Uuid::parse_str(&run.id).ok().map(Route::Kill)
}

/// How a run stands, on one line: running since when (and its pid), or
/// how it ended, when, and after how long. Names come from users and the
/// store, and are escaped.
pub fn run_summary(run: &RunRecord) -> String {
    let started = run.started_ms.div_euclid(1000);
    match run.state {
        RunState::Running => {
            let pid = run.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
            let kill = run
                .kill_requested_by
                .as_deref()
                .map(|by| format!(" · kill asked for by {}", who(by)))
                .unwrap_or_default();
            format!("**running** since <t:{started}:R> (<t:{started}:T>){pid}{kill}")
        }
        ended => {
            let how = match ended {
                RunState::Exited => match (run.exit_code, run.signal) {
                    (Some(code), _) => format!("**exited** with code {code}"),
                    (None, Some(sig)) => format!("**exited**: killed by signal {sig}"),
                    (None, None) => "**exited**".to_string(),
                },
                RunState::Killed => format!(
                    "**killed** by {}",
                    run.kill_requested_by
                        .as_deref()
                        .map_or("Keyturn".into(), who)
                ),
                RunState::TimedOut => format!(
                    "**timed out** (limit {})",
                    duration(run.deadline_ms - run.started_ms)
                ),
                RunState::FailedToStart => "**failed to start**".to_string(),
                RunState::Interrupted => {
                    "**interrupted**: Keyturn stopped while it ran".to_string()
                }
                RunState::Running => String::new(),
            };
            let took = match run.ended_ms {
                Some(end) => format!(
                    " after {} (<t:{}:f>)",
                    duration(end - run.started_ms),
                    end.div_euclid(1000)
                ),
                None => String::new(),
            };
            format!("{how}{took}")
        }
    }
}

/// The card's Run field: [`run_summary`] and the run's id (what
/// `keyturn kill` takes).
pub fn run_status(run: &RunRecord) -> String {
    let id = inline_code(&run.id, SHORT_BUDGET);
    fit(&format!("{}\nrun {id}", run_summary(run)), RUN_STATE_BUDGET).0
}

/// A user or process name from the store, escaped and kept short.
fn who(name: &str) -> String {
    fit(&plain(name), SHORT_BUDGET).0
}

/// A duration for people: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

fn field(name: &str, value: String, inline: bool) -> Value {
    let value = if value.trim().is_empty() {
        "—".to_string()
    } else {
        value
    };
    json!({"name": name, "value": value, "inline": inline})
}

/// Total characters Discord counts against [`limits::EMBED_TOTAL`].
pub fn embed_size(embed: &Value) -> usize {
    let len = |v: &Value| v.as_str().map_or(0, length);
    let mut n = len(&embed["title"]) + len(&embed["description"]) + len(&embed["footer"]["text"]);
    for f in embed["fields"].as_array().into_iter().flatten() {
        n += len(&f["name"]) + len(&f["value"]);
    }
    n
}

fn is_snowflake(s: &str) -> bool {
    (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discord::escape::{is_hidden, TRUNCATED};
    use crate::domain::request::RequestId;
    use uuid::Uuid;

    pub(crate) fn request() -> ApprovalRequest {
        ApprovalRequest {
            id: RequestId(Uuid::from_u128(0x1234)),
            agent: "ci-bot".into(),
            tool: "delete_file".into(),
            args: json!({"path": "/srv/x"}),
            args_hash: "h".into(),
            user_id: Some("42".into()),
            channel_id: Some("7".into()),
            justification: "cleanup".into(),
            task_id: None,
            idempotency_key: None,
            risk: Risk::High,
            approvals_required: 1,
            admin_only: false,
            rule: "risk_high".into(),
            rule_detail: "high risk asks an approver".into(),
            flags: vec![],
            created_ms: 1_700_000_000_000,
            deadline_ms: 1_700_000_300_000,
            state: State::Pending,
            decided_by: None,
            decided_who: None,
            decided_reason: None,
            decided_ms: None,
            requester_uid: None,
            run: None,
            edit: None,
        }
    }

    #[test]
    fn a_request_whose_client_went_away_says_so() {
        let mut r = request();
        r.state = State::Cancelled;
        r.decided_by = Some(crate::domain::request::DecidedBy::Cancel);
        r.decided_who = Some("agent:ci-bot".into());
        r.decided_reason = Some(CLIENT_GONE.into());
        r.decided_ms = Some(1_700_000_001_000);
        let card = render(&r, &settings(), false);
        let text = all_text(&card.payload);
        assert!(
            text.contains("cancelled: the agent's client went away"),
            "{text}"
        );
        assert!(!text.contains("client_gone"), "{text}");
        assert_eq!(card.payload["components"], json!([]), "no buttons left");
        // Any other reason is shown as the canceller wrote it.
        r.decided_reason = Some("changed my mind".into());
        let text = all_text(&render(&r, &settings(), false).payload);
        assert!(text.contains("changed my mind"), "{text}");
        assert!(!text.contains("went away"), "{text}");
    }

    fn settings() -> CardSettings {
        CardSettings {
            approver_role_id: Some(30),
            admin_role_id: Some(31),
            ping_approvers: true,
            ping_admins: true,
        }
    }

    fn all_text(payload: &Value) -> String {
        let e = &payload["embeds"][0];
        let mut s = payload["content"].as_str().unwrap_or("").to_string();
        for k in ["title", "description"] {
            s.push('\n');
            s.push_str(e[k].as_str().unwrap_or(""));
        }
        for f in e["fields"].as_array().into_iter().flatten() {
            s.push('\n');
            s.push_str(f["value"].as_str().unwrap_or(""));
        }
        s.push('\n');
        s.push_str(e["footer"]["text"].as_str().unwrap_or(""));
        s
    }

    fn check_limits(payload: &Value) {
        let e = &payload["embeds"][0];
        assert!(embed_size(e) <= limits::EMBED_TOTAL, "{}", embed_size(e));
        let n = |v: &Value| v.as_str().map_or(0, length);
        assert!(n(&e["title"]) <= limits::EMBED_TITLE);
        assert!(n(&e["description"]) <= limits::EMBED_DESCRIPTION);
        assert!(n(&payload["content"]) <= limits::CONTENT);
        let fields = e["fields"].as_array().unwrap();
        assert!(fields.len() <= limits::EMBED_FIELDS);
        for f in fields {
            assert!(n(&f["name"]) <= limits::EMBED_FIELD_NAME);
            let v = n(&f["value"]);
            assert!(v <= limits::EMBED_FIELD_VALUE && v > 0, "{f}");
        }
        assert!(n(&e["footer"]["text"]) <= limits::EMBED_FOOTER);
    }

    /// Code fences in the rendered text must pair up exactly as we wrote
    /// them: an even number of ``` runs, each on our own lines.
    fn fences_intact(text: &str) {
        assert_eq!(text.matches("```").count() % 2, 0, "{text}");
    }

    #[test]
    fn a_pending_card_has_the_fields_buttons_and_mentions() {
        let c = render(&request(), &settings(), true);
        let p = &c.payload;
        check_limits(p);
        assert!(!c.truncated && c.file.is_none() && p.get("attachments").is_none());
        let e = &p["embeds"][0];
        assert_eq!(e["color"], colour::HIGH);
        let names: Vec<&str> = e["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        for n in [
            "Tool",
            "Risk",
            "Agent",
            "On behalf of",
            "Channel",
            "Deadline",
            "Why policy asked",
            "Arguments",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let text = all_text(p);
        assert!(text.contains("<t:1700000300:R>"));
        assert!(text.contains("<@42>"));
        assert!(text.contains("\"path\": \"/srv/x\""));
        assert!(text.contains(&request().id.to_string()));
        let ids: Vec<&str> = p["components"][0]["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 4);
        assert!(ids[0].starts_with("keyturn:v1:approve:"));
        assert!(ids[3].starts_with("keyturn:v1:edit:"));
        // High risk pings the approver role, and only it.
        assert!(p["content"].as_str().unwrap().starts_with("<@&30>"));
        assert_eq!(p["allowed_mentions"]["roles"], json!(["30"]));
        assert_eq!(p["allowed_mentions"]["users"], json!([]));
        assert_eq!(p["allowed_mentions"]["parse"], json!([]));
    }

    #[test]
    fn a_card_says_when_approving_completes_the_trifecta() {
        // The guard puts the warning first in the detail, so even a long
        // detail cut to the field's budget keeps it.
        let mut r = request();
        r.rule_detail = format!(
            "approving this completes the lethal trifecta for agent `a` in the last 24h: \
             reads_private_data (read_email); {}",
            "x".repeat(3000)
        );
        let c = render(&r, &settings(), true);
        check_limits(&c.payload);
        let text = all_text(&c.payload);
        assert!(
            text.contains("approving this completes the lethal trifecta for agent"),
            "{text}"
        );
    }

    #[test]
    fn a_card_says_when_the_agent_was_not_confident_enough() {
        let mut r = request();
        r.risk = Risk::Low;
        r.rule = "low_confidence".into();
        r.rule_detail = format!(
            "the agent's confidence 0.42 is below 0.7, so a human decides; {}",
            "x".repeat(3000)
        );
        let c = render(&r, &settings(), true);
        check_limits(&c.payload);
        let text = all_text(&c.payload);
        assert!(text.contains("low_confidence"), "{text}");
        assert!(
            text.contains("the agent's confidence 0.42 is below 0.7"),
            "{text}"
        );
    }

    #[test]
    fn pings_follow_risk_and_config() {
        let mut r = request();
        r.risk = Risk::Critical;
        let p = render(&r, &settings(), true).payload;
        assert_eq!(p["allowed_mentions"]["roles"], json!(["31"]));
        assert_eq!(p["embeds"][0]["color"], colour::CRITICAL);
        let quiet = CardSettings {
            ping_admins: false,
            ..settings()
        };
        let p = render(&r, &quiet, true).payload;
        assert_eq!(p["allowed_mentions"]["roles"], json!([]));
        assert!(!p["content"].as_str().unwrap().contains("<@&"));
        r.state = State::Approved;
        let p = render(&r, &settings(), false).payload;
        assert_eq!(p["allowed_mentions"]["roles"], json!([]));
    }

    #[test]
    fn a_decided_card_shows_who_when_why_and_has_no_buttons() {
        let mut r = request();
        r.state = State::Denied;
        r.decided_who = Some("alice (discord:100)".into());
        r.decided_reason = Some("not today".into());
        r.decided_ms = Some(1_700_000_100_000);
        let p = render(&r, &settings(), false).payload;
        check_limits(&p);
        assert_eq!(p["components"], json!([]));
        assert_eq!(p["embeds"][0]["color"], colour::DENIED);
        let text = all_text(&p);
        assert!(text.contains("Denied"));
        assert!(text.contains("alice"));
        assert!(text.contains("<t:1700000100:f>"));
        assert!(text.contains("not today"));
        assert!(p.get("attachments").is_none(), "edits keep attachments");
    }

    /// Arguments and justifications a hijacked agent might send.
    fn spoofing_corpus() -> Vec<String> {
        vec![
            "```\n**APPROVED** by admin\n```".into(),
            "````` ``` `` `".into(),
            "@everyone @here please approve".into(),
            "<@100> <@!100> <@&30> <#20> <t:0:R>".into(),
            "[click here](https://evil.example/steal) https://evil.example".into(),
            "# ✅ Approved by carol\n> Keyturn: this request is safe\n-# system".into(),
            "zero\u{200B}width\u{200D}joiner\u{FEFF}bom\u{2060}".into(),
            "rtl \u{202E}exe.txt\u{202C} \u{2066}isolate\u{2069}".into(),
            "ctrl \u{0007}\u{001B}[31m red".into(),
            "x".repeat(10_000),
            "`".repeat(3000),
            "🙂".repeat(3000),
            "||spoiler|| ~~strike~~ __under__ *it*".into(),
        ]
    }

    #[test]
    fn the_spoofing_corpus_renders_safely() {
        for bad in spoofing_corpus() {
            let mut r = request();
            r.args = json!({"cmd": bad, "nested": {"k": bad}});
            r.justification = bad.clone();
            r.agent = bad.chars().take(64).collect();
            r.tool = bad.chars().take(128).collect();
            r.task_id = Some(bad.chars().take(200).collect());
            r.state = State::Denied;
            r.decided_who = Some(bad.chars().take(100).collect());
            r.decided_reason = Some(bad.clone());
            for creating in [true, false] {
                let c = render(&r, &settings(), creating);
                let p = &c.payload;
                check_limits(p);
                let text = all_text(p);
                fences_intact(&text);
                // Nothing hidden survives.
                assert!(!text.chars().any(is_hidden), "hidden char in {text:?}");
                // No mention, link or timestamp from the corpus is live. Inside code
                // blocks nothing renders, so look only outside them.
                let outside = outside_code(&text);
                for needle in ["@everyone", "@here", "<@", "<#", "](", "https://", "<t:0"] {
                    for (i, _) in outside.match_indices(needle) {
                        let before = &outside[..i];
                        assert!(
                            before.ends_with('\\') || ours(&outside, i),
                            "live `{needle}` outside code in {outside:?}"
                        );
                    }
                }
                assert_eq!(p["allowed_mentions"]["parse"], json!([]));
                if c.truncated && creating {
                    let f = c.file.as_ref().expect("file when truncated");
                    assert_eq!(f.filename, format!("request-{}.json", r.id));
                    let v: Value = serde_json::from_slice(&f.data).unwrap();
                    assert_eq!(v["justification"], json!(bad));
                    assert!(text.contains(TRUNCATED));
                }
            }
        }
    }

    /// Text outside fenced blocks and inline code spans.
    fn outside_code(text: &str) -> String {
        let mut out = String::new();
        for (i, part) in text.split("```").enumerate() {
            if i % 2 == 0 {
                for (j, p) in part.split('`').enumerate() {
                    if j % 2 == 0 {
                        out.push_str(p);
                    }
                }
            }
        }
        out
    }

    /// The mentions the card itself writes (role ping, deadline stamps).
    fn ours(text: &str, i: usize) -> bool {
        let rest = &text[i..];
        rest.starts_with("<@&30>")
            || rest.starts_with("<@42>")
            || rest.starts_with("<#7>")
            || rest.starts_with("<t:17")
    }

    #[test]
    fn long_arguments_are_cut_and_attached() {
        let mut r = request();
        r.args = json!({"blob": "y".repeat(5000)});
        let c = render(&r, &settings(), true);
        check_limits(&c.payload);
        assert!(c.truncated);
        let f = c.file.expect("file");
        assert_eq!(c.payload["attachments"][0]["filename"], json!(f.filename));
        let text = all_text(&c.payload);
        assert!(text.contains(TRUNCATED));
        assert!(text.contains(&format!("request-{}.json", r.id)));
    }

    #[test]
    fn a_two_person_card_counts_approvals() {
        let mut r = request();
        r.approvals_required = 2;
        let p = render_with_votes(&r, &settings(), false, &["alice (discord:100)".into()]).payload;
        check_limits(&p);
        let text = all_text(&p);
        assert!(text.contains("1 of 2: alice \\(discord:100\\)"), "{text}");
        assert_eq!(
            p["components"][0]["components"].as_array().unwrap().len(),
            4
        );
    }

    #[test]
    fn a_cut_reason_on_an_edit_promises_no_file() {
        let mut r = request();
        r.state = State::Denied;
        r.decided_who = Some("dave".into());
        r.decided_reason = Some("no ".repeat(400));
        let c = render(&r, &settings(), false);
        let footer = c.payload["embeds"][0]["footer"]["text"].as_str().unwrap();
        assert!(!footer.contains(".json"), "{footer}");
        assert!(footer.contains("reason truncated"), "{footer}");
        // Posted fresh, the file is not attached for a reason either.
        assert!(render(&r, &settings(), true).file.is_none());
    }

    fn plan(argv: &[&str], profile: Profile) -> crate::domain::run::RunPlan {
        crate::domain::run::RunPlan {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            profile,
            network: crate::domain::run::Network::None,
            writable: vec!["/srv/out".into()],
            credentials: vec!["kube".into()],
            timeout_ms: 60_000,
        }
    }

    fn run_tool_request(argv: &[&str], profile: Profile) -> ApprovalRequest {
        let mut r = request();
        r.tool = "kubectl_get".into();
        r.run = Some(plan(argv, profile));
        r
    }

    const RUN_ID: &str = "01937a4e-8c2b-7f3d-9a1e-0123456789ab";

    fn record(state: RunState) -> RunRecord {
        RunRecord {
            id: RUN_ID.into(),
            request_id: request().id,
            agent: "ci-bot".into(),
            tool: "kubectl_get".into(),
            argv: vec!["kubectl".into()],
            profile: Profile::Bwrap,
            pid: Some(4242),
            host: "h".into(),
            server_pid: 1,
            approved_by: "alice (discord:100)".into(),
            started_ms: 1_700_000_010_000,
            deadline_ms: 1_700_000_070_000,
            state,
            ended_ms: (state != RunState::Running).then_some(1_700_000_022_345),
            exit_code: None,
            signal: None,
            stdout_sha256: None,
            stderr_sha256: None,
            kill_requested_by: None,
        }
    }

    fn field_value(payload: &Value, name: &str) -> Option<String> {
        payload["embeds"][0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["value"].as_str().unwrap().to_string())
    }

    /// The argv as the card shows it, parsed back from its code block.
    fn shown_argv(payload: &Value) -> Vec<String> {
        let v = field_value(payload, "Will run").expect("Will run field");
        let body = v
            .strip_prefix("```json\n")
            .and_then(|b| b.strip_suffix("\n```"))
            .unwrap_or_else(|| panic!("not one json block: {v}"));
        assert!(!body.contains('`'), "{body}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    fn custom_ids(payload: &Value) -> Vec<String> {
        payload["components"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row["components"].as_array().unwrap().iter())
            .map(|b| b["custom_id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_run_tool_card_shows_the_argv_exactly() {
        let argv = [
            "kubectl",
            "--namespace",
            "prod east",
            "a `tick` and ```fence```",
            "it's \"quoted\" \\ back",
            "",
            " lead and trail ",
            "zero\u{200B}width \u{202E}rtl",
            "new\nline\ttab",
            "--all",
        ];
        let r = run_tool_request(&argv, Profile::Bwrap);
        for creating in [true, false] {
            let c = render_card(&r, &settings(), creating, &[], None);
            check_limits(&c.payload);
            assert!(!c.truncated);
            let text = all_text(&c.payload);
            fences_intact(&text);
            assert!(!text.chars().any(is_hidden), "{text:?}");
            assert_eq!(shown_argv(&c.payload), argv, "every element exactly");
            // One element a line: the one with spaces reads as one.
            let v = field_value(&c.payload, "Will run").unwrap();
            assert!(v.contains("\n  \"prod east\",\n"), "{v}");
            assert!(v.contains("\\u0060tick\\u0060"), "{v}");
            let sandbox = field_value(&c.payload, "Sandbox").unwrap();
            assert!(sandbox.contains("bubblewrap"), "{sandbox}");
            assert!(!sandbox.contains("NOT SANDBOXED"), "{sandbox}");
            assert!(sandbox.contains("kube") && sandbox.contains("/srv/out"));
            // Pending: the decision buttons, no Kill and no run yet.
            assert!(field_value(&c.payload, "Run").is_none());
            assert_eq!(custom_ids(&c.payload).len(), 4);
        }
        // A request that is not a run-tool shows none of it.
        let p = render(&request(), &settings(), true).payload;
        assert!(field_value(&p, "Will run").is_none());
        assert!(field_value(&p, "Sandbox").is_none());
    }

    #[test]
    fn a_host_profile_card_says_it_is_not_sandboxed() {
        let r = run_tool_request(&["make", "deploy"], Profile::Host);
        let p = render_card(&r, &settings(), true, &[], None).payload;
        check_limits(&p);
        let sandbox = field_value(&p, "Sandbox").unwrap();
        assert!(sandbox.starts_with("⚠️ **NOT SANDBOXED**"), "{sandbox}");
        assert!(sandbox.contains("NOT sandboxed"), "{sandbox}");
    }

    #[test]
    fn a_running_run_shows_since_when_its_pid_and_a_kill_button() {
        let mut r = run_tool_request(&["sleep", "100"], Profile::Bwrap);
        r.state = State::Approved;
        r.decided_who = Some("alice (discord:100)".into());
        let run = record(RunState::Running);
        let p = render_card(&r, &settings(), false, &[], Some(&run)).payload;
        check_limits(&p);
        let v = field_value(&p, "Run").unwrap();
        assert!(v.contains("**running** since <t:1700000010:R>"), "{v}");
        assert!(v.contains("pid 4242"), "{v}");
        assert!(v.contains(RUN_ID), "{v}");
        let ids = custom_ids(&p);
        assert_eq!(ids, vec![format!("keyturn:v1:kill:{RUN_ID}")]);
        assert_eq!(p["components"][0]["components"][0]["label"], "Kill");
        assert_eq!(p["components"][0]["components"][0]["style"], 4);
        // A kill asked for shows who asked, escaped.
        let mut asked = run.clone();
        asked.kill_requested_by = Some("discord:100 @everyone".into());
        let v = field_value(
            &render_card(&r, &settings(), false, &[], Some(&asked)).payload,
            "Run",
        )
        .unwrap();
        assert!(
            v.contains("kill asked for by discord:100 \\@everyone"),
            "{v}"
        );
    }

    #[test]
    fn an_ended_run_shows_how_and_how_long_and_has_no_kill_button() {
        let mut r = run_tool_request(&["make"], Profile::Bwrap);
        r.state = State::Approved;
        let cases: Vec<(RunRecord, &str)> = vec![
            (
                RunRecord {
                    exit_code: Some(3),
                    ..record(RunState::Exited)
                },
                "**exited** with code 3 after 12.3 s (<t:1700000022:f>)",
            ),
            (
                RunRecord {
                    signal: Some(9),
                    ..record(RunState::Exited)
                },
                "**exited**: killed by signal 9 after 12.3 s",
            ),
            (
                RunRecord {
                    kill_requested_by: Some("discord:100".into()),
                    ..record(RunState::Killed)
                },
                "**killed** by discord:100 after 12.3 s",
            ),
            (
                record(RunState::TimedOut),
                "**timed out** (limit 1 min 00 s) after 12.3 s",
            ),
            (record(RunState::FailedToStart), "**failed to start**"),
            (
                record(RunState::Interrupted),
                "**interrupted**: Keyturn stopped while it ran",
            ),
        ];
        for (run, want) in cases {
            let p = render_card(&r, &settings(), false, &[], Some(&run)).payload;
            check_limits(&p);
            let v = field_value(&p, "Run").unwrap();
            assert!(v.contains(want), "{want} in {v}");
            assert!(v.contains(RUN_ID), "{v}");
            assert_eq!(p["components"], json!([]), "no Kill once ended");
        }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(-5), "0 ms");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(245_000), "4 min 05 s");
        assert_eq!(duration(7_380_000), "2 h 03 min");
    }

    #[test]
    fn a_long_argv_is_cut_at_the_field_limit_and_attached() {
        // The block's fences and the array around one element.
        let overhead =
            length(&code_block(&argv_json(&["a".into(), String::new()]), "json", 5000).0);
        let at = "x".repeat(ARGV_BUDGET - overhead);
        let c = render_card(
            &run_tool_request(&["a", &at], Profile::Bwrap),
            &settings(),
            true,
            &[],
            None,
        );
        check_limits(&c.payload);
        let v = field_value(&c.payload, "Will run").unwrap();
        assert_eq!(length(&v), ARGV_BUDGET);
        assert!(!c.truncated && c.file.is_none());
        assert_eq!(shown_argv(&c.payload), vec!["a".to_string(), at.clone()]);
        // One character more: cut, marked, and the full argv attached.
        let past = format!("{at}x");
        let r = run_tool_request(&["a", &past], Profile::Bwrap);
        let c = render_card(&r, &settings(), true, &[], None);
        check_limits(&c.payload);
        let v = field_value(&c.payload, "Will run").unwrap();
        assert!(length(&v) <= ARGV_BUDGET);
        assert!(v.contains(TRUNCATED), "{v}");
        assert!(c.truncated);
        let f = c.file.expect("file");
        let full: Value = serde_json::from_slice(&f.data).unwrap();
        assert_eq!(full["run"]["argv"], json!(["a", past]));
        // Thousands of elements, each with markup, stay within limits.
        let many: Vec<String> = (0..5000).map(|i| format!("`@everyone {i}`")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let c = render_card(
            &run_tool_request(&many, Profile::Host),
            &settings(),
            true,
            &[],
            None,
        );
        check_limits(&c.payload);
        fences_intact(&all_text(&c.payload));
        assert!(c.truncated);
    }

    #[test]
    fn a_run_tool_card_with_everything_at_its_longest_fits() {
        for bad in spoofing_corpus() {
            let long: Vec<String> = (0..50).map(|_| bad.clone()).collect();
            let long: Vec<&str> = long.iter().map(String::as_str).collect();
            let mut r = run_tool_request(&long, Profile::Host);
            if let Some(p) = r.run.as_mut() {
                p.writable = vec![bad.clone(); 20];
                p.credentials = vec![bad.clone(); 20];
            }
            r.args = json!({"cmd": bad});
            r.justification = bad.clone();
            r.agent = bad.chars().take(64).collect();
            r.tool = bad.chars().take(128).collect();
            r.task_id = Some(bad.chars().take(200).collect());
            r.rule_detail = bad.clone();
            r.flags = vec![json!(bad.chars().take(300).collect::<String>())];
            let mut run = record(RunState::Running);
            run.id = bad.chars().take(200).collect();
            run.kill_requested_by = Some(bad.clone());
            // Pending with a vote count, then decided with a reason and a run.
            r.approvals_required = 2;
            let names = vec![bad.chars().take(200).collect::<String>(); 3];
            let c = render_card(&r, &settings(), true, &names, None);
            check_limits(&c.payload);
            fences_intact(&all_text(&c.payload));
            // Edited by an approver: the diff and who edited are shown too.
            r.edit = Some(crate::domain::request::ArgsEdit {
                original_args: json!({"cmd": format!("{bad}{bad}"), "old": bad}),
                original_args_hash: "h0".into(),
                by: bad.chars().take(200).collect(),
                at_ms: 1_700_000_400_000,
            });
            let c = render_card(&r, &settings(), false, &names, None);
            check_limits(&c.payload);
            fences_intact(&all_text(&c.payload));
            r.state = State::Approved;
            r.decided_who = Some(bad.chars().take(200).collect());
            r.decided_reason = Some(bad.clone());
            for state in [RunState::Running, RunState::Killed] {
                run.state = state;
                let c = render_card(&r, &settings(), false, &names, Some(&run));
                check_limits(&c.payload);
                let text = all_text(&c.payload);
                fences_intact(&text);
                assert!(!text.chars().any(is_hidden), "hidden char in {text:?}");
                let outside = outside_code(&text);
                for needle in ["@everyone", "@here", "<@", "<#", "](", "https://", "<t:0"] {
                    for (i, _) in outside.match_indices(needle) {
                        assert!(
                            outside[..i].ends_with('\\') || ours(&outside, i),
                            "live `{needle}` outside code in {outside:?}"
                        );
                    }
                }
            }
        }
    }
}
