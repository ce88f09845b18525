//! Logging and terminal output that never panic or block the process.
//!
//! A log line goes through a lossy background writer to a stderr wrapper
//! that swallows write errors: when stderr is a pipe whose reader died (a
//! `tee` killed by Ctrl-C) or a pipe nobody drains, lines are dropped and
//! the daemon keeps serving and keeps answering signals. Colour only when
//! stderr is a terminal; `[log] format = "json"` writes one JSON object a
//! line. The filter can be replaced at run time (SIGHUP). Client output goes
//! through [`out`], which ends the process quietly on a closed stdout
//! (`keyturn audit export | head -1`). No `unsafe`: SIGPIPE stays ignored
//! and EPIPE is handled here. Imports nothing from the application.

use crate::config::LogFormat;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Exit status after a closed stdout, as a shell reports SIGPIPE (128 + 13).
pub const EXIT_BROKEN_PIPE: i32 = 141;

/// Lines that wait for a slow stderr before new ones are dropped.
const BUFFERED_LINES: usize = 16_384;

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Stderr that reports every write as done: a dead stderr loses log lines,
/// never the process.
#[derive(Clone, Copy, Default)]
struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Keeps the background writer alive; dropping it flushes what is queued
/// (for at most a second).
pub struct LogGuard(#[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>);

/// The filter in force: `KEYTURN_LOG` first, then `level`, then `default`.
fn filter(level: Option<&str>, default: &str) -> EnvFilter {
    if let Ok(f) = EnvFilter::try_from_env("KEYTURN_LOG") {
        return f;
    }
    level
        .and_then(|l| EnvFilter::builder().parse(l).ok())
        .unwrap_or_else(|| EnvFilter::new(default))
}

/// Installs the global subscriber. `server` selects the daemon's default
/// level (info rather than warn). Keep the guard until the process ends.
pub fn init(server: bool, level: Option<&str>, format: LogFormat) -> LogGuard {
    let default = if server {
        "keyturn=info"
    } else {
        "keyturn=warn"
    };
    let (filter_layer, handle) = reload::Layer::new(filter(level, default));
    let (writer, guard) = if server {
        let (w, g) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(BUFFERED_LINES)
            .thread_name("keyturn-log")
            .finish(QuietStderr);
        (
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(w),
            Some(g),
        )
    } else {
        (
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(|| QuietStderr),
            None,
        )
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        // The default reports a failed write with eprintln!, which panics
        // when stderr is gone.
        .log_internal_errors(false);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
    LogGuard(guard)
}

/// Replaces the log filter with `level` (the config's `[log] level`).
/// Returns the filter now in force, or why it was kept.
pub fn set_level(level: Option<&str>) -> Result<String, String> {
    if std::env::var_os("KEYTURN_LOG").is_some() {
        return Err("kept: KEYTURN_LOG overrides [log] level".into());
    }
    let Some(handle) = FILTER.get() else {
        return Err("kept: no reloadable logger".into());
    };
    let f = filter(level, "keyturn=info");
    let shown = f.to_string();
    handle
        .reload(f)
        .map_err(|e| format!("kept: {e}"))
        .map(|()| shown)
}

/// Writes client output to stdout. A closed stdout (the reader of a pipe
/// left) ends the process quietly with [`EXIT_BROKEN_PIPE`]; any other
/// error is reported on stderr, also without panicking.
pub fn out(text: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    let r = stdout.write_fmt(text).and_then(|()| stdout.flush());
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(EXIT_BROKEN_PIPE)
        }
        Err(e) => {
            err(format_args!("keyturn: cannot write the output: {e}\n"));
            std::process::exit(2)
        }
    }
}

/// Writes to stderr, ignoring a closed or failing stderr.
pub fn err(text: std::fmt::Arguments<'_>) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_fmt(text);
    let _ = stderr.flush();
}

/// `println!` for client output, through [`out`].
#[macro_export]
macro_rules! outln {
    () => { $crate::logging::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::logging::out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` that never panics, through [`err`].
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::logging::err(format_args!("{}\n", format_args!($($arg)*))) };
}
