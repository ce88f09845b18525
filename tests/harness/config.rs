//! The configs the tests start `serve` with: a few base texts that tests
//! extend with their own TOML, and the rules every config file here obeys
//! (owner-only, since `serve` refuses a readable file that holds a token;
//! the single-user demo switch, since agents and admin are this one uid).

use std::path::Path;

/// `toml` with `[admin] single_user_demo = true` added, unless it already
/// says `single_user_demo` (tests of the refusal set it to false).
pub fn with_demo(toml: &str) -> String {
    if toml.contains("single_user_demo") {
        return toml.to_string();
    }
    if toml.contains("[admin]\n") {
        toml.replacen("[admin]\n", "[admin]\nsingle_user_demo = true\n", 1)
    } else {
        format!("{toml}\n[admin]\nsingle_user_demo = true\n")
    }
}

/// Writes a config file readable by its owner only, as `serve` requires of
/// a file that holds a token.
pub fn write_config(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write config");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Agents, tools and the one grant of the coding-agent tests (hooks, exec,
/// MCP, Claude Code): no `[server]` or `[store]`, see [`claude_code`].
pub const CLAUDE_CODE_BASE: &str = r#"
[[agents]]
name = "claude-code"

[[agents]]
name = "cli"

[[agents]]
name = "robot"
unattended = true

[[tools]]
name = "Read"
risk = "low"

[[tools]]
name = "Bash"
risk = "high"

[[grants]]
scope = "global"
tool = "*"
effect = "allow"
"#;

/// The coding-agent config in `dir`: socket `k.sock`, database `k.db`,
/// agents `claude-code`, `cli` and `robot` (unattended), `Read` (low) and
/// `Bash` (high), everything allowed. `extra` is appended, then the demo
/// switch ([`with_demo`]).
pub fn claude_code(dir: &Path, extra: &str) -> String {
    with_demo(&format!(
        "[server]\nsocket_path = \"{}\"\n\n[store]\nurl = \"sqlite://{}\"\n\n{CLAUDE_CODE_BASE}\n{extra}\n",
        dir.join("k.sock").display(),
        dir.join("k.db").display()
    ))
}

/// The file-tools config in `dir`: socket `k.sock`, database `k.db`,
/// agents `bot` and `cli`, user 42, `read_file` (low), `write_file`
/// (medium), `delete_file` (high) and `drop_database` (critical), all
/// granted globally. `extra` is appended right after that grant (so a bare
/// `effect = …` line changes it), then the demo switch ([`with_demo`]).
pub fn files(dir: &Path, extra: &str) -> String {
    with_demo(&format!(
        r#"
[server]
socket_path = "{sock}"

[store]
url = "sqlite://{db}"

[[agents]]
name = "bot"

[[agents]]
name = "cli"

[[users]]
id = "42"

[[tools]]
name = "read_file"
risk = "low"

[[tools]]
name = "write_file"
risk = "medium"

[[tools]]
name = "delete_file"
risk = "high"

[[tools]]
name = "drop_database"
risk = "critical"

[[grants]]
scope = "global"
tool = "*"
{extra}
"#,
        sock = dir.join("k.sock").display(),
        db = dir.join("k.db").display(),
    ))
}

/// The agent the Discord config ([`discord`]) declares.
pub const DISCORD_AGENT: &str = "agent";

/// The Discord tests' config: Discord pointed at `api_base`, user 42 and
/// alice (100) paired, `delete_file` high and `drop_db` critical (both
/// allowed globally), `read_file` low (not allowed anywhere). Paths are
/// relative to the config's directory; `[discord]` is the last section, so
/// appended lines are Discord keys.
pub fn discord(api_base: &str) -> String {
    format!(
        r#"
[server]
socket_path = "k.sock"

[store]
url = "sqlite://k.db"

[admin]
# Agents and admin are the test's one uid.
single_user_demo = true

[risk.high]
timeout = "30s"

[[agents]]
name = "{DISCORD_AGENT}"
max_pending = 1000

[[users]]
id = "42"

[[users]]
id = "100"

[[tools]]
name = "delete_file"
risk = "high"

[[tools]]
name = "drop_db"
risk = "critical"

[[tools]]
name = "read_file"
risk = "low"

[[grants]]
scope = "global"
tool = "delete_file"

[[grants]]
scope = "global"
tool = "drop_db"

[discord]
token = "fake-token"
api_base = "{api_base}"
guild_id = 10
approvals_channel_id = 20
approver_role_id = 30
admin_role_id = 31
ping_approvers = true
ping_admins = true
"#
    )
}
