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

/// A CA and a server certificate for `localhost` and 127.0.0.1 in `dir`
/// (`ca.pem`, `cert.pem`, `key.pem`), for the suite's TLS round trip.
fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf named like its issuer reads as self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keyturn test CA");
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let key = KeyPair::generate().expect("key");
    let cert = {
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        p
    }
    .signed_by(&key, &ca, &ca_key)
    .expect("cert");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write key");
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
    let tls = tempfile::tempdir().expect("tempdir");
    certificates(tls.path());
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
        .env("KEYTURN_TEST_TLS_DIR", tls.path())
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
