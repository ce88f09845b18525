//! Calls on the sockets without the library's client: one JSON-RPC line
//! per fresh connection, and the routing of a call to the agent or the
//! admin socket. Plus the small helpers of the file-tools tests' calls.

use keyturn::ipc::client::{Client, ClientError};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Whether a call goes to the admin socket: admin methods (the server's own
/// list, named here and nowhere else in the tests), and agent methods
/// without an `agent` (an admin acting on any request).
pub fn is_admin_call(method: &str, params: &Value) -> bool {
    keyturn::ipc::protocol::is_admin_method(method)
        || (method != "ping" && params.get("agent").is_none_or(Value::is_null))
}

/// One call on a fresh connection to `socket`: the result, or the error object.
pub fn call(socket: &Path, method: &str, params: Value) -> Result<Value, Value> {
    let mut s = UnixStream::connect(socket).expect("connect");
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{line}").expect("write");
    let mut r = BufReader::new(s);
    let mut buf = String::new();
    r.read_line(&mut buf).expect("read");
    let v: Value = serde_json::from_str(&buf).expect("json");
    match v.get("error") {
        Some(e) => Err(e.clone()),
        None => Ok(v["result"].clone()),
    }
}

/// Submit params for agent `bot` of the file-tools config, with `extra`
/// fields set over the defaults.
pub fn submit(tool: &str, extra: Value) -> Value {
    let mut p = json!({"agent": "bot", "tool": tool, "args": {"path": "/srv/x"}, "user_id": "42", "channel_id": "7", "justification": "test"});
    if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
    p
}

/// The stable error code of a failed call.
pub fn err_code(r: Result<Value, ClientError>) -> String {
    match r {
        Err(ClientError::Rpc(e)) => e.data.code,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

/// Waits (with a deadline) until `pending` lists `n` requests.
pub async fn wait_pending(c: &mut Client, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = c.call("pending", json!({})).await.expect("pending");
        let list = list.as_array().cloned().unwrap_or_default();
        if list.len() == n {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} pending, have {}",
            list.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A high-risk request (the Discord config's `delete_file`) on behalf of
/// user 42, for [`super::Server::submit_as`].
pub fn delete_file() -> Value {
    json!({
        "tool": "delete_file",
        "args": {"path": "/srv/x"},
        "user_id": "42",
        "channel_id": "7",
        "justification": "cleanup of old builds",
    })
}
