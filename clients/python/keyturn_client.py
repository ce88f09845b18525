"""Keyturn client: ask a human (or the policy) before a tool call runs.

A single file, standard library only. It speaks Keyturn's agent socket:
JSON-RPC 2.0 over a Unix socket, one JSON object per line; or, given a URL
(``url="keyturn+tls://host:7443"`` or ``$KEYTURN_URL``), the same protocol
over TCP with TLS, authenticated by the agent's bearer token (``token=`` or
``$KEYTURN_TOKEN``; a self-signed server's CA with ``ca=`` or ``$KEYTURN_CA``).

    from keyturn_client import Client, require_approval

    kt = Client(agent="my-agent")            # socket: $KEYTURN_SOCKET or ./keyturn.sock

    @require_approval(tool="delete_file", risk="high", client=kt)
    def delete_file(path):
        os.remove(path)

    delete_file("/srv/old.log")   # blocks until decided; raises ApprovalDenied if not approved

Everything fails closed: no socket, a protocol error or a timeout raises, so
the decorated function does not run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import ipaddress
import itertools
import json
import math
import os
import socket
import ssl
import time
import uuid
from typing import Any, Callable, Dict, Optional

__all__ = [
    "Client",
    "Decision",
    "KeyturnError",
    "ConnectionFailed",
    "RpcError",
    "ApprovalDenied",
    "ApprovalTimedOut",
    "ArgsMismatch",
    "AnswerMismatch",
    "RiskMismatch",
    "require_approval",
    "canonical_json",
    "args_hash",
    "loads_strict",
]

__version__ = "0.1.0"

RISKS = ("low", "medium", "high", "critical")


# --------------------------------------------------------------------------
# Errors


class KeyturnError(Exception):
    """Base class: no approval could be had, so nothing should run."""


class ConnectionFailed(KeyturnError):
    """The socket could not be reached or the connection broke."""


class _ReadTimeout(ConnectionFailed):
    """No answer within the call's timeout."""


class RpcError(KeyturnError):
    """Keyturn answered with a JSON-RPC error (``code`` is the stable name)."""

    def __init__(self, code: str, message: str, number: int = 0):
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.number = number


class ApprovalDenied(KeyturnError):
    """The call was denied (by a person or the policy) or cancelled.

    ``reason`` says why, ``approver`` who decided (``policy`` for the policy),
    ``decision`` is the full :class:`Decision`.
    """

    def __init__(self, decision: "Decision"):
        self.decision = decision
        self.reason = decision.reason
        self.approver = decision.who
        self.rule = decision.rule
        self.request_id = decision.request_id
        super().__init__(
            f"Keyturn {decision.request_id}: {decision.tool} was not approved: {decision.summary}"
        )


class ApprovalTimedOut(ApprovalDenied):
    """Nobody decided in time (Keyturn's deadline or the client's own wait)."""

    def __init__(self, decision: "Decision"):
        super().__init__(decision)
        self.args = (
            f"Keyturn {decision.request_id}: {decision.tool} timed out waiting for approval "
            f"({decision.summary})",
        )


class ArgsMismatch(KeyturnError):
    """The arguments about to run are not the ones that were approved."""


class AnswerMismatch(KeyturnError):
    """Keyturn's answer is about a different call (another tool, other
    arguments or another request) than the one asked about; never act on it."""


class RiskMismatch(KeyturnError):
    """The code declares a higher risk than the gateway applied; refusing to
    run on an automatic approval (risk may be raised, never lowered)."""


# --------------------------------------------------------------------------
# Canonical JSON and the arguments hash (must match src/domain/canonical.rs)
#
# Numbers: an int is its exact decimal digits (any size up to
# MAX_INTEGER_DIGITS); a float is the shortest text that reads back to the
# same double, as serde_json prints it (1.0, 100.0, 1e+16, 1.5e-7). So 1 and
# 1.0 hash differently. JSON text is read as Keyturn reads it (loads_strict):
# duplicate keys, the literal -0, NaN/Infinity and numbers a double cannot
# hold exactly (1e400, 1e-400, 0.10000000000000000001) are refused.

#: Longest integer Keyturn accepts, in digits (CPython's own default limit).
MAX_INTEGER_DIGITS = 4300
_INT_LIMIT = 10**MAX_INTEGER_DIGITS


def _ryu_float(x: float) -> str:
    """A float as serde_json prints it: the shortest round-trip digits,
    plain from 1e-5 up to below 1e16, else ``1e+16`` / ``1.5e-7``."""
    if math.isnan(x) or math.isinf(x):
        raise ValueError("NaN and infinity cannot be sent as JSON")
    if x == 0.0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    r = repr(abs(x))  # shortest round-trip digits, like ryu
    mant, _, exp = r.partition("e")
    exp_i = int(exp) if exp else 0
    int_part, _, frac = mant.partition(".")
    digits = (int_part + frac).lstrip("0")
    # value = 0.digits * 10**kk
    point = len(int_part) + exp_i
    lead_zeros = len(int_part + frac) - len((int_part + frac).lstrip("0"))
    kk = point - lead_zeros
    digits = digits.rstrip("0") or "0"
    length = len(digits)
    k = kk - length  # value = digits * 10**k
    if 0 <= k and kk <= 16:
        out = digits + "0" * k + ".0"
    elif 0 < kk <= 16:
        out = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        out = "0." + "0" * (-kk) + digits
    else:
        e = kk - 1
        exp_s = ("e+%d" % e) if e >= 0 else ("e%d" % e)
        out = (digits if length == 1 else digits[0] + "." + digits[1:]) + exp_s
    return sign + out


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        # Exact digits, whatever the size (Keyturn keeps every digit).
        if -_INT_LIMIT < v < _INT_LIMIT:
            return str(int(v))
        raise ValueError(f"an integer of more than {MAX_INTEGER_DIGITS} digits cannot be sent")
    return _ryu_float(float(v))


# serde_json's internal marker for a number; Keyturn refuses it as a key.
_RESERVED_KEY = "$serde_json::private::Number"


def _no_duplicate_keys(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k == _RESERVED_KEY:
            raise ValueError(f"the key {k!r} is reserved")
        if k in out:
            raise ValueError(f"duplicate key {k[:64]!r}")
        out[k] = v
    return out


def _strict_int(s: str) -> int:
    if s == "-0":
        raise ValueError("-0 is ambiguous (the integer 0 or the float -0.0); send 0 or -0.0")
    if len(s.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer of more than {MAX_INTEGER_DIGITS} digits is too long")
    return int(s)


def _strict_float(s: str) -> float:
    import decimal

    f = float(s)
    if math.isinf(f):
        raise ValueError(f"{s[:64]} is beyond the range of a 64-bit float")
    nearest = _ryu_float(f)
    if decimal.Decimal(s) != decimal.Decimal(nearest):
        raise ValueError(
            f"{s[:64]} cannot be kept exactly as a 64-bit float (it would become {nearest}); "
            "send fewer digits or a string"
        )
    return f


def _no_constant(s: str) -> Any:
    raise ValueError(f"{s} is not JSON")


def loads_strict(text: Any) -> Any:
    """Reads JSON text as Keyturn does: raises ``ValueError`` on a duplicate
    key at any depth, the literal ``-0``, ``NaN``/``Infinity``, an integer of
    more than :data:`MAX_INTEGER_DIGITS` digits, or a number that a 64-bit
    float cannot hold exactly (so what is hashed is what was written)."""
    return json.loads(
        text,
        object_pairs_hook=_no_duplicate_keys,
        parse_int=_strict_int,
        parse_float=_strict_float,
        parse_constant=_no_constant,
    )


def _string(s: str) -> str:
    out = ['"']
    for c in s:
        o = ord(c)
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif c == "\b":
            out.append("\\b")
        elif c == "\f":
            out.append("\\f")
        elif o < 0x20:
            out.append("\\u%04x" % o)
        elif 0xD800 <= o <= 0xDFFF:
            raise ValueError("lone surrogates cannot be sent as JSON")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def _canon(v: Any, out: list) -> None:
    if v is None:
        out.append("null")
    elif isinstance(v, bool):
        out.append("true" if v else "false")
    elif isinstance(v, (int, float)):
        out.append(_number(v))
    elif isinstance(v, str):
        out.append(_string(v))
    elif isinstance(v, (list, tuple)):
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _canon(item, out)
        out.append("]")
    elif isinstance(v, dict):
        for k in v:
            if not isinstance(k, str):
                raise TypeError(f"object keys must be strings, not {type(k).__name__}")
            if k == _RESERVED_KEY:
                raise ValueError(f"the key {k!r} is reserved")
        out.append("{")
        # Code point order is UTF-8 byte order.
        for i, k in enumerate(sorted(v)):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _canon(v[k], out)
        out.append("}")
    else:
        raise TypeError(f"{type(v).__name__} is not JSON (arguments must be JSON values)")


def canonical_json(v: Any) -> str:
    """Keys sorted by UTF-8 bytes at every level, no whitespace, integers as
    exact digits, floats in their shortest round-trip form: the text Keyturn
    hashes."""
    out: list = []
    _canon(v, out)
    return "".join(out)


def args_hash(v: Any) -> str:
    """Lowercase hex SHA-256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(v).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------
# The decision


class Decision(dict):
    """Keyturn's answer (a dict, with attribute access for the usual fields)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def pending(self) -> bool:
        return self.get("state") == "pending"

    @property
    def edited(self) -> bool:
        """An approver approved the call with edited arguments: run
        ``self.args`` (hashing to ``args_hash``), never the ones submitted."""
        return self.get("edited") is True

    def raise_unless_approved(self) -> "Decision":
        if self.get("approved") is True:
            return self
        if self.get("state") in ("timed_out", "pending") or self.get("client_timed_out"):
            raise ApprovalTimedOut(self)
        raise ApprovalDenied(self)


def _answering(d: Decision, tool: str, asked_hash: str, request_id: Optional[str] = None) -> Decision:
    """``d`` if it answers the call asked about, else :class:`AnswerMismatch`:
    an idempotency key or request id used for another call must never lend
    that call's approval to this one."""
    if d.get("tool") != tool:
        raise AnswerMismatch(f"asked about tool {tool!r}, Keyturn answered about {d.get('tool')!r}; not approved")
    if d.get("edited") and d.get("original_args_hash") == asked_hash:
        # An approver edited the call: the answer carries the arguments to
        # run instead (``Decision.args``), which must match their hash.
        edited = d.get("args")
        if not isinstance(edited, dict) or args_hash(edited) != d.get("args_hash"):
            raise AnswerMismatch(
                "an approver edited the arguments, and the edited arguments are missing or do not "
                "match their hash; not approved"
            )
    elif d.get("args_hash") != asked_hash:
        raise AnswerMismatch(
            f"asked about arguments {asked_hash}, Keyturn answered about {d.get('args_hash')}; not approved"
        )
    if request_id is not None and d.get("request_id") != request_id:
        raise AnswerMismatch(f"waited for request {request_id}, Keyturn answered about {d.get('request_id')}; not approved")
    return d


# --------------------------------------------------------------------------
# The client


def parse_url(url: str):
    """``keyturn+tls://host:port`` or ``keyturn+tcp://host:port`` as
    ``(host, port, tls)``."""
    for scheme, tls in (("keyturn+tls://", True), ("keyturn+tcp://", False)):
        if url.startswith(scheme):
            rest = url[len(scheme):].rstrip("/")
            break
    else:
        raise ValueError(
            f"{url!r} is not a Keyturn URL: use keyturn+tls://HOST:PORT "
            "(or keyturn+tcp://127.0.0.1:PORT on this host)"
        )
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"{url!r} has no port number: use keyturn+tls://HOST:PORT")
    host = host.strip("[]")
    if not host or any(c in host for c in "/@?#"):
        raise ValueError(f"{url!r}: no usable host name")
    return host, int(port), tls


def _is_loopback(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class Client:
    """One agent's view of Keyturn.

    ``socket_path`` defaults to ``$KEYTURN_SOCKET`` or ``./keyturn.sock``,
    ``agent`` to ``$KEYTURN_AGENT`` or ``"cli"``, ``token`` to
    ``$KEYTURN_AGENT_TOKEN``. With ``url`` (default ``$KEYTURN_URL``) the
    client reaches Keyturn over TCP instead: ``keyturn+tls://host:port``, or
    ``keyturn+tcp://127.0.0.1:port`` (plaintext, refused for any host that is
    not loopback); ``token`` is then the agent's bearer token (default
    ``$KEYTURN_TOKEN``, from ``keyturn token issue``) and ``ca`` a CA file
    to trust (default ``$KEYTURN_CA``, else the system's roots). ``unattended=True`` says nobody is watching:
    calls that need a human are denied at once (rule ``unattended``).
    ``max_wait`` bounds how long :meth:`submit` blocks (seconds, default: until
    Keyturn's own deadline); the request is cancelled when it passes.
    """

    def __init__(
        self,
        socket_path: Optional[str] = None,
        agent: Optional[str] = None,
        token: Optional[str] = None,
        *,
        unattended: bool = False,
        max_wait: Optional[float] = None,
        connect_timeout: float = 5.0,
        url: Optional[str] = None,
        ca: Optional[str] = None,
    ):
        self.socket_path = socket_path or os.environ.get("KEYTURN_SOCKET") or "keyturn.sock"
        self.agent = agent or os.environ.get("KEYTURN_AGENT") or "cli"
        self.url = url or (None if socket_path else os.environ.get("KEYTURN_URL")) or None
        self._ssl = None
        if self.url:
            host, port, tls = parse_url(self.url)
            if not tls and not _is_loopback(host, port):
                raise ValueError(
                    f"{self.url!r}: plaintext keyturn+tcp:// is for loopback addresses only "
                    "(the token would cross the network in clear); use keyturn+tls://"
                )
            self._addr = (host, port)
            self.bearer = token if token is not None else os.environ.get("KEYTURN_TOKEN")
            if not self.bearer:
                raise ValueError(
                    f"no token for {self.url}: pass token= or set KEYTURN_TOKEN to the "
                    "agent's token from `keyturn token issue`"
                )
            if tls:
                self._ssl = ssl.create_default_context(
                    cafile=ca or os.environ.get("KEYTURN_CA") or None
                )
            # Over TCP the bearer token authenticates the connection; no
            # agent token goes in the calls.
            token = ""
        self.token = token if token is not None else os.environ.get("KEYTURN_AGENT_TOKEN")
        self.unattended = unattended
        self.max_wait = max_wait
        self.connect_timeout = connect_timeout
        self._ids = itertools.count(1)

    # -- transport ---------------------------------------------------------

    def call(self, method: str, params: Dict[str, Any], timeout: Optional[float] = None) -> Any:
        """One JSON-RPC call on its own connection. ``timeout`` bounds the
        wait for the answer (``None``: no bound)."""
        rid = next(self._ids)
        line = json.dumps(
            {"jsonrpc": "2.0", "id": rid, "method": method, "params": params},
            ensure_ascii=False,
            allow_nan=False,
        )
        s = None
        try:
            s, f = self._connect()
            s.settimeout(timeout)
            try:
                s.sendall(line.encode("utf-8") + b"\n")
                while True:
                    raw = f.readline()
                    if not raw:
                        raise ConnectionFailed("Keyturn closed the connection")
                    try:
                        msg = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
                    except ValueError as e:
                        raise KeyturnError(f"Keyturn sent something that is not JSON: {raw[:200]!r}") from e
                    if not isinstance(msg, dict):
                        raise KeyturnError(f"Keyturn sent something that is not a response: {raw[:200]!r}")
                    if msg.get("id") not in (rid, None):
                        continue
                    if "error" in msg:
                        err = msg["error"] or {}
                        code = (err.get("data") or {}).get("code", "error")
                        raise RpcError(code, err.get("message", "error"), err.get("code", 0))
                    if "result" not in msg:
                        raise KeyturnError(f"response without a result: {raw[:200]!r}")
                    return msg["result"]
            except socket.timeout as e:
                raise _ReadTimeout(f"no answer from Keyturn within {timeout}s") from e
            except OSError as e:
                raise ConnectionFailed(f"connection to Keyturn failed: {e}") from e
        finally:
            if s is not None:
                s.close()

    def _connect(self):
        """A connected socket and a reader on it: the agent socket, or TCP
        (TLS for keyturn+tls) authenticated with the bearer token."""
        where = self.url or self.socket_path
        try:
            if not self.url:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(self.connect_timeout)
                try:
                    s.connect(self.socket_path)
                except OSError:
                    s.close()
                    raise
                return s, s.makefile("rb")
            raw = socket.create_connection(self._addr, timeout=self.connect_timeout)
            try:
                s = self._ssl.wrap_socket(raw, server_hostname=self._addr[0]) if self._ssl else raw
            except (OSError, ssl.SSLError):
                raw.close()
                raise
        except (OSError, ssl.SSLError) as e:
            raise ConnectionFailed(
                f"cannot connect to Keyturn at {where}: {e} (is `keyturn serve` running?)"
            ) from e
        try:
            auth = {"jsonrpc": "2.0", "id": 0, "method": "auth", "params": {"token": self.bearer}}
            s.sendall(json.dumps(auth).encode("utf-8") + b"\n")
            f = s.makefile("rb")
            raw_line = f.readline()
        except (OSError, ssl.SSLError) as e:
            s.close()
            raise ConnectionFailed(f"authenticating to Keyturn at {where} failed: {e}") from e
        try:
            msg = json.loads(raw_line) if raw_line else None
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or msg.get("id") not in (0, None):
            s.close()
            raise ConnectionFailed(f"Keyturn at {where} did not answer auth")
        if "error" in msg:
            s.close()
            err = msg["error"] or {}
            code = (err.get("data") or {}).get("code", "error")
            raise RpcError(code, err.get("message", "error"), err.get("code", 0))
        return s, f

    def _auth(self, p: Dict[str, Any]) -> Dict[str, Any]:
        p["agent"] = self.agent
        if self.token:
            p["token"] = self.token
        return p

    # -- API ---------------------------------------------------------------

    def _submit_params(
        self,
        tool: str,
        args: Optional[Any],
        justification: str = "",
        *,
        task_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        user_id: Optional[str] = None,
        channel_id: Optional[str] = None,
        cost: Optional[float] = None,
        timeout_secs: Optional[int] = None,
        unattended: Optional[bool] = None,
        confidence: Optional[float] = None,
    ) -> Dict[str, Any]:
        args = {} if args is None else args
        if isinstance(args, (str, bytes, bytearray)):
            # JSON text: read as Keyturn reads it, before anything is sent.
            args = loads_strict(args)
        if not isinstance(args, dict):
            raise TypeError("args must be a dict (a JSON object) or the JSON text of one")
        canonical_json(args)  # fail early on values that are not JSON
        p: Dict[str, Any] = {"tool": tool, "args": args, "justification": justification}
        for k, v in (
            ("task_id", task_id),
            ("idempotency_key", idempotency_key),
            ("user_id", user_id),
            ("channel_id", channel_id),
            ("cost", cost),
            ("timeout_secs", timeout_secs),
            ("confidence", confidence),
        ):
            if v is not None:
                p[k] = v
        if unattended if unattended is not None else self.unattended:
            p["unattended"] = True
        return self._auth(p)

    def submit(self, tool: str, args: Optional[Any] = None, justification: str = "", *,
               wait: bool = True, **kw: Any) -> Decision:
        """Submits a tool call. With ``wait`` (the default) blocks until it is
        decided, Keyturn's deadline passes, or ``max_wait`` passes (then the
        request is cancelled and the returned decision is not approved).
        While it waits, this process dying or being interrupted closes the
        connection, and Keyturn cancels the request (``client_gone``).
        Keyword arguments: task_id, idempotency_key, user_id, channel_id,
        cost, timeout_secs, unattended, confidence (0 to 1: below the
        server's ``min_confidence`` an allowed call waits for a human).

        The answer must be about this call (same tool and ``args_hash``), else
        :class:`AnswerMismatch` is raised."""
        p = self._submit_params(tool, args, justification, **kw)
        asked = args_hash(p["args"])
        if not wait:
            p["wait"] = False
            return _answering(Decision(self.call("submit", p, timeout=30.0)), tool, asked)
        # One call that waits on the server, so no moment exists where the
        # request is pending and nobody is connected to wait for it.
        p["wait"] = True
        p.setdefault("idempotency_key", f"keyturn-py:{uuid.uuid4()}")
        started = time.monotonic()
        try:
            d: Optional[Decision] = Decision(self.call("submit", p, timeout=self.max_wait))
        except _ReadTimeout:
            d = None
        if d is not None and d.state != "pending":
            return _answering(d, tool, asked)
        waited = time.monotonic() - started
        if d is None:
            # The same call under the same key returns the same request.
            q = dict(p, wait=False)
            d = _answering(Decision(self.call("submit", q, timeout=30.0)), tool, asked)
        try:
            d = self.cancel(d.request_id, reason=f"the agent stopped waiting after {waited:.0f}s")
        except RpcError as e:
            if e.code != "already_decided":
                raise
            d = self.status(d.request_id)
        # Whatever landed between our timeout and the cancel, we stopped
        # waiting: never treat it as approved.
        return _answering(Decision(d, approved=False, client_timed_out=True), tool, asked)

    def wait(self, request_id: str, max_wait: Optional[float] = None, *, detach: bool = False) -> Decision:
        """Blocks until ``request_id`` is decided (woken by Keyturn, no polling).
        After ``max_wait`` seconds the request is cancelled and returned. If
        this process goes away while waiting, Keyturn cancels the request
        (``client_gone``) unless ``detach`` is set."""
        p = self._auth({"id": request_id})
        if detach:
            p["detach"] = True
        if max_wait is not None:
            p["timeout_secs"] = max(1, math.ceil(max_wait))
        started = time.monotonic()
        try:
            d = Decision(self.call("wait", p, timeout=max_wait))
        except _ReadTimeout:
            d = None
        if d is None or d.state == "pending":
            waited = time.monotonic() - started
            try:
                d = self.cancel(request_id, reason=f"the agent stopped waiting after {waited:.0f}s")
            except RpcError as e:
                if e.code != "already_decided":
                    raise
                d = self.status(request_id)
            # Whatever landed between our timeout and the cancel, we stopped
            # waiting: never treat it as approved.
            d = Decision(d, approved=False, client_timed_out=True)
        return d

    def status(self, request_id: str) -> Decision:
        return Decision(self.call("status", self._auth({"id": request_id}), timeout=30.0))

    def cancel(self, request_id: str, reason: Optional[str] = None) -> Decision:
        p = self._auth({"id": request_id})
        if reason:
            p["reason"] = reason
        return Decision(self.call("cancel", p, timeout=30.0))

    def check(self, tool: str, args: Optional[Any] = None, **kw: Any) -> Dict[str, Any]:
        """What the policy would do with a call, without queueing it:
        ``{"verdict": {"action": "allow"|"ask"|"deny", "rule", "detail", …}, "risk", "allowlist"}``."""
        p = self._submit_params(tool, args, **kw)
        return self.call("check", p, timeout=30.0)

    def ping(self) -> Dict[str, Any]:
        return self.call("ping", {}, timeout=10.0)


# --------------------------------------------------------------------------
# The decorator


def require_approval(
    tool: Optional[str] = None,
    risk: Optional[str] = None,
    *,
    client: Optional[Client] = None,
    justification: Any = "",
    **submit_kw: Any,
) -> Callable:
    """Runs the decorated function only after Keyturn approves the call.

    The call's arguments (bound by name, defaults applied) are the request's
    ``args``; they must be JSON values. ``tool`` defaults to the function's
    name. ``justification`` may be a string or a function of the same
    arguments. ``risk`` is what the code believes the tool's risk is: when
    the gateway approved automatically at a lower risk, :class:`RiskMismatch`
    is raised rather than running (a risk may be raised, never lowered).

    Before running, the arguments are hashed again and compared with the
    approved ``args_hash``; a difference raises :class:`ArgsMismatch`.
    Denials raise :class:`ApprovalDenied` (``.reason``, ``.approver``),
    timeouts :class:`ApprovalTimedOut`.
    """
    if risk is not None and risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}")

    def deco(fn: Callable) -> Callable:
        name = tool or fn.__name__
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            kt = client or Client()
            bound = sig.bind(*a, **kw)
            bound.apply_defaults()
            args = dict(bound.arguments)
            why = justification(*a, **kw) if callable(justification) else justification
            d = kt.submit(name, args, why or "", **submit_kw).raise_unless_approved()
            if risk is not None and d.get("decided_by") == "policy":
                if RISKS.index(d.get("risk", "low")) < RISKS.index(risk):
                    raise RiskMismatch(
                        f"{name} is declared {risk} risk but Keyturn approved it automatically at "
                        f"{d.get('risk')} risk; configure [[tools]] risk for {name} in Keyturn"
                    )
            if d.edited:
                # What runs is what the approver saw: their edit, bound to
                # the same parameters (an edit that does not fit the
                # function's signature is not run).
                try:
                    bound = sig.bind(**d["args"])
                except TypeError as e:
                    raise ArgsMismatch(f"{name}: the approver's edit does not fit the function ({e})") from None
            # Hash what is about to run, now, against what was approved.
            now = args_hash(dict(bound.arguments))
            if now != d.get("args_hash"):
                raise ArgsMismatch(
                    f"{name}: the arguments changed after approval (approved {d.get('args_hash')}, running {now})"
                )
            return fn(*bound.args, **bound.kwargs)

        wrapper.keyturn_tool = name  # type: ignore[attr-defined]
        return wrapper

    return deco
