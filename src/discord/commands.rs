//! Slash commands: their definitions (registered as guild commands at
//! start) and what each does. Admin commands are hidden from members
//! without Manage Server, and checked again here against the configured
//! admin role, because Discord's default permissions can be changed by any
//! server admin. `/runs` is for approvers and admins alike (approvers may
//! kill runs), so it is visible to every member and checked here against
//! the configured roles.

use super::card::run_summary;
use super::escape::{code_block, fit, inline_code, length, plain, trusted};
use crate::app::ports::RunRecord;
use crate::app::{AppError, Gateway};
use crate::domain::policy::Effect;
use crate::domain::run::RunState;
use crate::domain::stats::{self, Outcome as CallOutcome, StatsReport};
use serenity::all::{
    CommandDataOption, CommandDataOptionValue, CommandOptionType, CreateCommand,
    CreateCommandOption, CreateEmbed, Permissions,
};
use std::sync::Arc;

/// Longest reply we send (Discord's content limit is 2000).
const REPLY_BUDGET: usize = 1900;
/// Running runs `/runs` lists at most.
pub const RUNS_RUNNING_SHOWN: u32 = 20;
/// Ended runs `/runs` lists after the running ones.
pub const RUNS_ENDED_SHOWN: usize = 5;

/// Every command Keyturn registers.
pub fn definitions() -> Vec<CreateCommand> {
    let admin = Permissions::MANAGE_GUILD;
    let scope = |required: bool| {
        let mut o = CreateCommandOption::new(
            CommandOptionType::String,
            "scope",
            "Where the grant applies",
        )
        .required(required);
        for s in ["global", "agent", "role", "channel", "user"] {
            o = o.add_string_choice(s, s);
        }
        o
    };
    let target = || {
        CreateCommandOption::new(
            CommandOptionType::String,
            "target",
            "The agent name, role, channel or user id (empty for global)",
        )
        .max_length(100)
    };
    let tool = |required: bool| {
        CreateCommandOption::new(
            CommandOptionType::String,
            "tool",
            "A tool name or glob such as fs.*",
        )
        .required(required)
        .max_length(128)
    };
    let effect = || {
        CreateCommandOption::new(
            CommandOptionType::String,
            "effect",
            "allow (default) or deny",
        )
        .add_string_choice("allow", "allow")
        .add_string_choice("deny", "deny")
    };
    let grant_like = |name: &str, what: &str| {
        CreateCommandOption::new(CommandOptionType::SubCommand, name, what)
            .add_sub_option(scope(true))
            .add_sub_option(tool(true))
            .add_sub_option(target())
            .add_sub_option(effect())
    };
    let agent_name = || {
        CreateCommandOption::new(CommandOptionType::String, "name", "The agent's name")
            .required(true)
            .max_length(64)
    };
    let reason = || {
        CreateCommandOption::new(
            CommandOptionType::String,
            "reason",
            "Why (shown with every denial, recorded in the audit log)",
        )
        .max_length(500)
    };
    vec![
        CreateCommand::new("tools")
            .description("Keyturn tool allowlist")
            .default_member_permissions(admin)
            .add_option(grant_like("grant", "Allow (or deny) a tool in a scope"))
            .add_option(grant_like("revoke", "Remove a grant"))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "revoke_grant",
                    "Remove a time-boxed grant (from Allow for…) by its id",
                )
                .add_sub_option(
                    CreateCommandOption::new(
                        CommandOptionType::String,
                        "grant",
                        "The grant's id (tg-…), as /tools list shows it",
                    )
                    .required(true)
                    .max_length(64),
                ),
            )
            .add_option(
                CreateCommandOption::new(CommandOptionType::SubCommand, "list", "List grants")
                    .add_sub_option(scope(false))
                    .add_sub_option(target()),
            )
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "effective",
                    "Which scope decides for a user in a channel, and why",
                )
                .add_sub_option(
                    CreateCommandOption::new(CommandOptionType::User, "user", "The user")
                        .required(true),
                )
                .add_sub_option(CreateCommandOption::new(
                    CommandOptionType::Channel,
                    "channel",
                    "The channel",
                ))
                .add_sub_option(tool(false))
                .add_sub_option(
                    CreateCommandOption::new(CommandOptionType::String, "agent", "Agent name")
                        .max_length(64),
                ),
            ),
        CreateCommand::new("pending")
            .description("Open Keyturn requests, with links to their cards")
            .default_member_permissions(admin),
        CreateCommand::new("audit")
            .description("Keyturn audit log")
            .default_member_permissions(admin)
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "recent",
                    "The newest audit entries",
                )
                .add_sub_option(
                    CreateCommandOption::new(
                        CommandOptionType::Integer,
                        "count",
                        "How many (1-50)",
                    )
                    .min_int_value(1)
                    .max_int_value(50),
                ),
            ),
        CreateCommand::new("pairing")
            .description("Users Keyturn may act for")
            .default_member_permissions(admin)
            .add_option(CreateCommandOption::new(
                CommandOptionType::SubCommand,
                "list",
                "Paired users and live codes",
            ))
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "approve",
                    "Approve a pairing code",
                )
                .add_sub_option(
                    CreateCommandOption::new(CommandOptionType::String, "code", "The code")
                        .required(true)
                        .max_length(32),
                ),
            )
            .add_option(
                CreateCommandOption::new(CommandOptionType::SubCommand, "revoke", "Unpair a user")
                    .add_sub_option(
                        CreateCommandOption::new(CommandOptionType::User, "user", "The user")
                            .required(true),
                    ),
            ),
        CreateCommand::new("agent")
            .description("Keyturn kill switch: pause or resume agents")
            .default_member_permissions(admin)
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "pause",
                    "Deny every call of an agent and cancel its pending requests",
                )
                .add_sub_option(agent_name())
                .add_sub_option(reason()),
            )
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "resume",
                    "Lift an agent's pause",
                )
                .add_sub_option(agent_name()),
            )
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::SubCommand,
                    "pause-all",
                    "Pause every agent",
                )
                .add_sub_option(reason()),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::SubCommand,
                "resume-all",
                "Lift the global pause (agents paused one by one stay paused)",
            )),
        CreateCommand::new("pair").description("Ask Keyturn for a pairing code"),
        CreateCommand::new("runs")
            .description("Runs Keyturn started: those running, then the last ended (approvers)"),
        CreateCommand::new("stats")
            .description("Keyturn usage: calls by outcome, tool and agent; decision times")
            .add_option(
                CreateCommandOption::new(
                    CommandOptionType::String,
                    "since",
                    "How far back, e.g. 24h or 7d (default 24h)",
                )
                .max_length(16),
            ),
    ]
}

/// Whether a command needs the admin role.
pub fn is_admin_command(name: &str) -> bool {
    matches!(name, "tools" | "pending" | "audit" | "pairing" | "agent")
}

/// Whether a command needs the approver role (admins have it too).
pub fn is_approver_command(name: &str) -> bool {
    matches!(name, "runs" | "stats")
}

/// Flattened options: the subcommand name and its (name, value) pairs as text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: String,
    pub sub: Option<String>,
    pub opts: Vec<(String, String)>,
}

impl Invocation {
    pub fn from_options(command: &str, options: &[CommandDataOption]) -> Invocation {
        let mut inv = Invocation {
            command: command.to_string(),
            ..Invocation::default()
        };
        for o in options {
            match &o.value {
                CommandDataOptionValue::SubCommand(inner) => {
                    inv.sub = Some(o.name.clone());
                    inv.opts.extend(inner.iter().filter_map(flat));
                }
                _ => inv.opts.extend(flat(o)),
            }
        }
        inv
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn need(&self, name: &str) -> Result<&str, String> {
        self.get(name)
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| format!("option `{name}` is required"))
    }
}

fn flat(o: &CommandDataOption) -> Option<(String, String)> {
    let v = match &o.value {
        CommandDataOptionValue::String(s) => s.clone(),
        CommandDataOptionValue::Integer(i) => i.to_string(),
        CommandDataOptionValue::Boolean(b) => b.to_string(),
        CommandDataOptionValue::Number(n) => n.to_string(),
        CommandDataOptionValue::User(u) => u.to_string(),
        CommandDataOptionValue::Channel(c) => c.to_string(),
        CommandDataOptionValue::Role(r) => r.to_string(),
        CommandDataOptionValue::Mentionable(m) => m.to_string(),
        _ => return None,
    };
    Some((o.name.clone(), v))
}

/// What a command did, for the reply and for the bot's follow-up actions.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reply: String,
    /// A user to DM, and the message (pairing approved).
    pub dm: Option<(String, String)>,
}

fn reply(text: impl Into<String>) -> Outcome {
    Outcome {
        reply: text.into(),
        dm: None,
    }
}

/// Runs an admin or `/pair` command for `actor_id`. The admin check has
/// been done by the caller. Errors are safe to show.
pub async fn run(
    gw: &Arc<Gateway>,
    inv: &Invocation,
    actor_id: u64,
    actor_name: &str,
    card_link: impl Fn(u64, u64) -> String,
) -> Result<Outcome, String> {
    let by = format!("discord:{actor_id}");
    let shown = |e: AppError| match e {
        AppError::Store(e) => {
            // The reply sends the user to the log: put the cause there.
            tracing::error!(command = %inv.command, error = %e, "a slash command failed in the store");
            "something went wrong (see the server log)".to_string()
        }
        other => other.to_string(),
    };
    match (inv.command.as_str(), inv.sub.as_deref()) {
        ("tools", Some(sub @ ("grant" | "revoke"))) => {
            let kind = inv.need("scope")?;
            let target = inv.get("target").unwrap_or("").trim();
            let scope = if kind == "global" {
                if !target.is_empty() {
                    return Err("option `target` must be empty for scope `global`".into());
                }
                "global".to_string()
            } else {
                if target.is_empty() {
                    return Err(format!(
                        "option `target` is required for scope `{kind}` (e.g. an id)"
                    ));
                }
                format!("{kind}:{target}")
            };
            let tool = inv.need("tool")?.trim();
            let effect = match inv.get("effect").unwrap_or("allow") {
                "deny" => Effect::Deny,
                "allow" => Effect::Allow,
                other => {
                    return Err(format!(
                        "option `effect`: `{}` is not allow or deny",
                        plain(other)
                    ))
                }
            };
            let changed = if sub == "grant" {
                gw.grant(&scope, tool, effect, &by).await
            } else {
                gw.revoke(&scope, tool, effect, &by).await
            }
            .map_err(|e| format!("cannot {sub}: {}", shown(e)))?;
            let what = match effect {
                Effect::Allow => "allow",
                Effect::Deny => "deny",
            };
            Ok(reply(match (sub, changed) {
                ("grant", true) => format!(
                    "Granted: {what} {} in {}.",
                    inline_code(tool, 140),
                    inline_code(&scope, 120)
                ),
                ("grant", false) => format!(
                    "Already granted: {what} {} in {}.",
                    inline_code(tool, 140),
                    inline_code(&scope, 120)
                ),
                (_, true) => format!(
                    "Revoked: {what} {} in {}.",
                    inline_code(tool, 140),
                    inline_code(&scope, 120)
                ),
                (_, false) => format!(
                    "No such grant: {what} {} in {}.",
                    inline_code(tool, 140),
                    inline_code(&scope, 120)
                ),
            }))
        }
        ("tools", Some("revoke_grant")) => {
            let id = inv.need("grant")?.trim();
            let changed = gw
                .revoke_timed(id, &by)
                .await
                .map_err(|e| format!("cannot revoke: {}", shown(e)))?;
            Ok(reply(if changed {
                format!("Revoked grant {}.", inline_code(id, 70))
            } else {
                format!("No such grant: {}.", inline_code(id, 70))
            }))
        }
        ("tools", Some("list")) => {
            let scope = match (inv.get("scope"), inv.get("target").map(str::trim)) {
                (None, _) => None,
                (Some("global"), _) => Some("global".to_string()),
                (Some(k), Some(t)) if !t.is_empty() => Some(format!("{k}:{t}")),
                (Some(k), _) => return Err(format!("option `target` is required for scope `{k}`")),
            };
            let grants = gw.grants(scope.as_deref()).await.map_err(shown)?;
            // Time-boxed grants are listed with the full list only (they
            // have no allowlist scope), each with its expiry.
            let timed = if scope.is_none() {
                gw.timed_grants(None, None)
            } else {
                Vec::new()
            };
            if grants.is_empty() && timed.is_empty() {
                return Ok(reply("No grants."));
            }
            let timed_lines: Vec<String> = timed
                .iter()
                .map(|g| {
                    format!(
                        "allow  {} for agent {}{} ({}) {} [{}] by {}, from request {}",
                        g.tool,
                        g.agent,
                        g.user_id
                            .as_deref()
                            .map(|u| format!(" and user {u}"))
                            .unwrap_or_default(),
                        g.kind.describe(),
                        g.until(),
                        g.id,
                        g.created_by,
                        g.origin_request
                    )
                })
                .collect();
            let mut lines: Vec<String> = grants
                .iter()
                .map(|g| {
                    format!(
                        "{:<6} {:<24} {} ({})",
                        match g.grant.effect {
                            Effect::Allow => "allow",
                            Effect::Deny => "deny",
                        },
                        g.grant.scope.to_string(),
                        g.grant.tool.as_str(),
                        g.created_by
                    )
                })
                .collect();
            if !timed_lines.is_empty() {
                lines.push("time-boxed:".into());
                lines.extend(timed_lines);
            }
            Ok(reply(format!(
                "Grants:\n{}",
                code_block(&lines.join("\n"), "text", REPLY_BUDGET - 20).0
            )))
        }
        ("tools", Some("effective")) => {
            let user = inv.need("user")?;
            let channel = inv.get("channel");
            let tool = inv.get("tool").unwrap_or("*");
            let agent = inv.get("agent").unwrap_or("");
            let a = gw
                .effective(agent, Some(user), channel, None, tool)
                .map_err(|e| format!("option `tool`: {}", shown(e)))?;
            let mut text = format!(
                "For user {} in channel {}, tool {}: **{}** ({})\nDeciding scope: {}\n{}",
                inline_code(user, 30),
                channel.map_or("—".to_string(), |c| inline_code(c, 30)),
                inline_code(tool, 140),
                if a.allowed { "allowed" } else { "not allowed" },
                inline_code(a.rule, 60),
                a.deciding_scope.unwrap_or("none (fail closed)"),
                trusted(&a.detail),
            );
            if !a.entries.is_empty() {
                let lines: Vec<String> = a
                    .entries
                    .iter()
                    .map(|g| format!("{:?} {} {}", g.effect, g.scope, g.tool.as_str()))
                    .collect();
                text.push('\n');
                text.push_str(&code_block(&lines.join("\n"), "text", 1000).0);
            }
            // Time-boxed grants for this agent and user: they stand in for
            // an approval (never for the allowlist above), until expiry.
            let timed: Vec<String> = gw
                .timed_grants(Some(agent), Some(tool))
                .iter()
                .filter(|g| g.user_id.is_none() || g.user_id.as_deref() == Some(user))
                .map(|g| format!("{} {} ({}) {}", g.id, g.tool, g.kind.describe(), g.until()))
                .collect();
            if !timed.is_empty() {
                text.push_str("\nTime-boxed grants (in place of an approval):\n");
                text.push_str(&code_block(&timed.join("\n"), "text", 600).0);
            }
            Ok(reply(text))
        }
        ("pending", _) => {
            let list = gw.pending(20).await.map_err(shown)?;
            if list.is_empty() {
                return Ok(reply("No pending requests."));
            }
            let mut lines = Vec::new();
            for r in &list {
                let link = match gw.card(r.id).await {
                    Ok(Some(c)) => c
                        .message_id
                        .map(|m| card_link(c.channel_id, m))
                        .unwrap_or_else(|| "card not posted yet".into()),
                    _ => "no card".into(),
                };
                lines.push(format!(
                    "• {} ({}) from {} — deadline <t:{}:R> — {link}",
                    inline_code(&r.tool, 60),
                    r.risk,
                    inline_code(&r.agent, 40),
                    r.deadline_ms.div_euclid(1000)
                ));
            }
            Ok(reply(super::escape::fit(&lines.join("\n"), REPLY_BUDGET).0))
        }
        ("audit", _) => {
            let n = inv
                .get("count")
                .map(|c| {
                    c.parse::<u32>()
                        .map_err(|_| "option `count` must be 1-50".to_string())
                })
                .transpose()?
                .unwrap_or(10);
            if !(1..=50).contains(&n) {
                return Err("option `count` must be 1-50".into());
            }
            let entries = gw.audit_tail(n).await.map_err(shown)?;
            let lines: Vec<String> = entries
                .iter()
                .map(|e| {
                    format!(
                        "#{} {} {} {}",
                        e.seq,
                        e.event.kind,
                        e.event.actor,
                        e.event.request_id.as_deref().unwrap_or("")
                    )
                })
                .collect();
            if lines.is_empty() {
                return Ok(reply("The audit log is empty."));
            }
            Ok(reply(code_block(&lines.join("\n"), "text", REPLY_BUDGET).0))
        }
        ("pairing", Some("list")) => {
            let (users, codes) = gw.pairings().await.map_err(shown)?;
            let mut text = String::from("Paired users:\n");
            let u: Vec<String> = users
                .iter()
                .map(|u| format!("{} (by {})", u.user_id, u.paired_by))
                .collect();
            let c: Vec<String> = codes
                .iter()
                .map(|c| {
                    format!(
                        "{} {} expires {}",
                        c.user_id,
                        c.display_name.as_deref().unwrap_or(""),
                        c.expires_ms / 1000
                    )
                })
                .collect();
            text.push_str(&code_block(&u.join("\n"), "text", 900).0);
            text.push_str("\nWaiting for approval:\n");
            text.push_str(&code_block(&c.join("\n"), "text", 900).0);
            Ok(reply(text))
        }
        ("pairing", Some("approve")) => {
            let code = inv.need("code")?;
            let user = gw
                .approve_pairing(code, &by)
                .await
                .map_err(|e| format!("option `code`: {}", shown(e)))?;
            Ok(Outcome {
                reply: format!("Paired user {}.", inline_code(&user.user_id, 30)),
                dm: Some((
                    user.user_id.clone(),
                    "You are now paired with Keyturn: agents may act on your behalf.".into(),
                )),
            })
        }
        ("pairing", Some("revoke")) => {
            let user = inv.need("user")?;
            let removed = gw
                .revoke_pairing(user, &by)
                .await
                .map_err(|e| format!("option `user`: {}", shown(e)))?;
            Ok(reply(if removed {
                format!("Unpaired user {}.", inline_code(user, 30))
            } else {
                format!("User {} was not paired.", inline_code(user, 30))
            }))
        }
        ("runs", _) => {
            let running = gw.runs(true, RUNS_RUNNING_SHOWN).await.map_err(shown)?;
            let recent = gw
                .runs(false, RUNS_RUNNING_SHOWN + RUNS_ENDED_SHOWN as u32)
                .await
                .map_err(shown)?;
            let ended: Vec<RunRecord> = recent
                .into_iter()
                .filter(|r| r.state != RunState::Running)
                .take(RUNS_ENDED_SHOWN)
                .collect();
            Ok(reply(runs_text(&running, &ended)))
        }
        ("agent", Some(sub @ ("pause" | "pause-all"))) => {
            let name = if sub == "pause" {
                Some(inv.need("name")?.trim())
            } else {
                None
            };
            let reason = inv
                .get("reason")
                .map(str::to_string)
                .filter(|r| !r.trim().is_empty());
            let a = gw
                .pause_agent(name, reason, &by)
                .await
                .map_err(|e| format!("cannot pause: {}", shown(e)))?;
            let who = match name {
                Some(n) => format!("Agent {}", inline_code(n, 70)),
                None => "Every agent".to_string(),
            };
            let why = a
                .pause
                .reason
                .as_deref()
                .map(|r| format!(" Reason: {}", plain(r)))
                .unwrap_or_default();
            Ok(reply(
                super::escape::fit(
                    &format!(
                        "{who} {} (by {}).{why}\n{} pending request(s) cancelled.",
                        if a.paused {
                            "is now paused"
                        } else {
                            "was already paused"
                        },
                        plain(&a.pause.paused_by),
                        a.cancelled
                    ),
                    REPLY_BUDGET,
                )
                .0,
            ))
        }
        ("agent", Some(sub @ ("resume" | "resume-all"))) => {
            let name = if sub == "resume" {
                Some(inv.need("name")?.trim())
            } else {
                None
            };
            let a = gw
                .resume_agent(name, &by)
                .await
                .map_err(|e| format!("cannot resume: {}", shown(e)))?;
            let who = match name {
                Some(n) => format!("Agent {}", inline_code(n, 70)),
                None => "The global pause".to_string(),
            };
            let mut text = if a.resumed {
                format!("{who} is resumed.")
            } else {
                format!("{who} was not paused.")
            };
            if let Some(p) = &a.still_paused_by {
                text.push_str(&format!(
                    " It is still stopped by the global pause (by {}).",
                    plain(&p.paused_by)
                ));
            }
            Ok(reply(text))
        }
        ("pair", _) => {
            let (code, expires) = gw
                .request_pairing(&actor_id.to_string(), Some(actor_name.to_string()))
                .await
                .map_err(shown)?;
            Ok(reply(pairing_text(&code, expires)))
        }
        _ => Err(format!(
            "unknown command `{}`",
            plain(&format!(
                "{} {}",
                inv.command,
                inv.sub.as_deref().unwrap_or("")
            ))
        )),
    }
}

/// One run as a `/runs` line: id, tool, agent, how it stands, when it
/// started and its pid.
pub fn run_line(r: &RunRecord) -> String {
    // A running run's summary already says since when and its pid.
    let started = if r.state == RunState::Running {
        String::new()
    } else {
        let pid = r.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
        format!(" · started <t:{}:f>{pid}", r.started_ms.div_euclid(1000))
    };
    format!(
        "• {} {} from {} — {}{started}",
        inline_code(&r.id, 40),
        inline_code(&r.tool, 60),
        inline_code(&r.agent, 40),
        run_summary(r)
    )
}

/// The `/runs` reply: the running runs, then the last ended ones, as many
/// whole lines as fit in a message (then how many were left out).
pub fn runs_text(running: &[RunRecord], ended: &[RunRecord]) -> String {
    let mut out = String::new();
    let mut left_out = 0usize;
    let mut push = |out: &mut String, line: String| {
        // Room is kept for the "left out" line.
        if left_out == 0 && length(out) + length(&line) < REPLY_BUDGET - 60 {
            out.push_str(&line);
            out.push('\n');
        } else {
            left_out += 1;
        }
    };
    if running.is_empty() {
        push(&mut out, "No runs are running.".into());
    } else {
        push(&mut out, format!("**Running** ({}):", running.len()));
        for r in running {
            push(&mut out, run_line(r));
        }
    }
    if !ended.is_empty() {
        push(&mut out, "**Recently ended:**".into());
        for r in ended {
            push(&mut out, run_line(r));
        }
    }
    if left_out > 0 {
        out.push_str(&format!("… {left_out} more lines left out."));
    }
    fit(out.trim_end(), REPLY_BUDGET).0
}

/// What the clicker of a Kill button is told (ephemerally). `run_id` is
/// the canonical UUID from the button; `outcome` holds the run as the
/// registry had it after the click, and whether this click asked for the
/// kill (`false`: the run had already ended).
pub fn kill_answer(run_id: &str, outcome: &Result<(RunRecord, bool), AppError>) -> String {
    let id = inline_code(run_id, 40);
    match outcome {
        Ok((r, true)) if r.state == RunState::Running => format!(
            "Kill sent to run {id} ({} from {}): it is being stopped; its card shows when it has ended.",
            inline_code(&r.tool, 60),
            inline_code(&r.agent, 40)
        ),
        Ok((r, true)) => format!(
            "Run {id} ({} from {}) has stopped: {}.",
            inline_code(&r.tool, 60),
            inline_code(&r.agent, 40),
            run_summary(r)
        ),
        Ok((r, false)) => format!(
            "Run {id} had already ended, so nothing was killed: {}.",
            run_summary(r)
        ),
        Err(AppError::NotFound(_)) => {
            format!("Keyturn has no run {id}, so nothing was killed.")
        }
        Err(AppError::Run {
            code: "not_running",
            ..
        }) => format!("Run {id} is not running any more, so nothing was killed."),
        Err(AppError::Store(_)) => format!(
            "Something went wrong: the kill of run {id} was not recorded, so it may still be running (see the server log)."
        ),
        Err(e) => format!("Nothing was killed: {}", plain(&e.to_string())),
    }
}

/// The chart's file name, as the embed refers to it.
pub const CHART_FILE: &str = "stats.png";
/// Longest value of one `/stats` embed field (Discord allows 1024; seven
/// of these, the title and the description stay under the 6000 total).
const STATS_FIELD_BUDGET: usize = 700;
/// Lines per `/stats` list.
const STATS_LINES: usize = 10;

/// What `/stats` answers: an embed and, unless it could not be drawn, the
/// chart to attach as [`CHART_FILE`].
pub struct StatsAnswer {
    pub embed: CreateEmbed,
    pub chart: Option<Vec<u8>>,
}

/// Runs `/stats [since]` (the role check has been done by the caller).
/// Errors are safe to show.
pub async fn stats_command(gw: &Arc<Gateway>, inv: &Invocation) -> Result<StatsAnswer, String> {
    let since = inv.get("since").map(str::trim).filter(|s| !s.is_empty());
    let window = match since {
        Some(s) => stats::parse_window(s).map_err(|e| format!("option `since`: {}", plain(&e)))?,
        None => stats::DEFAULT_WINDOW_SECS,
    };
    let report = gw.stats_report(window).await.map_err(|e| match e {
        AppError::Store(_) => "something went wrong (see the server log)".to_string(),
        other => other.to_string(),
    })?;
    let chart = match super::chart::outcome_chart(&report.outcomes) {
        Ok(png) => Some(png),
        Err(e) => {
            tracing::warn!(error = %e, "stats chart not drawn");
            None
        }
    };
    Ok(StatsAnswer {
        embed: stats_embed(&report, since.unwrap_or("24h"), chart.is_some()),
        chart,
    })
}

/// Seconds with one decimal, e.g. `12.5s`.
fn secs(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// A `/stats` field value: the lines, or `none`, within the budget.
fn field_lines(lines: Vec<String>, omitted: u64) -> String {
    if lines.is_empty() {
        return "none".into();
    }
    let mut text = lines.join("\n");
    if omitted > 0 {
        text.push_str(&format!("\n… and {omitted} more"));
    }
    super::escape::fit(&text, STATS_FIELD_BUDGET).0
}

/// The `/stats` embed (pure): every name from the store is shown as
/// inline code, every list cut to fit Discord's limits.
pub fn stats_embed(r: &StatsReport, since: &str, with_chart: bool) -> CreateEmbed {
    let mut description = format!(
        "**{}** calls since <t:{}:f>; **{}** timed out.",
        r.total,
        r.since_ms.div_euclid(1000),
        r.timeouts
    );
    if r.truncated {
        description.push_str(&format!(
            "\nOnly the newest {} requests were counted.",
            stats::MAX_ROWS
        ));
    }
    if with_chart {
        description.push_str("\nThe chart's bars follow the outcomes, in order.");
    }
    let outcomes: Vec<String> = CallOutcome::ALL
        .iter()
        .map(|o| {
            format!(
                "{} {}: **{}**",
                super::chart::swatch(*o),
                o.label(),
                r.outcomes.get(*o)
            )
        })
        .collect();
    let decision = match &r.time_to_decision {
        Some(l) => format!(
            "p50 **{}** · p90 **{}** ({} decisions)",
            secs(l.p50_ms),
            secs(l.p90_ms),
            l.count
        ),
        None => "no human decisions".into(),
    };
    let approvers: Vec<String> = r
        .by_approver
        .iter()
        .take(STATS_LINES)
        .map(|a| {
            format!(
                "{}: {} approved, {} denied · p50 {} · p90 {}",
                inline_code(&a.approver, 60),
                a.approved,
                a.denied,
                secs(a.time_to_decision.p50_ms),
                secs(a.time_to_decision.p90_ms)
            )
        })
        .collect();
    let named = |list: &[stats::NamedOutcomes], omitted: u64| {
        let lines = list
            .iter()
            .take(STATS_LINES)
            .map(|n| {
                format!(
                    "{}: {} ({} approved, {} denied)",
                    inline_code(&n.name, 60),
                    n.total,
                    n.outcomes.approved_by_policy + n.outcomes.approved_by_human,
                    n.outcomes.denied_by_policy + n.outcomes.denied_by_human
                )
            })
            .collect();
        let more = omitted + list.len().saturating_sub(STATS_LINES) as u64;
        field_lines(lines, more)
    };
    let counted = |list: &[stats::NamedCount], omitted: u64| {
        let lines = list
            .iter()
            .take(STATS_LINES)
            .map(|c| format!("{}: {}", inline_code(&c.name, 60), c.calls))
            .collect();
        let more = omitted + list.len().saturating_sub(STATS_LINES) as u64;
        field_lines(lines, more)
    };
    let more_approvers =
        r.by_approver_omitted + r.by_approver.len().saturating_sub(STATS_LINES) as u64;
    let mut embed = CreateEmbed::new()
        .title(super::escape::fit(&format!("Keyturn usage, last {}", plain(since)), 200).0)
        .description(description)
        .field("Outcomes", field_lines(outcomes, 0), false)
        .field("Time to a human decision", decision, false)
        .field("By approver", field_lines(approvers, more_approvers), false)
        .field("By tool", named(&r.by_tool, r.by_tool_omitted), true)
        .field("By agent", named(&r.by_agent, r.by_agent_omitted), true)
        .field(
            "Approved by policy, per rule",
            counted(&r.grants_used, r.grants_used_omitted),
            false,
        )
        .field("Most denied tools", counted(&r.top_denied_tools, 0), false);
    if with_chart {
        embed = embed.image(format!("attachment://{CHART_FILE}"));
    }
    embed
}

/// The text a user gets with their pairing code.
pub fn pairing_text(code: &str, expires_ms: i64) -> String {
    format!(
        "Your Keyturn pairing code is `{}`. Give it to a Keyturn admin; it expires <t:{}:R>.",
        crate::domain::pairing::display(code),
        expires_ms.div_euclid(1000)
    )
}

/// What a user DMs to get a fresh pairing code (case and spaces ignored).
pub const NEW_CODE_WORDS: &str = "new code";
/// Codes one user may be given per [`CODE_WINDOW`].
pub const CODES_PER_WINDOW: usize = 3;
pub const CODE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
/// Answers to one user's DMs: a burst of this many, then one per [`REPLY_GAP`].
pub const REPLY_BURST: f64 = 5.0;
pub const REPLY_GAP: std::time::Duration = std::time::Duration::from_secs(2);
/// Users remembered at most; older entries are dropped first.
const MAX_DM_USERS: usize = 10_000;

/// Whether a DM asks for a new pairing code.
pub fn asks_new_code(text: &str) -> bool {
    let words: Vec<&str> = text.split_whitespace().collect();
    words.join(" ").to_lowercase() == NEW_CODE_WORDS
}

/// "You already have a live code" (the code itself is not stored).
pub fn live_code_text(expires_ms: i64) -> String {
    format!(
        "You already have a live Keyturn pairing code (expires <t:{}:R>). Give it to a Keyturn admin. \
         Lost it? Reply `{NEW_CODE_WORDS}` for a new one; the old one then stops working.",
        expires_ms.div_euclid(1000)
    )
}

/// Per-user limits on DM answers and on new pairing codes, in memory (a
/// restart forgets them, which only gives a user a few codes more).
#[derive(Debug, Default)]
pub struct DmLimiter {
    users: std::collections::HashMap<String, DmUser>,
}

#[derive(Debug)]
struct DmUser {
    /// Answers left (token bucket) as of `at`.
    tokens: f64,
    at: std::time::Instant,
    codes: std::collections::VecDeque<std::time::Instant>,
}

impl DmUser {
    fn new(now: std::time::Instant) -> DmUser {
        DmUser {
            tokens: REPLY_BURST,
            at: now,
            codes: std::collections::VecDeque::new(),
        }
    }
}

impl DmLimiter {
    /// Whether to answer this user's DM now; records the answer.
    pub fn reply(&mut self, user: &str, now: std::time::Instant) -> bool {
        self.prune(now);
        let u = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| DmUser::new(now));
        let refill = now.saturating_duration_since(u.at).as_secs_f64() / REPLY_GAP.as_secs_f64();
        u.tokens = (u.tokens + refill).min(REPLY_BURST);
        u.at = now;
        if u.tokens < 1.0 {
            return false;
        }
        u.tokens -= 1.0;
        true
    }

    /// Whether this user may get a new code now; records it. `Err` holds
    /// how long until one more is allowed.
    pub fn new_code(
        &mut self,
        user: &str,
        now: std::time::Instant,
    ) -> Result<(), std::time::Duration> {
        let u = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| DmUser::new(now));
        while u
            .codes
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= CODE_WINDOW)
        {
            u.codes.pop_front();
        }
        if u.codes.len() >= CODES_PER_WINDOW {
            let oldest = u.codes.front().copied().unwrap_or(now);
            return Err(CODE_WINDOW.saturating_sub(now.saturating_duration_since(oldest)));
        }
        u.codes.push_back(now);
        Ok(())
    }

    /// Gives back the last [`DmLimiter::new_code`] when no code was made
    /// (the user was already paired, or the store failed).
    pub fn refund(&mut self, user: &str) {
        if let Some(u) = self.users.get_mut(user) {
            u.codes.pop_back();
        }
    }

    fn prune(&mut self, now: std::time::Instant) {
        if self.users.len() < MAX_DM_USERS {
            return;
        }
        self.users.retain(|_, u| {
            u.codes
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) < CODE_WINDOW)
        });
        if self.users.len() >= MAX_DM_USERS {
            self.users.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serenity::all::CreateCommand;

    #[test]
    fn new_code_words_are_recognised_loosely() {
        assert!(asks_new_code("new code"));
        assert!(asks_new_code("  New   CODE "));
        assert!(!asks_new_code("hi"));
        assert!(!asks_new_code("thanks, new code please"));
    }

    #[test]
    fn dm_limits_per_user() {
        let t0 = std::time::Instant::now();
        let mut l = DmLimiter::default();
        for _ in 0..REPLY_BURST as usize {
            assert!(l.reply("a", t0));
        }
        assert!(!l.reply("a", t0 + REPLY_GAP / 2));
        assert!(l.reply("b", t0), "another user is not held up");
        assert!(l.reply("a", t0 + REPLY_GAP));
        assert!(!l.reply("a", t0 + REPLY_GAP));
        for _ in 0..CODES_PER_WINDOW {
            assert_eq!(l.new_code("a", t0), Ok(()));
        }
        assert_eq!(l.new_code("a", t0), Err(CODE_WINDOW));
        l.refund("a");
        l.refund("a");
        assert_eq!(l.new_code("a", t0), Ok(()), "a refunded try counts no more");
        assert_eq!(l.new_code("a", t0 + CODE_WINDOW), Ok(()));
    }

    #[test]
    fn the_stats_embed_fits_discord_limits_and_shows_names_as_code() {
        use crate::domain::request::{DecidedBy, State};
        use crate::domain::stats::{compute, CallRecord};
        let mut recs = Vec::new();
        for i in 0..150 {
            let long = format!("{i:03}{}", "@everyone `x` **y** ".repeat(20));
            recs.push(CallRecord {
                state: if i % 2 == 0 {
                    State::Denied
                } else {
                    State::Approved
                },
                decided_by: Some(if i % 3 == 0 {
                    DecidedBy::Policy
                } else {
                    DecidedBy::Human
                }),
                decided_who: Some(format!("{long} (uid:{i}), other{i} (uid:1)")),
                tool: long.clone(),
                agent: long.clone(),
                rule: long,
                created_ms: 1_000,
                decided_ms: Some(2_000 + i),
            });
        }
        let r = compute(&recs, 0, 10_000, true);
        let v = serde_json::to_value(stats_embed(&r, "7d", true)).unwrap();
        let len = |v: &serde_json::Value| super::super::escape::length(v.as_str().unwrap_or(""));
        let mut total = len(&v["title"]) + len(&v["description"]);
        assert!(len(&v["title"]) <= 256 && len(&v["description"]) <= 4096);
        let fields = v["fields"].as_array().unwrap();
        assert!(fields.len() <= 25);
        for f in fields {
            assert!(len(&f["name"]) <= 256);
            assert!((1..=1024).contains(&len(&f["value"])), "{f}");
            total += len(&f["name"]) + len(&f["value"]);
        }
        assert!(total <= 6000, "{total}");
        let text = v.to_string();
        assert!(!text.contains("@everyone `x`"), "names are escaped");
        assert!(text.contains("Only the newest"));
        assert_eq!(v["image"]["url"], "attachment://stats.png");
    }

    #[test]
    fn definitions_fit_discord_limits() {
        let defs: Vec<CreateCommand> = definitions();
        let v = serde_json::to_value(&defs).unwrap();
        for c in v.as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            assert!(name.len() <= 32 && !name.is_empty());
            assert!(c["description"].as_str().unwrap().len() <= 100);
            for o in c["options"].as_array().into_iter().flatten() {
                assert!(o["description"].as_str().unwrap().len() <= 100);
                for s in o["options"].as_array().into_iter().flatten() {
                    assert!(s["description"].as_str().unwrap().len() <= 100, "{s}");
                }
            }
            assert_eq!(
                c.get("default_member_permissions")
                    .is_some_and(|p| !p.is_null()),
                is_admin_command(name),
                "{name}"
            );
        }
    }

    fn run(id: &str, state: RunState) -> RunRecord {
        RunRecord {
            id: id.into(),
            request_id: crate::domain::request::RequestId(uuid::Uuid::from_u128(7)),
            agent: "ci-bot".into(),
            tool: "kubectl_get".into(),
            argv: vec!["kubectl".into()],
            profile: crate::domain::run::Profile::Bwrap,
            pid: Some(4242),
            host: "h".into(),
            server_pid: 1,
            approved_by: "alice".into(),
            started_ms: 1_700_000_010_000,
            deadline_ms: 1_700_000_070_000,
            state,
            ended_ms: (state != RunState::Running).then_some(1_700_000_011_500),
            exit_code: (state == RunState::Exited).then_some(0),
            signal: None,
            stdout_sha256: None,
            stderr_sha256: None,
            kill_requested_by: None,
        }
    }

    const ID: &str = "01937a4e-8c2b-7f3d-9a1e-0123456789ab";

    #[test]
    fn kill_answers_say_what_happened() {
        let t = kill_answer(ID, &Ok((run(ID, RunState::Running), true)));
        assert!(t.starts_with("Kill sent to run `01937a4e"), "{t}");
        assert!(t.contains("`kubectl_get`") && t.contains("`ci-bot`"), "{t}");
        // Killed so fast that the click's answer already sees the end.
        let mut killed = run(ID, RunState::Killed);
        killed.kill_requested_by = Some("discord:100".into());
        let t = kill_answer(ID, &Ok((killed, true)));
        assert!(t.contains("has stopped: **killed** by discord:100"), "{t}");
        let t = kill_answer(ID, &Ok((run(ID, RunState::Exited), false)));
        assert!(
            t.contains("had already ended, so nothing was killed: **exited** with code 0"),
            "{t}"
        );
        let t = kill_answer(ID, &Err(AppError::NotFound(format!("run {ID}"))));
        assert_eq!(
            t,
            format!("Keyturn has no run `{ID}`, so nothing was killed.")
        );
        let t = kill_answer(
            ID,
            &Err(AppError::Run {
                code: "not_running",
                message: "x".into(),
            }),
        );
        assert!(t.contains("not running any more"), "{t}");
        let t = kill_answer(
            ID,
            &Err(AppError::Store(crate::app::ports::StoreError::Unavailable(
                "secret detail".into(),
            ))),
        );
        assert!(
            t.contains("was not recorded") && !t.contains("secret"),
            "{t}"
        );
    }

    #[test]
    fn runs_lists_running_then_ended_within_the_reply_limit() {
        assert_eq!(runs_text(&[], &[]), "No runs are running.");
        let mut evil = run(ID, RunState::Running);
        evil.tool = "`@everyone` [x](https://e)".into();
        evil.agent = "<@100>".into();
        let t = runs_text(&[evil], &[run("r2", RunState::Exited)]);
        assert!(t.starts_with("**Running** (1):"), "{t}");
        assert!(
            t.contains("pid 4242") && t.contains("<t:1700000010:R>"),
            "{t}"
        );
        assert!(t.contains("`ˋ@everyoneˋ [x](https://e)`"), "{t}");
        assert!(t.contains("**Recently ended:**\n• `r2`"), "{t}");
        assert!(t.contains("exited** with code 0 after 1.5 s"), "{t}");
        assert!(t.contains("started <t:1700000010:f>, pid 4242"), "{t}");
        let many: Vec<RunRecord> = (0..200)
            .map(|i| run(&format!("run-{i}"), RunState::Running))
            .collect();
        let t = runs_text(&many, &[]);
        assert!(length(&t) <= REPLY_BUDGET, "{}", length(&t));
        assert!(t.ends_with("more lines left out."), "{t}");
    }
}
