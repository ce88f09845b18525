//! Runs the Python client's pytest suite (clients/python/tests) against this
//! build's binary, so `cargo test` covers CPython too. pytest is installed by
//! `.ci/run`; without it the test fails under `CI=true` and is skipped, loudly,
//! elsewhere.

use std::path::Path;
use std::process::Command;

fn have_pytest() -> bool {
    Command::new("python3")
        .args(["-c", "import pytest"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn python_client_pytest_suite() {
    if !have_pytest() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("python3 with pytest is required under CI (installed by .ci/run)");
        }
        eprintln!("\n*** SKIPPED python_client_pytest_suite: python3 -m pytest is not available (pip install pytest) ***\n");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "clients/python/tests",
        ])
        .current_dir(root)
        .env("KEYTURN_BIN", env!("CARGO_BIN_EXE_keyturn"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "pytest failed:\n{text}");
}
