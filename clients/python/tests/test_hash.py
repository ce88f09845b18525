"""The client's canonical JSON and args hash agree with the server's, on the
vectors the Rust side records (tests/fixtures/args_hash_vectors.json)."""

import json
import pathlib

import pytest

import keyturn_client as kc

ROOT = pathlib.Path(__file__).resolve().parents[3]
VECTORS = json.loads((ROOT / "tests/fixtures/args_hash_vectors.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", VECTORS, ids=[c["args_json"][:40] for c in VECTORS])
def test_vectors(case):
    if "refused" in case:
        # Keyturn refuses this text; the client refuses it before sending.
        with pytest.raises(ValueError):
            kc.loads_strict(case["args_json"])
        return
    args = kc.loads_strict(case["args_json"])
    assert kc.canonical_json(args) == case["canonical"]
    assert kc.args_hash(args) == case["sha256"]


def test_big_integers_keep_every_digit():
    approved = {"amount": 123456789012345678901}
    assert kc.canonical_json(approved) == '{"amount":123456789012345678901}'
    assert kc.args_hash(approved) != kc.args_hash({"amount": 123456789012345678900})
    assert kc.canonical_json({"n": -(2**200)}) == '{"n":%d}' % -(2**200)
    assert kc.canonical_json({"n": 10**4300 - 1})
    with pytest.raises(ValueError):
        kc.canonical_json({"n": 10**4300})
    # 1 and 1.0 are different values.
    assert kc.args_hash({"n": 1}) != kc.args_hash({"n": 1.0})


def test_json_text_args_are_read_strictly():
    client = kc.Client(socket_path="/nonexistent.sock", agent="a")
    p = client._submit_params("t", '{"n": 123456789012345678901, "f": 1e2}')
    assert p["args"] == {"n": 123456789012345678901, "f": 100.0}
    for bad in ('{"a": 1, "a": 2}', '{"x": {"y": [{"k": 1, "k": 1}]}}', '{"n": -0}',
                '{"n": 1e400}', '{"n": 0.10000000000000000001}', '{"n": NaN}'):
        with pytest.raises(ValueError):
            client._submit_params("t", bad)
    with pytest.raises(TypeError):
        client._submit_params("t", "[1]")


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
