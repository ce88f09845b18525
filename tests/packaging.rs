//! What ships beside the binary: the licence files Cargo.toml declares and
//! the systemd unit, checked with `systemd-analyze verify` where the machine
//! has it (under `CI=true` a missing `systemd-analyze` fails the test).

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn both_declared_licences_ship() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    assert!(manifest.contains("license = \"MIT OR Apache-2.0\""));
    let mit = std::fs::read_to_string(root().join("LICENSE-MIT")).expect("LICENSE-MIT");
    assert!(mit.contains("Permission is hereby granted, free of charge"));
    let apache = std::fs::read_to_string(root().join("LICENSE-APACHE")).expect("LICENSE-APACHE");
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0"));
}

#[test]
fn systemd_unit_verifies_clean() {
    verify_unit(
        "keyturn.service",
        "keyturn.service",
        "/etc/keyturn/keyturn.toml",
    );
}

/// The template for several replicas on one PostgreSQL database, verified as
/// an instance.
#[test]
fn systemd_replica_template_verifies_clean() {
    verify_unit(
        "keyturn@.service",
        "keyturn@a.service",
        "/etc/keyturn/%i.toml",
    );
}

/// Checks the unit's must-haves, then `systemd-analyze verify` on it saved
/// as `as_name` (an instance name for a template).
fn verify_unit(file: &str, as_name: &str, config: &str) {
    let unit = std::fs::read_to_string(root().join("examples/systemd").join(file))
        .unwrap_or_else(|e| panic!("examples/systemd/{file}: {e}"));
    for must in [
        "User=keyturn",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        &format!("ExecStart=/usr/local/bin/keyturn serve --config {config}"),
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(must), "{file} lacks `{must}`");
    }
    let has_analyze = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_analyze {
        assert!(
            std::env::var("CI").is_err(),
            "systemd-analyze is missing under CI (install the systemd package)"
        );
        eprintln!("systemd-analyze not found; only the unit's text was checked");
        return;
    }
    // `verify` checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(as_name);
    let text = unit.replace("/usr/local/bin/keyturn", env!("CARGO_BIN_EXE_keyturn"));
    std::fs::write(&path, text).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings (exit 0): any output fails.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {as_name}: {}\n{stderr}",
        out.status
    );
}
