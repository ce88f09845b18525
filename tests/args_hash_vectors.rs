//! Shared test vectors for the arguments hash: the Python client
//! (clients/python/tests/test_hash.py) must produce the same canonical JSON
//! and SHA-256 as the server for the same JSON text, and refuse the same
//! texts (a case with `refused` instead of a hash). Run with
//! `KEYTURN_WRITE_VECTORS=1` to record the Rust side's answers.

use keyturn::domain::canonical::{args_hash, canonical_json, parse_strict};
use serde_json::Value;
use std::path::Path;

#[test]
fn rust_side_matches_the_recorded_vectors() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/args_hash_vectors.json");
    let text = std::fs::read_to_string(&path).expect("vectors");
    let mut cases: Vec<Value> = serde_json::from_str(&text).expect("vectors JSON");
    let write = std::env::var_os("KEYTURN_WRITE_VECTORS").is_some();
    let (mut hashed, mut refused) = (0, 0);
    for c in &mut cases {
        let text = c["args_json"].as_str().expect("args_json").to_string();
        let obj = c.as_object_mut().expect("case");
        match parse_strict(&text) {
            Ok(args) => {
                hashed += 1;
                let (canon, hash) = (canonical_json(&args), args_hash(&args));
                if write {
                    obj.remove("refused");
                    obj.insert("canonical".into(), Value::String(canon));
                    obj.insert("sha256".into(), Value::String(hash));
                } else {
                    assert_eq!(obj.get("canonical"), Some(&Value::String(canon)), "{text}");
                    assert_eq!(obj.get("sha256"), Some(&Value::String(hash)), "{text}");
                }
            }
            Err(e) => {
                refused += 1;
                if write {
                    obj.remove("canonical");
                    obj.remove("sha256");
                    obj.insert("refused".into(), Value::String(e.to_string()));
                } else {
                    assert_eq!(
                        obj.get("refused"),
                        Some(&Value::String(e.to_string())),
                        "{text}"
                    );
                }
            }
        }
    }
    assert!(
        hashed >= 10 && refused >= 5,
        "{hashed} hashed, {refused} refused"
    );
    if write {
        let mut out = serde_json::to_string_pretty(&cases).expect("json");
        out.push('\n');
        std::fs::write(&path, out).expect("write vectors");
    }
}
