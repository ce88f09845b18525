"""The client's canonical JSON and args hash agree with the server's, on the
vectors the Rust side records (tests/fixtures/args_hash_vectors.json)."""

import json
import pathlib

import pytest

import keyturn_client as kc

ROOT = pathlib.Path(__file__).resolve().parents[3]
VECTORS = json.loads((ROOT / "tests/fixtures/args_hash_vectors.json").read_text(encoding="utf-8"))


def serde_like_loads(text):
    # serde_json reads the literal -0 as the float -0.0; Python never sends
    # it (json.dumps writes -0.0), but the vector file contains it.
    return json.loads(text, parse_int=lambda s: -0.0 if s == "-0" else int(s))


@pytest.mark.parametrize("case", VECTORS, ids=[c["args_json"][:40] for c in VECTORS])
def test_vectors(case):
    args = serde_like_loads(case["args_json"])
    assert kc.canonical_json(args) == case["canonical"]
    assert kc.args_hash(args) == case["sha256"]


def test_python_values_round_trip_through_json_dumps():
    # What the client sends is json.dumps(args); its canonical form must equal
    # the canonical form of the sent text re-read.
    args = {"t": (1, 2), "f": 1e16, "z": -0.0, "s": "é\u2028\x00"}
    sent = json.loads(json.dumps(args, ensure_ascii=False))
    assert kc.canonical_json(args) == kc.canonical_json(sent)


def test_non_json_values_are_refused():
    with pytest.raises(TypeError):
        kc.canonical_json({"x": object()})
    with pytest.raises(ValueError):
        kc.canonical_json({"x": float("nan")})
    with pytest.raises(TypeError):
        kc.canonical_json({1: "int key"})
