#!/usr/bin/env bash
# Benchmark (not a test): end-to-end latency of `keyturn hook claude-code`
# for an auto-allowed call (process start included, server running), beside
# `cat` as the floor. Needs hyperfine.
#
#   benches/hook_latency.sh [path/to/keyturn]     (default: target/release/keyturn)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(realpath "${1:-target/release/keyturn}")"
DIR="$(mktemp -d)"
trap 'kill "$SERVER" 2>/dev/null || true; rm -rf "$DIR"' EXIT

cat > "$DIR/config.toml" <<TOML
[server]
socket_path = "$DIR/k.sock"
[store]
url = "sqlite://$DIR/k.db"
[admin]
# The hook and the server run as this one uid.
single_user_demo = true
[[agents]]
name = "claude-code"
[[tools]]
name = "Read"
risk = "low"
[[grants]]
scope = "global"
tool = "*"
effect = "allow"
TOML

"$BIN" serve --config "$DIR/config.toml" > "$DIR/serve.out" 2> "$DIR/serve.err" &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" "$DIR/serve.out" 2>/dev/null && break; sleep 0.05; done

# A Read call without tool_use_id: every run is a fresh submit, not a replay.
python3 - "$DIR/read.json" <<'PY'
import json, sys
d = json.load(open("tests/fixtures/claude-code/read.json"))
d.pop("tool_use_id")
json.dump(d, open(sys.argv[1], "w"))
PY
"$BIN" hook claude-code --socket "$DIR/k.sock" < "$DIR/read.json"
echo

# No shell (-N) for either command: stdin comes from the file via sh's
# redirection in both, so the floor is `sh -c 'cat < file'`.
hyperfine -N --warmup 30 --runs "${RUNS:-500}" --export-json "$DIR/hf.json" \
  "sh -c 'cat < $DIR/read.json'" \
  "sh -c '$BIN hook claude-code --socket $DIR/k.sock < $DIR/read.json'"
python3 - "$DIR/hf.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    name = "hook" if "hook" in r["command"] else "cat "
    print(f"{name}: median {r['median']*1000:.2f} ms  mean {r['mean']*1000:.2f} ms  min {r['min']*1000:.2f} ms")
PY
