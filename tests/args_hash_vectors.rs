//! Shared test vectors for the arguments hash: the Python client
//! (clients/python/tests/test_hash.py) must produce the same canonical JSON
//! and SHA-256 as the server for the same JSON text. Run with
//! `KEYTURN_WRITE_VECTORS=1` to record the Rust side's answers.

use serde_json::Value;
use std::path::Path;

#[test]
fn rust_side_matches_the_recorded_vectors() {
    use keyturn::domain::redact::{args_hash, canonical_json};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/args_hash_vectors.json");
    let text = std::fs::read_to_string(&path).expect("vectors");
    let mut cases: Vec<Value> = serde_json::from_str(&text).expect("vectors JSON");
    let write = std::env::var_os("KEYTURN_WRITE_VECTORS").is_some();
    for c in &mut cases {
        let args: Value =
            serde_json::from_str(c["args_json"].as_str().expect("args_json")).expect("args");
        let (canon, hash) = (canonical_json(&args), args_hash(&args));
        if write {
            c["canonical"] = Value::String(canon);
            c["sha256"] = Value::String(hash);
        } else {
            assert_eq!(c["canonical"], Value::String(canon), "{}", c["args_json"]);
            assert_eq!(c["sha256"], Value::String(hash), "{}", c["args_json"]);
        }
    }
    if write {
        let mut out = serde_json::to_string_pretty(&cases).expect("json");
        out.push('\n');
        std::fs::write(&path, out).expect("write vectors");
    }
}
