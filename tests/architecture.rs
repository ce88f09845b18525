//! The dependency rules, as a test that reads the source files.
//!
//! - `src/domain` names nothing above it (no other module of the crate but
//!   `domain`, no tokio, sqlx, rusqlite, serenity, reqwest, axum, nix) and
//!   reads no clock (`Utc::now`, `SystemTime::now`, `Instant::now`…);
//! - `src/app` names no adapter;
//! - sqlx and rusqlite only in `src/store`; serenity and reqwest only in
//!   `src/discord`;
//! - nothing but `src/store` and the composition root (`src/serve.rs`,
//!   `src/main.rs`) names the store adapter;
//! - no adapter (store, ipc, discord, integrations, cli, monitor, sandbox) names
//!   another, except the documented client-side exceptions in
//!   [`ALLOWED_ACROSS`].
//!
//! Paths are found in code only: comments, strings and char literals are
//! blanked first, so a doc comment that mentions `crate::store` is no
//! violation and a `use` split over lines or grouped in braces still is.
//! A failure names the file, the line and the rule.

use std::path::{Path, PathBuf};

/// The adapters: each may use `app`, `domain` and `config`, never another.
const ADAPTERS: &[&str] = &[
    "store",
    "ipc",
    "discord",
    "integrations",
    "cli",
    "monitor",
    "sandbox",
];

/// Modules of the crate the domain sits under (everything but itself).
const ABOVE_DOMAIN: &[&str] = &[
    "app",
    "store",
    "ipc",
    "discord",
    "integrations",
    "cli",
    "monitor",
    "sandbox",
    "serve",
    "bench",
    "config",
    "logging",
];

/// Adapter-to-adapter paths that are allowed, and why. The socket's wire
/// contract (`ipc::protocol`, the typed answers in `ipc::answers`) and its
/// client (`ipc::client`) are what every
/// client of the socket speaks: the CLI and the integrations are such
/// clients, not callers of the server. The CLI's `hook`, `exec` and
/// `mcp-proxy` subcommands are the integrations' entry points. How a client
/// reaches the TCP listener (`ipc::tcp_endpoint`: URL, token, CA, the
/// `auth` line) is part of that contract.
const ALLOWED_ACROSS: &[(&str, &str)] = &[
    ("cli", "ipc::protocol"),
    ("cli", "ipc::client"),
    ("cli", "ipc::answers"),
    ("cli", "ipc::tcp_endpoint"),
    ("cli", "integrations"),
    ("integrations", "ipc::protocol"),
    ("integrations", "ipc::tcp_endpoint"),
];

/// External crates the domain must not use.
const NOT_IN_DOMAIN: &[&str] = &[
    "tokio", "sqlx", "rusqlite", "serenity", "reqwest", "axum", "nix",
];

/// Clock reads the domain must not make (time is a parameter).
const CLOCKS: &[&str] = &[
    "Utc::now",
    "Local::now",
    "SystemTime::now",
    "Instant::now",
    "now_ms(",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a Rust file with comments, string and char literals blanked
/// (newlines kept, so line numbers still hold).
fn code_only(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if (c == 'r' || c == 'b')
            && !prev_is_ident(&b, i)
            && raw_string_start(&b, i).is_some()
        {
            let (open_len, hashes) = raw_string_start(&b, i).unwrap_or((0, 0));
            for _ in 0..open_len {
                out.push(' ');
            }
            i += open_len;
            while i < b.len() {
                if b[i] == '"' && (1..=hashes).all(|k| b.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(b[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                // Past the escaped character, to the closing quote.
                let mut j = i + 3;
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                for _ in i..=j.min(b.len() - 1) {
                    out.push(' ');
                }
                i = j + 1;
            } else if b.get(i + 2) == Some(&'\'') {
                out.push_str("   ");
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// `r"`, `r#"`, `br"`, `br#"`…: the opener's length and the number of `#`.
fn raw_string_start(b: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if b.get(j) == Some(&'b') {
        j += 1;
    }
    if b.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while b.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (b.get(j) == Some(&'"')).then_some((j + 1 - i, hashes))
}

/// Every path the code names, with its line: `a::b::c` as written, and each
/// branch of a grouped `use a::{b::c, d}` spelled out (`a::b::c`, `a::d`).
fn paths(code: &str) -> Vec<(usize, String)> {
    let b: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < b.len() {
        if b[i] == '\n' {
            line += 1;
            i += 1;
            continue;
        }
        let starts_path = (b[i].is_alphabetic() || b[i] == '_')
            && !prev_is_ident(&b, i)
            && !(i >= 2 && b[i - 1] == ':' && b[i - 2] == ':');
        if !starts_path {
            i += 1;
            continue;
        }
        let start_line = line;
        let (mut found, end) = path_at(&b, i, &mut line, "");
        out.extend(found.drain(..).map(|p| (start_line, p)));
        i = end.max(i + 1);
    }
    out
}

/// Reads the path starting at `i` (prefixed by `prefix`), expanding braces.
fn path_at(b: &[char], mut i: usize, line: &mut usize, prefix: &str) -> (Vec<String>, usize) {
    let mut cur = prefix.to_string();
    loop {
        let s = i;
        while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
            i += 1;
        }
        cur.extend(&b[s..i]);
        // `a :: b` is legal; spaces and newlines may sit around `::`.
        let mut j = i;
        while j < b.len() && b[j].is_whitespace() {
            j += 1;
        }
        if !(b.get(j) == Some(&':') && b.get(j + 1) == Some(&':')) {
            return (vec![cur], i);
        }
        for c in &b[i..j] {
            if *c == '\n' {
                *line += 1;
            }
        }
        j += 2;
        while j < b.len() && b[j].is_whitespace() {
            if b[j] == '\n' {
                *line += 1;
            }
            j += 1;
        }
        cur.push_str("::");
        if b.get(j) == Some(&'{') {
            let mut all = Vec::new();
            j += 1;
            loop {
                while j < b.len() && (b[j].is_whitespace() || b[j] == ',') {
                    if b[j] == '\n' {
                        *line += 1;
                    }
                    j += 1;
                }
                match b.get(j) {
                    None => return (all, j),
                    Some('}') => return (all, j + 1),
                    Some(c) if c.is_alphabetic() || *c == '_' => {
                        let (found, end) = path_at(b, j, line, &cur);
                        all.extend(found);
                        j = end;
                        // Skip `as name` and anything else up to `,` or `}`.
                        let mut depth = 0;
                        while j < b.len() {
                            match b[j] {
                                '{' => depth += 1,
                                '}' if depth == 0 => break,
                                '}' => depth -= 1,
                                ',' if depth == 0 => break,
                                '\n' => *line += 1,
                                _ => {}
                            }
                            j += 1;
                        }
                    }
                    Some(_) => j += 1,
                }
            }
        }
        i = j;
    }
}

/// Which top-level module of the crate a file belongs to (`discord` for
/// `src/discord/rest.rs`, `cli` for `src/cli.rs`).
fn module_of(rel: &Path) -> String {
    let first = rel.components().next().unwrap().as_os_str();
    let first = first.to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The crate module a path names, if it names one (`crate::x::…`,
/// `keyturn::x::…`), with the rest of it.
fn crate_module(path: &str) -> Option<(&str, &str)> {
    let rest = path
        .strip_prefix("crate::")
        .or_else(|| path.strip_prefix("keyturn::"))?;
    Some(rest.split_once("::").unwrap_or((rest, "")))
}

fn violations_in(rel: &Path, text: &str) -> Vec<String> {
    let module = module_of(rel);
    let composition_root = matches!(module.as_str(), "serve" | "main" | "lib");
    let code = code_only(text);
    let mut v = Vec::new();
    let mut report = |line: usize, rule: &str, path: &str| {
        v.push(format!(
            "src/{}:{line}: {rule} (found `{path}`)",
            rel.display()
        ));
    };
    for (line, path) in paths(&code) {
        let root = path.split("::").next().unwrap_or("");
        if module == "domain" {
            if let Some((m, _)) = crate_module(&path) {
                if ABOVE_DOMAIN.contains(&m) {
                    report(line, "the domain names nothing above it", &path);
                }
            }
            if NOT_IN_DOMAIN.contains(&root) {
                report(
                    line,
                    "the domain uses no runtime, database, Discord or HTTP crate",
                    &path,
                );
            }
        }
        if matches!(root, "sqlx" | "rusqlite") && module != "store" {
            report(line, "sqlx and rusqlite are used only in src/store", &path);
        }
        if matches!(root, "serenity" | "reqwest") && module != "discord" {
            report(
                line,
                "serenity and reqwest are used only in src/discord",
                &path,
            );
        }
        let Some((target, rest)) = crate_module(&path) else {
            continue;
        };
        if target == "store" && module != "store" && !composition_root {
            report(
                line,
                "only src/store and the composition root (src/serve.rs, src/main.rs) name the store adapter",
                &path,
            );
            continue;
        }
        if module == "app" && ADAPTERS.contains(&target) {
            report(line, "the app names no adapter", &path);
        }
        if ADAPTERS.contains(&module.as_str())
            && ADAPTERS.contains(&target)
            && target != module
            && target != "store"
        {
            let full = format!("{target}::{rest}");
            let allowed = ALLOWED_ACROSS.iter().any(|(from, to)| {
                *from == module && (full == *to || full.starts_with(&format!("{to}::")))
            });
            if !allowed {
                report(line, "no adapter names another adapter", &path);
            }
        }
    }
    if module == "domain" {
        for (n, l) in code.lines().enumerate() {
            for clock in CLOCKS {
                if l.contains(clock) {
                    report(
                        n + 1,
                        "the domain reads no clock (time is a parameter)",
                        clock,
                    );
                }
            }
        }
    }
    v
}

#[test]
fn the_dependency_rules_hold() {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src",
        files.len()
    );
    let mut all = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        all.extend(violations_in(f.strip_prefix(&root).unwrap(), &text));
    }
    assert!(
        all.is_empty(),
        "{} dependency rule(s) broken:\n{}",
        all.len(),
        all.join("\n")
    );
}

/// The checker itself: each rule catches what it is for, in the forms
/// code takes (grouped, split over lines, fully qualified), and ignores
/// comments and strings.
#[test]
fn the_checker_catches_each_rule_and_ignores_comments_and_strings() {
    let check = |file: &str, text: &str| violations_in(Path::new(file), text);
    // Clean: mentions in comments, doc comments and strings.
    assert_eq!(
        check(
            "discord/mod.rs",
            "//! calls crate::store never\n/* crate::ipc */ fn f() { let s = \"crate::store::x\"; let r = r#\"sqlx::query\"#; let c = '\"'; }\n"
        ),
        Vec::<String>::new()
    );
    let v = check(
        "discord/outbox.rs",
        "use crate::app::Gateway;\nuse crate::{app::now_ms,\n  store::SqliteStore};\n",
    );
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].starts_with("src/discord/outbox.rs:2: only src/store"),
        "{v:?}"
    );
    let v = check(
        "monitor.rs",
        "fn f() { let x = crate::store::check::check; }",
    );
    assert!(v[0].contains("monitor.rs:1: only src/store"), "{v:?}");
    assert!(check("serve.rs", "use crate::store::SqliteStore;").is_empty());
    let v = check("app/decide.rs", "fn f() {\n    crate::discord::start();\n}");
    assert!(
        v[0].contains("app/decide.rs:2: the app names no adapter"),
        "{v:?}"
    );
    let v = check("ipc/handler.rs", "use crate::discord::Bot;");
    assert!(v[0].contains("no adapter names another adapter"), "{v:?}");
    assert!(check("cli.rs", "use crate::ipc::client::Client;").is_empty());
    let v = check("integrations/hook.rs", "use crate::ipc::handler::Handler;");
    assert!(v[0].contains("no adapter names another adapter"), "{v:?}");
    let v = check("domain/policy.rs", "use crate::app::Gateway;\nuse tokio::sync::Mutex;\nfn f() -> i64 { chrono::Utc::now().timestamp() }");
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(
        v[0].contains("domain/policy.rs:1: the domain names nothing above it"),
        "{v:?}"
    );
    assert!(
        v[1].contains("domain/policy.rs:2: the domain uses no runtime"),
        "{v:?}"
    );
    assert!(
        v[2].contains("domain/policy.rs:3: the domain reads no clock"),
        "{v:?}"
    );
    let v = check("app/mod.rs", "use sqlx::SqlitePool;");
    assert!(
        v[0].contains("sqlx and rusqlite are used only in src/store"),
        "{v:?}"
    );
    assert!(check("store/sqlite/mod.rs", "use sqlx::SqlitePool;").is_empty());
    let v = check(
        "ipc/server.rs",
        "fn f() { let _ = serenity::all::Http::new(\"\"); }",
    );
    assert!(
        v[0].contains("serenity and reqwest are used only in src/discord"),
        "{v:?}"
    );
    let v = check("cli.rs", "fn f() { let c = reqwest::Client::new(); }");
    assert!(v[0].contains("serenity and reqwest"), "{v:?}");
}
