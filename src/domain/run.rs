//! Tools Keyturn runs itself: the `run` section of a tool (an argv template
//! whose slots are typed), the checks that turn an agent's arguments into the
//! exact argv that will run, the environment rules, and the output cap.
//!
//! Pure: no I/O and no clock. Resolving a path slot against the file system
//! (symlinks) is the executor's ([`crate::app::ports::Executor`]); this file
//! does the lexical part and says which slots need it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Where a run happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// bubblewrap: new namespaces, read-only root, private `/tmp`, only the
    /// declared directories writable, no network unless declared.
    #[default]
    Bwrap,
    /// No namespaces: a scrubbed environment, a cwd from the allowlist,
    /// resource limits, the timeout and the output cap only. For trusted
    /// tools; the card says so.
    Host,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Bwrap => "bwrap",
            Profile::Host => "host",
        }
    }
}

/// Network inside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// A new network namespace with only a down loopback: nothing reachable.
    #[default]
    None,
    /// The host's network (the tool's `url` slots limit which hosts an
    /// agent may name; the process itself can reach anything the host can).
    Host,
}

/// Resource limits set on the process before it starts (setrlimit), inherited
/// by everything it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// CPU seconds (RLIMIT_CPU).
    pub cpu_secs: u64,
    /// Address space in MiB (RLIMIT_AS).
    pub memory_mb: u64,
    /// Open files (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Processes (RLIMIT_NPROC), counted for the uid the run uses.
    pub processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_secs: 60,
            memory_mb: 2048,
            open_files: 256,
            processes: 64,
        }
    }
}

/// A credential a tool declares, and how it is put into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialUse {
    /// A `[credentials.NAME]` entry.
    pub name: String,
    /// Put the value in this environment variable.
    #[serde(default)]
    pub env: Option<String>,
    /// Or write it to this file inside the sandbox (mode 0400), and, with
    /// `path_env`, name the file in that variable (`KUBECONFIG`).
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub path_env: Option<String>,
}

/// One slot's type and rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SlotType {
    /// A path under one of `roots` (a relative value is taken from the
    /// first root). `..` is refused; symlinks are resolved by the executor
    /// and the result must still be under a root. With `must_exist = false`
    /// the last component may be missing (an output file).
    Path {
        roots: Vec<String>,
        #[serde(default = "yes")]
        must_exist: bool,
    },
    /// One of the listed values.
    Enum { values: Vec<String> },
    /// An integer within `min..=max`.
    Int { min: i64, max: i64 },
    /// A string that fully matches `pattern`, at most `max_len` characters.
    /// A value starting with `-` is refused unless `allow_leading_dash`
    /// (it would read as an option).
    String {
        pattern: String,
        max_len: usize,
        #[serde(default)]
        allow_leading_dash: bool,
    },
    /// An `http`/`https` URL (or the listed `schemes`) whose host is one
    /// of `hosts` (`example.com` also covers its subdomains).
    Url {
        hosts: Vec<String>,
        #[serde(default = "https_only")]
        schemes: Vec<String>,
    },
}

fn yes() -> bool {
    true
}

fn https_only() -> Vec<String> {
    vec!["https".into()]
}

/// A tool's `run` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The argv template: no shell, ever. `{name}` in an element is
    /// replaced by the argument `name`, checked against its slot; `{{` and
    /// `}}` are literal braces. The first element is the program (a path,
    /// or a name looked up on the sandbox's `PATH`).
    pub argv: Vec<String>,
    /// Slot name → type and rule. Every `{name}` needs one, every slot must
    /// be used, and the agent's arguments must be exactly the slots.
    #[serde(default)]
    pub slots: BTreeMap<String, SlotType>,
    #[serde(default)]
    pub profile: Profile,
    #[serde(default)]
    pub network: Network,
    /// Directories writable inside the sandbox (bound read-write at the
    /// same path); everything else is read-only or hidden.
    #[serde(default)]
    pub writable: Vec<String>,
    /// Paths hidden inside the sandbox (an empty directory or file over
    /// them), besides Keyturn's own database, config and sockets.
    #[serde(default)]
    pub hidden: Vec<String>,
    /// The working directory; must be one of `writable`, or under a path
    /// slot's roots. Default: the private `/tmp` (bwrap) or the first
    /// writable directory (host).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Variables set inside, with literal values.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Variables passed from Keyturn's environment when set there.
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// Credentials injected for this tool only.
    #[serde(default)]
    pub credentials: Vec<CredentialUse>,
    /// Wall-clock limit (`60s`): SIGTERM to the process group, then
    /// SIGKILL after the server's `[run] kill_grace`. Default 60 s.
    #[serde(default = "default_timeout_ms", rename = "timeout", with = "dur_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub limits: Limits,
}

fn default_timeout_ms() -> u64 {
    60_000
}

/// A duration written as everywhere else in the config (`90s`, `5m`; a bare
/// number is seconds), held as milliseconds.
mod dur_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", ms))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let t = String::deserialize(d)?;
        let t = t.trim();
        let dur = match t.parse::<u64>() {
            Ok(secs) => std::time::Duration::from_secs(secs),
            Err(_) => humantime::parse_duration(t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a duration (e.g. `90s`, `5m`, `1h`): {e}"
                ))
            })?,
        };
        Ok(u64::try_from(dur.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Environment variables never passed into a run, even when declared in
/// `pass_env` (loader and interpreter hooks), and those passed only when
/// declared by name (proxies).
pub const NEVER_PASSED: &[&str] = &[
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "NODE_OPTIONS",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "RUBYOPT",
    "RUBYLIB",
    "PERL5OPT",
    "PERL5LIB",
    "BASH_ENV",
    "ENV",
    "GCONV_PATH",
    "KEYTURN_TOKEN",
    "KEYTURN_AGENT_TOKEN",
    "KEYTURN_DISCORD_TOKEN",
];

/// Whether `name` may never be passed in (see [`NEVER_PASSED`]; also every
/// `DYLD_*`).
pub fn never_passed(name: &str) -> bool {
    NEVER_PASSED.contains(&name) || name.starts_with("DYLD_") || name.starts_with("LD_")
}

/// Proxy variables: passed only when a tool names them in `pass_env` or `env`.
pub fn is_proxy_var(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "http_proxy" | "https_proxy" | "all_proxy" | "no_proxy" | "ftp_proxy"
    )
}

/// One piece of an argv element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Slot(String),
}

/// Splits one template element into text and `{slot}` pieces.
pub fn parse_element(element: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = element.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) if c.is_ascii_alphanumeric() || c == '_' => name.push(c),
                        Some(c) => {
                            return Err(format!(
                                "`{element}`: `{c}` in a slot name (slot names are letters, digits and `_`; write `{{{{` for a literal brace)"
                            ))
                        }
                        None => return Err(format!("`{element}`: `{{` without a closing `}}`")),
                    }
                }
                if name.is_empty() {
                    return Err(format!("`{element}`: an empty slot `{{}}`"));
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Slot(name));
            }
            '}' => {
                return Err(format!(
                    "`{element}`: a lone `}}` (write `}}}}` for a literal brace)"
                ))
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Why a `run` section is not usable (found at config load).
pub fn check_spec(spec: &RunSpec) -> Result<(), String> {
    if spec.argv.is_empty() {
        return Err("`argv` is empty: it needs at least the program".into());
    }
    let mut used = std::collections::BTreeSet::new();
    for (i, el) in spec.argv.iter().enumerate() {
        let pieces = parse_element(el)?;
        for p in &pieces {
            if let Piece::Slot(name) = p {
                if !spec.slots.contains_key(name) {
                    return Err(format!(
                        "argv uses `{{{name}}}` but `slots` has no `{name}`"
                    ));
                }
                if i == 0 {
                    return Err(format!(
                        "argv[0] (the program) may not contain a slot (`{{{name}}}`)"
                    ));
                }
                used.insert(name.clone());
            }
        }
        if el.contains('\0') {
            return Err(format!("argv[{i}] contains a NUL byte"));
        }
    }
    for (name, slot) in &spec.slots {
        if !used.contains(name) {
            return Err(format!("slot `{name}` is not used in `argv`"));
        }
        match slot {
            SlotType::Path { roots, .. } => {
                if roots.is_empty() {
                    return Err(format!("slot `{name}`: a path slot needs `roots`"));
                }
                for r in roots {
                    if !r.starts_with('/') {
                        return Err(format!("slot `{name}`: root `{r}` must be absolute"));
                    }
                }
            }
            SlotType::Enum { values } => {
                if values.is_empty() {
                    return Err(format!("slot `{name}`: an enum slot needs `values`"));
                }
            }
            SlotType::Int { min, max } => {
                if min > max {
                    return Err(format!("slot `{name}`: min {min} is above max {max}"));
                }
            }
            SlotType::String {
                pattern, max_len, ..
            } => {
                regex::Regex::new(pattern)
                    .map_err(|e| format!("slot `{name}`: `pattern` is not a regex: {e}"))?;
                if *max_len == 0 {
                    return Err(format!("slot `{name}`: `max_len` must be at least 1"));
                }
            }
            SlotType::Url { hosts, schemes } => {
                if hosts.is_empty() {
                    return Err(format!("slot `{name}`: a url slot needs `hosts`"));
                }
                if schemes.is_empty() {
                    return Err(format!("slot `{name}`: `schemes` is empty"));
                }
            }
        }
    }
    for d in spec.writable.iter().chain(spec.hidden.iter()) {
        if !d.starts_with('/') {
            return Err(format!("`{d}` must be an absolute path"));
        }
    }
    for k in spec.env.keys() {
        check_env_name(k)?;
    }
    for k in &spec.pass_env {
        check_env_name(k)?;
    }
    for c in &spec.credentials {
        match (&c.env, &c.file) {
            (Some(e), None) => check_env_name(e)?,
            (None, Some(f)) => {
                // The sandbox's root is read-only: a file can only be placed
                // in its private /tmp (a tmpfs), where nothing else lives.
                if !under(f, "/tmp") || f.trim_end_matches('/') == "/tmp" || f.contains("/..") {
                    return Err(format!(
                        "credential `{}`: file `{f}` must be a path under /tmp (the sandbox's \
                         private /tmp; the rest of its root is read-only)",
                        c.name
                    ));
                }
                if spec.profile == Profile::Host {
                    return Err(format!(
                        "credential `{}`: a file credential needs the bwrap profile (the host \
                         profile has no private /tmp to put it in); use `env`",
                        c.name
                    ));
                }
                if let Some(p) = &c.path_env {
                    check_env_name(p)?;
                }
            }
            _ => {
                return Err(format!(
                    "credential `{}`: set exactly one of `env` or `file`",
                    c.name
                ))
            }
        }
    }
    // The working directory is one the tool declares (the cwd allowlist):
    // a writable directory or under a path slot's root.
    let roots: Vec<&String> = spec
        .slots
        .values()
        .filter_map(|t| match t {
            SlotType::Path { roots, .. } => Some(roots),
            _ => None,
        })
        .flatten()
        .collect();
    if let Some(cwd) = &spec.cwd {
        let ok = spec.writable.iter().any(|w| under(cwd, w)) || roots.iter().any(|r| under(cwd, r));
        if !ok {
            return Err(format!(
                "`cwd` `{cwd}` is neither under a `writable` directory nor under a path slot's root"
            ));
        }
    } else if spec.profile == Profile::Host && spec.writable.is_empty() {
        return Err(
            "the host profile needs a `cwd` or a `writable` directory to run in (it has no \
             private /tmp)"
                .into(),
        );
    }
    if spec.timeout_ms == 0 {
        return Err("`timeout` must be more than 0".into());
    }
    let l = &spec.limits;
    if l.cpu_secs == 0 || l.memory_mb == 0 || l.open_files == 0 || l.processes == 0 {
        return Err("`limits` values must be at least 1".into());
    }
    Ok(())
}

fn check_env_name(k: &str) -> Result<(), String> {
    if k.is_empty()
        || k.contains('=')
        || k.contains('\0')
        || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("`{k}` is not an environment variable name"));
    }
    if never_passed(k) {
        return Err(format!(
            "`{k}` is never passed into a run (loader and interpreter hooks are refused)"
        ));
    }
    Ok(())
}

/// Why an argument was refused: the slot and the rule, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotError {
    pub slot: String,
    pub rule: String,
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "argument `{}`: {}", self.slot, self.rule)
    }
}

/// A path slot's value after the lexical checks, for the executor to
/// resolve (symlinks) against `roots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathToResolve {
    pub slot: String,
    /// Absolute and free of `..` and `.` (a relative value joined to the
    /// first root).
    pub path: String,
    pub roots: Vec<String>,
    pub must_exist: bool,
}

/// The slots' values as strings after the per-type checks; path slots still
/// to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub values: BTreeMap<String, String>,
    pub paths: Vec<PathToResolve>,
}

/// Checks an agent's arguments against the slots (everything but the file
/// system): exactly the slots, each of its type and rule.
pub fn check_args(spec: &RunSpec, args: &serde_json::Value) -> Result<Checked, SlotError> {
    let err = |slot: &str, rule: String| SlotError {
        slot: slot.to_string(),
        rule,
    };
    let obj = args
        .as_object()
        .ok_or_else(|| err("", "`args` must be a JSON object".into()))?;
    for k in obj.keys() {
        if !spec.slots.contains_key(k) {
            return Err(err(
                k,
                "this tool's run template has no such slot (its slots: ".to_string()
                    + &spec.slots.keys().cloned().collect::<Vec<_>>().join(", ")
                    + ")",
            ));
        }
    }
    let mut values = BTreeMap::new();
    let mut paths = Vec::new();
    for (name, slot) in &spec.slots {
        let v = obj
            .get(name)
            .ok_or_else(|| err(name, "missing (every slot is required)".into()))?;
        let s = match (slot, v) {
            (SlotType::Int { min, max }, v) => {
                let n = v
                    .as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.parse::<i64>().ok()))
                    .ok_or_else(|| err(name, "must be an integer".into()))?;
                if n < *min || n > *max {
                    return Err(err(name, format!("must be between {min} and {max}")));
                }
                n.to_string()
            }
            (_, serde_json::Value::String(s)) => s.clone(),
            _ => return Err(err(name, "must be a string".into())),
        };
        if s.contains('\0') {
            return Err(err(name, "contains a NUL byte".into()));
        }
        match slot {
            SlotType::Int { .. } => {}
            SlotType::Enum { values } => {
                if !values.contains(&s) {
                    return Err(err(name, format!("must be one of: {}", values.join(", "))));
                }
            }
            SlotType::String {
                pattern,
                max_len,
                allow_leading_dash,
            } => {
                let n = s.chars().count();
                if n > *max_len {
                    return Err(err(name, format!("is {n} characters; at most {max_len}")));
                }
                if s.starts_with('-') && !allow_leading_dash {
                    return Err(err(
                        name,
                        "may not start with `-` (it would read as an option)".into(),
                    ));
                }
                let anchored = format!("^(?:{pattern})$");
                let re = regex::Regex::new(&anchored)
                    .map_err(|_| err(name, "the slot's pattern is not a regex".into()))?;
                if !re.is_match(&s) {
                    return Err(err(name, format!("must match the pattern `{pattern}`")));
                }
            }
            SlotType::Url { hosts, schemes } => {
                check_url(&s, hosts, schemes).map_err(|rule| err(name, rule))?;
            }
            SlotType::Path { roots, must_exist } => {
                let path = lexical_path(&s, roots).map_err(|rule| err(name, rule))?;
                paths.push(PathToResolve {
                    slot: name.clone(),
                    path: path.clone(),
                    roots: roots.clone(),
                    must_exist: *must_exist,
                });
                values.insert(name.clone(), path);
                continue;
            }
        }
        values.insert(name.clone(), s);
    }
    Ok(Checked { values, paths })
}

/// A path value made absolute (relative to the first root), refused if it
/// holds `..`, is empty, or lies outside every root before resolving.
pub fn lexical_path(value: &str, roots: &[String]) -> Result<String, String> {
    if value.is_empty() {
        return Err("is empty".into());
    }
    let joined = if value.starts_with('/') {
        value.to_string()
    } else {
        let root = roots.first().ok_or("the slot has no roots")?;
        format!("{}/{}", root.trim_end_matches('/'), value)
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("may not contain `..`".into()),
            c => parts.push(c),
        }
    }
    let path = format!("/{}", parts.join("/"));
    if !roots.iter().any(|r| under(&path, r)) {
        return Err(format!(
            "`{path}` is outside the allowed roots ({})",
            roots.join(", ")
        ));
    }
    Ok(path)
}

/// Whether `path` is `root` or below it (both absolute, normalised).
pub fn under(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return path.starts_with('/');
    }
    path == root || path.starts_with(&format!("{root}/"))
}

fn check_url(s: &str, hosts: &[String], schemes: &[String]) -> Result<(), String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| "is not a URL (scheme://host/…)".to_string())?;
    let scheme = scheme.to_ascii_lowercase();
    if !schemes.iter().any(|x| x.eq_ignore_ascii_case(&scheme)) {
        return Err(format!(
            "scheme `{scheme}` is not allowed ({})",
            schemes.join(", ")
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("may not carry user information (`user@host`)".into());
    }
    if authority.contains('\\') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains characters not allowed in a URL".into());
    }
    let host = if let Some(h) = authority.strip_prefix('[') {
        h.split(']').next().unwrap_or_default().to_string()
    } else {
        authority.split(':').next().unwrap_or_default().to_string()
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err("has no host".into());
    }
    let ok = hosts.iter().any(|h| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        host == h || host.ends_with(&format!(".{h}"))
    });
    if !ok {
        return Err(format!(
            "host `{host}` is not allowed ({})",
            hosts.join(", ")
        ));
    }
    Ok(())
}

/// The argv with every slot filled from `values` (which must hold every slot).
pub fn render(spec: &RunSpec, values: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    spec.argv
        .iter()
        .map(|el| {
            let mut out = String::new();
            for p in parse_element(el)? {
                match p {
                    Piece::Text(t) => out.push_str(&t),
                    Piece::Slot(s) => out.push_str(
                        values
                            .get(&s)
                            .ok_or_else(|| format!("no value for slot `{s}`"))?,
                    ),
                }
            }
            Ok(out)
        })
        .collect()
}

/// What a request of a run-tool will run, as stored with it and shown on
/// its card: the argv with secrets masked, and the sandbox it runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPlan {
    /// The argv as shown (secrets masked).
    pub argv: Vec<String>,
    pub profile: Profile,
    pub network: Network,
    pub writable: Vec<String>,
    /// Credential names injected (never values).
    pub credentials: Vec<String>,
    pub timeout_ms: u64,
}

impl RunPlan {
    /// One line for a card: where and how it runs.
    pub fn describe(&self) -> String {
        let mut s = match self.profile {
            Profile::Bwrap => format!(
                "sandbox: bubblewrap, network {}",
                match self.network {
                    Network::None => "none",
                    Network::Host => "host",
                }
            ),
            Profile::Host => "host profile: NOT sandboxed (no namespaces)".to_string(),
        };
        if !self.writable.is_empty() {
            s.push_str(&format!(", writable {}", self.writable.join(", ")));
        }
        if !self.credentials.is_empty() {
            s.push_str(&format!(", credentials {}", self.credentials.join(", ")));
        }
        s.push_str(&format!(", timeout {} s", self.timeout_ms / 1000));
        s
    }
}

/// How a run ended (or that it still runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// The process exited by itself (any exit code) or died of a signal it
    /// was not sent by Keyturn.
    Exited,
    /// Killed on request (`keyturn kill`, the card's Kill button).
    Killed,
    /// Killed by the timeout.
    TimedOut,
    /// It could not be started (program missing, sandbox refused).
    FailedToStart,
    /// Keyturn stopped or crashed while it ran; found after restart.
    Interrupted,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Exited => "exited",
            RunState::Killed => "killed",
            RunState::TimedOut => "timed_out",
            RunState::FailedToStart => "failed_to_start",
            RunState::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        Some(match s {
            "running" => RunState::Running,
            "exited" => RunState::Exited,
            "killed" => RunState::Killed,
            "timed_out" => RunState::TimedOut,
            "failed_to_start" => RunState::FailedToStart,
            "interrupted" => RunState::Interrupted,
            _ => return None,
        })
    }
}

/// Captured output after the cap: the text as shown (lossy UTF-8, cut on
/// a character boundary), whether it was cut, and the full size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub text: String,
    pub truncated: bool,
    /// Bytes the process wrote in all.
    pub size: u64,
    /// SHA-256 (hex) of all the bytes the process wrote.
    pub sha256: String,
}

/// The marker appended to output cut at the cap.
pub fn truncation_marker(shown: usize, size: u64) -> String {
    format!("\n[keyturn: output truncated: showing {shown} of {size} bytes]")
}

impl Output {
    /// Output as shown: `text` (made from the first `kept` bytes the process
    /// wrote), with the truncation marker when `size` (all bytes written)
    /// is larger.
    pub fn shown(mut text: String, kept: usize, size: u64, sha256: String) -> Output {
        let truncated = size > kept as u64;
        if truncated {
            text.push_str(&truncation_marker(kept, size));
        }
        Output {
            text,
            truncated,
            size,
            sha256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(toml_text: &str) -> RunSpec {
        toml::from_str(toml_text).unwrap()
    }

    fn cat() -> RunSpec {
        spec(
            r#"
            argv = ["cat", "--", "{file}"]
            [slots.file]
            type = "path"
            roots = ["/srv/data"]
            "#,
        )
    }

    #[test]
    fn elements_parse_slots_and_escaped_braces() {
        assert_eq!(
            parse_element("--ns={ns}").unwrap(),
            vec![Piece::Text("--ns=".into()), Piece::Slot("ns".into())]
        );
        assert_eq!(
            parse_element("{{x}}").unwrap(),
            vec![Piece::Text("{x}".into())]
        );
        assert!(parse_element("{a b}").is_err());
        assert!(parse_element("{").is_err());
        assert!(parse_element("}").is_err());
        assert!(parse_element("{}").is_err());
    }

    #[test]
    fn spec_checks_name_the_problem() {
        assert!(check_spec(&cat()).is_ok());
        let mut s = cat();
        s.argv.push("{missing}".into());
        assert!(check_spec(&s).unwrap_err().contains("missing"));
        let mut s = cat();
        s.argv = vec!["{file}".into()];
        assert!(check_spec(&s).unwrap_err().contains("argv[0]"));
        let mut s = cat();
        s.pass_env.push("LD_PRELOAD".into());
        assert!(check_spec(&s).unwrap_err().contains("LD_PRELOAD"));
        let mut s = cat();
        s.argv.pop();
        assert!(check_spec(&s).unwrap_err().contains("not used"));
    }

    #[test]
    fn paths_are_lexically_confined() {
        let roots = vec!["/srv/data".to_string()];
        assert_eq!(
            lexical_path("a/b.txt", &roots).unwrap(),
            "/srv/data/a/b.txt"
        );
        assert_eq!(
            lexical_path("/srv/data/./x", &roots).unwrap(),
            "/srv/data/x"
        );
        assert!(lexical_path("../../etc/passwd", &roots)
            .unwrap_err()
            .contains(".."));
        assert!(lexical_path("/srv/data/../x", &roots).is_err());
        assert!(lexical_path("/etc/passwd", &roots)
            .unwrap_err()
            .contains("outside"));
        assert!(lexical_path("/srv/database", &roots).is_err());
        assert!(lexical_path("", &roots).is_err());
    }

    #[test]
    fn args_must_be_exactly_the_slots() {
        let s = cat();
        let c = check_args(&s, &json!({"file": "x.txt"})).unwrap();
        assert_eq!(c.paths[0].path, "/srv/data/x.txt");
        assert_eq!(
            render(&s, &c.values).unwrap(),
            vec!["cat", "--", "/srv/data/x.txt"]
        );
        let e = check_args(&s, &json!({"file": "../../etc/passwd"})).unwrap_err();
        assert_eq!(e.slot, "file");
        assert!(check_args(&s, &json!({}))
            .unwrap_err()
            .rule
            .contains("missing"));
        assert!(check_args(&s, &json!({"file": "x", "extra": 1})).is_err());
        assert!(check_args(&s, &json!({"file": 3})).is_err());
    }

    #[test]
    fn typed_slots() {
        let s = spec(
            r#"
            argv = ["t", "{e}", "{n}", "{s}", "{u}"]
            [slots.e]
            type = "enum"
            values = ["staging", "prod"]
            [slots.n]
            type = "int"
            min = 1
            max = 10
            [slots.s]
            type = "string"
            pattern = "[a-z]+"
            max_len = 5
            [slots.u]
            type = "url"
            hosts = ["example.com"]
            "#,
        );
        check_spec(&s).unwrap();
        let ok = json!({"e": "prod", "n": 3, "s": "abc", "u": "https://api.example.com/x"});
        assert!(check_args(&s, &ok).is_ok());
        let bad = |k: &str, v: serde_json::Value| {
            let mut a = ok.clone();
            a[k] = v;
            check_args(&s, &a).unwrap_err()
        };
        assert_eq!(bad("e", json!("dev")).slot, "e");
        assert!(bad("n", json!(11)).rule.contains("between"));
        assert!(bad("n", json!("x")).rule.contains("integer"));
        assert!(bad("s", json!("abcdef")).rule.contains("at most"));
        assert!(bad("s", json!("ab1")).rule.contains("pattern"));
        assert!(bad("s", json!("a\nb")).rule.contains("pattern"));
        assert!(bad("u", json!("https://evil.com/"))
            .rule
            .contains("not allowed"));
        assert!(bad("u", json!("https://example.com.evil.com/"))
            .rule
            .contains("not allowed"));
        assert!(bad("u", json!("https://user@example.com/"))
            .rule
            .contains("user"));
        assert!(bad("u", json!("http://example.com/"))
            .rule
            .contains("scheme"));
    }

    #[test]
    fn leading_dash_is_refused_unless_allowed() {
        let s = spec(
            r#"
            argv = ["t", "{s}"]
            [slots.s]
            type = "string"
            pattern = ".*"
            max_len = 50
            "#,
        );
        assert!(check_args(&s, &json!({"s": "-rf"}))
            .unwrap_err()
            .rule
            .contains("`-`"));
    }

    #[test]
    fn output_cap_marks_truncation_and_full_size() {
        let o = Output::shown("hello".into(), 5, 11, "h".into());
        assert!(o.truncated);
        assert!(o.text.starts_with("hello"));
        assert!(o.text.contains("showing 5 of 11 bytes"));
        let o = Output::shown("hi".into(), 2, 2, "h".into());
        assert!(!o.truncated);
        assert_eq!(o.text, "hi");
    }

    #[test]
    fn loader_variables_are_never_passed() {
        for v in [
            "LD_PRELOAD",
            "DYLD_INSERT_LIBRARIES",
            "NODE_OPTIONS",
            "PYTHONPATH",
        ] {
            assert!(never_passed(v), "{v}");
        }
        assert!(!never_passed("LANG"));
        assert!(is_proxy_var("HTTPS_PROXY"));
    }
}
