"""LLM API relay gateway: team members call it with personal keys; it calls the upstream LLM API
with the team's key, enforcing exact per-user daily request and token limits.

Run:    python gateway.py --demo                     (built-in mock model, no upstream key needed)
        python gateway.py --upstream-api-key=sk-...  (or UPSTREAM_API_KEY / OPENAI_API_KEY)
Users:  users.yaml, reloaded on change (format in README.md).  Counters: data/YYYY-MM-DD.jsonl.
Admin:  python gateway.py user add|list|disable|enable|limits|rotate|reset …, usage …;
        /admin dashboard and /metrics with --admin-key.

The file, section by section, each under a banner; names are defined before the sections
that use them (the dashboard's page assets excepted, kept near the end out of the code's way):

   1. Contract: messages, error codes and the envelope (clients match on these)
   2. Errors: raised anywhere, turned into answers in one place (answer_for)
   3. Secrets out, control characters escaped: what may reach a client, a log or data/
   4. Configuration and options
   5. Private files: data/ is 0700, its files 0600, no symbolic link followed
   6. Users (users.yaml)
   7. Editing users.yaml in place (the `user` commands and the dashboard)
   8. Days: "today" is the calendar day in the configured zone
   9. Usage store: the interface, the journal format, the file backend
  10. Upstream client and the bounded queue
  11. Call log (data/calls/YYYY-MM-DD.jsonl) and metrics
  12. Requests: bodies, parsing, validation and token estimation
  13. Admin access: sessions and the guess throttle
  14. The relay pipeline: admit -> relay -> settle or release (Service.relay)
  15. HTTP handlers: the API routes
  16. Operating: /metrics and the /admin dashboard (both off without --admin-key)
  17. Demo upstream (--demo): a mock model behind OpenAI's and Anthropic's APIs
  18. Assets: the dashboard's HTML, CSS and JavaScript
  19. Administration commands: python gateway.py user … | usage …
  20. Main: routes, the HTTP server, the running service, the command line

A request's way through: HTTPServer → a handler's prepare() (route, key, body size, from the
headers) → RelayHandler.run() (validate) → Service.relay (admit → relay → settle or release) →
the handler's answer, or answer_for() → write_error() for any failure.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import csv
import dataclasses
import fnmatch
import gc
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pwd
import re
import secrets
import signal
import socket
import struct
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import filelock
import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.log
import tornado.netutil
import tornado.options
import tornado.queues
import tornado.simple_httpclient
import tornado.web
import yaml

log = logging.getLogger("gateway")


# ---------------------------------------------------------------------------------------------
# Contract: messages, error codes and the envelope (clients match on these)
# ---------------------------------------------------------------------------------------------

MSG_OK = "请求成功"
MSG_BAD_REQUEST = "请求参数错误"
MSG_BAD_KEY = "API Key无效或缺失"
MSG_REQUEST_LIMIT = "每日请求次数已达上限"
MSG_TOKEN_LIMIT = "每日Token用量已达上限"  # noqa: S105 - a message, not a secret
MSG_SERVER_ERROR = "系统配置错误"  # the contract's one 500 message: configuration and store faults
MSG_UPSTREAM = "大模型API调用失败"
MSG_QUEUE_FULL = "队列已满"
# Ours, for cases the contract does not name.
MSG_NOT_FOUND = "接口不存在"
MSG_METHOD = "请求方法不允许"
MSG_TOO_LARGE = "请求体过大"
MSG_HEADERS_TOO_LARGE = "请求头过大"
MSG_INTERNAL = "系统内部错误"
MSG_STOPPING = "服务正在停止"
MSG_FORBIDDEN = "无权访问"
MSG_TOO_MANY = "请求过于频繁"
# Per-user policy (users.yaml): each has its machine code in data.error / error.code.
MSG_MODEL_NOT_ALLOWED = "无权使用该模型"
MSG_RPM = "每分钟请求次数已达上限"
MSG_TPM = "每分钟Token用量已达上限"
MSG_CONCURRENCY = "并发请求数已达上限"
MSG_KEY_EXPIRED = "API Key已过期"
MSG_IP_NOT_ALLOWED = "IP地址不在允许范围内"

# The client APIs the gateway speaks: OpenAI's (chat, completions, embeddings), OpenAI's
# Responses API, Anthropic's Messages API. An upstream speaks OpenAI's or Anthropic's.
API_OPENAI, API_RESPONSES, API_ANTHROPIC = "openai", "responses", "anthropic"
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,512}")  # a header value passed on or configured

MESSAGE_BY_STATUS = {
    400: MSG_BAD_REQUEST,
    401: MSG_BAD_KEY,
    404: MSG_NOT_FOUND,
    403: MSG_FORBIDDEN,
    405: MSG_METHOD,
    413: MSG_TOO_LARGE,
    431: MSG_HEADERS_TOO_LARGE,
    502: MSG_UPSTREAM,
    503: MSG_QUEUE_FULL,
}


# OpenAI's error `type` and our `code` for each status / contract message.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
}
_OPENAI_CODES = {
    MSG_BAD_REQUEST: "invalid_request",
    MSG_BAD_KEY: "invalid_api_key",
    MSG_REQUEST_LIMIT: "daily_request_limit_exceeded",
    MSG_TOKEN_LIMIT: "daily_token_limit_exceeded",
    MSG_SERVER_ERROR: "configuration_error",
    MSG_UPSTREAM: "upstream_error",
    MSG_QUEUE_FULL: "queue_full",
    MSG_NOT_FOUND: "not_found",
    MSG_METHOD: "method_not_allowed",
    MSG_TOO_LARGE: "request_too_large",
    MSG_HEADERS_TOO_LARGE: "headers_too_large",
    MSG_INTERNAL: "internal_error",
    MSG_STOPPING: "shutting_down",
    MSG_TOO_MANY: "too_many_requests",
    MSG_MODEL_NOT_ALLOWED: "model_not_allowed",
    MSG_RPM: "rpm_limit_exceeded",
    MSG_TPM: "tpm_limit_exceeded",
    MSG_CONCURRENCY: "concurrency_limit_exceeded",
    MSG_KEY_EXPIRED: "api_key_expired",
    MSG_IP_NOT_ALLOWED: "ip_not_allowed",
}


def envelope(success: bool, message: str, data: Any) -> dict[str, Any]:
    return {"success": success, "message": message, "data": data}


def _compact(obj: Any) -> bytes:
    # backslashreplace: a lone surrogate becomes its JSON escape instead of an exception.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "backslashreplace"
    )


# ---------------------------------------------------------------------------------------------
# Errors: raised anywhere, turned into answers in one place (answer_for)
# ---------------------------------------------------------------------------------------------


class GatewayError(Exception):
    """An error response: status, the contract's message, details in `data`, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        data: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.data = data
        self.headers = headers or {}


def bad_request(error: str, field: str | None = None) -> GatewayError:
    data: dict[str, Any] = {"error": error}
    if field is not None:
        data["field"] = field
    return GatewayError(400, MSG_BAD_REQUEST, data)


class ConfigError(Exception):
    """users.yaml or an option is unusable; raised at start-up and on reload."""


class StoreError(Exception):
    """The usage store could not read or write its files."""


class StoreUnavailable(StoreError):
    """A network store (Redis) cannot be reached now; calls resume when it is back."""


class QuotaExceeded(Exception):
    """A reservation was refused: `reason` is "requests", "tokens", "corrupt", or from the
    user's policy "rpm", "tpm" or "concurrency" (`retry_after`: seconds, for rpm and tpm)."""

    def __init__(self, reason: str, user: User, counts: Counts, retry_after: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.user = user
        self.counts = counts
        self.retry_after = retry_after


class UpstreamFailure(Exception):
    """The upstream call failed: unreachable, timed out, non-2xx, or not a JSON object.

    `responded`: an HTTP answer (its status line at least) arrived; `retry_after`: the
    upstream's Retry-After in seconds, if it sent one; `attempts`: every upstream tried for
    the call, when routing tried more than one (names and statuses, never keys).
    """

    def __init__(
        self,
        status: int | None,
        error: str,
        *,
        responded: bool | None = None,
        retry_after: float | None = None,
        attempts: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.responded = status is not None if responded is None else responded
        self.retry_after = retry_after
        self.attempts = attempts or []


_POLICY_REFUSALS = {
    "rpm": (MSG_RPM, "rpm_limit_exceeded"),
    "tpm": (MSG_TPM, "tpm_limit_exceeded"),
    "concurrency": (MSG_CONCURRENCY, "concurrency_limit_exceeded"),
}


def answer_for(exc: BaseException, clock: DayClock) -> GatewayError | None:
    """The answer to an exception raised under a handler: the one place where failures
    become responses (write_error renders it in the route's shape)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, QuotaExceeded):
        if exc.reason == "corrupt":
            return GatewayError(
                500,
                MSG_SERVER_ERROR,
                {"error": "this user's usage records are unreadable; see the gateway log"},
            )
        user, c = exc.user, exc.counts
        if exc.reason in _POLICY_REFUSALS:
            message, code = _POLICY_REFUSALS[exc.reason]
            headers = {"x-should-retry": "true" if exc.reason != "concurrency" else "false"}
            if exc.retry_after:
                headers["Retry-After"] = str(exc.retry_after)
            return GatewayError(429, message, {"error": code, "in_flight": c.reserved}, headers)
        return GatewayError(
            429,
            MSG_REQUEST_LIMIT if exc.reason == "requests" else MSG_TOKEN_LIMIT,
            {
                "daily_request_count": c.requests + c.reserved,
                "daily_request_limit": user.daily_request_limit,
                "daily_token_count": c.tokens,
                "daily_token_limit": user.daily_token_limit,
            },
            # The SDKs obey x-should-retry: without it they sleep until midnight and retry.
            {"Retry-After": str(clock.seconds_to_midnight()), "x-should-retry": "false"},
        )
    if isinstance(exc, UnknownModel):
        return GatewayError(
            400,
            MSG_BAD_REQUEST,
            {"error": f"no upstream serves model {exc.model!r}", "field": "model"},
        )
    if isinstance(exc, UpstreamFailure):
        data: dict[str, Any] = {"upstream_status": exc.status, "error": exc.error}
        if exc.attempts:
            data["attempts"] = exc.attempts
        headers = {}
        if exc.retry_after is not None and exc.status is None:  # every upstream is resting
            headers["Retry-After"] = str(math.ceil(exc.retry_after))
        return GatewayError(502, MSG_UPSTREAM, data, headers)
    if isinstance(exc, StoreUnavailable):
        return GatewayError(
            500,
            MSG_SERVER_ERROR,
            {"error": "the usage store is unavailable; calls resume when it is back"},
            {"Retry-After": "1"},
        )
    if isinstance(exc, StoreError):
        return GatewayError(
            500,
            MSG_SERVER_ERROR,
            {"error": "the usage store cannot be written; see the gateway log"},
        )
    if isinstance(exc, ConfigError):
        return GatewayError(500, MSG_SERVER_ERROR, {"error": str(exc)})
    return None


class UnknownModel(Exception):
    """No upstream serves the model a call names (routing: upstreams.yaml's `models`)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class ClientLeft(tornado.httputil.HTTPInputError):
    """Raised inside the upstream's streaming callback to abort it when the client has gone.

    An HTTPInputError, because Tornado's HTTP client lets that type through its callback
    wrapper without logging a traceback, and then closes the upstream connection.
    """


class EventTooLarge(ClientLeft):
    """Raised inside the streaming callback when one upstream event outgrows --max-event-size."""


# ---------------------------------------------------------------------------------------------
# Secrets out, control characters escaped: what may reach a client, a log or data/
# ---------------------------------------------------------------------------------------------

# Key-shaped text from anywhere: sk-…, gsk_…, xai-…, key-…, and Authorization values.
_SECRET_PATTERNS = re.compile(
    r"\b(?:sk|pk|rk|gsk|xai|key)[-_][A-Za-z0-9_\-*.]{6,}|Bearer\s+\S+", re.IGNORECASE
)
_KEYISH_RUN = re.compile(r"[A-Za-z0-9_\-.+/=~*]{8,}")
_FRAGMENT = 8  # this many consecutive characters of a configured secret are redacted
REDACTED = "[redacted]"


def _mixed(text: str) -> bool:
    kinds = (str.islower, str.isupper, str.isdigit, lambda c: not c.isalnum())
    return sum(any(kind(c) for c in text) for kind in kinds) >= 2


class Redactor:
    """Takes the configured secrets out of text that comes from the upstream or the OS.

    Upstreams echo keys whole ("Bearer sk-…"), in part ("Incorrect API key: gsk_ABCD…"), or
    key-shaped strings that are not ours. `text` removes all three: each secret, every run
    holding 8+ consecutive characters of one, and anything key-shaped. `data` is for the
    relayed bytes of a successful answer: whole secrets only, and no copy when none occurs.
    """

    def __init__(self, secrets_: tuple[str, ...] = ()) -> None:
        self.secrets = tuple(sorted({s for s in secrets_ if s}, key=len, reverse=True))
        self._bytes = tuple(s.encode() for s in self.secrets)
        # A window that is one kind of character ("upstream", "20261127") would match
        # ordinary words: only windows that mix kinds, as random keys do, are looked for.
        self._windows = {
            w
            for s in self.secrets
            for i in range(len(s) - _FRAGMENT + 1)
            if _mixed(w := s[i : i + _FRAGMENT])
        }

    def text(self, text: str) -> str:
        if not text.isascii():
            text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if self._windows:
            text = _KEYISH_RUN.sub(self._fragment, text)
        return _SECRET_PATTERNS.sub(REDACTED, text)

    def _fragment(self, m: re.Match[str]) -> str:
        run = m.group()
        windows = self._windows
        for i in range(len(run) - _FRAGMENT + 1):
            if run[i : i + _FRAGMENT] in windows:
                return REDACTED
        return run

    def data(self, data: bytes) -> bytes:
        for secret in self._bytes:
            if secret in data:
                data = data.replace(secret, REDACTED.encode())
        return data


def redact(text: str, secrets_: tuple[str, ...] = ()) -> str:
    """Remove these secrets, fragments of them and anything key-shaped from text."""
    return Redactor(secrets_).text(text)


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
        f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    )


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    """Control characters as visible escapes: a logged string cannot forge a line or drive the
    terminal (ESC sequences, C1 controls, Unicode line separators)."""
    pattern = _CONTROLS_BUT_NEWLINE if keep_newlines else _CONTROLS
    return pattern.sub(_escape_char, text)


STRANGER_LINES_PER_MINUTE = 20  # log lines about requests that never authenticated


_HEADER_QUOTE = re.compile(r"(Invalid header (?:value|name)|Invalid Host header:?) .*", re.S)
_TRACEBACKS = logging.Formatter()


class LogGuard(logging.Filter):
    """Every record the gateway's and Tornado's loggers emit passes here once, so that no
    log line carries a secret or a raw control character, whoever wrote it.

    It also bounds the lines that traffic without a valid key can cause (records marked
    `stranger`, and Tornado's notes on malformed requests) to STRANGER_LINES_PER_MINUTE, and
    drops Tornado's "Malformed HTTP message" about an upstream read the gateway aborted on
    purpose (ClientLeft).
    """

    LOGGERS = (
        "gateway",
        "tornado.access",
        "tornado.application",
        "tornado.general",
        "tornado.curl_httpclient",
        "asyncio",
    )

    def __init__(self) -> None:
        super().__init__()
        self.redactor = Redactor()
        self._window = 0.0
        self._lines = 0
        self.suppressed = 0

    def install(self, redactor: Redactor) -> None:
        """Guard the loggers (once) and redact these secrets from now on; the stranger-line
        budget starts afresh."""
        self.redactor = redactor
        self._window, self._lines, self.suppressed = 0.0, 0, 0
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(arg, ClientLeft) for arg in args):
            return False
        if record.name == "tornado.general":
            # "Malformed HTTP message from …: Invalid header value 'sk-…\r'" quotes the
            # client's header, which may be a key: only the kind of fault is kept.
            record.args = tuple(
                _HEADER_QUOTE.sub(r"\1 [withheld]", str(a))
                if isinstance(a, str | BaseException)
                else a
                for a in args
            )
            if str(record.msg).startswith(("Malformed HTTP", "Timeout reading body")):
                record.stranger = True
        if getattr(record, "stranger", False) and not self._allow_stranger():
            return False
        message = escape_controls(self.redactor.text(record.getMessage()))
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_text = escape_controls(self.redactor.text(text), keep_newlines=True)
        return True

    def _allow_stranger(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 60:
            self.flush()
            self._window, self._lines = now, 0
        self._lines += 1
        if self._lines <= STRANGER_LINES_PER_MINUTE:
            return True
        self.suppressed += 1
        return False

    def flush(self) -> None:
        """Log how many lines the last minute's limit held back (called every few seconds)."""
        if self.suppressed and time.monotonic() - self._window >= 60:
            n, self.suppressed = self.suppressed, 0
            log.warning(
                "%d more log lines about requests without a valid key were not written "
                "in the last minute (at most %d a minute are)",
                n,
                STRANGER_LINES_PER_MINUTE,
            )


LOG_GUARD = LogGuard()


# ---------------------------------------------------------------------------------------------
# Configuration and options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Everything the gateway reads from options; built once in main() (or by tests)."""

    host: str = "127.0.0.1"
    port: int = 8000
    users_file: str = "users.yaml"
    data_dir: str = "data"
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: str = ""
    anthropic_base_url: str = "https://api.anthropic.com/v1"
    anthropic_api_key: str = ""
    upstreams_file: str = ""
    upstream_timeout: float = 300.0
    upstream_connect_timeout: float = 10.0
    queue_size: int = 256
    concurrency: int = 32
    timezone: str = ""
    max_body_size: int = 8 * 1024 * 1024
    demo: bool = False
    fsync: bool = False
    reload_interval: float = 2.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    xheaders: bool = False
    models: str = ""
    http_client: str = "auto"
    admin_key: str = ""
    retention_days: int = 0
    max_body_memory: int = 64 * 1024 * 1024
    max_event_size: int = 1024 * 1024
    cors_origins: str = ""
    user_queue_share: float = 0.5
    processes: int = 1
    prices_file: str = ""
    currency: str = "USD"
    alert_webhook: str = ""
    alert_format: str = "json"
    alert_secret: str = ""
    store: str = ""

    def cors(self) -> frozenset[str]:
        """The origins whose pages may call the API (`*`: any); empty: none."""
        return frozenset(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    def routing_file(self) -> Path:
        """upstreams.yaml: --upstreams-file, else beside the users file."""
        if self.upstreams_file:
            return Path(self.upstreams_file)
        return Path(self.users_file).parent / "upstreams.yaml"

    def secrets(self) -> tuple[str, ...]:
        """The configured secrets: redacted wherever outside text enters the gateway."""
        keys = (self.upstream_api_key, self.anthropic_api_key, self.admin_key, self.alert_secret)
        return keys + webhook_tokens(self.alert_webhook)

    def tz(self) -> tzinfo | None:
        """The configured zone, or None for the machine's local zone."""
        if not self.timezone:
            return None
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ConfigError(f"--timezone={self.timezone!r} is not an IANA time zone") from e


def _has_pycurl() -> bool:
    try:
        import pycurl  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def define_options() -> tornado.options.OptionParser:
    """The options; each is also read from GATEWAY_<NAME> (e.g. GATEWAY_QUEUE_SIZE)."""
    d = Config()
    p = tornado.options.OptionParser()
    p.define("host", d.host, str, "address to listen on; 0.0.0.0 for all interfaces")
    p.define("port", d.port, int, "port to listen on")
    p.define("users-file", d.users_file, str, "users file, reloaded when it changes")
    p.define("data-dir", d.data_dir, str, "directory for counters (YYYY-MM-DD.jsonl/.json)")
    p.define("upstream-base-url", d.upstream_base_url, str, "OpenAI-compatible base URL")
    p.define(
        "upstream-api-key",
        d.upstream_api_key,
        str,
        "the team's upstream key (also UPSTREAM_API_KEY or OPENAI_API_KEY); "
        "empty: calls answer 500 and status shows api_key_configured false",
    )
    p.define(
        "anthropic-base-url",
        d.anthropic_base_url,
        str,
        "base URL of an upstream that speaks Anthropic's Messages API (for /v1/messages)",
    )
    p.define(
        "anthropic-api-key",
        d.anthropic_api_key,
        str,
        "the team's key for --anthropic-base-url (also ANTHROPIC_API_KEY); "
        "empty: /v1/messages answers 500",
    )
    p.define(
        "upstreams-file",
        d.upstreams_file,
        str,
        "several upstreams, keys, model names, retries (README: Routing); "
        "empty: upstreams.yaml beside the users file, if it exists",
    )
    p.define("upstream-timeout", d.upstream_timeout, float, "seconds for a whole upstream call")
    p.define("upstream-connect-timeout", d.upstream_connect_timeout, float, "seconds to connect")
    p.define(
        "queue-size",
        d.queue_size,
        int,
        "calls that may wait for a worker; 0 turns the queue off (busy workers -> 503)",
    )
    p.define("concurrency", d.concurrency, int, "upstream calls in flight at once (workers)")
    p.define("timezone", d.timezone, str, "IANA zone for 'today'; empty: the machine's zone")
    p.define("max-body-size", d.max_body_size, int, "largest request body in bytes (else 413)")
    p.define("demo", d.demo, bool, "answer with a built-in mock model; enables demo_only users")
    p.define(
        "fsync",
        d.fsync,
        bool,
        "fsync each charge before answering (survives power loss; slower). "
        "false: a process crash loses nothing, a power loss may lose the last seconds",
    )
    p.define("reload-interval", d.reload_interval, float, "seconds between users-file checks")
    p.define(
        "idle-timeout", d.idle_timeout, float, "seconds an idle or slow-header connection lives"
    )
    p.define("body-timeout", d.body_timeout, float, "seconds allowed to send a request body")
    p.define("shutdown-timeout", d.shutdown_timeout, float, "seconds to finish calls on SIGTERM")
    p.define("xheaders", d.xheaders, bool, "trust X-Forwarded-For/X-Real-Ip (behind a proxy)")
    p.define(
        "http-client",
        d.http_client,
        str,
        "upstream HTTP client: curl (pycurl), simple (Tornado's own), or auto (curl if installed)",
    )
    p.define(
        "models",
        d.models,
        str,
        "comma-separated model ids for GET /v1/models; empty: the upstream's list (cached 5 min)",
    )
    p.define(
        "admin-key",
        d.admin_key,
        str,
        "key for the /admin dashboard and /metrics (also GATEWAY_ADMIN_KEY); empty: both off",
    )
    p.define(
        "retention-days",
        d.retention_days,
        int,
        "delete counters and call logs of days older than this many days; 0: keep everything",
    )
    p.define(
        "max-body-memory",
        d.max_body_memory,
        int,
        "bytes of request bodies held at once, all requests together (else 503)",
    )
    p.define(
        "cors-origins",
        d.cors_origins,
        str,
        "comma-separated origins (https://chat.example.org) whose web pages may call the API "
        "routes, or *; empty: none (the admin pages never)",
    )
    p.define(
        "store",
        d.store,
        str,
        "where usage counters live: empty or file: (the data dir), or redis://host:port/db, "
        "rediss://… (TLS), unix:///path.sock; a ?prefix=name shares one Redis between gateways",
    )
    p.define(
        "prices-file",
        d.prices_file,
        str,
        "model prices per million tokens (a YAML map, as upstreams.yaml's prices:), for the "
        "cost in the call log, `usage` and the dashboard",
    )
    p.define("currency", d.currency, str, "the currency of the prices (a label)")
    p.define(
        "alert-webhook",
        d.alert_webhook,
        str,
        "comma-separated webhook URLs for alerts (limits at 80%/100%, upstreams resting or "
        "back, the store failing or back); URL#format picks the format per webhook",
    )
    p.define(
        "alert-format",
        d.alert_format,
        str,
        "the webhooks' format: json, feishu, dingtalk, wecom or slack",
    )
    p.define(
        "alert-secret",
        d.alert_secret,
        str,
        "signs each alert (X-Gateway-Signature: sha256=HMAC; and Feishu's and DingTalk's own "
        "signing); also GATEWAY_ALERT_SECRET",
    )
    p.define(
        "processes",
        d.processes,
        int,
        "serving processes on one port (0: one per core), sharing users, store and data dir; "
        "one that dies is started again",
    )
    p.define(
        "user-queue-share",
        d.user_queue_share,
        float,
        "the share of --queue-size one user's waiting calls may take (0-1; 1: no cap)",
    )
    p.define(
        "max-event-size",
        d.max_event_size,
        int,
        "largest single upstream stream event in bytes; a larger one ends the stream "
        "(stream_interrupted, charged)",
    )
    tornado.log.define_logging_options(p)
    return p


def parse_config(argv: list[str], env: dict[str, str]) -> Config:
    """Options from GATEWAY_* env vars, then the command line (which wins)."""
    parser = define_options()
    from_env = []
    for name in parser:
        value = env.get("GATEWAY_" + name.upper().replace("-", "_"))
        if value is not None:
            from_env.append(f"--{name}={value}")
    key = env.get("UPSTREAM_API_KEY") or env.get("OPENAI_API_KEY")
    if key and "GATEWAY_UPSTREAM_API_KEY" not in env:
        from_env.insert(0, f"--upstream-api-key={key}")
    key = env.get("ANTHROPIC_API_KEY")
    if key and "GATEWAY_ANTHROPIC_API_KEY" not in env:
        from_env.insert(0, f"--anthropic-api-key={key}")
    rest = parser.parse_command_line(["gateway.py", *from_env, *argv])
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    o = parser.as_dict()
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(
        **{k.replace("-", "_"): v for k, v in o.items() if k.replace("-", "_") in fields}
    )
    if config.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if config.http_client not in ("auto", "curl", "simple"):
        raise ConfigError("--http-client must be auto, curl or simple")
    if config.http_client == "curl" and not _has_pycurl():
        raise ConfigError("--http-client=curl needs pycurl (pip install pycurl)")
    if config.admin_key and len(config.admin_key) < 12:
        raise ConfigError("--admin-key must be at least 12 characters")
    if config.retention_days < 0:
        raise ConfigError("--retention-days must be >= 0 (0 keeps everything)")
    if config.queue_size < 0 or config.max_body_size < 1:
        raise ConfigError("--queue-size must be >= 0 and --max-body-size >= 1")
    if config.max_body_memory < config.max_body_size:
        raise ConfigError("--max-body-memory must be at least --max-body-size")
    if config.processes < 0:
        raise ConfigError("--processes must be >= 0 (0: one per core)")
    if config.alert_format not in ALERT_FORMATS:
        raise ConfigError(f"--alert-format must be one of {', '.join(ALERT_FORMATS)}")
    parse_webhooks(config.alert_webhook, config.alert_format)
    if not 0 < config.user_queue_share <= 1:
        raise ConfigError("--user-queue-share must be above 0 and at most 1")
    if config.max_event_size < 1024:
        raise ConfigError("--max-event-size must be at least 1024 bytes")
    config.tz()
    return config


# ---------------------------------------------------------------------------------------------
# Private files: data/ is 0700, its files 0600, no symbolic link followed
# ---------------------------------------------------------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_private(path: Path, flags: int) -> int:
    """os.open that never follows a symbolic link at `path` and creates files as 0600."""
    return os.open(path, flags | _NOFOLLOW | os.O_CLOEXEC, 0o600)


def read_private(path: Path) -> bytes:
    """A file's bytes, refusing a symbolic link (ELOOP) as open_private does."""
    fd = open_private(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> None:
    """Create a directory and its missing parents as 0700, whatever the umask."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)  # mkdir's mode passes through the umask


def file_lock(path: Path, thread_local: bool = True) -> filelock.BaseFileLock:
    """A filelock lock whose file is 0600 whatever the umask and never a symbolic link."""
    os.close(open_private(path, os.O_RDWR | os.O_CREAT))  # ELOOP on a link
    return filelock.FileLock(str(path), mode=0o600, thread_local=thread_local)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace path with data so that a crash at any point leaves the old or the new file.

    The temporary file has an unpredictable name and is created exclusively, never through
    a symbolic link, so nothing planted in the directory can redirect the write.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------
# Users (users.yaml)
# ---------------------------------------------------------------------------------------------

DEFAULT_REQUEST_LIMIT = 1000
DEFAULT_TOKEN_LIMIT = 100000
_POLICY_FIELDS = frozenset(
    {"models", "rpm", "tpm", "max_concurrency", "expires", "allow_ips", "weight", "token_policy"}
)
_LIMIT_FIELDS = frozenset({"daily_request_limit", "daily_token_limit"})
_USER_FIELDS = {
    "api_key",
    "api_key_sha256",
    "daily_request_limit",
    "daily_token_limit",
    "enabled",
    "demo_only",
    "group",
    *_POLICY_FIELDS,
}
_NAME_RE = re.compile(r'^[^"\\]{1,64}$')
# A plain api_key: what a client can send in a header and the gateway compare byte for byte.
_PLAIN_KEY_RE = re.compile(r"^[\x21-\x7e]{8,}$")


def valid_name(name: Any) -> bool:
    """1-64 printable characters without quotes or backslashes: no control characters, C1
    controls, line or paragraph separators or surrogates, which YAML, logs and terminals
    would each read differently."""
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and name.isprintable()


_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")


TOKEN_POLICIES = ADMIT, RESERVE, STRICT = ("admit", "reserve", "strict")


@dataclass(frozen=True, slots=True)
class Policy:
    """A user's per-call rules beyond the daily limits (users.yaml: user > group > defaults).

    `token_policy`: "admit" admits while tokens used < the daily limit (the API contract's
    rule); "reserve" also counts what calls in flight hold (their prompt estimate plus their
    max_tokens); "strict" as reserve, and lowers a call's max_tokens to what is left.
    """

    models: tuple[str, ...] = ("*",)  # globs over the model names clients send
    rpm: int = 0  # requests per rolling minute; 0: no limit
    tpm: int = 0  # tokens per rolling minute; 0: no limit
    max_concurrency: int = 0  # calls in flight or queued at once; 0: no limit
    expires: date | None = None  # the key stops working after this day
    allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # empty: any
    weight: int = 1  # share of the workers when calls wait
    token_policy: str = RESERVE

    def allows_model(self, model: str) -> bool:
        return self.models == ("*",) or any(fnmatch.fnmatchcase(model, g) for g in self.models)

    def allows_address(self, address: str) -> bool:
        if not self.allow_ips:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow_ips)


@dataclass(frozen=True, slots=True)
class User:
    name: str
    key_sha256: bytes
    daily_request_limit: int
    daily_token_limit: int
    enabled: bool = True
    policy: Policy = Policy()
    group: str = ""


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML loader (libyaml when present) that refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # The keys as written, before merge keys (<<: *anchor) pull in others.
        keys = [k for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG]
        if len({k.value for k in keys}) != len(keys):
            seen = set()
            for k in keys:
                if k.value in seen:
                    raise ConfigError(f"duplicate key {k.value!r} (line {k.start_mark.line + 1})")
                seen.add(k.value)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where, without the snippet of the file that PyYAML quotes: the
    line could hold a plain api_key, and the message reaches logs and the dashboard."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def _limit(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be a whole number >= 0, got {value!r}")
    return value


def model_glob(where: str, value: Any) -> str:
    """A model glob of users.yaml or upstreams.yaml, checked."""
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or not value.isprintable():
        raise ConfigError(f"{where}: a model glob must be 1-200 printable characters")
    if value.count("[") != value.count("]"):
        raise ConfigError(f"{where}: unbalanced [ ] in model glob {value!r}")
    return value


def _policy_value(name: str, value: Any, where: str) -> Any:
    """One policy setting of users.yaml, checked and converted."""
    if name in ("rpm", "tpm", "max_concurrency"):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
            raise ConfigError(f"{where} must be a whole number >= 0 (0: no limit), got {value!r}")
        return value
    if name == "weight":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise ConfigError(f"{where} must be a whole number from 1 to 1000, got {value!r}")
        return value
    if name == "token_policy":
        if value not in TOKEN_POLICIES:
            raise ConfigError(f"{where} must be one of {', '.join(TOKEN_POLICIES)}")
        return value
    if name == "expires":
        if value is None:
            return None
        if isinstance(value, datetime):
            raise ConfigError(f"{where} must be a day, YYYY-MM-DD")
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            raise ConfigError(f"{where} must be a day, YYYY-MM-DD, got {value!r}") from None
    if name == "models":
        if not isinstance(value, list) or not value or len(value) > 1000:
            raise ConfigError(f"{where} must be a list of 1-1000 model globs")
        return tuple(model_glob(where, glob) for glob in value)
    # allow_ips
    if not isinstance(value, list) or len(value) > 1000:
        raise ConfigError(f"{where} must be a list of addresses or networks (10.0.0.0/8)")
    nets = []
    for item in value:
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{where}: {str(item)[:60]!r} is not an address or network") from None
    return tuple(nets)


def _settings(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """The daily limits and policy settings an entry sets, checked."""
    out: dict[str, Any] = {}
    for name in _LIMIT_FIELDS & entry.keys():
        out[name] = _limit(entry[name], f"{where}.{name}")
    for name in _POLICY_FIELDS & entry.keys():
        out[name] = _policy_value(name, entry[name], f"{where}.{name}")
    return out


def parse_users(text: str, demo: bool = False) -> dict[str, User]:
    """Parse users.yaml text; raise ConfigError naming the first problem."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {yaml_problem(e)}") from None
    except (ValueError, RecursionError) as e:  # e.g. a date that does not exist, deep nesting
        raise ConfigError(f"not valid YAML: {type(e).__name__}: {str(e)[:100]}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("the top level must be a mapping with 'defaults' and 'users'")
    # x-… keys are free for YAML anchors (x-base: &base {...}), as in docker-compose files.
    unknown = {
        k for k in doc if k not in ("defaults", "users", "groups") and not str(k).startswith("x-")
    }
    if unknown:
        raise ConfigError(f"unknown top-level keys: {sorted(map(str, unknown))}")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("'defaults' must be a mapping")
    bad = set(defaults) - _LIMIT_FIELDS - _POLICY_FIELDS
    if bad:
        raise ConfigError(f"unknown keys in defaults: {sorted(map(str, bad))}")
    base = {
        "daily_request_limit": DEFAULT_REQUEST_LIMIT,
        "daily_token_limit": DEFAULT_TOKEN_LIMIT,
        **_settings(defaults, "defaults"),
    }
    groups_doc = doc.get("groups") or {}
    if not isinstance(groups_doc, dict):
        raise ConfigError("'groups' must be a mapping of name -> settings")
    groups: dict[str, dict[str, Any]] = {}
    for gname, gentry in groups_doc.items():
        if not valid_name(gname):
            raise ConfigError(f"group name {gname!r}: 1-64 printable characters, no quotes")
        if not isinstance(gentry, dict):
            raise ConfigError(f"groups.{gname} must be a mapping")
        bad = set(gentry) - _LIMIT_FIELDS - _POLICY_FIELDS
        if bad:
            raise ConfigError(f"groups.{gname}: unknown keys {sorted(map(str, bad))}")
        groups[gname] = _settings(gentry, f"groups.{gname}")
    entries = doc.get("users") or {}
    if not isinstance(entries, dict):
        raise ConfigError("'users' must be a mapping of name -> settings")
    users: dict[str, User] = {}
    digests: dict[bytes, str] = {}
    for name, entry in entries.items():
        if not valid_name(name):
            raise ConfigError(f"user name {name!r}: 1-64 printable characters, no quotes")
        if not isinstance(entry, dict):
            raise ConfigError(f"users.{name} must be a mapping")
        bad = set(entry) - _USER_FIELDS
        if bad:
            raise ConfigError(f"users.{name}: unknown keys {sorted(map(str, bad))}")
        key, digest_hex = entry.get("api_key"), entry.get("api_key_sha256")
        if (key is None) == (digest_hex is None):
            raise ConfigError(f"users.{name}: give exactly one of api_key or api_key_sha256")
        if key is not None:
            if not isinstance(key, str) or not _PLAIN_KEY_RE.match(key):
                # A key with spaces around it or non-ASCII characters would load but could
                # never match what a client sends.
                raise ConfigError(
                    f"users.{name}.api_key must be 8+ characters of printable ASCII, no spaces"
                )
            digest = hashlib.sha256(key.encode()).digest()
        else:
            if not isinstance(digest_hex, str) or not _HEX64_RE.match(digest_hex):
                raise ConfigError(f"users.{name}.api_key_sha256 must be 64 hex characters")
            digest = bytes.fromhex(digest_hex)
        enabled, demo_only = entry.get("enabled", True), entry.get("demo_only", False)
        if not isinstance(enabled, bool) or not isinstance(demo_only, bool):
            raise ConfigError(f"users.{name}: enabled and demo_only must be true or false")
        if demo_only and not demo:
            continue
        if digest in digests:
            raise ConfigError(f"users.{name} has the same key as users.{digests[digest]}")
        digests[digest] = name
        group = entry.get("group", "")
        if not isinstance(group, str):
            raise ConfigError(f"users.{name}.group must be a group's name")
        if group and group not in groups:
            raise ConfigError(f"users.{name}.group: no group {str(group)[:64]!r} in 'groups'")
        settings = {**base, **groups.get(group, {}), **_settings(entry, f"users.{name}")}
        users[name] = User(
            name=name,
            key_sha256=digest,
            daily_request_limit=settings.pop("daily_request_limit"),
            daily_token_limit=settings.pop("daily_token_limit"),
            enabled=enabled,
            policy=Policy(**settings),
            group=group,
        )
    return users


class UserDirectory:
    """The users from users.yaml, looked up by key digest; reloads itself when the file changes."""

    def __init__(self, path: str, demo: bool = False) -> None:
        self.path = path
        self.demo = demo
        self.by_name: dict[str, User] = {}
        self._by_digest: dict[bytes, User] = {}
        self._stamp: tuple[int, int, int] | None = None

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> None:
        """Load the file now; raise ConfigError if it is missing or broken."""
        try:
            stamp = self._file_stamp()
            text = Path(self.path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {self.path}: {e}") from None
        try:
            users = parse_users(text, self.demo)
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from None
        self.by_name = users
        self._by_digest = {u.key_sha256: u for u in users.values()}
        self._stamp = stamp

    def reload_if_changed(self) -> bool:
        """Reload after an edit; on a broken edit log it and keep the last good users."""
        try:
            if self._file_stamp() == self._stamp:
                return False
        except OSError as e:
            log.error("users file %s unreadable (%s); keeping %d users", self.path, e, len(self))
            return False
        try:
            self.load()
        except ConfigError as e:
            # Remember the broken file's stamp so that the error is logged once per edit.
            with contextlib.suppress(OSError):
                self._stamp = self._file_stamp()
            log.error("users file not reloaded, keeping %d users: %s", len(self), e)
            return False
        log.info("users file reloaded: %d users", len(self))
        return True

    def authenticate(self, key: str) -> User | None:
        """The enabled user holding this key, or None.

        The table is keyed by the key's SHA-256, so lookup time depends on a hash of the
        presented key, never on how much of a real key it matches; compare_digest confirms.
        """
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        user = self._by_digest.get(digest)
        if user is None or not hmac.compare_digest(user.key_sha256, digest) or not user.enabled:
            return None
        return user

    def __len__(self) -> int:
        return len(self.by_name)


# ---------------------------------------------------------------------------------------------
# Editing users.yaml in place (the `user` commands and the dashboard)
# ---------------------------------------------------------------------------------------------

_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def new_api_key() -> str:
    """A fresh user key: sk- and 32 random bytes, URL-safe base64 (43 characters)."""
    return "sk-" + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _yaml_name(name: str) -> str:
    if _PLAIN_NAME.match(name) and name.lower() not in _YAML_WORDS:
        return name
    return json.dumps(name, ensure_ascii=False)  # a JSON string is a YAML string too


def _line_end(text: str, index: int) -> int:
    """The index just past the newline of the line holding `index` (or the end of text)."""
    nl = text.find("\n", index)
    return len(text) if nl < 0 else nl + 1


def _last_index(node: yaml.Node) -> int:
    """Where the last scalar under a node ends (a block's own end mark lies past comments)."""
    if isinstance(node, yaml.ScalarNode):
        return int(node.end_mark.index)
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = list(node.value)
    return max((_last_index(n) for n in children), default=int(node.start_mark.index))


class UsersEdit:
    """Text edits to users.yaml that touch only the lines they change.

    Positions come from PyYAML's composed nodes, so comments, blank lines, order, quoting
    and anchors elsewhere in the file stay exactly as the administrator wrote them.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {yaml_problem(e)}") from None
        parse_users(text, demo=True)  # refuse to edit a file that is already broken

    def _users_node(self) -> tuple[yaml.Node, yaml.Node] | None:
        if not isinstance(self.root, yaml.MappingNode):
            return None
        for key, value in self.root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "users":
                return key, value
        return None

    def _entry(self, name: str) -> yaml.MappingNode:
        found = self._users_node()
        if found and isinstance(found[1], yaml.MappingNode):
            for key, value in found[1].value:
                if isinstance(key, yaml.ScalarNode) and key.value == name:
                    if not isinstance(value, yaml.MappingNode) or value.start_mark.index < (
                        key.end_mark.index
                    ):
                        raise ConfigError(
                            f"users.{name} is written through an alias; edit it by hand"
                        )
                    return value
        raise LookupError(name)

    def names(self) -> list[str]:
        found = self._users_node()
        if not found or not isinstance(found[1], yaml.MappingNode):
            return []
        return [str(k.value) for k, _ in found[1].value]

    def _splice(self, start: int, end: int, new: str) -> None:
        self.text = self.text[:start] + new + self.text[end:]
        self.root = yaml.compose(self.text, Loader=yaml.SafeLoader)

    def set(self, name: str, field: str, value: str, replaces: str = "") -> None:
        """Give users.NAME.FIELD this YAML value, in place if written, else on a new line.

        `replaces` names a field that this one takes the place of (api_key for
        api_key_sha256): its line is rewritten instead.
        """
        entry = self._entry(name)
        for key, node in entry.value:
            if isinstance(key, yaml.ScalarNode) and key.value in (field, replaces):
                start, end = key.start_mark.index, node.end_mark.index
                if node.start_mark.index == node.end_mark.index:  # `field:` with no value
                    end = node.start_mark.index
                self._splice(start, end, f"{field}: {value}")
                return
        if entry.flow_style:
            close = self.text.rindex("}", 0, entry.end_mark.index)
            sep = ", " if entry.value else ""
            self._splice(close, close, f"{sep}{field}: {value}")
            return
        column = entry.value[0][0].start_mark.column
        at = _line_end(self.text, _last_index(entry))
        line = " " * column + f"{field}: {value}\n"
        if at == len(self.text) and not self.text.endswith("\n"):
            line = "\n" + line
        self._splice(at, at, line)

    def unset(self, name: str, field: str) -> bool:
        """Delete users.NAME.FIELD (its line, or its part of a flow mapping); False if the
        entry does not set it."""
        entry = self._entry(name)
        for i, (key, node) in enumerate(entry.value):
            if not (isinstance(key, yaml.ScalarNode) and key.value == field):
                continue
            if not entry.flow_style:
                start = self.text.rfind("\n", 0, key.start_mark.index) + 1
                self._splice(start, _line_end(self.text, _last_index(node)), "")
                return True
            start, end = key.start_mark.index, node.end_mark.index
            if i + 1 < len(entry.value):  # up to the next key: its comma goes along
                end = entry.value[i + 1][0].start_mark.index
            elif i > 0:  # the last one: from the end of the one before
                start = entry.value[i - 1][1].end_mark.index
            self._splice(start, end, "")
            return True
        return False

    def remove(self, name: str) -> None:
        """Delete users.NAME's lines (comments above it stay)."""
        found = self._users_node()
        if found is None or not isinstance(found[1], yaml.MappingNode):
            raise LookupError(name)
        users = found[1]
        if users.flow_style:
            raise ConfigError("'users' is not written as a block mapping; edit it by hand")
        for key, _ in users.value:
            if isinstance(key, yaml.ScalarNode) and key.value == name:
                entry = self._entry(name)
                start = self.text.rfind("\n", 0, key.start_mark.index) + 1
                self._splice(start, _line_end(self.text, _last_index(entry)), "")
                return
        raise LookupError(name)

    def add(self, name: str, fields: dict[str, str]) -> None:
        """Append users.NAME with these fields after the last user."""
        if name in self.names():
            raise ConfigError(f"user {name!r} already exists")
        found = self._users_node()
        text = self.text
        if found is None:
            prefix = "" if not text or text.endswith("\n") else "\n"
            at, indent, inner = len(text), 2, 2
            head = prefix + "users:\n"
        else:
            key, users = found
            head = ""
            if isinstance(users, yaml.MappingNode) and users.value and not users.flow_style:
                first_key, first_entry = users.value[0]
                indent = first_key.start_mark.column
                inner = 2
                if isinstance(first_entry, yaml.MappingNode) and first_entry.value:
                    if not first_entry.flow_style:
                        inner = first_entry.value[0][0].start_mark.column - indent
                at = _line_end(text, _last_index(users))
                if at == len(text) and not text.endswith("\n"):
                    head = "\n"
            elif (isinstance(users, yaml.MappingNode) and not users.value) or (
                isinstance(users, yaml.ScalarNode) and users.tag.endswith(":null")
            ):
                # `users:` or `users: {}`: the new block goes under the key.
                start, end = users.start_mark.index, users.end_mark.index
                if start != end:
                    while start > key.end_mark.index + 1 and text[start - 1] == " ":
                        start -= 1
                    self._splice(start, end, "")
                    text = self.text
                at, indent, inner = _line_end(text, key.end_mark.index), 2, 2
                if at == len(text) and not text.endswith("\n"):
                    head = "\n"
            else:
                raise ConfigError("'users' is not written as a block mapping; edit it by hand")
        lines = [head + " " * indent + f"{_yaml_name(name)}:\n"]
        lines += [" " * (indent + inner) + f"{k}: {v}\n" for k, v in fields.items()]
        self._splice(at, at, "".join(lines))


def edit_users_file(path: str, change: Callable[[UsersEdit], None]) -> dict[str, User]:
    """Apply `change` to users.yaml under a file lock; write only if the result is valid.

    The file is replaced atomically (a running gateway sees the old or the new one, never
    half), keeping its permissions. Returns the users of the new file.
    """
    target = Path(path)
    try:
        lock = file_lock(target.with_name(f".{target.name}.lock"))
    except OSError as e:
        raise ConfigError(f"cannot lock {path}: {e.strerror}") from None
    try:
        with lock.acquire(timeout=10):
            try:
                text = target.read_text(encoding="utf-8")
                mode = target.stat().st_mode & 0o777
            except FileNotFoundError:
                text, mode = "", 0o644
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read {path}: {e}") from None
            try:
                edit = UsersEdit(text)
                change(edit)
                users = parse_users(edit.text, demo=True)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
            try:
                atomic_write(target, edit.text.encode(), mode)
            except StoreError as e:
                raise ConfigError(str(e)) from None
            return users
    except filelock.Timeout:
        raise ConfigError(f"{path} is locked by another edit (.{target.name}.lock)") from None


# ---------------------------------------------------------------------------------------------
# Days: "today" is the calendar day in the configured zone
# ---------------------------------------------------------------------------------------------


class DayClock:
    """Maps a clock to day keys (YYYY-MM-DD) in one time zone; the clock is injectable."""

    def __init__(self, tz: tzinfo | None, now: Callable[[], float] = time.time) -> None:
        self.tz = tz
        self.now = now
        self._day = ""
        self._start = 0.0
        self._end = -1.0

    def _midnight(self, d: date) -> float:
        # A naive datetime (tz None) is read in the machine's local zone, which is the default.
        return datetime(d.year, d.month, d.day, tzinfo=self.tz).timestamp()

    def today(self) -> str:
        t = self.now()
        if not (self._start <= t < self._end):
            d = datetime.fromtimestamp(t, self.tz).date()
            self._day = d.isoformat()
            self._start = self._midnight(d)
            self._end = self._midnight(d + timedelta(days=1))
        return self._day

    def seconds_to_midnight(self) -> int:
        self.today()
        return max(1, math.ceil(self._end - self.now()))


# ---------------------------------------------------------------------------------------------
# Usage store: the interface, the journal format, the file backend
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Counts:
    """One user's figures for one day: charged requests and tokens, and open reservations."""

    requests: int = 0
    tokens: int = 0
    reserved: int = 0
    held: int = 0  # tokens held by calls in flight (token_policy reserve or strict)

    def copy(self) -> Counts:
        return Counts(self.requests, self.tokens, self.reserved, self.held)


def remaining(user: User, counts: Counts) -> tuple[int, int]:
    """What a user has left today, the one rule for every answer, header and command:
    requests = limit - charged - in flight (a call in flight holds its slot until it is
    settled or released); tokens = limit - charged tokens. Never below zero."""
    return (
        max(0, user.daily_request_limit - counts.requests - counts.reserved),
        max(0, user.daily_token_limit - counts.tokens),
    )


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False
    cached_tokens: int = 0  # of the prompt, read from the provider's cache (priced apart)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.estimated:
            out["estimated"] = True
        return out


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What is recorded with a charge besides its usage."""

    model: str
    latency_ms: int
    partial: bool = False  # a stream cut short, charged for what it delivered


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    user: str
    day: str
    grant: int = 0  # tokens the call may hold (token_policy reserve/strict); 0: no hold


class UsageStore(abc.ABC):
    """Per-user daily counters with reservations; every backend keeps limits exact.

    The only way in to usage data: the gateway, the dashboard, /metrics and the admin
    commands all go through these methods, and every backend (file:, redis://) passes the
    same contract tests (tests/test_store_contract.py). Reads are async: a backend may be a
    network away. `peek` is the one synchronous read, for headers on an error path: what
    this process last saw, or None.
    """

    name: str = ""  # how logs and /api/status.php name the store (never a password)
    held_until = "a restart"  # when a slot whose release failed is free again
    listener: Callable[[str, str], None] | None = None  # told when the store fails or is back

    problem: str = ""  # the last failure, until an operation succeeds again

    def tell(self, event: str, detail: str) -> None:
        if self.listener is not None:
            self.listener(event, detail)

    def failed(self, what: str, e: BaseException | str) -> None:
        """An operation failed: logged and alerted once, until the store works again."""
        if not self.problem:
            log.error("usage store %s: %s failed: %s", self.name, what, e)
            kind = type(e).__name__ if isinstance(e, BaseException) else str(e)
            self.tell("store_failed", f"用量存储 {self.name} 不可用: {kind}"[:300])
        self.problem = (f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else e)[:300]

    def worked(self) -> None:
        """An operation succeeded: if the store had failed, it is back."""
        if self.problem:
            log.warning("usage store %s is back", self.name)
            self.tell("store_back", f"用量存储 {self.name} 已恢复")
            self.problem = ""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def reserve(self, user: User, day: str, want: int = 0, prompt: int = 0) -> Reservation:
        """Take one request slot, or raise QuotaExceeded. `want`: the tokens the call asks
        to hold (its prompt estimate `prompt` plus its max_tokens), for the user's token
        policy; the reservation's `grant` is what it may hold."""

    @abc.abstractmethod
    async def settle(self, res: Reservation, usage: Usage, call: CallFacts) -> Counts:
        """Charge a finished call durably; return the user's counts after it."""

    @abc.abstractmethod
    async def release(self, res: Reservation) -> None:
        """Give a slot back: the call failed and costs nothing."""

    @abc.abstractmethod
    async def counts(self, user: str, day: str) -> Counts:
        """A user's counts against the limits on a day."""

    @abc.abstractmethod
    async def all_counts(self, day: str) -> dict[str, Counts]:
        """Every user's counts on a day (users with none are left out)."""

    @abc.abstractmethod
    async def totals(self, day: str) -> tuple[int, int]:
        """Requests and tokens charged on a day, all users, resets included."""

    @abc.abstractmethod
    async def reset(self, user: str, day: str) -> Counts:
        """Zero a user's counts for the day (calls in flight are still charged); return the
        counts before."""

    @abc.abstractmethod
    async def usage(self, day: str) -> dict[str, tuple[int, int]]:
        """Each user's (requests, tokens) charged on a day, including before resets."""

    @abc.abstractmethod
    async def prune(self, keep_days: int, today: str) -> list[str]:
        """Forget days more than `keep_days` before today; return what was removed."""

    @abc.abstractmethod
    async def maintain(self, today: str) -> None:
        """Periodic housekeeping: free slots of dead processes, write snapshots."""

    def peek(self, user: str, day: str) -> Counts | None:
        """What this process last saw of a user's counts, without waiting; None if nothing."""
        return None


# The journal's record format: one flat JSON object per line, short keys to keep lines small.
# Keys (a record holds those of its kind):
F_USER = "u"  # the user's name; written first, so a damaged line can still be attributed
F_KIND = "k"  # one of the KIND_* below
F_ID = "id"  # a reservation's id: "<owner>-<sequence>"
F_OWNER = "o"  # the process that made the reservation (its lock: owners/<owner>.lock)
# The user's daily limits when reserving: whether a reservation is granted is decided from
# these and the records before it, so every process reaches the same verdict.
F_REQUEST_LIMIT = "rl"
F_TOKEN_LIMIT = "tl"  # noqa: S105 - a record key, not a secret
F_TIME = "t"  # when, in milliseconds since the epoch
F_TOKENS = "n"  # tokens charged: prompt + completion
F_PROMPT = "p"
F_COMPLETION = "c"
F_ESTIMATED = "e"  # 1: the tokens are an estimate (the upstream sent no usable usage)
F_MODEL = "m"  # the model the client asked for
F_LATENCY = "ms"  # admission to answer, in milliseconds
F_PARTIAL = "partial"  # 1: a stream cut short (client left, upstream broke), charged so far
# The user's policy when reserving (absent: no such limit), decided like the daily limits:
F_RPM = "rpm"  # requests per rolling minute
F_TPM = "tpm"  # tokens per rolling minute
F_CONCURRENCY = "mc"  # calls in flight at once
F_POLICY = "tp"  # token policy: "r" reserve, "s" strict (absent: admit)
F_WANT = "w"  # tokens the call asks to hold: its prompt estimate plus its max_tokens
F_PROMPT_ESTIMATE = "pe"  # strict: the prompt estimate, which must fit in what is left
# Kinds:
KIND_RESERVE = "r"  # u id o rl tl t [rpm tpm mc tp w pe]: take a slot (granted unless at a limit)
KIND_SETTLE = "s"  # u id n p c t [e m ms partial]: charge the call; its slot closes
KIND_RELEASE = "x"  # u id: give the slot back (the call failed and costs nothing)
KIND_DEAD = "d"  # o: that process is gone; free every slot it still holds
KIND_RESET = "z"  # u t: an administrator's reset of the user's counters for the day

_USER_PREFIX = re.compile(rb'^\{"u":("(?:[^"\\]|\\.)*")')
_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f]*')


def _json_str(text: str) -> str:
    if _PLAIN.fullmatch(text):
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


def _encode_record(rec: dict[str, Any]) -> bytes:
    """A journal record (a flat object of strings and integers) as compact JSON.

    Several times faster than json.dumps for these small records, and the same bytes.
    """
    parts = [f'"{k}":{v}' if type(v) is int else f'"{k}":{_json_str(v)}' for k, v in rec.items()]
    # backslashreplace: a lone surrogate becomes its JSON escape, never a failed charge.
    return ("{" + ",".join(parts) + "}").encode("utf-8", "backslashreplace")


_READ_CHUNK = 4 * 1024 * 1024


class _Ledger:
    """One day: an append-only journal shared by every process, replayed into counters.

    Each record is a JSON object on its own line, written with one O_APPEND write. The order
    of records in the file is the order of events for every process, and whether a
    reservation is granted is decided from the records before it (limits travel in the
    record), so all processes reach the same verdict without holding a lock. Records start
    with a newline as well as ending with one, so a torn write (disk full) stays on a line
    of its own instead of swallowing the next process's record.
    """

    def __init__(self, store: JournalStore, day: str) -> None:
        self.store = store
        self.day = day
        self.journal = store.root / f"{day}.jsonl"
        self.snapshot = store.root / f"{day}.json"
        self.counters: dict[str, Counts] = {}
        self.open: dict[str, tuple[str, str]] = {}  # reservation id -> (user, owner)
        self.holds: dict[str, int] = {}  # reservation id -> tokens it holds (if any)
        # user -> (time in ms, reservation id or tokens) within the last minute: rpm and tpm
        self.minute_calls: dict[str, collections.deque[tuple[int, str]]] = {}
        self.minute_tokens: dict[str, collections.deque[tuple[int, int]]] = {}
        # our reservation id -> refusal reason, or None and the tokens granted
        self.decisions: dict[str, str | None] = {}
        self.grants: dict[str, int] = {}
        self.requests = 0
        self.tokens = 0
        self.tainted: dict[str, str] = {}  # user -> why their records cannot be trusted
        # user -> [requests, tokens] charged before an administrator's reset ('z' records):
        # no longer counted against the limits, still part of the day's usage.
        self.forgiven: dict[str, list[int]] = {}
        self.tainted_all = ""
        self.pos = 0  # bytes of the journal consumed (complete lines only)
        self.snapshot_pos = -1
        self.written = 0  # records appended by this process
        self.synced = 0  # of those, how many are known to be on disk
        self._partial = b""
        self._own: dict[int, dict[str, Any]] = {}  # offset -> a record this process appended
        self._sync: asyncio.Task[None] | None = None
        try:
            self.fd = open_private(self.journal, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        except OSError as e:
            raise StoreError(f"cannot open {self.journal}: {e.strerror}") from None
        try:
            self._load_snapshot()
            self.catch_up()
        except BaseException:
            os.close(self.fd)  # the ledger is retried on the next call: no descriptor leaks
            raise

    # -- reading ------------------------------------------------------------------------------

    def _load_snapshot(self) -> None:
        try:
            raw = read_private(self.snapshot)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"cannot read {self.snapshot}: {e.strerror}") from None
        size = os.fstat(self.fd).st_size
        try:
            snap = json.loads(raw)
            offset = snap["journal_offset"]
            users = {
                u: Counts(int(c["requests"]), int(c["tokens"])) for u, c in snap["users"].items()
            }
            opened = {rid: (str(u), str(o)) for rid, (u, o) in snap["open"].items()}
            holds = {str(rid): int(h) for rid, h in snap.get("holds", {}).items() if rid in opened}
            minute_calls = {
                str(u): collections.deque((int(t), str(rid)) for t, rid in q)
                for u, q in snap.get("minute_calls", {}).items()
            }
            minute_tokens = {
                str(u): collections.deque((int(t), int(n)) for t, n in q)
                for u, q in snap.get("minute_tokens", {}).items()
            }
            tainted = {str(u): str(why) for u, why in snap.get("tainted", {}).items()}
            tainted_all = str(snap.get("tainted_all", ""))
            forgiven = {
                str(u): [int(c["requests"]), int(c["tokens"])]
                for u, c in snap.get("forgiven", {}).items()
            }
            if not isinstance(offset, int) or offset < 0:
                raise ValueError("bad journal_offset")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if size > 0:
                log.warning(
                    "%s is unreadable (%s); rebuilding from %s", self.snapshot, e, self.journal
                )
                return
            self.tainted_all = f"{self.snapshot.name} is unreadable and its journal is empty"
            log.error("usage data for %s refused: %s", self.day, self.tainted_all)
            return
        if offset > size:
            self.tainted_all = f"{self.journal.name} is shorter than {self.snapshot.name} records"
            log.error("usage data for %s refused: %s", self.day, self.tainted_all)
            return
        self.counters, self.open, self.holds = users, opened, holds
        self.minute_calls, self.minute_tokens = minute_calls, minute_tokens
        self.tainted, self.tainted_all = tainted, tainted_all
        self.forgiven = forgiven
        for rid, (u, _) in opened.items():
            c = self.counter(u)
            c.reserved += 1
            c.held += holds.get(rid, 0)
        self.requests = sum(c.requests for c in users.values())
        self.tokens = sum(c.tokens for c in users.values())
        self.requests += sum(r for r, _ in forgiven.values())
        self.tokens += sum(t for _, t in forgiven.values())
        self.pos = self.snapshot_pos = offset

    def catch_up(self, until: int = 0) -> None:
        """Apply every complete record appended (by any process) since the last call."""
        while True:
            start = self.pos + len(self._partial)
            try:
                size = os.fstat(self.fd).st_size
                chunk = b""
                if size > start:
                    chunk = os.pread(self.fd, min(size - start, _READ_CHUNK), start)
            except OSError as e:
                raise StoreError(f"cannot read {self.journal}: {e.strerror}") from None
            if not chunk:
                break
            data = self._partial + chunk
            end = data.rfind(b"\n") + 1
            offset = self.pos
            own = self._own
            for line in data[:end].split(b"\n"):
                if line:
                    # Our own records are applied from the dict we wrote, not parsed again.
                    rec = own.pop(offset, None) if own else None
                    if rec is not None:
                        self._apply(rec)
                    else:
                        self._apply_line(line)
                offset += len(line) + 1
            self._partial = data[end:]
            self.pos += end
        if self.pos < until:
            # Every write before ours has completed when ours returns (POSIX append on a
            # local file system), so this means the data dir is on a file system without it.
            raise StoreError(f"{self.journal} is not append-consistent (network file system?)")

    def counter(self, user: str) -> Counts:
        c = self.counters.get(user)
        if c is None:
            c = self.counters[user] = Counts()
        return c

    def _apply_line(self, line: bytes) -> None:
        try:
            rec = json.loads(line)
            self._apply(rec)
        except (ValueError, KeyError, TypeError, AttributeError):
            if line.startswith(b'{"') and not line.endswith(b"}"):
                # Cut short by a full disk or a crash mid-write: the writer got an error (or
                # died) before answering, so the call it records was never acknowledged.
                log.warning(
                    "skipping a record cut short in %s near byte %d", self.journal, self.pos
                )
            else:
                self._taint(line)

    def _taint(self, line: bytes) -> None:
        where = f"{self.journal} near byte {self.pos}"
        m = _USER_PREFIX.match(line)
        user = None
        if m:
            try:
                user = json.loads(m.group(1))
            except ValueError:
                user = None
        if isinstance(user, str):
            if user not in self.tainted:
                self.tainted[user] = f"unreadable record in {where}"
                log.error(
                    "usage of user %r for %s cannot be trusted (unreadable record in %s); "
                    "refusing their calls until an administrator repairs the file and restarts",
                    user,
                    self.day,
                    where,
                )
        elif not self.tainted_all:
            self.tainted_all = f"unreadable record in {where}"
            log.error(
                "usage data for %s cannot be trusted (unreadable record in %s); refusing all "
                "calls for that day until an administrator repairs the file and restarts",
                self.day,
                where,
            )

    def _apply(self, rec: dict[str, Any]) -> None:
        kind = rec[F_KIND]
        if kind == KIND_RESERVE:
            self._reserve(rec)
        elif kind == KIND_SETTLE:
            user, n = rec[F_USER], int(rec[F_TOKENS])
            if n < 0:
                raise ValueError("negative tokens")
            c = self.counter(user)
            if self.open.pop(rec[F_ID], None) is not None:
                c.reserved -= 1
                c.held -= self.holds.pop(rec[F_ID], 0)
            # A settle is charged even if its slot was already freed: the call was answered.
            c.requests += 1
            c.tokens += n
            self.requests += 1
            self.tokens += n
            if n and user in self.minute_tokens:
                self.minute_tokens[user].append((int(rec.get(F_TIME, 0)), n))
        elif kind == KIND_RELEASE:
            entry = self.open.pop(rec[F_ID], None)
            if entry is not None:
                c = self.counter(entry[0])
                c.reserved -= 1
                c.held -= self.holds.pop(rec[F_ID], 0)
                calls = self.minute_calls.get(entry[0])
                if calls:  # a failed call costs nothing, its minute's slot included
                    for i, (_, rid) in enumerate(calls):
                        if rid == rec[F_ID]:
                            del calls[i]
                            break
        elif kind == KIND_DEAD:
            owner = rec[F_OWNER]
            for rid in [rid for rid, (_, o) in self.open.items() if o == owner]:
                c = self.counter(self.open.pop(rid)[0])
                c.reserved -= 1
                c.held -= self.holds.pop(rid, 0)
        elif kind == KIND_RESET:
            # An administrator's reset: the day starts over for this user's limits. Calls in
            # flight keep their slots and are charged when they finish.
            c = self.counter(rec[F_USER])
            f = self.forgiven.setdefault(rec[F_USER], [0, 0])
            f[0] += c.requests
            f[1] += c.tokens
            c.requests = c.tokens = 0
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def _reserve(self, rec: dict[str, Any]) -> None:
        """Decide a reservation from the records before it, as every process does."""
        user, rid, owner = rec[F_USER], rec[F_ID], rec[F_OWNER]
        rl, tl = int(rec[F_REQUEST_LIMIT]), int(rec[F_TOKEN_LIMIT])
        now = int(rec.get(F_TIME, 0))
        policy = rec.get(F_POLICY, "")  # "": admit, "r": reserve, "s": strict
        c = self.counter(user)
        held = c.held if policy else 0
        rpm, tpm, mc = (
            int(rec.get(F_RPM, 0)),
            int(rec.get(F_TPM, 0)),
            int(rec.get(F_CONCURRENCY, 0)),
        )
        calls = tokens = None
        if rpm:
            calls = self.minute_calls.setdefault(user, collections.deque())
            while calls and calls[0][0] <= now - 60_000:
                calls.popleft()
        if tpm:
            tokens = self.minute_tokens.setdefault(user, collections.deque())
            while tokens and tokens[0][0] <= now - 60_000:
                tokens.popleft()
        reason: str | None = None
        grant = 0
        if self.tainted_all or user in self.tainted:
            reason = "corrupt"
        elif c.requests + c.reserved >= rl:
            reason = "requests"
        elif c.tokens + held >= tl:
            reason = "tokens"
        elif mc and c.reserved >= mc:
            reason = "concurrency"
        elif calls is not None and len(calls) >= rpm:
            reason = "rpm"
        elif tokens is not None and sum(n for _, n in tokens) + held >= tpm:
            reason = "tpm"
        elif policy:
            grant = int(rec.get(F_WANT, 0))
            if policy == "s":
                left = tl - c.tokens - held
                if int(rec.get(F_PROMPT_ESTIMATE, 0)) >= left:
                    reason = "tokens"  # the prompt alone fills what is left: no room to answer
                grant = min(grant, left) if grant else left
        if reason is None:
            c.reserved += 1
            self.open[rid] = (user, owner)
            if grant:
                self.holds[rid] = grant
                c.held += grant
            if calls is not None:
                calls.append((now, rid))
        if owner == self.store.owner:
            self.decisions[rid] = reason
            self.grants[rid] = grant

    def minute_wait(self, user: str, now_ms: int) -> int:
        """Seconds until the oldest call or charge of the user's last minute leaves it."""
        oldest = [q[0][0] for q in (self.minute_calls.get(user), self.minute_tokens.get(user)) if q]
        return max(1, math.ceil((min(oldest) + 60_000 - now_ms) / 1000)) if oldest else 1

    # -- writing ------------------------------------------------------------------------------

    def append(self, rec: dict[str, Any]) -> int:
        """Append one record; return the journal offset just past it."""
        data = b"\n" + _encode_record(rec) + b"\n"
        try:
            written = os.write(self.fd, data)
            end = os.lseek(self.fd, 0, os.SEEK_CUR)
        except OSError as e:
            self.store.failed("write", e)
            raise StoreError(f"cannot write {self.journal}: {e.strerror}") from None
        if written != len(data):
            self.store.failed("write", "short write (disk full?)")
            raise StoreError(f"short write to {self.journal} (disk full?)")
        self.store.worked()
        self.written += 1
        self._own[end - len(data) + 1] = rec
        return end

    async def sync(self) -> None:
        """fsync the journal up to now; concurrent callers share one fsync (group commit)."""
        target = self.written
        while self.synced < target:
            if self._sync is None:
                self._sync = asyncio.ensure_future(self._fsync())
            await self._sync

    async def _fsync(self) -> None:
        upto = self.written
        try:
            await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.fd)
            self.synced = max(self.synced, upto)
        except OSError as e:
            self.store.failed("fsync", e)
            raise StoreError(f"cannot fsync {self.journal}: {e.strerror}") from None
        finally:
            # Cleared before this task completes, so a woken waiter never awaits a done task.
            self._sync = None

    async def write_snapshot(self) -> None:
        """Write the counters as {day}.json if ours are newer than the file's (atomic replace).

        The state is encoded here; the file work (lock, fsync, rename) runs in a thread so
        that a slow disk does not stall the event loop.
        """
        if self.pos <= self.snapshot_pos or self.tainted_all:
            return
        pos = self.pos
        snap = {
            "day": self.day,
            "journal_offset": pos,
            "requests": self.requests,
            "tokens": self.tokens,
            "users": {
                u: {"requests": c.requests, "tokens": c.tokens}
                for u, c in sorted(self.counters.items())
                if c.requests or c.tokens
            },
            "open": {rid: list(entry) for rid, entry in self.open.items()},
            "holds": dict(self.holds),
            # The rolling minute (rpm, tpm): a process that starts from this snapshot must
            # still see the calls and tokens of the last 60 s.
            "minute_calls": {u: list(map(list, q)) for u, q in self.minute_calls.items() if q},
            "minute_tokens": {u: list(map(list, q)) for u, q in self.minute_tokens.items() if q},
            "tainted": self.tainted,
            "forgiven": {
                u: {"requests": r, "tokens": t} for u, (r, t) in sorted(self.forgiven.items())
            },
        }
        data = json.dumps(snap, ensure_ascii=False, indent=1).encode()
        loop = asyncio.get_running_loop()
        written = await loop.run_in_executor(None, self._store_snapshot, data, pos)
        self.snapshot_pos = max(self.snapshot_pos, written)

    def _store_snapshot(self, data: bytes, pos: int) -> int:
        """Replace the snapshot unless the file is as new; return the offset it now holds."""
        try:
            lock = file_lock(self.store.root / ".snapshot.lock", thread_local=False)
            lock.acquire(timeout=0)
        except filelock.Timeout:  # (an OSError too: caught first)
            return -1  # another process is writing one; ours will be newer next time
        except OSError as e:
            raise StoreError(f"cannot lock {self.store.root}: {e.strerror}") from None
        try:
            try:
                theirs = json.loads(read_private(self.snapshot))["journal_offset"]
            except (OSError, ValueError, KeyError, TypeError):
                theirs = -1
            if isinstance(theirs, int) and theirs >= pos:
                return theirs
            atomic_write(self.snapshot, data)
            return pos
        finally:
            lock.release()

    def usage(self) -> dict[str, tuple[int, int]]:
        """Each user's requests and tokens charged this day, resets included."""
        out: dict[str, tuple[int, int]] = {}
        for user in set(self.counters) | set(self.forgiven):
            c = self.counters.get(user) or Counts()
            r, t = self.forgiven.get(user, (0, 0))
            if c.requests + r or c.tokens + t:
                out[user] = (c.requests + r, c.tokens + t)
        return out

    def close(self) -> None:
        os.close(self.fd)


class JournalStore(UsageStore):
    """Counters in data/: per-day journals (YYYY-MM-DD.jsonl) with JSON snapshots (.json).

    Several processes may share one data dir on a local file system. Each holds a file lock on
    data/owners/<id>.lock for its lifetime; when a process dies (even by kill -9) the kernel
    drops its lock, and the survivors free the slots it had reserved.

    A journal line is one record (keys: the F_* constants above):

        kind  meaning                         fields
        r     reserve a slot                  u id o rl tl t
        s     settle: charge the call         u id n p c t, and e m ms partial
        x     release: the call failed        u id
        d     a process died: free its slots  o
        z     an administrator's reset        u t

    e.g. {"u":"alice","k":"s","id":"9f2c41d07a3e-118","n":99,"p":12,"c":87,"t":1764137587412,
    "m":"gpt-4o-mini","ms":1840}
    """

    def __init__(self, root: str, clock: DayClock, fsync: bool = False) -> None:
        self.root = Path(root)
        self.name = f"file:{root}"
        self._past: dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}
        self.clock = clock
        self.fsync = fsync
        self.owner = secrets.token_hex(6)
        self._ledgers: dict[str, _Ledger] = {}
        self._seq = 0
        self._owner_lock: filelock.BaseFileLock | None = None
        self._dead: set[str] = set()

    async def start(self) -> None:
        try:
            make_private_dir(self.root / "owners")
            if os.stat(self.root).st_mode & 0o022:
                log.warning("data dir %s is writable by others than its owner", self.root)
            self._owner_lock = file_lock(self.root / "owners" / f"{self.owner}.lock")
            self._owner_lock.acquire(timeout=5)
        except (OSError, filelock.Timeout) as e:
            raise StoreError(f"cannot use data dir {self.root}: {e}") from None
        self._ledger(self.clock.today())

    async def close(self) -> None:
        for ledger in list(self._ledgers.values()):
            try:
                ledger.catch_up()
                await ledger.write_snapshot()
            except StoreError as e:
                log.error("closing %s: %s", ledger.day, e)
            ledger.close()
        self._ledgers.clear()
        if self._owner_lock is not None:
            (self.root / "owners" / f"{self.owner}.lock").unlink(missing_ok=True)
            self._owner_lock.release()
            self._owner_lock = None

    def _ledger(self, day: str) -> _Ledger:
        ledger = self._ledgers.get(day)
        if ledger is None:
            ledger = self._ledgers[day] = _Ledger(self, day)
        return ledger

    async def reserve(self, user: User, day: str, want: int = 0, prompt: int = 0) -> Reservation:
        ledger = self._ledger(day)
        c = ledger.counter(user.name)
        policy = user.policy
        now = int(self.clock.now() * 1000)
        # A user whose charged calls and calls in flight already reach a limit is refused
        # without a write, after reading what other processes appended (a reset, a settle, a
        # released slot): a flood of refused calls does not grow the journal. Everyone else
        # is decided by the journal's order, where every process reaches the same verdict.
        if self._refusal(ledger, user, c, now) is not None:
            ledger.catch_up()
        reason = self._refusal(ledger, user, c, now)
        if reason is not None:
            raise QuotaExceeded(reason, user, c.copy(), ledger.minute_wait(user.name, now))
        self._seq += 1
        rid = f"{self.owner}-{self._seq}"
        rec = {
            F_USER: user.name,
            F_KIND: KIND_RESERVE,
            F_ID: rid,
            F_OWNER: self.owner,
            F_REQUEST_LIMIT: user.daily_request_limit,
            F_TOKEN_LIMIT: user.daily_token_limit,
            F_TIME: now,
        }
        for field, value in ((F_RPM, policy.rpm), (F_TPM, policy.tpm)):
            if value:
                rec[field] = value
        if policy.max_concurrency:
            rec[F_CONCURRENCY] = policy.max_concurrency
        if policy.token_policy != ADMIT:
            rec[F_POLICY] = policy.token_policy[0]
            rec[F_WANT] = want
            if policy.token_policy == STRICT:
                rec[F_PROMPT_ESTIMATE] = prompt
        end = ledger.append(rec)
        try:
            ledger.catch_up(until=end)
        except StoreError:
            ledger.append({F_USER: user.name, F_KIND: KIND_RELEASE, F_ID: rid})  # may be granted
            raise
        reason = ledger.decisions.pop(rid)
        grant = ledger.grants.pop(rid, 0)
        if reason is not None:
            raise QuotaExceeded(reason, user, c.copy(), ledger.minute_wait(user.name, now))
        return Reservation(rid, user.name, day, grant)

    @staticmethod
    def _refusal(ledger: _Ledger, user: User, c: Counts, now: int) -> str | None:
        """The limit a reservation would meet on what this process has read so far."""
        policy = user.policy
        held = c.held if policy.token_policy != ADMIT else 0
        if ledger.tainted_all or user.name in ledger.tainted:
            return "corrupt"
        if c.requests + c.reserved >= user.daily_request_limit:
            return "requests"
        if c.tokens + held >= user.daily_token_limit:
            return "tokens"
        if policy.max_concurrency and c.reserved >= policy.max_concurrency:
            return "concurrency"
        since = now - 60_000
        calls = ledger.minute_calls.get(user.name)
        if policy.rpm and calls and sum(t > since for t, _ in calls) >= policy.rpm:
            return "rpm"
        tokens = ledger.minute_tokens.get(user.name)
        if policy.tpm and tokens and sum(n for t, n in tokens if t > since) + held >= policy.tpm:
            return "tpm"
        return None

    async def settle(self, res: Reservation, usage: Usage, call: CallFacts) -> Counts:
        ledger = self._ledger(res.day)
        rec: dict[str, Any] = {
            F_USER: res.user,
            F_KIND: KIND_SETTLE,
            F_ID: res.id,
            F_TOKENS: usage.total_tokens,
            F_PROMPT: usage.prompt_tokens,
            F_COMPLETION: usage.completion_tokens,
            F_TIME: int(self.clock.now() * 1000),
        }
        if usage.estimated:
            rec[F_ESTIMATED] = 1
        rec[F_MODEL], rec[F_LATENCY] = call.model, call.latency_ms
        if call.partial:
            rec[F_PARTIAL] = 1
        end = ledger.append(rec)
        if self.fsync:
            await ledger.sync()
        ledger.catch_up(until=end)
        return ledger.counter(res.user).copy()

    async def release(self, res: Reservation) -> None:
        ledger = self._ledger(res.day)
        ledger.append({F_USER: res.user, F_KIND: KIND_RELEASE, F_ID: res.id})

    async def reset(self, user: str, day: str) -> Counts:
        try:
            make_private_dir(self.root)
        except OSError as e:
            raise StoreError(f"cannot create {self.root}: {e.strerror}") from None
        ledger = self._ledger(day)
        ledger.catch_up()
        before = (ledger.counters.get(user) or Counts()).copy()
        end = ledger.append(
            {F_USER: user, F_KIND: KIND_RESET, F_TIME: int(self.clock.now() * 1000)}
        )
        await ledger.sync()
        ledger.catch_up(until=end)
        return before

    def _recorded(self, day: str) -> bool:
        """Whether a day has a journal (reads never create one)."""
        return day in self._ledgers or (self.root / f"{day}.jsonl").exists()

    async def usage(self, day: str) -> dict[str, tuple[int, int]]:
        if not self._recorded(day):
            return {}  # a day with nothing recorded (or removed by --retention-days)
        if day != self.clock.today():
            # A past day is read once and kept until its journal changes.
            try:
                st = os.stat(self.root / f"{day}.jsonl")
            except FileNotFoundError:
                return {}
            stamp = (st.st_size, st.st_mtime_ns)
            cached = self._past.get(day)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        ledger = self._ledger(day)
        ledger.catch_up()
        usage = ledger.usage()
        if day != self.clock.today():
            self._past[day] = (stamp, usage)
            for old in sorted(self._past)[:-HISTORY_DAYS]:
                del self._past[old]
        return usage

    async def counts(self, user: str, day: str) -> Counts:
        ledger = self._ledger(day)
        ledger.catch_up()
        return (ledger.counters.get(user) or Counts()).copy()

    def peek(self, user: str, day: str) -> Counts | None:
        ledger = self._ledgers.get(day)
        c = ledger.counters.get(user) if ledger is not None else None
        return c.copy() if c is not None else None

    async def all_counts(self, day: str) -> dict[str, Counts]:
        if not self._recorded(day):
            return {}
        ledger = self._ledger(day)
        ledger.catch_up()
        return {u: c.copy() for u, c in ledger.counters.items()}

    async def totals(self, day: str) -> tuple[int, int]:
        ledger = self._ledger(day)
        ledger.catch_up()
        return ledger.requests, ledger.tokens

    async def prune(self, keep_days: int, today: str) -> list[str]:
        cutoff = (date.fromisoformat(today) - timedelta(days=keep_days)).isoformat()
        removed: list[str] = []
        for day in [d for d in self._ledgers if d < cutoff]:
            self._ledgers.pop(day).close()
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return removed
        for name in names:
            m = _DAY_FILE.match(name)
            if m and m.group(1) < cutoff:
                try:
                    (self.root / name).unlink()
                    removed.append(str(self.root / name))
                except OSError as e:
                    log.error("retention: cannot delete %s: %s", self.root / name, e.strerror)
        return removed

    def _owner_alive(self, owner: str) -> bool:
        if owner == self.owner:
            return True
        if owner in self._dead:
            return False
        path = self.root / "owners" / f"{owner}.lock"
        if path.exists():
            try:
                lock = file_lock(path)
                lock.acquire(timeout=0)
            except OSError:
                return True  # not ours to judge: keep its slots
            except filelock.Timeout:
                return True
            path.unlink(missing_ok=True)
            lock.release()
        self._dead.add(owner)
        return False

    async def maintain(self, today: str) -> None:
        self._ledger(today)
        for day, ledger in list(self._ledgers.items()):
            ledger.catch_up()
            for owner in {o for _, o in ledger.open.values()}:
                if not self._owner_alive(owner):
                    log.warning("process %s is gone; freeing its reserved slots for %s", owner, day)
                    ledger.append({F_KIND: KIND_DEAD, F_OWNER: owner})
            ledger.catch_up()
            await ledger.write_snapshot()
            ours = any(o == self.owner for _, o in ledger.open.values())
            if day != today and not ours:
                ledger.close()
                del self._ledgers[day]


# The Redis store's scripts. Every key of one user's day shares the hash tag
# {<prefix>:<day>:<user>}, so each script touches one slot and also runs on Redis Cluster.
# Times come from Redis (TIME), so several machines agree on the rolling minute whatever
# their clocks say.
#   c  hash   r t (counts against the limits), ur ut (usage, resets included)
#   o  hash   reservation id -> "owner|hold|deadline ms" (calls in flight; a lease)
#   m  zset   reservation ids admitted in the last minute, by time (rpm)
#   k  zset   "id:tokens" charged in the last minute, by time (tpm)
_REDIS_OPEN = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function in_flight(o, now)
  local open = redis.call('HGETALL', o)
  local reserved, held = 0, 0
  for i = 1, #open, 2 do
    local hold, deadline = string.match(open[i + 1], '^[^|]*|(%d+)|(%d+)$')
    if hold == nil or tonumber(deadline) < now then
      redis.call('HDEL', o, open[i])  -- its process is gone: the slot is free again
    else
      reserved = reserved + 1
      held = held + tonumber(hold)
    end
  end
  return reserved, held
end
local function counts(c)
  local v = redis.call('HMGET', c, 'r', 't')
  return tonumber(v[1] or '0'), tonumber(v[2] or '0')
end
"""
_REDIS_RESERVE = (
    _REDIS_OPEN
    + """
local c, o, m, k = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local rid, owner = ARGV[1], ARGV[2]
local rl, tl = tonumber(ARGV[3]), tonumber(ARGV[4])
local rpm, tpm, mc = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local policy, want, pe, lease = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local now = now_ms()
local reserved, held = in_flight(o, now)
local req, tok = counts(c)
local held_now = held
if policy == '' then held_now = 0 end
redis.call('ZREMRANGEBYSCORE', m, '-inf', now - 60000)
redis.call('ZREMRANGEBYSCORE', k, '-inf', now - 60000)
local function refuse(reason)
  local wait = 1
  local first = redis.call('ZRANGE', m, 0, 0, 'WITHSCORES')
  local firstk = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  local oldest = nil
  if #first > 0 then oldest = tonumber(first[2]) end
  if #firstk > 0 and (oldest == nil or tonumber(firstk[2]) < oldest) then
    oldest = tonumber(firstk[2])
  end
  if oldest ~= nil then wait = math.max(1, math.ceil((oldest + 60000 - now) / 1000)) end
  return {reason, req, tok, reserved, held, 0, wait}
end
if req + reserved >= rl then return refuse('requests') end
if tok + held_now >= tl then return refuse('tokens') end
if mc > 0 and reserved >= mc then return refuse('concurrency') end
if rpm > 0 and redis.call('ZCARD', m) >= rpm then return refuse('rpm') end
if tpm > 0 then
  local used = 0
  for _, member in ipairs(redis.call('ZRANGE', k, 0, -1)) do
    used = used + tonumber(string.match(member, ':(%d+)$'))
  end
  if used + held_now >= tpm then return refuse('tpm') end
end
local grant = 0
if policy == 'r' then
  grant = want
elseif policy == 's' then
  local left = tl - tok - held
  if pe >= left then return refuse('tokens') end
  if want > 0 then grant = math.min(want, left) else grant = left end
end
redis.call('HSET', o, rid, owner .. '|' .. string.format('%d', grant) .. '|' .. (now + lease))
redis.call('ZADD', m, now, rid)
return {'', req, tok, reserved + 1, held + grant, grant, 0}
"""
)
_REDIS_SETTLE = (
    _REDIS_OPEN
    + """
local c, o, k = KEYS[1], KEYS[2], KEYS[3]
local rid, n = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
redis.call('HDEL', o, rid)
redis.call('HINCRBY', c, 'r', 1)
redis.call('HINCRBY', c, 't', n)
redis.call('HINCRBY', c, 'ur', 1)
redis.call('HINCRBY', c, 'ut', n)
if n > 0 then redis.call('ZADD', k, now, rid .. ':' .. n) end
local reserved, held = in_flight(o, now)
local req, tok = counts(c)
return {req, tok, reserved, held}
"""
)
_REDIS_RELEASE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])  -- only an open call gives its minute's place back
end
return 1
"""
_REDIS_COUNTS = (
    _REDIS_OPEN
    + """
local now = now_ms()
local reserved, held = in_flight(KEYS[2], now)
local req, tok = counts(KEYS[1])
if ARGV[1] == 'reset' then redis.call('HSET', KEYS[1], 'r', 0, 't', 0) end
return {req, tok, reserved, held}
"""
)
_REDIS_RENEW = """
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  local owner, hold = nil, nil
  if v then owner, hold = string.match(v, '^([^|]*)|(%d+)|') end
  if owner then
    redis.call('HSET', KEYS[1], ARGV[i], owner .. '|' .. hold .. '|' .. ARGV[1])
  end
end
return 1
"""

REDIS_LEASE_MS = 4_000  # a reservation lives this long unless its process renews it
REDIS_RENEW_SECONDS = 1.0
# Commands go to Redis in pipelines, one in flight at a time: what calls send meanwhile
# waits and goes in the next one. Under load a round trip carries many calls' scripts, which
# costs a fraction of a pipeline per command (one round trip each cost the gateway twice the
# CPU of the file store, and throughput halved).
REDIS_PIPELINES = 1
REDIS_BATCH = 1024  # commands in one pipeline at most
# Numbers sent to the scripts are at most this: Lua keeps numbers as doubles, exact up to
# 2**53 (and the scripts write a lease's hold with %d: plain `..` would write 1e15 as "1e+15").
REDIS_NUMBER_MAX = 2**53 - 1
REDIS_TIMEOUT = 2.0  # seconds for any one Redis command, connecting included


class RedisStore(UsageStore):
    """Counters in Redis (or Valkey), shared by gateways on any number of machines.

    Reserve, settle, release and reset are one Lua script call each, so every decision is
    atomic, and the rules are those of the journal (the same contract tests run on both).
    A reservation is a lease: its process renews it every second, and one whose process died
    is freed 4 s after its last renewal. A Redis that cannot be reached fails the call at
    once with StoreError (no call is relayed or charged); the next call tries again.
    """

    held_until = f"its lease ends ({REDIS_LEASE_MS // 1000} s)"

    def __init__(self, url: str, clock: DayClock) -> None:
        try:
            import redis.asyncio  # noqa: PLC0415 - only deployments with a Redis store need it
        except ImportError:
            raise ConfigError(
                "--store=redis… needs the redis package: pip install 'redis[hiredis]>=5,<7'"
            ) from None
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        self.prefix = (query.pop("prefix", ["gw"])[0] or "gw")[:64]
        rest = urllib.parse.urlencode({k: v[0] for k, v in query.items()})
        plain = urllib.parse.urlunsplit(parts._replace(query=rest))
        host = parts.hostname or parts.path or "localhost"
        where = f"{host}:{parts.port}" if parts.port else host
        self.name = f"{parts.scheme}://{where}{'' if parts.scheme == 'unix' else parts.path}"
        self.clock = clock
        self.owner = secrets.token_hex(6)
        self._seq = 0
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415

        # No retries inside the client: a settle resent after a lost answer would charge
        # twice, and a Redis that is down must fail the call at once, not after backoffs.
        self._redis = redis.asyncio.Redis.from_url(
            plain,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._no_script: type[BaseException] = redis.exceptions.NoScriptError
        self._scripts = {
            name: self._redis.register_script(code)
            for name, code in (
                ("reserve", _REDIS_RESERVE),
                ("settle", _REDIS_SETTLE),
                ("release", _REDIS_RELEASE),
                ("counts", _REDIS_COUNTS),
                ("renew", _REDIS_RENEW),
            )
        }
        # Commands of the calls in flight wait at most one turn of the event loop and go
        # together in one pipeline: under load a round trip carries many calls' scripts.
        self._batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing: set[asyncio.Future[None]] = set()
        self._closed = False
        self._error_type: type[Exception] = redis.RedisError
        self._ours: dict[str, Reservation] = {}  # reservations this process holds: renewed
        self._seen: dict[tuple[str, str], Counts] = {}
        self._listed: set[tuple[str, str]] = set()  # (day, user) already in the day's user set
        self._totals: dict[str, tuple[float, tuple[int, int]]] = {}
        self._active: set[tuple[str, str]] = set()  # (day, user) who called since maintain()
        self._renewing: asyncio.Task[None] | None = None

    def _keys(self, day: str, user: str) -> list[str]:
        tag = "{" + f"{self.prefix}:{day}:{user}" + "}"
        return [f"{tag}:c", f"{tag}:o", f"{tag}:m", f"{tag}:k"]

    def _day(self, day: str, what: str) -> str:
        return "{" + f"{self.prefix}:{day}" + "}:" + what

    async def _call(self, what: str, work: Awaitable[Any]) -> Any:
        try:
            result = await work
        except self._errors as e:
            self.failed(what, e)
            raise StoreUnavailable(
                f"usage store {self.name} unavailable ({self.problem})"
            ) from None
        self.worked()
        return result

    def _send(self, *command: Any) -> asyncio.Future[Any]:
        """Queue one command for the next pipeline; its future holds the answer. Arguments
        are made text here, so one that cannot be fails its own caller, not the pipeline."""
        future = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(self._error_type("the usage store is closed"))
            return future
        command = tuple(a if isinstance(a, str | bytes) else str(a) for a in command)
        self._batch.append((command, future))
        if len(self._batch) == 1 and len(self._flushing) < REDIS_PIPELINES:
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def _script(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        return self._send("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    def _flush(self) -> None:
        if not self._batch or len(self._flushing) >= REDIS_PIPELINES:
            return
        batch, self._batch = self._batch[:REDIS_BATCH], self._batch[REDIS_BATCH:]
        task = asyncio.ensure_future(self._run_batch(batch))
        self._flushing.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(lambda t: self._flushed(t, batch))

    def _flushed(self, task: asyncio.Future[None], batch: list[tuple[Any, Any]]) -> None:
        self._flushing.discard(task)
        # A pipeline task that was cancelled (the loop closing) answers its calls all the same.
        self._fail(batch, self._error_type("the usage store's pipeline was cancelled"))
        self._flush()  # what queued up meanwhile goes in the next pipeline

    @staticmethod
    def _fail(batch: list[tuple[Any, asyncio.Future[Any]]], error: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return cast(list[Any], await pipe.execute(raise_on_error=False))

    async def _run_batch(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            answers = await self._pipeline([c for c, _ in batch])
        except Exception as e:
            error = e if isinstance(e, self._errors) else self._error_type(f"{e!r}"[:300])
            self._fail(batch, error)
            # Redis is down or hangs: what queued meanwhile was not sent, and fails now rather
            # than waiting its turn behind one timed-out pipeline after another. The next call
            # tries again.
            waiting, self._batch = self._batch, []
            self._fail(waiting, error)
            return
        again = [i for i, a in enumerate(answers) if isinstance(a, self._no_script)]
        if again:  # Redis restarted or was flushed: it ran none of these, so send them again
            try:
                for script in self._scripts.values():
                    await self._redis.script_load(script.script)  # the same SHA1 as before
                redo = await self._pipeline([batch[i][0] for i in again])
            except Exception as e:
                error = e if isinstance(e, self._errors) else self._error_type(f"{e!r}"[:300])
                redo = [error] * len(again)  # only these failed; the others have their answers
            for i, answer in zip(again, redo, strict=True):
                answers[i] = answer
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    async def start(self) -> None:
        await self._call("connect", self._redis.ping())
        self._renewing = asyncio.ensure_future(self._renew_forever())

    async def close(self) -> None:
        self._closed = True
        if self._renewing is not None:
            self._renewing.cancel()
        if self._flushing:  # the pipeline on its way: its answers are awaited, up to a timeout
            await asyncio.wait(list(self._flushing), timeout=REDIS_TIMEOUT)
        waiting, self._batch = self._batch, []
        self._fail(waiting, self._error_type("the usage store is closed"))
        await self._redis.aclose()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(REDIS_RENEW_SECONDS)
            ours = list(self._ours.values())
            if not ours:
                continue
            by_key: dict[str, list[str]] = {}  # one call per user's day: one slot each
            for r in ours:
                by_key.setdefault(self._keys(r.day, r.user)[1], []).append(r.id)
            try:
                seconds, micros = await self._redis.time()
                deadline = int(seconds) * 1000 + int(micros) // 1000 + REDIS_LEASE_MS
                await asyncio.gather(
                    *(self._script("renew", [key], [deadline, *ids]) for key, ids in by_key.items())
                )
            except Exception as e:  # the renewer must outlive any one failure
                log.warning("usage store %s: renewing leases failed: %s", self.name, e)

    async def reserve(self, user: User, day: str, want: int = 0, prompt: int = 0) -> Reservation:
        policy = user.policy
        self._seq += 1
        rid = f"{self.owner}-{self._seq}"
        self._active.add((day, user.name))
        first = (day, user.name) not in self._listed
        reserve = self._script(
            "reserve",
            self._keys(day, user.name),
            args=[
                rid,
                self.owner,
                min(user.daily_request_limit, REDIS_NUMBER_MAX),
                min(user.daily_token_limit, REDIS_NUMBER_MAX),
                min(policy.rpm, REDIS_NUMBER_MAX),
                min(policy.tpm, REDIS_NUMBER_MAX),
                min(policy.max_concurrency, REDIS_NUMBER_MAX),
                "" if policy.token_policy == ADMIT else policy.token_policy[0],
                min(want, REDIS_NUMBER_MAX),
                min(prompt, REDIS_NUMBER_MAX),
                REDIS_LEASE_MS,
            ],
        )
        if first:  # the first call of this user's day here: list the user and the day too
            # In the same pipeline, but not awaited: if listing fails, the reservation
            # stands, and the next call (or maintain) lists them again.
            listed = asyncio.gather(
                self._send("SADD", self._day(day, "users"), user.name),
                self._send("ZADD", f"{self.prefix}:days", 0, day),
            )
            listed.add_done_callback(lambda f: self._note_listed(f, day, user.name))
        result = await self._call("reserve", reserve)
        reason, req, tok, reserved, held, grant, wait = result
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        counts = Counts(int(req), int(tok), int(reserved), int(held))
        self._seen[(user.name, day)] = counts
        if reason:
            raise QuotaExceeded(reason, user, counts, int(wait))
        res = Reservation(rid, user.name, day, int(grant))
        self._ours[rid] = res
        return res

    def _note_listed(self, listed: asyncio.Future[Any], day: str, user: str) -> None:
        if listed.cancelled() or listed.exception() is not None:
            return
        self._listed.add((day, user))
        if len(self._listed) > 100_000:
            self._listed.clear()

    async def settle(self, res: Reservation, usage: Usage, call: CallFacts) -> Counts:
        c, o, _, k = self._keys(res.day, res.user)
        settle = self._script("settle", [c, o, k], [res.id, usage.total_tokens])
        try:
            result = await self._call("settle", settle)
        finally:
            self._ours.pop(res.id, None)
            self._totals.clear()
        counts = Counts(*(int(x) for x in result))
        self._seen[(res.user, res.day)] = counts
        return counts

    async def release(self, res: Reservation) -> None:
        _, o, m, _ = self._keys(res.day, res.user)
        try:
            await self._call("release", self._script("release", [o, m], [res.id]))
        finally:
            self._ours.pop(res.id, None)

    async def _counts(self, user: str, day: str, reset: bool = False) -> Counts:
        c, o, _, _ = self._keys(day, user)
        script = self._script("counts", [c, o], ["reset" if reset else ""])
        result = await self._call("counts", script)
        return Counts(*(int(x) for x in result))

    async def counts(self, user: str, day: str) -> Counts:
        counts = await self._counts(user, day)
        self._seen[(user, day)] = counts
        return counts

    def peek(self, user: str, day: str) -> Counts | None:
        return self._seen.get((user, day))

    async def all_counts(self, day: str) -> dict[str, Counts]:
        users = await self._call("users", self._redis.smembers(self._day(day, "users")))
        out = {}
        for raw in sorted(users):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            out[name] = await self._counts(name, day)
        return out

    async def totals(self, day: str) -> tuple[int, int]:
        # The sum of the users' usage: a settle touches only its user's slot (one script
        # call), and a day's users are few next to its calls. Kept for half a second.
        now = time.monotonic()
        cached = self._totals.get(day)
        if cached is not None and now - cached[0] < 0.5:
            return cached[1]
        usage = await self.usage(day)
        total = (sum(r for r, _ in usage.values()), sum(t for _, t in usage.values()))
        self._totals = {day: (now, total)}
        return total

    async def reset(self, user: str, day: str) -> Counts:
        pipe = self._redis.pipeline(transaction=False)
        c, o, _, _ = self._keys(day, user)
        await self._scripts["counts"](keys=[c, o], args=["reset"], client=pipe)
        pipe.sadd(self._day(day, "users"), user)
        result = (await self._call("reset", pipe.execute()))[0]
        self._totals.clear()
        return Counts(*(int(x) for x in result))

    async def usage(self, day: str) -> dict[str, tuple[int, int]]:
        users = await self._call("users", self._redis.smembers(self._day(day, "users")))
        names = sorted(u.decode() if isinstance(u, bytes) else str(u) for u in users)
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(self._keys(day, name)[0], "ur", "ut")
        rows = await self._call("usage", pipe.execute())
        return {
            name: (int(r or 0), int(t or 0))
            for name, (r, t) in zip(names, rows, strict=True)
            if r or t
        }

    async def prune(self, keep_days: int, today: str) -> list[str]:
        cutoff = (date.fromisoformat(today) - timedelta(days=keep_days)).isoformat()
        days = await self._call("days", self._redis.zrange(f"{self.prefix}:days", 0, -1))
        removed: list[str] = []
        for raw in days:
            day = raw.decode() if isinstance(raw, bytes) else str(raw)
            if day >= cutoff:
                continue
            users = await self._call("users", self._redis.smembers(self._day(day, "users")))
            for u in users:
                name = u.decode() if isinstance(u, bytes) else str(u)
                await self._call("prune", self._redis.delete(*self._keys(day, name)))
            await self._call("prune", self._redis.delete(self._day(day, "users")))
            await self._call("prune", self._redis.zrem(f"{self.prefix}:days", day))
            removed.append(f"{self.name} {self.prefix} {day}")
        return removed

    async def maintain(self, today: str) -> None:
        if self.problem:  # a quiet moment: see whether Redis is back
            await self._call("ping", self._redis.ping())
        # List again every user who called since the last time (one pipeline): if Redis lost
        # its data (a restart without persistence, a failover), the day's user list is whole
        # again within a maintenance round.
        active, self._active = self._active, set()
        if active:
            pipe = self._redis.pipeline(transaction=False)
            for day, name in active:
                pipe.sadd(self._day(day, "users"), name)
                pipe.zadd(f"{self.prefix}:days", {day: 0})
            await self._call("list users", pipe.execute())


def open_store(url: str, data_dir: str, clock: DayClock, fsync: bool = False) -> UsageStore:
    """The usage store that --store names: empty or `file:` (the data dir, or `file:PATH`),
    `redis://`, `rediss://` or `unix://` (RedisStore); anything else is a ConfigError."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if not url or scheme == "file":
        path = url[5:] if scheme == "file" and url[5:] else data_dir
        return JournalStore(path, clock, fsync=fsync)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, clock)
    raise ConfigError(
        f"--store: unknown scheme {scheme or url[:20]!r} (use file:, redis://, rediss:// or unix://)"
    )


# ---------------------------------------------------------------------------------------------
# Upstream client and the bounded queue
# ---------------------------------------------------------------------------------------------


class _CachingResolver(tornado.netutil.DefaultExecutorResolver):
    """Tornado's client opens a connection per call and resolves its host in a thread each
    time; an IP address needs no lookup, and a name's addresses are kept for a minute."""

    TTL = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[str, int, int], tuple[float, list[tuple[int, Any]]]] = {}

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (str(ip), port))]
        key = (host, port, int(family))
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.TTL:
            return hit[1]
        addresses = await super().resolve(host, port, family)
        self._cache[key] = (now, addresses)
        return addresses


def _retry_after(value: str | None) -> float | None:
    """An upstream's Retry-After in seconds (a number of seconds; an HTTP date is not read)."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 1e6 else None


def _error_message(body: bytes | None) -> str:
    """The upstream's own error message (OpenAI shape), or the start of its body."""
    text = (body or b"").decode("utf-8", "replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:1000]
        if isinstance(err, str):
            return err[:1000]
    except (ValueError, AttributeError, RecursionError):
        pass
    return text[:300] or "empty response"


class Upstream:
    """Calls one upstream (OpenAI-compatible, or Anthropic's API) with the team's key."""

    curl: bool
    client: tornado.httpclient.AsyncHTTPClient
    stream_client: tornado.httpclient.AsyncHTTPClient

    def __init__(
        self,
        config: Config,
        base_url: str | None = None,
        api_key: str | None = None,
        auth: str = "bearer",
        *,
        timeout: float | None = None,
        redactor: Redactor | None = None,
        share: Upstream | None = None,
    ) -> None:
        self.base_url = (config.upstream_base_url if base_url is None else base_url).rstrip("/")
        self.api_key = config.upstream_api_key if api_key is None else api_key
        self.auth = auth  # "bearer": Authorization: Bearer <key>; "x-api-key": Anthropic's header
        # Upstream text enters the gateway here and nowhere else; it is redacted on the way in.
        self.redactor = redactor or Redactor(config.secrets())
        self.timeout = config.upstream_timeout if timeout is None else timeout
        self.connect_timeout = config.upstream_connect_timeout
        self.shared = share is not None
        if share is not None:  # another upstream's connection pools (routing: one set for all)
            self.curl, self.client, self.stream_client = (
                share.curl,
                share.client,
                share.stream_client,
            )
            return
        # Tornado's default max_clients=10 would silently cap in-flight calls below --concurrency.
        kwargs: dict[str, Any] = {
            "force_instance": True,
            "max_clients": max(10, config.concurrency),
        }
        self.curl = config.http_client == "curl" or (config.http_client == "auto" and _has_pycurl())
        if self.curl:
            # libcurl keeps connections to the upstream alive and resolves without a thread:
            # about twice the throughput of Tornado's own client (see bench/).
            from tornado.curl_httpclient import CurlAsyncHTTPClient  # noqa: PLC0415 - optional

            # At DEBUG, Tornado's curl client logs libcurl's trace, request headers included:
            # that would put the upstream key in the log.
            logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)

            self.client = CurlAsyncHTTPClient(**kwargs)
        else:
            self.client = tornado.simple_httpclient.SimpleAsyncHTTPClient(
                resolver=_CachingResolver(), **kwargs
            )
        # Streams always use Tornado's own client: it awaits the streaming callback (so a slow
        # client slows the upstream read) and aborts the transfer when the callback raises;
        # the curl client does neither, and may deliver body chunks before the headers.
        self.stream_client = (
            tornado.simple_httpclient.SimpleAsyncHTTPClient(resolver=_CachingResolver(), **kwargs)
            if self.curl
            else self.client
        )

    @property
    def configured(self) -> bool:
        return bool(self.api_key)

    def _request(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        key = key or self.api_key
        key_header = (
            {"x-api-key": key} if self.auth == "x-api-key" else {"Authorization": f"Bearer {key}"}
        )
        return tornado.httpclient.HTTPRequest(
            self.base_url + path,
            method=method,
            headers={
                **(headers or {}),
                **key_header,
                "Content-Type": "application/json",
                "Accept": "text/event-stream"
                if "streaming_callback" in kwargs
                else "application/json",
            },
            request_timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            # A redirect would send the team's key and the user's body to another host.
            follow_redirects=False,
            **kwargs,
        )

    async def _fetch(self, request: tornado.httpclient.HTTPRequest) -> Any:
        seen: list[str] = []  # the status line, once the upstream began to answer
        request.header_callback = lambda line: None if seen else seen.append(line)
        try:
            response = await self.client.fetch(request, raise_error=False)
        except (OSError, tornado.httpclient.HTTPClientError, ValueError, OverflowError) as e:
            # No HTTP answer at all: refused, reset, DNS, TLS, or timed out (Tornado's 599).
            raise UpstreamFailure(None, self._describe(e), responded=bool(seen)) from None
        if response.code == 599:
            raise UpstreamFailure(None, self._describe(response.error), responded=bool(seen))
        if not 200 <= response.code < 300:
            raise UpstreamFailure(
                response.code,
                self.redactor.text(_error_message(response.body)),
                retry_after=_retry_after(response.headers.get("Retry-After")),
            )
        raw, odd = response.body, list[str]()
        try:
            if b"NaN" in raw or b"Infinity" in raw:
                # Not JSON: read as null, and the reply re-encoded below if one was there.
                reply = json.loads(raw, parse_constant=odd.append)
            else:
                reply = json.loads(raw)  # the default decoder: built once, not per reply
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            raise UpstreamFailure(
                response.code, "upstream returned a body that is not a JSON object"
            )
        # The upstream's bytes are relayed as they are, unless they are not plain UTF-8 JSON
        # (a BOM, UTF-16, NaN) or hold a configured secret written with JSON escapes.
        if odd or raw[:3] == b"\xef\xbb\xbf" or b"\x00" in raw:
            raw = _compact(reply)
        elif b"\\u" in raw and self.redactor.secrets:
            plain = _compact(reply)
            if self.redactor.data(plain) is not plain:
                raw = plain
        return reply, self.redactor.data(raw)

    async def post_json(
        self, path: str, body: bytes, headers: dict[str, str] | None = None, key: str | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """POST a JSON body; return the reply, parsed and as sent (it must be a JSON object)."""
        reply, raw = await self._fetch(self._request(path, "POST", headers, key, body=body))
        return reply, raw

    async def get_json(
        self, path: str, key: str | None = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """GET a JSON object, parsed from the relayable (redacted) bytes."""
        _, raw = await self._fetch(self._request(path, headers=headers, key=key))
        return json.loads(raw)  # type: ignore[no-any-return]

    async def stream(
        self,
        path: str,
        body: bytes,
        on_header: Callable[[str], None],
        on_chunk: Callable[[bytes], Awaitable[None]],
        *,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> str | None:
        """POST and feed the answer to the callbacks as it arrives; return an error or None.

        An awaited on_chunk pauses reading, so a slow client slows the upstream instead of
        filling memory.
        """
        request = self._request(
            path,
            "POST",
            headers,
            key,
            body=body,
            header_callback=on_header,
            streaming_callback=on_chunk,
        )
        try:
            response = await self.stream_client.fetch(request, raise_error=False)
        except EventTooLarge as e:
            return str(e)
        except ClientLeft:
            return None
        except (
            OSError,
            tornado.httpclient.HTTPClientError,
            tornado.httputil.HTTPInputError,
            ValueError,
            OverflowError,
        ) as e:
            return self._describe(e)
        return self._describe(response.error) if response.code == 599 else None

    def _describe(self, error: BaseException | None) -> str:
        """Both clients' transport errors as 'timeout: …' or 'connection failed: …'."""
        text = str(error or "no response").removeprefix("HTTP 599: ")
        if "timeout" in text.lower() or "timed out" in text.lower():
            return self.redactor.text(f"timeout: {text}")
        return self.redactor.text(f"connection failed: {text}")

    def close(self) -> None:
        if self.shared:
            return
        self.client.close()
        if self.stream_client is not self.client:
            self.stream_client.close()


@dataclass(frozen=True, slots=True)
class Answer:
    """What an upstream call produced: a JSON reply (None for a stream) and its usage.

    `complete` is False for a stream that broke or whose client left; `tail` is the stream's
    closing event as the upstream sent it (`data: [DONE]`, `response.completed`,
    `message_stop`), held back by the relay and sent only after the charge is written.
    """

    reply: dict[str, Any] | None
    usage: Usage
    complete: bool = True
    tail: bytes = b""
    raw: bytes = b""  # the reply as the upstream sent it
    upstream_id: str = ""  # the upstream's id for the call (chatcmpl-…), if it gave one
    interrupted: str = ""  # why an incomplete stream ended
    upstream: str = ""  # the name of the upstream that answered (routing)
    attempts: int = 1  # upstreams tried, this one included
    upstream_model: str = ""  # the model name sent upstream (after models: mapping)


@dataclass(eq=False)
class Job:
    """One upstream call waiting for a worker; `client_left` is set when the client leaves."""

    call: Callable[[], Awaitable[Answer]]
    model: str = ""
    api: str = API_OPENAI  # what the upstream must speak: API_OPENAI or API_ANTHROPIC
    future: asyncio.Future[Answer] = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    client_left: bool = False
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float = 0.0
    user: str = ""  # whose call: fair share takes turns between users
    weight: int = 1  # the user's share of the workers when calls wait
    prompt: int = 0  # the prompt's estimated tokens (token policies)
    max_tokens: int = 0  # the client's cap on generated tokens; 0: none given
    cap: int = 0  # token_policy strict: the max_tokens the upstream gets (0: the client's)
    choices: int = 1  # answers the call asks for (n, best_of); each may use max_tokens


class CallQueue:
    """The waiting room: a bounded tornado.queues.Queue of turns drained by --concurrency
    workers, and a fair choice of which call a free worker takes.

    At most `concurrency` calls run and `size` more wait; the next is refused with 503. One
    user's waiting calls may take at most `user_share` of the room, so others still get in
    while one floods it. A free worker takes the next call of the user served least, by
    `weight` (stride scheduling: each call served moves its user 1/weight along; the user
    furthest behind goes next; FIFO within one user). `waiting` counts calls submitted but
    not yet started. With size 0 there is no waiting room.
    """

    def __init__(self, size: int, concurrency: int, user_share: float = 1.0) -> None:
        self.size = size
        self.concurrency = concurrency
        self.user_room = max(1, int(size * user_share)) if user_share < 1 else size
        self.waiting = 0
        self.processing = 0
        self._turns: tornado.queues.Queue[bool] = tornado.queues.Queue()  # False: stop
        self._lines: dict[str, collections.deque[Job]] = {}  # user -> their waiting calls
        self._pass: dict[str, float] = {}  # user -> how far along their share they are
        self._clock = 0.0  # the pass of the call served last
        self._workers: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        """Calls waiting because every worker is busy."""
        return max(0, self.waiting + self.processing - self.concurrency)

    def full(self) -> bool:
        """True when `concurrency` calls run and `size` more wait."""
        return self.waiting + self.processing >= self.concurrency + self.size

    def user_full(self, user: str) -> bool:
        """True when this user's waiting calls already take their share of the room."""
        line = self._lines.get(user)
        if line is None or self.user_room >= self.size:
            return False
        # Calls in the line that an idle worker is about to take do not wait.
        free = max(0, self.concurrency - self.processing)
        return len(line) - free >= self.user_room

    def start(self) -> None:
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(self.concurrency)]

    def submit(self, job: Job) -> None:
        """Queue a job or raise tornado.queues.QueueFull."""
        if self.full() or self.user_full(job.user):
            raise tornado.queues.QueueFull()
        line = self._lines.get(job.user)
        if line is None:
            line = self._lines[job.user] = collections.deque()
            # A user who had nothing waiting joins at the current pass: no credit saved up
            # while idle, and no debt either.
            self._pass[job.user] = max(self._pass.get(job.user, 0.0), self._clock)
        line.append(job)
        self.waiting += 1
        self._turns.put_nowait(True)

    def _next(self) -> Job:
        """The call to start now: the first of the user furthest behind their share."""
        user = min(self._lines, key=self._pass.__getitem__)
        line = self._lines[user]
        job = line.popleft()
        if not line:
            del self._lines[user]
        self._clock = self._pass[user]
        self._pass[user] += 1.0 / max(1, job.weight)
        if len(self._pass) > 4 * (len(self._lines) + 1024):  # forget long-idle users
            self._pass = {u: p for u, p in self._pass.items() if u in self._lines}
        return job

    async def _work(self) -> None:
        async for turn in self._turns:
            try:
                if not turn:
                    return
                job = self._next()
                self.waiting -= 1
                if job.client_left:
                    job.future.set_exception(ClientLeft("the client left while its call waited"))
                    continue
                self.processing += 1
                job.started_at = time.monotonic()
                try:
                    job.future.set_result(await job.call())
                except Exception as e:
                    job.future.set_exception(e)
                finally:
                    self.processing -= 1
            finally:
                job = None  # type: ignore[assignment]  # idle, the worker holds no body
                self._turns.task_done()

    async def drain(self) -> None:
        """Finish every queued call, then stop the workers."""
        await self._turns.join()
        for _ in self._workers:
            await self._turns.put(False)
        await asyncio.gather(*self._workers)


# ---------------------------------------------------------------------------------------------
# Upstream routing (upstreams.yaml): which upstream and key take a call, retries, cooldowns
# ---------------------------------------------------------------------------------------------

_ROUTING_FIELDS = frozenset({"upstreams", "models", "retries", "cooldown_seconds", "prices"})
_UPSTREAM_FIELDS = frozenset(
    {
        "base_url",
        "api_key",
        "api_key_env",
        "api_keys",
        "api_keys_env",
        "models",
        "priority",
        "weight",
        "max_concurrency",
        "timeout",
        "headers",
        "api",
    }
)
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}")
_OWN_HEADERS = frozenset({"authorization", "x-api-key", "content-type", "accept", "host"})
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})  # 529: Anthropic's overloaded
KEY_REFUSED = frozenset({401, 403})  # the key is bad: out of use until reload or re-enable
CLIENT_FAULTS = frozenset({400, 404, 422})  # the request is bad: passed on, never retried
FAILURES_BEFORE_REST = 3  # an upstream's consecutive failures that send it to rest
MAX_REST_WAIT = 3.0  # seconds a call waits for a resting upstream to come back, else it fails
MAX_KEY_REST = 60.0  # the longest a 429 rests a key, whatever the upstream's Retry-After
MAX_ROUTES_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Price:
    """What a model costs per million tokens (one currency: --currency)."""

    glob: str
    input: float
    output: float
    cached_input: float


def parse_prices(doc: Any, where: str = "prices") -> tuple[Price, ...]:
    """`prices:` {model glob: {input, output, cached_input}}; first match wins."""
    if doc is None:
        return ()
    if not isinstance(doc, dict) or len(doc) > 10_000:
        raise ConfigError(f"{where} must map model globs to {{input: …, output: …}}")
    out = []
    for glob, entry in doc.items():
        here = f"{where}.{glob}"
        model_glob(where, glob)
        if not isinstance(entry, dict) or set(entry) - {"input", "output", "cached_input"}:
            raise ConfigError(f"{here} must be {{input: …, output: …, cached_input: …}}")
        if "input" not in entry or "output" not in entry:
            raise ConfigError(f"{here} needs input and output (per million tokens)")
        values = {k: _number(f"{here}.{k}", v, float, 0, 1e6) for k, v in entry.items()}
        out.append(
            Price(
                glob, values["input"], values["output"], values.get("cached_input", values["input"])
            )
        )
    return tuple(out)


def load_prices_file(path: str) -> tuple[Price, ...]:
    """--prices-file: the same map as upstreams.yaml's `prices:`; empty path: no prices."""
    if not path:
        return ()
    try:
        doc = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"--prices-file {path}: cannot read it ({type(e).__name__})") from None
    if isinstance(doc, dict) and set(doc) == {"prices"}:
        doc = doc["prices"]
    try:
        return parse_prices(doc)
    except ConfigError as e:
        raise ConfigError(f"--prices-file {path}: {e}") from None


def price_of(prices: tuple[Price, ...], model: str) -> Price | None:
    for price in prices:
        if fnmatch.fnmatchcase(model, price.glob):
            return price
    return None


def cost_of(prices: tuple[Price, ...], model: str, usage: Usage) -> float | None:
    """A call's cost from its prompt (cached part apart) and completion tokens; None when
    the model has no price ("unpriced")."""
    price = price_of(prices, model)
    if price is None:
        return None
    fresh = usage.prompt_tokens - usage.cached_tokens
    cost = (
        fresh * price.input
        + usage.cached_tokens * price.cached_input
        + usage.completion_tokens * price.output
    ) / 1e6
    return round(cost, 8)


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One upstream of upstreams.yaml (or the one the command line describes)."""

    name: str
    base_url: str
    keys: tuple[str, ...]
    models: tuple[str, ...] = ("*",)
    priority: int = 0
    weight: int = 1
    max_concurrency: int = 0  # 0: --concurrency
    timeout: float = 0.0  # 0: --upstream-timeout
    headers: tuple[tuple[str, str], ...] = ()
    api: str = API_OPENAI


@dataclass(frozen=True, slots=True)
class RoutingSpec:
    """upstreams.yaml, checked: the upstreams, model names mapped, retries, cooldown."""

    upstreams: tuple[UpstreamSpec, ...]
    aliases: Mapping[str, tuple[str, str]]  # client's name -> (upstream's name, upstream or "")
    retries: int = 2
    cooldown: float = 30.0
    from_file: bool = False
    prices: tuple[Price, ...] = ()


def default_routing(config: Config) -> RoutingSpec:
    """Without upstreams.yaml: the command line's upstream (`default`, every model) and, for
    /v1/messages, the Anthropic one (`anthropic`)."""
    return RoutingSpec(
        (
            UpstreamSpec("default", config.upstream_base_url, (config.upstream_api_key,)),
            UpstreamSpec(
                "anthropic",
                config.anthropic_base_url,
                (config.anthropic_api_key,),
                api=API_ANTHROPIC,
            ),
        ),
        {},
        retries=0,
    )


def _number(where: str, value: Any, kind: type, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float if kind is float else int):
        raise ConfigError(f"{where} must be a {'number' if kind is float else 'whole number'}")
    if not low <= value <= high:
        raise ConfigError(f"{where} must be between {low:g} and {high:g}")
    return kind(value)


def _keys_of(where: str, entry: dict[str, Any], env: Mapping[str, str]) -> tuple[str, ...]:
    given = [k for k in ("api_key", "api_key_env", "api_keys", "api_keys_env") if k in entry]
    if len(given) != 1:
        raise ConfigError(
            f"{where}: set exactly one of api_key, api_key_env, api_keys, api_keys_env"
        )
    field = given[0]
    value = entry[field]
    names = [value] if field in ("api_key", "api_key_env") else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{where}.{field} must be a non-empty string or list of strings")
    if len(names) > 1000:
        raise ConfigError(f"{where}.{field}: at most 1000 keys")
    if field.endswith("_env"):
        missing = [n for n in names if not env.get(n)]
        if missing:
            raise ConfigError(f"{where}.{field}: environment variable {missing[0]} is not set")
        keys = [env[n] for n in names]
    else:
        keys = names
    for key in keys:
        if not re.fullmatch(r"[\x21-\x7e]{1,1000}", key):
            # Said without the key: a key is never written to a log.
            raise ConfigError(f"{where}.{field}: a key must be printable ASCII without spaces")
    return tuple(dict.fromkeys(keys))


def parse_routing(text: str, env: Mapping[str, str], config: Config) -> RoutingSpec:
    """upstreams.yaml, validated strictly; raises ConfigError naming the first problem."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {yaml_problem(e)}") from None
    except (ValueError, RecursionError) as e:  # e.g. a date that does not exist, deep nesting
        raise ConfigError(f"not valid YAML: {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise ConfigError("the file must be a mapping with an `upstreams:` section")
    unknown = set(doc) - _ROUTING_FIELDS
    if unknown:
        raise ConfigError(f"unknown setting {sorted(map(str, unknown))[0]!r}")
    entries = doc.get("upstreams")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError("`upstreams:` must map at least one name to its settings")
    if len(entries) > 100:
        raise ConfigError("at most 100 upstreams")
    specs = []
    for name, entry in entries.items():
        where = f"upstreams.{name}"
        if not isinstance(name, str) or not _UPSTREAM_NAME.fullmatch(name):
            raise ConfigError(f"{where}: a name is 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping of settings")
        unknown = set(entry) - _UPSTREAM_FIELDS
        if unknown:
            raise ConfigError(f"{where}: unknown setting {sorted(map(str, unknown))[0]!r}")
        url = entry.get("base_url")
        try:
            parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
            port_ok = parsed is not None and (parsed.port is None or 0 < parsed.port)
        except ValueError:  # a bad IPv6 literal, a port that is not 1-65535
            parsed, port_ok = None, False
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{where}.base_url must be an http:// or https:// URL")
        if not port_ok or not str(url).isprintable():
            raise ConfigError(f"{where}.base_url: the port must be 1-65535")
        models = entry.get("models", ["*"])
        if not isinstance(models, list) or not models or len(models) > 1000:
            raise ConfigError(f"{where}.models must be a list of 1-1000 model globs")
        headers = entry.get("headers", {})
        if not isinstance(headers, dict) or len(headers) > 50:
            raise ConfigError(f"{where}.headers must be a mapping of at most 50 headers")
        for h, v in headers.items():
            if not isinstance(h, str) or not _HEADER_NAME.fullmatch(h) or h.lower() in _OWN_HEADERS:
                raise ConfigError(f"{where}.headers: {h!r} is not a header the gateway may send")
            if not isinstance(v, str) or not _HEADER_VALUE.fullmatch(v):
                raise ConfigError(f"{where}.headers.{h}: 1-512 printable ASCII characters")
        api = entry.get("api", API_OPENAI)
        if api not in (API_OPENAI, API_ANTHROPIC):
            raise ConfigError(f"{where}.api must be openai or anthropic")
        specs.append(
            UpstreamSpec(
                name=name,
                base_url=url.rstrip("/"),  # type: ignore[union-attr]
                keys=_keys_of(where, entry, env),
                models=tuple(model_glob(f"{where}.models", m) for m in models),
                priority=_number(f"{where}.priority", entry.get("priority", 0), int, 0, 1000),
                weight=_number(f"{where}.weight", entry.get("weight", 1), int, 1, 10_000),
                max_concurrency=_number(
                    f"{where}.max_concurrency", entry.get("max_concurrency", 0), int, 0, 100_000
                ),
                timeout=_number(f"{where}.timeout", entry.get("timeout", 0), float, 0, 86_400),
                headers=tuple(sorted(headers.items())),
                api=api,
            )
        )
    names = {s.name for s in specs}
    aliases: dict[str, tuple[str, str]] = {}
    mapped = doc.get("models") or {}
    if not isinstance(mapped, dict) or len(mapped) > 10_000:
        raise ConfigError("`models:` must map client model names to upstream ones")
    for alias, target in mapped.items():
        where = f"models.{alias}"
        if not isinstance(alias, str) or not 1 <= len(alias) <= 200 or not alias.isprintable():
            raise ConfigError(f"{where}: a model name is 1-200 printable characters")
        if isinstance(target, dict):
            if set(target) - {"model", "upstream"} or "model" not in target:
                raise ConfigError(f"{where} must be a name or {{model: …, upstream: …}}")
            model, upstream = target["model"], target.get("upstream", "")
            if not isinstance(upstream, str):
                raise ConfigError(f"{where}.upstream must be an upstream's name")
            if upstream and upstream not in names:
                raise ConfigError(f"{where}.upstream: no upstream named {upstream!r}")
        else:
            model, upstream = target, ""
        if not isinstance(model, str) or not 1 <= len(model) <= 200 or not model.isprintable():
            raise ConfigError(f"{where}: the upstream model is 1-200 printable characters")
        aliases[alias] = (model, str(upstream))
    return RoutingSpec(
        tuple(specs),
        aliases,
        retries=_number("retries", doc.get("retries", 2), int, 0, 10),
        cooldown=_number("cooldown_seconds", doc.get("cooldown_seconds", 30), float, 0, 86_400),
        from_file=True,
        prices=parse_prices(doc.get("prices")),
    )


def routing_secrets(spec: RoutingSpec) -> tuple[str, ...]:
    """Every upstream key of a routing: redacted wherever outside text enters, like the
    command line's keys."""
    return tuple(k for u in spec.upstreams for k in u.keys if k)


def key_fingerprint(key: str) -> str:
    """How logs, the dashboard and commands name a key: never the key itself."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyState:
    """One key of an upstream's pool, and how it has fared."""

    __slots__ = (
        "calls",
        "checked_at",
        "disabled",
        "failures",
        "fingerprint",
        "last_error",
        "resting_until",
        "secret",
    )

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.fingerprint = key_fingerprint(secret)
        self.resting_until = 0.0  # after a 429: the upstream's Retry-After, or the cooldown
        self.disabled = ""  # after a 401/403: why; until the file changes or the admin says so
        self.checked_at = -1e9  # when a 401/403 last sent it to be checked
        self.calls = 0
        self.failures = 0
        self.last_error = ""


class Channel:
    """One upstream at run time: its keys, calls in flight, health and figures."""

    def __init__(self, spec: UpstreamSpec, client: Upstream, concurrency: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.client = client
        self.limit = spec.max_concurrency or concurrency
        self.headers = dict(spec.headers)
        self.keys = [KeyState(k) for k in spec.keys if k]
        self._turn = 0  # the pool's next key
        self.current = 0  # smooth weighted round robin's running weight
        self.in_flight = 0
        self.failures_in_row = 0
        self.failing_users: set[str] = set()  # who the failures in a row came from
        self.resting_until = 0.0
        self.trial = False  # a call is deciding whether the upstream comes back from rest
        self.calls = 0
        self.failures = 0
        self.last_error = ""
        self.latency_ms = 0.0  # moving average of answered calls

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.spec.models)

    def key(self, now: float, tried: set[str]) -> int | None:
        """The index of the pool's next usable key (keys take turns; `take` moves the turn
        on), skipping keys resting, refused or tried in this call."""
        keys = self.keys
        for i in range(len(keys)):
            n = (self._turn + i) % len(keys)
            k = keys[n]
            if not k.disabled and k.resting_until <= now and k.secret not in tried:
                return n
        return None

    def take(self, n: int) -> KeyState:
        self._turn = (n + 1) % len(self.keys)
        return self.keys[n]

    def state(self, now: float) -> str:
        if self.keys and all(k.disabled for k in self.keys):
            return "disabled"
        if self.resting_until > now:
            return "resting"
        return "ok"

    def describe(self, now: float, wall: float) -> dict[str, Any]:
        """For the dashboard and the `upstreams` command: names, states and figures, no keys."""

        def until(t: float) -> str | None:
            if t <= now:
                return None
            return datetime.fromtimestamp(wall + t - now).astimezone().isoformat(timespec="seconds")

        return {
            "name": self.name,
            "api": self.spec.api,
            "base_url": self.spec.base_url,
            "models": list(self.spec.models),
            "priority": self.spec.priority,
            "weight": self.spec.weight,
            "state": self.state(now),
            "resting_until": until(self.resting_until),
            "in_flight": self.in_flight,
            "max_concurrency": self.limit,
            "calls": self.calls,
            "failures": self.failures,
            "last_error": self.last_error or None,
            "latency_ms": round(self.latency_ms),
            "keys": [
                {
                    "fingerprint": k.fingerprint,
                    "state": "disabled"
                    if k.disabled
                    else "resting"
                    if k.resting_until > now
                    else "ok",
                    "resting_until": until(k.resting_until),
                    "disabled": k.disabled or None,
                    "calls": k.calls,
                    "failures": k.failures,
                    "last_error": k.last_error or None,
                }
                for k in self.keys
            ],
        }


@dataclass(frozen=True, slots=True)
class Route:
    """Where calls for one model may go: the model name sent upstream and the upstreams that
    serve it, grouped by priority (lowest first)."""

    model: str
    groups: tuple[tuple[Channel, ...], ...]
    requested: str = ""  # the model name the client sent
    api: str = API_OPENAI  # what the upstreams speak

    def channels(self) -> Iterator[Channel]:
        for group in self.groups:
            yield from group


class NoUpstreamFree(Exception):
    """Every upstream for the call is resting, refused or already tried."""

    def __init__(self, wait: float | None) -> None:
        super().__init__("no upstream free")
        self.wait = wait  # seconds until the earliest comes back, if one will


class Router:
    """Chooses an upstream and a key for each attempt of a call, and learns from the result.

    Choosing: the route's lowest priority group with a usable upstream (not resting, below its
    max_concurrency, with a usable key, not tried in this call); within it, smooth weighted
    round robin, so that weights are exact shares; within an upstream, keys take turns.
    Learning: 401/403 takes the key out of use; 429 rests the key (Retry-After, else the
    cooldown); a connect error, a timeout or a 5xx counts against the upstream, and
    FAILURES_BEFORE_REST in a row rest it for the cooldown, after which one trial call
    decides whether it comes back.
    """

    def __init__(
        self,
        spec: RoutingSpec,
        config: Config,
        redactor: Redactor,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.redactor = redactor
        self.now = now
        self.pool = Upstream(
            config, redactor=redactor
        )  # the connection pools every upstream shares
        self.spec = spec
        self.channels: dict[str, Channel] = {}
        self._routes: dict[tuple[str, str], Route | None] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._checks: set[asyncio.Future[None]] = set()  # key checks under way
        # Told of rests and returns (the Service turns them into alerts).
        self.on_event: Callable[[str, str, str], None] = lambda event, upstream, detail: None
        self.install(spec)

    def install(self, spec: RoutingSpec) -> None:
        """Take a new routing. An upstream whose settings did not change is kept as it is
        (its calls in flight, rest and figures); one whose settings changed keeps its health
        and figures. Either way a disabled key comes back: the file changed. Calls in flight
        finish where they started."""
        old = self.channels
        channels = {}
        for s in spec.upstreams:
            before = old.get(s.name)
            if before is not None and before.spec == s:
                before.client.redactor = self.redactor
                for k in before.keys:
                    k.disabled = ""
                channels[s.name] = before
                continue
            client = Upstream(
                self.config,
                s.base_url,
                "",
                auth="x-api-key" if s.api == API_ANTHROPIC else "bearer",
                timeout=s.timeout or self.config.upstream_timeout,
                redactor=self.redactor,
                share=self.pool,
            )
            ch = Channel(s, client, self.config.concurrency)
            if before is not None and before.spec.base_url == s.base_url:
                # Health and figures carry over; calls in flight release the old object.
                for name in ("resting_until", "failures_in_row", "calls", "failures"):
                    setattr(ch, name, getattr(before, name))
                ch.last_error, ch.latency_ms = before.last_error, before.latency_ms
                states = {k.secret: k for k in before.keys}
                for i, k in enumerate(ch.keys):
                    if (was := states.get(k.secret)) is not None:
                        was.disabled = ""
                        ch.keys[i] = was
            channels[s.name] = ch
        self.spec, self.channels = spec, channels
        self._routes = {}
        self._wake()

    def configured(self, api: str) -> bool:
        return any(c.keys for c in self.channels.values() if c.spec.api == api)

    def route(self, model: str, api: str) -> Route | None:
        """Where calls for `model` on an `api` route go; None if no upstream serves it."""
        found = self._routes.get((model, api), False)
        if found is not False:
            return found  # type: ignore[return-value]
        target, pinned = self.spec.aliases.get(model, (model, ""))
        serving = [
            c
            for c in self.channels.values()
            if c.spec.api == api and (c.name == pinned if pinned else c.serves(target))
        ]
        route = None
        if serving:
            priorities = sorted({c.spec.priority for c in serving})
            route = Route(
                target,
                tuple(tuple(c for c in serving if c.spec.priority == p) for p in priorities),
                model,
                api,
            )
        if len(self._routes) >= MAX_ROUTES_CACHED:
            self._routes.clear()
        self._routes[(model, api)] = route
        return route

    def pick(
        self, route: Route, tried_upstreams: set[str], tried_keys: set[str]
    ) -> tuple[Channel, KeyState] | None:
        """The upstream and key for the next attempt, now; None if none can take it."""
        now = self.now()
        for group in route.groups:
            best: Channel | None = None
            best_key = 0
            total = 0
            for ch in group:
                if ch.name in tried_upstreams or ch.in_flight >= ch.limit:
                    continue
                if ch.resting_until > now or ch.trial:
                    continue  # resting, or its one trial call is under way
                n = ch.key(now, tried_keys)
                if n is None:
                    continue
                ch.current += ch.spec.weight
                total += ch.spec.weight
                if best is None or ch.current > best.current:
                    best, best_key = ch, n
            if best is not None:
                best.current -= total
                best.in_flight += 1
                if best.failures_in_row >= FAILURES_BEFORE_REST and best.resting_until:
                    best.trial = True  # back from rest: this call decides
                return best, best.take(best_key)
        return None

    def next_free(
        self, route: Route, tried_upstreams: set[str], tried_keys: set[str]
    ) -> float | None:
        """Seconds until an upstream of the route (not tried) may take a call; None if never
        (every key refused) or only when a call in flight ends."""
        now = self.now()
        soonest: float | None = None
        for ch in route.channels():
            keys = [k for k in ch.keys if not k.disabled and k.secret not in tried_keys]
            if ch.name in tried_upstreams or not keys:
                continue
            # 0 when only busy (at max_concurrency, or a trial call running): a release wakes.
            wait = max(0.0, ch.resting_until - now, min(k.resting_until for k in keys) - now)
            soonest = wait if soonest is None else min(soonest, wait)
        return soonest

    async def acquire(
        self, route: Route, tried_upstreams: set[str], tried_keys: set[str]
    ) -> tuple[Channel, KeyState]:
        """pick(), waiting while the route's upstreams are all busy (at max_concurrency) or
        resting for at most MAX_REST_WAIT seconds; raises NoUpstreamFree otherwise."""
        while True:
            chosen = self.pick(route, tried_upstreams, tried_keys)
            if chosen is not None:
                return chosen
            wait = self.next_free(route, tried_upstreams, tried_keys)
            if wait is None or wait > MAX_REST_WAIT:
                raise NoUpstreamFree(wait)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                # A busy upstream frees on release (which wakes us); a resting one at `wait`.
                await asyncio.wait_for(waiter, wait if wait > 0 else None)
            except TimeoutError:
                pass

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def release(self, ch: Channel) -> None:
        ch.in_flight -= 1
        ch.trial = False  # a trial call has decided by now (succeeded or failed ran first)
        self._wake()

    def succeeded(self, ch: Channel, key: KeyState, seconds: float) -> None:
        if ch.failures_in_row >= FAILURES_BEFORE_REST and ch.resting_until:
            log.warning("upstream %s is back", ch.name)
            self.on_event("upstream_back", ch.name, "上游恢复正常 (back after a rest)")
        ch.failures_in_row, ch.resting_until, ch.trial = 0, 0.0, False
        ch.failing_users.clear()
        ch.calls += 1
        key.calls += 1
        ms = seconds * 1000
        ch.latency_ms = ms if not ch.latency_ms else 0.8 * ch.latency_ms + 0.2 * ms

    def failed(self, ch: Channel, key: KeyState, e: UpstreamFailure, user: str = "") -> str:
        """Learn from a failed attempt; return what to avoid for the rest of the call:
        "key", "upstream", or "" (a client fault, not retried).

        A user's own request can draw a 401/403 (a model the project may not use), a 429
        ("request too large") or a 5xx from an upstream; so one user cannot take keys or
        upstreams out of service: a refused key is checked with a plain model-list request
        before it is disabled, a 429 rests a key at most MAX_KEY_REST, and answered 5xx rest
        an upstream only when they came from at least two users (connect errors and timeouts,
        which no request chooses, count whoever sent them)."""
        now = self.now()
        error = f"{e.status or 'no answer'}: {e.error}"[:300]
        ch.calls += 1
        key.calls += 1
        if e.status in CLIENT_FAULTS:
            return ""
        ch.failures += 1
        key.failures += 1
        ch.last_error = key.last_error = error
        if not self.spec.from_file:
            # One upstream from the command line: nothing to fail over to, so no key is
            # taken out of use and nothing rests; every call tries it, as it always has.
            return "upstream"
        if e.status in KEY_REFUSED:
            self.check_key(ch, key, error)
            return "key"
        if e.status == 429:
            rest = min(
                e.retry_after if e.retry_after is not None else self.spec.cooldown, MAX_KEY_REST
            )
            key.resting_until = now + rest
            log.warning("upstream %s: key %s rests %.0f s (429)", ch.name, key.fingerprint, rest)
            if rest >= 1:
                self.on_event(
                    "upstream_key_resting",
                    ch.name,
                    f"密钥 {key.fingerprint} 被限流，休息 {rest:.0f} 秒 (429)",
                )
            return "key"
        if e.status is not None and e.status not in RETRYABLE_STATUSES:
            return ""  # some other answer (e.g. 405, 413): the upstream's word, not retried
        if e.status is None and e.responded:
            return ""  # timed out while answering: the call may have run, not repeated
        ch.failures_in_row += 1
        if e.status is None:
            ch.failing_users.add("")  # not the request's doing: counts as another user
        ch.failing_users.add(user)
        if ch.trial or (ch.failures_in_row >= FAILURES_BEFORE_REST and len(ch.failing_users) >= 2):
            ch.trial = False
            ch.resting_until = now + self.spec.cooldown
            log.warning(
                "upstream %s rests %.0f s after %d failures in a row (last: %s)",
                ch.name,
                self.spec.cooldown,
                ch.failures_in_row,
                error,
            )
            self.on_event(
                "upstream_resting",
                ch.name,
                # The status only: an upstream's error text may echo what a user sent.
                f"连续失败 {ch.failures_in_row} 次，休息 {self.spec.cooldown:.0f} 秒"
                f"（最近一次：{e.status or '无应答'}）",
            )
        return "upstream"

    def check_key(self, ch: Channel, key: KeyState, error: str) -> None:
        """After a 401/403: ask the upstream for its model list with the key (in the
        background, at most once per cooldown); only if that is refused too is the key
        taken out of use."""
        now = self.now()
        if key.disabled or key.checked_at > now - max(self.spec.cooldown, 1.0):
            return
        key.checked_at = now
        headers = dict(ch.headers)
        if ch.spec.api == API_ANTHROPIC:
            headers.setdefault("anthropic-version", "2023-06-01")

        async def check() -> None:
            try:
                await ch.client.get_json("/models", key.secret, headers)
            except UpstreamFailure as e:
                if e.status in KEY_REFUSED:
                    key.disabled = error
                    log.error(
                        "upstream %s refused key %s (%s, and again for its model list): "
                        "taken out of use until upstreams.yaml changes or an admin "
                        "re-enables it",
                        ch.name,
                        key.fingerprint,
                        e.status,
                    )
                    self.on_event(
                        "upstream_key_disabled",
                        ch.name,
                        f"密钥 {key.fingerprint} 被拒绝 ({e.status})，已停用，直到管理员重新启用",
                    )
            except Exception:
                log.exception("checking key %s of upstream %s failed", key.fingerprint, ch.name)

        task = asyncio.ensure_future(check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def enable_key(self, upstream: str, fingerprint: str) -> bool:
        ch = self.channels.get(upstream)
        for k in ch.keys if ch else []:
            if k.fingerprint == fingerprint:
                k.disabled, k.resting_until = "", 0.0
                self._wake()
                return True
        return False

    def describe(self, wall: float) -> list[dict[str, Any]]:
        now = self.now()
        return [ch.describe(now, wall) for ch in self.channels.values()]

    def close(self) -> None:
        self.pool.close()


class RoutingFile:
    """upstreams.yaml, re-read when it changes; a broken edit keeps the last good routing."""

    def __init__(self, path: str, config: Config, env: Mapping[str, str]) -> None:
        self.path = Path(path)
        self.config = config
        self.env = env
        self._stamp: tuple[int, int, int] | None = None

    def load(self) -> RoutingSpec:
        """The routing at start-up: the file if it exists (a broken one is an error), else
        the command line's upstream."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return default_routing(self.config)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.path}: cannot read it ({type(e).__name__})") from None
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            return parse_routing(text, self.env, self.config)
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from None

    def changed(self) -> RoutingSpec | None:
        """A new routing if the file changed and is good; None otherwise (logged if broken)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is None:
                return None
            self._stamp = None
            log.warning("%s was removed: routing to the command line's upstream", self.path)
            return default_routing(self.config)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            spec = parse_routing(self.path.read_text(encoding="utf-8"), self.env, self.config)
        except (ConfigError, OSError, UnicodeDecodeError) as e:
            log.error("%s not reloaded, the last good routing stays: %s", self.path, e)
            return None
        log.info("%s reloaded: %s", self.path, ", ".join(u.name for u in spec.upstreams))
        return spec


# ---------------------------------------------------------------------------------------------
# Call log (data/calls/YYYY-MM-DD.jsonl) and metrics
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallRecord:
    """What one request to a relay endpoint did; written once to the call log and metrics."""

    endpoint: str
    t0: float = dataclasses.field(default_factory=time.monotonic)
    user: str = ""
    model: str = ""
    stream: bool = False
    status: int = 0
    error: str = ""
    usage: Usage | None = None
    partial: bool = False
    queue_ms: int | None = None
    upstream_ms: int | None = None
    upstream_id: str = ""
    upstream: str = ""  # the upstream that answered (routing)
    attempts: int = 0  # upstreams tried (0: none, the call never reached one)
    cost: float | None = None  # by the price table; None: unpriced or not charged
    call_id: str = ""  # the reservation id in the day's journal
    day: str = ""  # the day the call was charged to (its admission day)
    written: bool = False

    def as_line(self, now: float, tz: tzinfo | None) -> dict[str, Any]:
        u = self.usage
        moment = datetime.fromtimestamp(now, tz)
        if tz is None:
            moment = moment.astimezone()  # the machine's zone, with its offset
        return {
            "time": moment.isoformat(timespec="milliseconds"),
            "user": self.user or None,
            "endpoint": self.endpoint,
            "model": self.model or None,
            "stream": self.stream,
            "status": self.status,
            "error": self.error or None,
            "prompt_tokens": u.prompt_tokens if u else 0,
            "completion_tokens": u.completion_tokens if u else 0,
            "total_tokens": u.total_tokens if u else 0,
            "estimated": bool(u and u.estimated),
            "partial": self.partial,
            "latency_ms": round((time.monotonic() - self.t0) * 1000),
            "queue_ms": self.queue_ms,
            "upstream_ms": self.upstream_ms,
            "upstream_request_id": self.upstream_id or None,
            "upstream": self.upstream or None,
            "cost": self.cost,
            "attempts": self.attempts,
            "id": self.call_id or None,
        }


_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.(?:jsonl|json)$")


@dataclass(slots=True)
class Tally:
    """Charged calls of the call log added up: the dashboard's costs and `usage --by`."""

    requests: int = 0
    tokens: int = 0
    cost: float = 0.0  # of the priced calls
    unpriced: int = 0

    def add(self, line: dict[str, Any]) -> None:
        self.requests += 1
        self.tokens += int(line.get("total_tokens") or 0)
        cost = line.get("cost")
        if isinstance(cost, int | float):
            self.cost += cost
        else:
            self.unpriced += 1


def charged_line(line: Any) -> bool:
    """Whether a call-log line is a charged call (an answer, or a stream cut short)."""
    return (
        isinstance(line, dict)
        and bool(line.get("user"))
        and (line.get("status") == 200 or bool(line.get("partial")))
    )


class CallLog:
    """One JSON line per finished call, filed under the day it was charged to.

    Holds no message content and no key. Written with one O_APPEND write per call, right
    after the call's charge, so its token sums match the counters (see README).
    """

    def __init__(self, root: str, clock: DayClock) -> None:
        self.dir = Path(root) / "calls"
        self.clock = clock
        self._fds: dict[str, int] = {}
        self._failing_since = 0.0

    def path(self, day: str) -> Path:
        return self.dir / f"{day}.jsonl"

    def write(self, rec: CallRecord) -> dict[str, Any]:
        line = rec.as_line(self.clock.now(), self.clock.tz)
        day = rec.day or self.clock.today()
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = text.encode("utf-8", "backslashreplace")
        try:
            fd = self._fds.get(day)
            if fd is None:
                make_private_dir(self.dir)
                fd = self._fds[day] = open_private(
                    self.path(day), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                )
                for old in sorted(self._fds)[:-2]:  # keep today's and yesterday's open
                    os.close(self._fds.pop(old))
            os.write(fd, data)
            self._failing_since = 0.0
        except OSError as e:
            # The charge is already in the journal; losing a log line must not fail the call.
            if time.monotonic() - self._failing_since > 60:
                log.error("call log %s not written: %s", self.path(day), e.strerror)
                self._failing_since = time.monotonic()
        return line

    def read(self, day: str) -> list[dict[str, Any]]:
        """A day's lines (a line cut short by a crash is skipped)."""
        try:
            text = read_private(self.path(day)).decode("utf-8", "replace")
        except OSError:
            return []
        out = []
        for raw in text.splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    def recent_failures(self, count: int = 50, scan: int = 1 << 20) -> list[dict[str, Any]]:
        """The last `count` calls answered with an error, newest first (today's, yesterday's)."""
        today = date.fromisoformat(self.clock.today())
        found: list[dict[str, Any]] = []
        for day in (today, today - timedelta(days=1)):
            try:
                with os.fdopen(open_private(self.path(day.isoformat()), os.O_RDONLY), "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - scan))
                    tail = f.read()
            except OSError:  # none that day, or not a regular file
                continue
            lines = tail.split(b"\n")[1 if size > scan else 0 :]
            for raw in reversed(lines):
                if b'"status":200' in raw or not raw:
                    continue
                try:
                    found.append(json.loads(raw))
                except ValueError:
                    continue
                if len(found) >= count:
                    return found
        return found

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def prune_call_logs(root: str, keep_days: int, today: str) -> list[str]:
    """Delete the call logs (data/calls/) of days more than `keep_days` before today; the
    store prunes its own days (UsageStore.prune)."""
    cutoff = (date.fromisoformat(today) - timedelta(days=keep_days)).isoformat()
    removed = []
    for folder in (Path(root) / "calls",):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            m = _DAY_FILE.match(name)
            if m and m.group(1) < cutoff:
                try:
                    (folder / name).unlink()
                    removed.append(str(folder / name))
                except OSError as e:
                    log.error("retention: cannot delete %s: %s", folder / name, e.strerror)
    return removed


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_MAX_SERIES = 10_000  # label sets per counter; beyond it, new models count as "(other)"
# Answers that turn a call away before the upstream, by the code in the call log.
_REJECTIONS = {400, 401, 403, 413, 429, 431, 503}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """This process's counters, exposed at /metrics in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.tokens: dict[tuple[str, str, str], int] = {}
        self.rejections: dict[str, int] = {}
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.recent_latency: collections.deque[float] = collections.deque(maxlen=500)

    def observe(self, rec: CallRecord) -> None:
        model = rec.model if rec.call_id else ""  # only admitted calls name a model
        key = (rec.user, model, str(rec.status))
        if key not in self.requests and len(self.requests) >= _MAX_SERIES:
            key = (rec.user, "(other)", str(rec.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if rec.usage is not None:
            for kind, n in (
                ("prompt", rec.usage.prompt_tokens),
                ("completion", rec.usage.completion_tokens),
            ):
                k = (rec.user, key[1], kind)
                self.tokens[k] = self.tokens.get(k, 0) + n
        if rec.status in _REJECTIONS:
            reason = rec.error.split(":", 1)[0] or str(rec.status)
            self.rejections[reason] = self.rejections.get(reason, 0) + 1
        if rec.upstream_ms is not None:
            seconds = rec.upstream_ms / 1000
            self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.recent_latency.append(seconds)

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        family("gateway_requests_total", "counter", "Relay requests by user, model and status.")
        for (user, model, status), n in sorted(self.requests.items()):
            out.append(
                f'gateway_requests_total{{user="{_label(user)}",model="{_label(model)}",'
                f'status="{status}"}} {n}'
            )
        family("gateway_tokens_total", "counter", "Tokens charged, by user, model and kind.")
        for (user, model, kind), n in sorted(self.tokens.items()):
            out.append(
                f'gateway_tokens_total{{user="{_label(user)}",model="{_label(model)}",'
                f'kind="{kind}"}} {n}'
            )
        family("gateway_rejections_total", "counter", "Calls turned away, by reason.")
        for reason, n in sorted(self.rejections.items()):
            out.append(f'gateway_rejections_total{{reason="{_label(reason)}"}} {n}')
        name = "gateway_upstream_latency_seconds"
        family(name, "histogram", "Upstream call time (queue wait excluded).")
        total = 0
        for bound, n in zip((*LATENCY_BUCKETS, math.inf), self.latency, strict=True):
            total += n
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out.append(f"{name}_sum {self.latency_sum:.6f}")
        out.append(f"{name}_count {total}")
        for gauge, (text, value) in gauges.items():
            family(gauge, "gauge", text)
            out.append(f"{gauge} {value:g}")
        return "\n".join(out) + "\n"

    def latency_quantiles(self) -> dict[str, float | None]:
        ordered = sorted(self.recent_latency)
        if not ordered:
            return {"p50": None, "p95": None}
        return {
            "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, math.ceil(len(ordered) * 0.95) - 1)],
        }


# ---------------------------------------------------------------------------------------------
# Requests: bodies, parsing, validation and token estimation
# ---------------------------------------------------------------------------------------------


class BodyBudget:
    """Bytes of request bodies held in memory at once, all requests together.

    A body is counted from the moment it is admitted (its Content-Length, or each chunk as
    it arrives) until its request has been answered; past --max-body-memory the request is
    refused with 503, so concurrent uploads cannot take the process's memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_surrogate(doc: Any) -> bool:
    """Whether any string in a parsed JSON document (keys too) holds a lone surrogate."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return True
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
    return False


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, an object, no NaN/Infinity or overflowing numbers."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise bad_request("request body must be a JSON object")
    # Valid UTF-8 holds no surrogates, but a JSON escape (\\ud800) can: such a string could
    # not be written to the journal or sent on, so it is refused before admission.
    if _SURROGATE_ESCAPE.search(text) and _holds_surrogate(doc):
        raise bad_request("request body holds a lone surrogate escape (\\ud800-\\udfff)")
    return doc


def _require_model(doc: dict[str, Any]) -> None:
    model = doc.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required and must be a non-empty string", "model")


def _check_stream(doc: dict[str, Any], allowed: bool) -> bool:
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", "stream")
    if stream and not allowed:
        raise bad_request(
            "streaming is not available on /api/call.php; use /v1/chat/completions", "stream"
        )
    if "stream_options" in doc and not isinstance(doc["stream_options"], dict | None):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return stream


def validate_chat(doc: dict[str, Any], allow_stream: bool = False) -> bool:
    """Check a chat request; return whether it asks for a stream."""
    _require_model(doc)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise bad_request("every item of 'messages' must be an object", "messages")
    return _check_stream(doc, allow_stream)


def validate_chat_stream(doc: dict[str, Any]) -> bool:
    """/v1/chat/completions: a chat request that may stream."""
    return validate_chat(doc, allow_stream=True)


def validate_completion(doc: dict[str, Any]) -> bool:
    _require_model(doc)
    prompt = doc.get("prompt")
    if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
        raise bad_request("'prompt' is required: a string or a non-empty list", "prompt")
    return _check_stream(doc, True)


def validate_embedding(doc: dict[str, Any]) -> bool:
    _require_model(doc)
    value = doc.get("input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise bad_request("'input' is required: a string or a non-empty list", "input")
    return False


def validate_responses(doc: dict[str, Any]) -> bool:
    """/v1/responses: OpenAI's Responses API."""
    _require_model(doc)
    if "input" in doc and not isinstance(doc["input"], str | list):
        raise bad_request("'input' must be a string or a list of input items", "input")
    return _check_stream(doc, True)


def _check_messages(doc: dict[str, Any]) -> None:
    _require_model(doc)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise bad_request("every item of 'messages' must be an object", "messages")


def validate_messages(doc: dict[str, Any]) -> bool:
    """/v1/messages: Anthropic's Messages API (max_tokens is required there)."""
    _check_messages(doc)
    max_tokens = doc.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        raise bad_request("'max_tokens' is required: a whole number >= 1", "max_tokens")
    return _check_stream(doc, True)


def validate_count_tokens(doc: dict[str, Any]) -> bool:
    """/v1/messages/count_tokens."""
    _check_messages(doc)
    return False


MAX_ESTIMATE_PARTS = 100_000  # values one estimate walks through; past it, the rest is not counted
MAX_USAGE_TOKENS = 100_000_000  # the largest usage figure taken from an upstream, per field
TOKEN_HOLD_MAX = 10**12  # the most tokens a call may hold (a client may ask max_tokens=10**4000)


def _ascii_count(text: str) -> int:
    return len(text.encode("ascii", "ignore"))  # C speed; lone surrogates are simply skipped


def estimate_tokens(text: str) -> int:
    """Rough token count: 4 ASCII characters per token, one token per other character."""
    ascii_chars = _ascii_count(text)
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


def _text_of(value: Any) -> str:
    """The text in a message or content part: strings, lists of parts, objects' content/text.

    An explicit stack and a bounded number of steps, not recursion: any JSON the validators
    accept (nested thousands deep, millions of parts) is estimated without an error.
    """
    parts: list[str] = []
    stack = [value]
    steps = MAX_ESTIMATE_PARTS
    while stack and steps:
        steps -= 1
        v = stack.pop()
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            stack.extend(reversed(v))
        elif isinstance(v, dict):
            stack.extend(v[k] for k in ("text", "content") if k in v)
    return " ".join(parts)


def _prompt_text(request: dict[str, Any]) -> str:
    """The text a request sends: chat messages, a completion prompt or embedding input."""
    for field in ("messages", "prompt", "input"):
        if field in request:
            return _text_of(request[field])
    return ""


def estimate_request_tokens(request: dict[str, Any], size: int = 0) -> int:
    """The prompt tokens of a request, estimated; never raises.

    Every string value the request holds counts (message contents, tool definitions and
    calls, prompts, inputs; not `model` or a message's `role`), plus one token per token id in
    a `prompt` or `input` list. The walk takes a bounded number of steps; if a body is too
    large for it, the estimate is at least `size` // 8 for its `size` bytes, so padding
    cannot make a large prompt cheap.
    """
    ascii_chars = other = ids = 0
    stack: list[tuple[Any, bool]] = [
        (v, k in ("prompt", "input")) for k, v in request.items() if k != "model"
    ]
    steps = MAX_ESTIMATE_PARTS
    while stack and steps:
        steps -= 1
        value, token_ids = stack.pop()
        if isinstance(value, str):
            n = _ascii_count(value)
            ascii_chars += n
            other += len(value) - n
        elif isinstance(value, list):
            stack.extend((v, token_ids) for v in value)
        elif isinstance(value, dict):
            stack.extend((v, False) for k, v in value.items() if k != "role")
        elif token_ids and type(value) is int:
            ids += 1
    estimate = math.ceil(ascii_chars / 4) + other + ids
    return estimate if stack == [] else max(estimate, size // 8)


def _count(value: Any) -> int | None:
    """A usage figure, if it is a whole number in a sane range (bool is not a number here)."""
    return value if type(value) is int and 0 <= value <= MAX_USAGE_TOKENS else None


def _exact_usage(usage: Any) -> Usage | None:
    """The upstream's usage object as Usage, if it holds usable counts.

    OpenAI's chat and completions name them prompt/completion_tokens; the Responses API and
    Anthropic's API input/output_tokens. Anthropic counts cache writes and reads apart from
    `input_tokens`: both are charged as prompt tokens.
    """
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" not in usage and "input_tokens" in usage:
        p = _count(usage.get("input_tokens"))
        for extra in ("cache_creation_input_tokens", "cache_read_input_tokens"):
            if p is not None and (n := _count(usage.get(extra))) is not None:
                p += n
        c, t = _count(usage.get("output_tokens")), _count(usage.get("total_tokens"))
    else:
        p, c, t = (
            _count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        )
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    cached = cached or _count(usage.get("cache_read_input_tokens")) or 0
    if p is not None and c is not None and (t is None or p + c >= t):
        return Usage(p, c, p + c, cached_tokens=min(cached, p))  # a total below its parts: no
    if t is not None:
        p = p if p is not None and p <= t else 0
        return Usage(p, t - p, t, cached_tokens=min(cached, p))
    return None


def usage_of(reply: dict[str, Any], request: dict[str, Any], size: int = 0) -> Usage:
    """The upstream's usage, or an estimate when it sent none (marked estimated)."""
    usage = _exact_usage(reply.get("usage"))
    if usage is not None:
        return usage
    prompt = estimate_request_tokens(request, size)
    choices = reply.get("choices")
    texts = [
        _text_of(ch.get("message") or ch.get("text"))
        for ch in (choices if isinstance(choices, list) else [])
        if isinstance(ch, dict)
    ]
    if not isinstance(choices, list):  # the Responses API's `output`, Anthropic's `content`
        texts.append(_text_of(reply.get("output") or reply.get("content")))
    completion = estimate_tokens(" ".join(texts))
    return Usage(prompt, completion, prompt + completion, estimated=True)


# ---------------------------------------------------------------------------------------------
# Audit trail: every change an administrator makes (data/audit/YYYY-MM-DD.jsonl)
# ---------------------------------------------------------------------------------------------


class AuditLog:
    """Every change an administrator makes, one JSON line each in data/audit/YYYY-MM-DD.jsonl:
    time, actor (the OS user for commands, the dashboard session, "file" for a changed
    users.yaml or upstreams.yaml picked up by a reload), action and target, and which fields
    changed; never a key's value."""

    def __init__(self, root: str, clock: DayClock) -> None:
        self.dir = Path(root) / "audit"
        self.clock = clock

    def write(self, actor: str, action: str, target: str, **details: Any) -> None:
        now = self.clock.now()
        moment = datetime.fromtimestamp(now, self.clock.tz)
        if self.clock.tz is None:
            moment = moment.astimezone()
        line = {
            "time": moment.isoformat(timespec="milliseconds"),
            "actor": actor[:100],
            "action": action,
            "target": target[:200],
            **details,
        }
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        path = self.dir / f"{self.clock.today()}.jsonl"
        try:
            make_private_dir(self.dir)
            fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            log.error("audit trail %s not written: %s (%s %s)", path, e.strerror, action, target)

    def recent(self, count: int = 50, days: int = 2) -> list[dict[str, Any]]:
        """The latest entries, newest first, from the last `days` days (1 MiB of each)."""
        out: list[dict[str, Any]] = []
        today = date.fromisoformat(self.clock.today())
        for n in range(days):
            path = self.dir / f"{(today - timedelta(days=n)).isoformat()}.jsonl"
            try:
                fd = open_private(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                raw = os.pread(fd, 1 << 20, max(0, size - (1 << 20)))
            finally:
                os.close(fd)
            lines = raw.split(b"\n")
            if size > 1 << 20:
                lines = lines[1:]  # the first may be cut
            for line in reversed(lines):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
                if len(out) >= count:
                    return out
        return out


def audit_actor() -> str:
    """Who runs an admin command: the OS user (and sudo's original user, if any)."""
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, OSError):
        name = f"uid {os.geteuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (sudo by {sudo})" if sudo and sudo != name else name


def user_changes(before: Mapping[str, User], after: Mapping[str, User]) -> list[dict[str, Any]]:
    """What a users.yaml reload changed: users added, removed, and the fields changed of the
    others (a key change is named "api_key", its value never written)."""
    changes: list[dict[str, Any]] = []
    for name in sorted(after.keys() - before.keys()):
        changes.append({"action": "user added", "target": name})
    for name in sorted(before.keys() - after.keys()):
        changes.append({"action": "user removed", "target": name})
    for name in sorted(before.keys() & after.keys()):
        old, new = before[name], after[name]
        fields = [
            "api_key" if f.name == "key_sha256" else f.name
            for f in dataclasses.fields(User)
            if getattr(old, f.name) != getattr(new, f.name)
        ]
        if fields:
            changes.append({"action": "user changed", "target": name, "fields": fields})
    return changes


def upstream_changes(before: RoutingSpec, after: RoutingSpec) -> list[dict[str, Any]]:
    """What an upstreams.yaml reload changed, by upstream and field (keys counted, never
    written); plus the model names and retry settings."""
    old = {u.name: u for u in before.upstreams}
    new = {u.name: u for u in after.upstreams}
    changes: list[dict[str, Any]] = []
    for name in sorted(new.keys() - old.keys()):
        changes.append({"action": "upstream added", "target": name})
    for name in sorted(old.keys() - new.keys()):
        changes.append({"action": "upstream removed", "target": name})
    for name in sorted(old.keys() & new.keys()):
        fields = [
            f.name
            for f in dataclasses.fields(UpstreamSpec)
            if getattr(old[name], f.name) != getattr(new[name], f.name)
        ]
        if fields:
            changes.append({"action": "upstream changed", "target": name, "fields": fields})
    settings = [
        k
        for k, a, b in (
            ("models", dict(before.aliases), dict(after.aliases)),
            ("retries", before.retries, after.retries),
            ("cooldown_seconds", before.cooldown, after.cooldown),
        )
        if a != b
    ]
    if settings:
        changes.append(
            {"action": "routing changed", "target": "upstreams.yaml", "fields": settings}
        )
    return changes


# ---------------------------------------------------------------------------------------------
# Alerts: webhooks told when limits, upstreams or the store need attention
# ---------------------------------------------------------------------------------------------


ALERT_FORMATS = ("json", "feishu", "dingtalk", "wecom", "slack")
ALERT_THRESHOLDS = (80, 100)  # percent of a daily limit
ALERT_RETRY_MAX = 300.0  # seconds between delivery attempts, at most
ALERT_ATTEMPTS = 12  # then the alert is dropped (logged)
ALERT_PENDING_MAX = 10_000  # alerts waiting for delivery; beyond it the oldest are dropped


def webhook_tokens(value: str) -> tuple[str, ...]:
    """The parts of --alert-webhook URLs that are tokens (Slack's path, DingTalk's
    access_token, WeCom's key, Feishu's hook id): path segments and query values of 16
    characters or more, redacted like the keys."""
    tokens: list[str] = []
    for item in value.split(","):
        parts = urllib.parse.urlsplit(item.strip().partition("#")[0])
        pieces = parts.path.split("/") + [v for _, v in urllib.parse.parse_qsl(parts.query)]
        tokens += [p for p in pieces if len(p) >= 16]
    return tuple(tokens)


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    format: str = "json"


def parse_webhooks(value: str, default_format: str) -> tuple[Webhook, ...]:
    """--alert-webhook: comma-separated URLs, each optionally `URL#format`."""
    hooks = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        url, _, fmt = item.partition("#")
        fmt = fmt or default_format
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("--alert-webhook: each must be an http:// or https:// URL")
        if fmt not in ALERT_FORMATS:
            raise ConfigError(f"--alert-webhook: format must be one of {', '.join(ALERT_FORMATS)}")
        hooks.append(Webhook(url, fmt))
    return tuple(hooks)


_LIMIT_WORDS = {"requests": "请求数", "tokens": "Token 用量"}


def alert_text(alert: dict[str, Any]) -> str:
    """An alert as a readable Chinese message, for the chat formats."""
    event = alert["event"]
    if event == "limit":
        what = _LIMIT_WORDS.get(str(alert.get("limit")), str(alert.get("limit")))
        return (
            f"【大模型网关】用户 {alert.get('user')} 今日{what}已达上限的 {alert.get('percent')}%"
            f"（{alert.get('used')}/{alert.get('max')}，{alert.get('day')}）"
        )
    if event.startswith("upstream"):
        return f"【大模型网关】上游 {alert.get('upstream')}：{alert.get('detail')}"
    return f"【大模型网关】{alert.get('detail')}"


class Alerts:
    """Alerts to webhooks (json, Feishu, DingTalk, WeCom, Slack), in the background.

    An alert is written to data/alerts/pending.jsonl first, so delivery survives a restart,
    and is sent with retries and backoff; sending never delays or fails a call. A user's
    limit alerts fire at most once per user, limit, threshold and day (data/alerts/fired-DAY,
    shared by the processes on the data dir). No alert carries a key.
    """

    def __init__(self, config: Config, clock: DayClock) -> None:
        self.hooks = parse_webhooks(config.alert_webhook, config.alert_format)
        self.secret = config.alert_secret
        self.dir = Path(config.data_dir) / "alerts"
        self.clock = clock
        self.pending: list[dict[str, Any]] = []
        self._seq = 0
        self._dirty = False
        self._saved_at = 0.0
        self._fired: tuple[str, set[str]] = ("", set())
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: tornado.httpclient.AsyncHTTPClient | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.hooks)

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            make_private_dir(self.dir)
            for line in read_private(self.dir / "pending.jsonl").splitlines():
                with contextlib.suppress(ValueError, TypeError):
                    item = json.loads(line)
                    item["next"] = 0.0  # a new process tries at once
                    self.pending.append(item)
        except OSError:
            pass
        # A webhook's answer is not read: 64 KiB of it at most.
        self._client = tornado.simple_httpclient.SimpleAsyncHTTPClient(
            force_instance=True, max_body_size=1 << 16
        )
        self._task = asyncio.ensure_future(self._deliver_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._client is not None:
            self._client.close()
        if self._dirty:
            self._save()

    def _save(self, pending: list[dict[str, Any]] | None = None) -> None:
        items = self.pending if pending is None else pending
        data = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in items).encode()
        try:
            make_private_dir(self.dir)
            atomic_write(self.dir / "pending.jsonl", data)
        except (OSError, StoreError) as e:
            log.error("alerts: cannot save pending alerts: %s", e)

    def emit(self, event: str, detail: str, **facts: Any) -> None:
        """Queue an alert for every webhook; returns at once."""
        if not self.enabled:
            return
        now = self.clock.now()
        moment = datetime.fromtimestamp(now, self.clock.tz)
        alert = {
            "event": event,
            "time": (moment if self.clock.tz else moment.astimezone()).isoformat(
                timespec="seconds"
            ),
            **facts,
            "detail": detail,
        }
        for n in range(len(self.hooks)):
            self._seq += 1
            item = {"id": f"{os.getpid()}-{self._seq}", "alert": alert, "hook": n}
            self.pending.append({**item, "attempts": 0, "next": 0.0})
        dropped = len(self.pending) - ALERT_PENDING_MAX
        if dropped > 0:
            log.error("alerts: %d dropped, %d already waiting", dropped, ALERT_PENDING_MAX)
            del self.pending[:dropped]
        self._dirty = True  # saved by the deliverer, at most once a second
        self._wake.set()

    def check_limits(self, user: User, counts: Counts, day: str) -> None:
        """After a charge: the 80% and 100% alerts of the user's daily limits, once each."""
        if not self.enabled:
            return
        for limit, used, top in (
            ("requests", counts.requests, user.daily_request_limit),
            ("tokens", counts.tokens, user.daily_token_limit),
        ):
            for percent in ALERT_THRESHOLDS:
                if top <= 0 or used * 100 < top * percent:
                    continue
                key = f"{user.name}\t{limit}\t{percent}"
                if self._already(day, key):
                    continue
                self.emit(
                    "limit",
                    f"{user.name}: {used} of {top} {limit} today ({percent}%)",
                    user=user.name,
                    limit=limit,
                    percent=percent,
                    used=used,
                    max=top,
                    day=day,
                )

    def _already(self, day: str, key: str) -> bool:
        """Whether an alert was fired today (by any process on the data dir); marks it."""
        path = self.dir / f"fired-{day}.txt"
        if self._fired[0] != day:
            self._fired = (day, set())
        if key in self._fired[1]:
            return True
        try:
            make_private_dir(self.dir)
            with file_lock(self.dir / ".fired.lock").acquire(timeout=2):
                try:
                    seen = set(read_private(path).decode().splitlines())
                except FileNotFoundError:
                    seen = set()
                self._fired[1].update(seen)
                if key in seen:
                    return True
                fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                try:
                    os.write(fd, (key + "\n").encode())
                finally:
                    os.close(fd)
        except (OSError, filelock.Timeout) as e:
            log.error("alerts: cannot record a fired alert: %s", e)
        self._fired[1].add(key)
        return False

    def body(self, alert: dict[str, Any], fmt: str) -> tuple[bytes, str]:
        """The request body in the webhook's format, and a query string (DingTalk's signing)."""
        text = alert_text(alert)
        query = ""
        if fmt == "feishu":
            doc: dict[str, Any] = {"msg_type": "text", "content": {"text": text}}
            if self.secret:  # Feishu's own signing: HMAC of "timestamp\nsecret", empty message
                stamp = str(int(time.time()))
                key = f"{stamp}\n{self.secret}".encode()
                sign = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
                doc.update(timestamp=stamp, sign=sign)
        elif fmt in ("dingtalk", "wecom"):
            doc = {"msgtype": "text", "text": {"content": text}}
            if fmt == "dingtalk" and self.secret:  # DingTalk's: in the URL
                stamp = str(int(time.time() * 1000))
                mac = hmac.new(self.secret.encode(), f"{stamp}\n{self.secret}".encode(), "sha256")
                sign = urllib.parse.quote_plus(base64.b64encode(mac.digest()).decode())
                query = f"timestamp={stamp}&sign={sign}"
        elif fmt == "slack":
            doc = {"text": text}
        else:
            doc = alert
        return json.dumps(doc, ensure_ascii=False).encode(), query

    async def _send(self, item: dict[str, Any]) -> bool:
        hook = self.hooks[item["hook"]] if item["hook"] < len(self.hooks) else None
        if hook is None or self._client is None:
            return True  # the webhook was removed: nothing to do
        body, query = self.body(item["alert"], hook.format)
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if self.secret:
            digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Gateway-Signature"] = f"sha256={digest}"
        url = hook.url + (("&" if "?" in hook.url else "?") + query if query else "")
        try:
            response = await self._client.fetch(
                url,
                method="POST",
                body=body,
                headers=headers,
                raise_error=False,
                request_timeout=10,
                follow_redirects=False,
            )
        except (OSError, tornado.httpclient.HTTPClientError):
            return False
        return 200 <= response.code < 300

    def _forget(self, item: dict[str, Any]) -> None:
        """Remove a delivered or abandoned alert (emit may have dropped it meanwhile)."""
        if item in self.pending:
            self.pending.remove(item)
        self._dirty = True

    async def _deliver_forever(self) -> None:
        while True:
            try:
                await self._deliver_due()
            except Exception:  # the deliverer must outlive any one alert
                log.exception("alerts: delivery round failed")
            if self._dirty and time.monotonic() - self._saved_at >= 1.0:
                self._dirty = False
                self._saved_at = time.monotonic()
                snapshot = [dict(p) for p in self.pending]  # taken here, written in a thread
                await asyncio.get_running_loop().run_in_executor(None, self._save, snapshot)
            waits = [p["next"] - time.time() for p in self.pending]
            if self._dirty:
                waits.append(1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, min(waits, default=60.0)))

    async def _deliver_due(self) -> None:
        """One round: every due alert, each webhook's in turn, the webhooks side by side (a
        slow one holds back only its own)."""
        now = time.time()
        due: dict[int, list[dict[str, Any]]] = {}
        for p in self.pending:
            if p["next"] <= now:
                due.setdefault(p["hook"], []).append(p)

        async def one_hook(items: list[dict[str, Any]]) -> None:
            for item in items:
                if await self._send(item):
                    self._forget(item)
                    continue
                item["attempts"] += 1
                if item["attempts"] >= ALERT_ATTEMPTS:
                    log.error("alerts: dropped after %d attempts: %s", ALERT_ATTEMPTS, item["id"])
                    self._forget(item)
                else:
                    item["next"] = time.time() + min(ALERT_RETRY_MAX, 2.0 ** item["attempts"])
                    self._dirty = True
                    return  # this webhook is failing: its other alerts wait for the retry

        await asyncio.gather(*(one_hook(items) for items in due.values()))


# ---------------------------------------------------------------------------------------------
# Admin access: sessions and the guess throttle
# ---------------------------------------------------------------------------------------------

ADMIN_COOKIE = "gateway_admin"
ADMIN_SESSION_DAYS = 0.5  # a login lasts 12 hours
# Failed admin-key checks: per source address and for the whole process, per minute.
ADMIN_GUESSES_PER_ADDRESS = 5
ADMIN_GUESSES_TOTAL = 20


def admin_cookie_secret(admin_key: str) -> str:
    """Signs admin cookies; follows the admin key, so changing the key ends every login."""
    if not admin_key:
        return secrets.token_hex(32)
    return hmac.new(admin_key.encode(), b"gateway admin cookie", hashlib.sha256).hexdigest()


class GuessThrottle:
    """Bounds failed admin-key checks per source address and overall, whatever the concurrency.

    A token bucket each: `per_address` failures a minute from one address and `total` from
    all, refilling evenly. While a bucket is empty, a presented key is not even compared (the
    answer is 429), so the number of keys tried per minute is bounded however many requests
    arrive at once. A logged-in admin keeps working; the command line always does.
    """

    MAX_ADDRESSES = 10_000

    def __init__(
        self,
        per_address: int = ADMIN_GUESSES_PER_ADDRESS,
        total: int = ADMIN_GUESSES_TOTAL,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_address = per_address
        self.total = total
        self.now = now
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _level(self, name: str, size: int) -> float:
        """Tokens in a bucket now (a bucket never seen is full)."""
        tokens, at = self._buckets.get(name, (float(size), 0.0))
        return min(float(size), tokens + (self.now() - at) * size / 60.0)

    def retry_after(self, address: str) -> int:
        """0 if a key from this address may be checked now, else seconds to wait."""
        wait = 0.0
        for name, size in (("", self.total), ("@" + address, self.per_address)):
            missing = 1.0 - self._level(name, size)
            if missing > 0:
                wait = max(wait, missing * 60.0 / size)
        return math.ceil(wait)

    def failed(self, address: str) -> None:
        now = self.now()
        for name, size in (("", self.total), ("@" + address, self.per_address)):
            self._buckets[name] = (self._level(name, size) - 1.0, now)
            self._buckets.move_to_end(name)
        while len(self._buckets) > self.MAX_ADDRESSES:
            self._buckets.popitem(last=False)  # the longest quiet: refilled by now


class AdminSessions:
    """Admin logins that the server can end: logout and expiry are decided here, not by the
    cookie. data/admin-sessions.json maps the SHA-256 of each session id to its expiry, so
    the file holds nothing that logs anyone in, and every process on the data dir shares it
    (re-read when it changes)."""

    def __init__(self, data_dir: str, now: Callable[[], float], lifetime: float) -> None:
        self.path = Path(data_dir) / "admin-sessions.json"
        self.now = now
        self.lifetime = lifetime
        self._sessions: dict[str, float] = {}
        self._stamp: tuple[int, int, int] | None = None

    @staticmethod
    def _digest(sid: str) -> str:
        return hashlib.sha256(sid.encode("utf-8", "surrogateescape")).hexdigest()

    def _read(self) -> dict[str, float]:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            self._sessions, self._stamp = {}, None
            return self._sessions
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                doc = json.loads(read_private(self.path))
                self._sessions = {
                    str(k): float(v) for k, v in doc.items() if isinstance(v, int | float)
                }
            except (ValueError, AttributeError, OSError) as e:
                log.error(
                    "admin sessions in %s unreadable (%s): everyone logs in again", self.path, e
                )
                self._sessions = {}
            self._stamp = stamp
        return self._sessions

    def _change(self, edit: Callable[[dict[str, float]], None]) -> None:
        try:
            lock = file_lock(self.path.with_name(".admin-sessions.lock"))
            with lock.acquire(timeout=5):
                self._stamp = None
                now = self.now()
                sessions = {k: t for k, t in self._read().items() if t > now}
                edit(sessions)
                atomic_write(self.path, json.dumps(sessions, indent=1).encode())
                self._stamp = None
        except (OSError, filelock.Timeout) as e:
            raise StoreError(f"cannot update {self.path}: {e}") from None

    def create(self) -> str:
        sid = secrets.token_urlsafe(32)
        expires = self.now() + self.lifetime
        self._change(lambda sessions: sessions.__setitem__(self._digest(sid), expires))
        return sid

    def valid(self, sid: str) -> bool:
        try:
            expires = self._read().get(self._digest(sid))
        except OSError:
            return False
        return expires is not None and expires > self.now()

    def end(self, sid: str) -> None:
        digest = self._digest(sid)

        def drop(sessions: dict[str, float]) -> None:
            sessions.pop(digest, None)

        self._change(drop)


# ---------------------------------------------------------------------------------------------
# The relay pipeline: admit -> relay -> settle or release (Service.relay)
# ---------------------------------------------------------------------------------------------


def daily_limits(user: User, counts: Counts) -> dict[str, Any]:
    """The contract's `daily_limits`: charged (`used`), limit and `remaining` (see remaining)."""
    requests_left, tokens_left = remaining(user, counts)
    return {
        "requests": {
            "used": counts.requests,
            "limit": user.daily_request_limit,
            "remaining": requests_left,
        },
        "tokens": {
            "used": counts.tokens,
            "limit": user.daily_token_limit,
            "remaining": tokens_left,
        },
    }


class StreamSink(abc.ABC):
    """Where a relayed stream goes: the client's connection."""

    left: bool  # the client closed its connection

    @abc.abstractmethod
    def start_stream(self) -> None:
        """Send the 200 and event-stream headers."""

    @abc.abstractmethod
    async def send(self, data: bytes) -> None:
        """Write and flush; raise ClientLeft if the client has gone."""


_RESPONSES_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_ANTHROPIC_USAGE = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


class SSERelay:
    """Relays one upstream Server-Sent Events stream event by event and works out its usage.

    Three stream dialects (`api`): OpenAI's (chat and completions: `choices[].delta`, a usage
    chunk, `data: [DONE]`), the Responses API's (`response.*.delta` events, usage in
    `response.completed`) and Anthropic's Messages API (`content_block_delta`, usage in
    `message_start` and `message_delta`, `message_stop`).

    Events are forwarded as they arrive. The OpenAI usage chunk the gateway asked for is
    dropped unless the client asked for it too. The closing event (and anything after it) is
    held back in `tail`: the caller sends it after the charge is written, so a stream that
    completes is always a charged one. One event may hold at most `max_event` bytes: a larger
    one ends the stream (interrupted, charged), so that no single upstream answer can hold
    memory or the event loop.
    """

    def __init__(
        self,
        sink: StreamSink,
        request: dict[str, Any],
        strip_usage: bool,
        *,
        redactor: Redactor,
        max_event: int,
        size: int = 0,
        api: str = API_OPENAI,
    ) -> None:
        self.sink = sink
        self.request = request
        self.size = size  # the request body's bytes, for the estimate's floor
        self.strip_usage = strip_usage
        self.redactor = redactor
        self.max_event = max_event
        self.api = api
        self.status = 0
        self.content_type = ""
        self.started = False
        self.done = False  # the upstream sent its closing event
        self.finished = False  # the upstream said the generation is over (finish/stop reason)
        self.usage: Usage | None = None
        self.upstream_id = ""
        self.tail = bytearray()  # the closing event and anything after it, sent after the charge
        self._buffer = bytearray()  # the start of an event not yet complete, CRLF normalized
        self._cr = False  # the last chunk ended in CR: its LF may open the next one
        self._error_body = bytearray()
        self.cut = ""  # why the gateway ended the stream itself
        self._ascii = 0
        self._other = 0
        self._counts: dict[str, int] = {}  # Anthropic's usage fields, as they arrive
        self._escaped: Any = None  # the last event's JSON, when it holds \\u escapes
        self.retry_after: float | None = None
        self.overflow = False  # more than max_event bytes came after the closing event
        self.keep_reading = False  # read on for the usage even if the client leaves

    def on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.status = tornado.httputil.parse_response_start_line(line.strip()).code
        elif line[:13].lower() == "content-type:":
            self.content_type = line[13:].strip().lower()
        elif line[:12].lower() == "retry-after:":
            self.retry_after = _retry_after(line[12:].strip())

    def feed(self, chunk: bytes) -> bytes:
        """Take a piece of the upstream's body; return the complete events to forward."""
        if self.sink.left and not (self.finished or self.keep_reading):
            # Cancelled mid-generation. After the last choice finished, the rest (the usage
            # chunk) is still read, so that a client leaving then is charged exact usage.
            raise ClientLeft("client disconnected; upstream call cancelled")
        if not (200 <= self.status < 300 and self.content_type.startswith("text/event-stream")):
            if len(self._error_body) < 65536:
                self._error_body += chunk[:65536]
            return b""
        if not self.started:
            self.started = True
            self.sink.start_stream()
        # Only the new piece is normalized and searched, so an event that arrives in many
        # pieces costs time in proportion to its size, not its size squared.
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        buffer = self._buffer
        searched = max(0, len(buffer) - 1)
        buffer += chunk.replace(b"\r\n", b"\n")
        out = []
        begin = 0
        while (end := buffer.find(b"\n\n", max(begin, searched))) >= 0:
            if end - begin > self.max_event:
                break
            event = bytes(buffer[begin:end])
            begin = end + 2
            if not self._inspect(event):
                continue
            if self._escaped and b"\\u" in event:
                event = self._unescaped(event)
            if self.done:  # held until the charge is written; bounded like one event
                if len(self.tail) + len(event) <= self.max_event:
                    self.tail += self.redactor.data(event + b"\n\n")
                else:
                    self.overflow = True  # an upstream that keeps on after its end
            else:
                out.append(event + b"\n\n")
        del buffer[:begin]
        if len(buffer) > self.max_event:
            self.cut = f"an upstream event is larger than {self.max_event} bytes"
            buffer.clear()
        return self.redactor.data(b"".join(out))

    async def on_chunk(self, chunk: bytes) -> None:
        """Streaming callback; Tornado's client awaits it, so a slow client slows the read."""
        data = self.feed(chunk)
        if data and not self.sink.left:
            try:
                await self.sink.send(data)
            except ClientLeft:
                if not (self.finished or self.keep_reading):
                    raise
        if self.cut:
            raise EventTooLarge(self.cut)  # the events before it were sent first
        if self.overflow:
            raise ClientLeft("the upstream kept sending after its closing event")

    def _inspect(self, event: bytes) -> bool:
        """Note what an event says; return whether to forward it (now, or in the tail)."""
        self._escaped = None
        data = [
            line[6:] if line.startswith(b"data: ") else line[5:]
            for line in event.split(b"\n")
            if line.startswith(b"data:")
        ]
        if not data:
            return True  # a comment or keep-alive
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            self.done = True
            return True
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return True
        if not isinstance(obj, dict):
            return True
        self._escaped = obj if self.redactor.secrets and b"\\u" in payload else None
        if self.api == API_RESPONSES:
            self._responses_event(obj)
            return True
        if self.api == API_ANTHROPIC:
            self._anthropic_event(obj)
            return True
        self._note_id(obj)
        usage = _exact_usage(obj.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = _text_of(delta) if isinstance(delta, dict) else _text_of(choice.get("text"))
            self._generated(text)
            if choice.get("finish_reason"):
                self.finished = True
        return not (self.strip_usage and usage is not None and not choices)

    def _unescaped(self, event: bytes) -> bytes:
        """The event with its JSON written plainly, if that shows a configured secret (an
        upstream may write one in \\u escapes, which the byte-level redaction cannot see)."""
        plain = _compact(self._escaped)
        if self.redactor.data(plain) is plain:
            return event
        head = [line for line in event.split(b"\n") if not line.startswith(b"data:")]
        return b"\n".join([*head, b"data: " + plain])

    def _note_id(self, obj: Any) -> None:
        if not self.upstream_id and isinstance(obj, dict) and isinstance(obj.get("id"), str):
            self.upstream_id = self.redactor.text(obj["id"][:200])

    def _generated(self, text: str) -> None:
        ascii_chars = _ascii_count(text)
        self._ascii += ascii_chars
        self._other += len(text) - ascii_chars

    def _responses_event(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            self._generated(obj["delta"])  # output text, tool arguments, reasoning
        response = obj.get("response")
        if isinstance(response, dict):
            self._note_id(response)
            usage = _exact_usage(response.get("usage"))
            if usage is not None:
                self.usage = usage
        if kind in _RESPONSES_ENDS:
            self.finished = self.done = True
        elif kind in ("response.output_item.done", "response.output_text.done"):
            # The answer is written: a client that leaves now is still charged the usage
            # that response.completed brings, so the rest is read (the stream is whole only
            # when response.completed comes).
            self.keep_reading = True

    def _anthropic_event(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        usage = obj.get("usage")
        if kind == "message_start" and isinstance(obj.get("message"), dict):
            self._note_id(obj["message"])
            usage = obj["message"].get("usage")
        elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
            delta = obj["delta"]
            self._generated(
                "".join(
                    v
                    for k in ("text", "partial_json", "thinking")
                    if isinstance(v := delta.get(k), str)
                )
            )
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.finished = True
        elif kind == "message_stop":
            self.finished = self.done = True
        if isinstance(usage, dict):  # the counts are running totals: the latest one holds
            for name in _ANTHROPIC_USAGE:
                if (n := _count(usage.get(name))) is not None:
                    self._counts[name] = n
            # message_start's output_tokens is a placeholder (1): the count holds from the
            # first message_delta on; until then a broken stream is charged an estimate.
            if kind == "message_delta" and "output_tokens" in self._counts:
                self.usage = _exact_usage(self._counts)

    def partial_usage(self) -> Usage:
        """Prompt plus what was generated so far, estimated (the upstream's own prompt count
        when it sent one at the start, as Anthropic's message_start does)."""
        known = _exact_usage({**self._counts, "output_tokens": 0}) if self._counts else None
        prompt = known.prompt_tokens if known else estimate_request_tokens(self.request, self.size)
        completion = max(
            math.ceil(self._ascii / 4) + self._other, self._counts.get("output_tokens", 0)
        )
        return Usage(prompt, completion, prompt + completion, estimated=True)

    def error_event(self, message: str) -> bytes:
        """An event that tells the client its stream broke, in its API's own shape."""
        if self.api == API_ANTHROPIC:
            body: dict[str, Any] = {
                "type": "error",
                "error": {"type": "api_error", "message": message},
            }
            return b"event: error\ndata: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
        if self.api == API_RESPONSES:
            body = {"type": "error", "code": "stream_interrupted", "message": message}
            return b"event: error\ndata: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"
        body = {
            "error": {"message": message, "type": "upstream_error", "code": "stream_interrupted"}
        }
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    async def finish(self, error: str | None) -> Answer:
        """Judge the ended stream; raise UpstreamFailure if nothing reached the client.

        Once the stream has started, this returns an Answer whatever happens: a stream that
        delivered anything is charged.
        """
        usage, uid = self.usage or self.partial_usage(), self.upstream_id
        if self.sink.left:
            return Answer(
                None, usage, complete=False, upstream_id=uid, interrupted="client_closed_request"
            )
        if not self.started:
            if error is not None:
                raise UpstreamFailure(None, error, responded=self.status != 0)
            if not 200 <= self.status < 300:
                message = self.redactor.text(_error_message(bytes(self._error_body)))
                raise UpstreamFailure(self.status, message, retry_after=self.retry_after)
            raise UpstreamFailure(
                self.status, "upstream did not answer the stream request with an event stream"
            )
        if self.done or (error is None and not self.cut and self.finished):
            # The closing event arrived: whatever happened after it, the answer is whole.
            return Answer(None, usage, tail=bytes(self.tail), upstream_id=uid)
        reason = self.cut or error or "upstream closed the stream before it was complete"
        try:
            await self.sink.send(self.error_event(f"{MSG_UPSTREAM}: {reason}"))
        except ClientLeft:
            pass
        return Answer(
            None,
            usage,
            complete=False,
            upstream_id=uid,
            interrupted=f"stream_interrupted: {reason}",
        )


@dataclass(frozen=True, slots=True)
class Figures:
    """Live figures of this process and today's totals of every process on the data dir."""

    status: str  # "running" or "stopping"
    queue_length: int  # calls waiting for a worker
    processing: int  # upstream calls running
    today_requests: int
    today_tokens: int


@dataclass(frozen=True, slots=True)
class Target:
    """What a route calls: the path on an upstream, the API the client speaks (API_OPENAI,
    API_RESPONSES or API_ANTHROPIC) and headers passed on from the client. Which upstream
    and key answer is the Router's choice, per attempt."""

    path: str
    api: str = API_OPENAI
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def upstream_api(self) -> str:
        """What an upstream must speak for it: Anthropic's API, or OpenAI's."""
        return API_ANTHROPIC if self.api == API_ANTHROPIC else API_OPENAI


async def _no_call() -> Answer:
    raise AssertionError("a Job's call is set by the job builder")


def _upstream_headers(target: Target, channel: Channel) -> dict[str, str]:
    """Headers for an attempt: the client's passed-on ones, then the upstream's own from
    upstreams.yaml (the admin's word wins), and Anthropic's API version if neither set one."""
    headers = {**target.headers, **channel.headers}
    if target.api == API_ANTHROPIC and "anthropic-version" not in {h.lower() for h in headers}:
        headers["anthropic-version"] = "2023-06-01"
    return headers


def _cap_field(request: dict[str, Any], target: Target) -> str:
    """The request field that caps generated tokens in the target's API ("" for none)."""
    if target.api == API_ANTHROPIC:
        return "max_tokens"
    if target.api == API_RESPONSES:
        return "max_output_tokens"
    if target.path == "/embeddings":
        return ""
    return "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"


@dataclass(frozen=True, slots=True)
class Outcome:
    answer: Answer
    counts: Counts


MODELS_CACHE_SECONDS = 300.0


def _model_list(names: list[str]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "gateway"} for m in names],
    }


HISTORY_DAYS = 14


class Service:
    """What every handler is given: the users, the usage store, the upstream and its queue,
    the call log and metrics, admin access state; and the relay pipeline itself (`relay`),
    with the figures and reports built from them (status, dashboard, model list)."""

    def __init__(
        self,
        config: Config,
        users: UserDirectory,
        store: UsageStore,
        clock: DayClock,
        routing: RoutingSpec | None = None,
    ) -> None:
        self.config = config
        self.users = users
        self.store = store
        self.clock = clock
        routing = routing or default_routing(config)
        self.router = Router(routing, config, Redactor(config.secrets() + routing_secrets(routing)))
        self.router.on_event = self._upstream_event
        self._upstream_models: dict[str, tuple[float, dict[str, Any]]] = {}  # /models
        self._totals = (0, 0)  # today's totals as last read from the store
        self._file_prices = load_prices_file(config.prices_file)
        self._models_lock = asyncio.Lock()
        self._cost_days: dict[str, list[Any]] = {}  # day -> [offset read, by user, by model]
        self._cost_lock = asyncio.Lock()
        self._alerted: dict[tuple[str, str, str], float] = {}
        self.queue = CallQueue(config.queue_size, config.concurrency, config.user_queue_share)
        self.calls = CallLog(config.data_dir, clock)
        self.audit = AuditLog(config.data_dir, clock)
        self.alerts = Alerts(config, clock)
        store.listener = self.alerts.emit  # the store failing or back: an alert
        self.metrics = Metrics()
        self.bodies = BodyBudget(config.max_body_memory)
        self.cors_origins = config.cors()
        self.admin_guesses = GuessThrottle()
        self.admin_sessions = AdminSessions(config.data_dir, clock.now, ADMIN_SESSION_DAYS * 86400)
        self.stopping = False
        self.active = 0  # calls between admission and their answer
        self.idle = asyncio.Event()
        self.idle.set()

    def authenticate(self, key: str | None, address: str = "") -> User:
        """The user of a key, if it may call from this address today; else the 401/403."""
        if not key:
            raise GatewayError(401, MSG_BAD_KEY, {"error": "missing API key"})
        user = self.users.authenticate(key)
        if user is None:
            raise GatewayError(401, MSG_BAD_KEY, {"error": "unknown or disabled API key"})
        policy = user.policy
        if policy.expires is not None and self.clock.today() > policy.expires.isoformat():
            raise GatewayError(401, MSG_KEY_EXPIRED, {"error": "api_key_expired"})
        if not policy.allows_address(address):
            raise GatewayError(403, MSG_IP_NOT_ALLOWED, {"error": "ip_not_allowed"})
        return user

    def _upstream_event(self, event: str, upstream: str, detail: str) -> None:
        """An upstream or key rested, was disabled or came back: an alert, at most one a
        minute for the same event, upstream and key (a user's requests can draw 429s)."""
        key = (event, upstream, " ".join(re.findall(r"sha256:[0-9a-f]+", detail)))
        now = time.monotonic()
        if now - self._alerted.get(key, -1e9) < 60:
            return
        self._alerted[key] = now
        if len(self._alerted) > 10_000:
            self._alerted = {k: t for k, t in self._alerted.items() if now - t < 60}
        self.alerts.emit(event, detail, upstream=upstream)

    def prices(self) -> tuple[Price, ...]:
        """upstreams.yaml's prices:, else --prices-file's."""
        return self.router.spec.prices or self._file_prices

    def install_routing(self, routing: RoutingSpec) -> None:
        """A new upstreams.yaml: its keys are secrets from now on, everywhere."""
        redactor = Redactor(self.config.secrets() + routing_secrets(routing))
        LOG_GUARD.install(redactor)
        self.router.redactor = redactor
        self.router.install(routing)
        self._upstream_models.clear()

    def route(self, target: Target, model: Any) -> Route:
        """Where calls of a model go; raises UnknownModel if no upstream serves it."""
        route = self.router.route(str(model), target.upstream_api)
        if route is None:
            raise UnknownModel(str(model)[:200])
        return route

    def check_accepting(self, api: str = API_OPENAI) -> None:
        """Raise the answer for a call the gateway cannot take now (stopping, no key for the
        upstream, queue full); return if it can."""
        if self.stopping:
            raise GatewayError(503, MSG_STOPPING, {"error": "the gateway is shutting down"})
        if not self.router.configured(api):
            what = (
                "no Anthropic upstream is configured (api: anthropic in upstreams.yaml, or "
                "--anthropic-api-key / ANTHROPIC_API_KEY)"
                if api == API_ANTHROPIC
                else "no upstream API key is configured on the gateway"
            )
            raise GatewayError(500, MSG_SERVER_ERROR, {"error": what})
        if self.queue.full():
            raise self._queue_full()

    def _queue_full(self, user: str = "") -> GatewayError:
        data: dict[str, Any] = {
            "queue_length": len(self.queue),
            "queue_size": self.config.queue_size,
        }
        if user and not self.queue.full():
            data["error"] = (
                f"this user's waiting calls already take their share of the queue "
                f"({self.queue.user_room}, --user-queue-share)"
            )
        return GatewayError(503, MSG_QUEUE_FULL, data, {"Retry-After": "1"})

    def record_call(self, rec: CallRecord) -> None:
        """Put a finished call in the call log and the metrics, once; never raises (the call
        is already charged or refused by then, and a log must not change that)."""
        if rec.written:
            return
        rec.written = True
        try:
            if rec.user:  # traffic without a valid key leaves no line on disk
                self.calls.write(rec)
            self.metrics.observe(rec)
        except Exception:
            log.exception("call log or metrics failed for a call of %r", rec.user)

    async def relay(self, user: User, job: Job, rec: CallRecord) -> Outcome:
        """The relay pipeline, once the key is authenticated and the request validated:
        admit → relay → settle or release. Failures are raised (QuotaExceeded, UpstreamFailure,
        StoreError, GatewayError, ClientLeft) and turned into answers by the handler.

        Hook points: per-user policy refuses a call where it is admitted (before the store's
        reservation); routing picks an upstream inside the Job's `call`, run by a worker.
        """
        # Admit: the gateway can take a call, and the user has a slot (reserved now).
        self.check_accepting(job.api)
        day = self.clock.today()  # settled against the day it was admitted on
        job.user, job.weight = user.name, user.policy.weight
        want = min(job.prompt + job.max_tokens * job.choices, TOKEN_HOLD_MAX)
        if user.policy.token_policy == STRICT and not job.max_tokens:
            want = 0  # no cap from the client: strict grants what is left, and caps it there
        prompt = min(job.prompt, TOKEN_HOLD_MAX)
        res: Reservation | None = await self.store.reserve(user, day, want, prompt)
        assert res is not None
        if user.policy.token_policy == STRICT and res.grant > job.prompt:
            # What is left of the day's tokens after the prompt, or the client's own cap if
            # lower; a strict call always goes upstream with one.
            job.cap = (res.grant - job.prompt) // job.choices
            if job.cap < 1:  # n answers that cannot each have a token
                await self.store.release(res)
                res = None
                raise QuotaExceeded("tokens", user, await self.store.counts(user.name, day))
        rec.call_id, rec.day = res.id, day
        self.active += 1
        self.idle.clear()
        try:
            # Relay: a worker makes the upstream call when one is free.
            try:
                self.queue.submit(job)
            except tornado.queues.QueueFull:
                raise self._queue_full(job.user) from None
            try:
                answer = await job.future
            except UpstreamFailure as e:
                rec.attempts = len(e.attempts) or 1
                raise
            finally:
                if job.started_at:
                    rec.queue_ms = round((job.started_at - job.queued_at) * 1000)
                    rec.upstream_ms = round((time.monotonic() - job.started_at) * 1000)
            # Settle: charge what the call used (a failure above released the slot instead).
            facts = CallFacts(
                model=job.model,
                latency_ms=round((time.monotonic() - job.queued_at) * 1000),
                partial=not answer.complete,
            )
            try:
                counts = await self.store.settle(res, answer.usage, facts)
            except StoreError as e:
                # The charge may or may not be on disk (a failed fsync after the write) or
                # in Redis (an answer lost on the way back): the store decides, and the
                # client is told the call failed, in the words of the failure.
                raise type(e)(f"{e} (the charge of {user.name!r}'s call may be lost)") from None
            res = None
            self.alerts.check_limits(user, counts, day)
            # Logged now, not when the response ends: a crash after the charge loses nothing.
            rec.usage, rec.partial, rec.upstream_id = (
                answer.usage,
                not answer.complete,
                answer.upstream_id,
            )
            rec.upstream, rec.attempts = answer.upstream, answer.attempts
            rec.cost = cost_of(self.prices(), answer.upstream_model or job.model, answer.usage)
            rec.error = answer.interrupted
            rec.status = 499 if answer.interrupted == "client_closed_request" else 200
            self.record_call(rec)
            return Outcome(answer, counts)
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()
            if res is not None:
                try:
                    await self.store.release(res)
                except StoreError as e:
                    log.error(
                        "usage store: %s (a slot of %s stays held until %s)",
                        e,
                        user.name,
                        self.store.held_until,
                    )

    async def routed(
        self, route: Route, attempt: Callable[[Channel, KeyState], Awaitable[Answer]], job: Job
    ) -> Answer:
        """Make a call through the route's upstreams: an attempt on the upstream and key the
        Router picks; after a retryable failure, another attempt on a different upstream or
        key, up to `retries` more (a stream that reached the client never fails here, so it
        is never retried). Raises the last failure, with every attempt, if none answered.

        A call that waited in the queue across a reload of upstreams.yaml goes by the new
        routing, as long as it sends the same model name upstream (its body is built)."""
        router = self.router
        current = router.route(route.requested, route.api)
        if current is not None and current.model == route.model:
            route = current
        tried_upstreams: set[str] = set()
        tried_keys: set[str] = set()
        attempts: list[dict[str, Any]] = []
        last: UpstreamFailure | None = None
        for _ in range(router.spec.retries + 1):
            try:
                channel, key = await router.acquire(route, tried_upstreams, tried_keys)
            except NoUpstreamFree as e:
                if last is not None:
                    break
                raise UpstreamFailure(
                    None,
                    f"every upstream for model {route.model!r} is resting or refused its keys",
                    retry_after=e.wait,
                    attempts=attempts,
                ) from None
            t0 = time.monotonic()
            try:
                answer = await attempt(channel, key)
            except UpstreamFailure as e:
                avoid = router.failed(channel, key, e, job.user)
                attempts.append({"upstream": channel.name, "status": e.status, "error": e.error})
                last = e
                if not avoid:
                    break
                if avoid == "key":
                    tried_keys.add(key.secret)
                else:
                    tried_upstreams.add(channel.name)
                continue
            finally:
                router.release(channel)
            router.succeeded(channel, key, time.monotonic() - t0)
            return dataclasses.replace(
                answer,
                upstream=channel.name,
                attempts=len(attempts) + 1,
                upstream_model=route.model,
            )
        assert last is not None
        raise UpstreamFailure(
            last.status,
            last.error,
            responded=last.responded,
            retry_after=last.retry_after,
            attempts=attempts if router.spec.from_file else [],
        )

    @staticmethod
    def _job(target: Target, body: bytes, request: dict[str, Any], model: str) -> Job:
        """A Job with what admission needs to know of the call: its prompt estimate and the
        client's max_tokens (in the field its API uses)."""
        job = Job(call=_no_call, model=model, api=target.upstream_api)
        job.prompt = estimate_request_tokens(request, len(body))
        field = _cap_field(request, target)
        given = request.get(field) if field else None
        job.max_tokens = given if type(given) is int and given > 0 else 0
        # n (and completions' best_of) answers: each may use max_tokens.
        choices = max(
            (
                int(v)
                for k in ("n", "best_of")
                if isinstance(v := request.get(k), int | float)
                and not isinstance(v, bool)
                and 0 < v <= 1000
            ),
            default=1,
        )
        job.choices = choices if field else 1
        return job

    @staticmethod
    def _upstream_body(
        target: Target,
        route: Route,
        body: bytes,
        request: dict[str, Any],
        *,
        job: Job,
        stream: bool,
    ) -> tuple[bytes, bool]:
        """The body as sent upstream (the mapped model name, a strict max_tokens, the usage
        chunk asked for) and whether the client asked for the usage chunk itself."""
        changes: dict[str, Any] = {}
        if route.model != request.get("model"):
            changes["model"] = route.model
        field = _cap_field(request, target)
        if job.cap and field and not 0 < job.max_tokens <= job.cap:
            changes[field] = job.cap
        wanted = True
        if stream and target.api == API_OPENAI:
            options = request.get("stream_options")
            wanted = isinstance(options, dict) and options.get("include_usage") is True
            changes["stream_options"] = {**(options or {}), "include_usage": True}
        if not changes:
            return body, wanted
        return json.dumps({**request, **changes}, ensure_ascii=False).encode(), wanted

    def json_job(
        self, target: Target, route: Route, body: bytes, request: dict[str, Any], *, model: str
    ) -> Job:
        """A call whose answer is one JSON document."""
        job = self._job(target, body, request, model)

        async def attempt(channel: Channel, key: KeyState) -> Answer:
            sent, _ = self._upstream_body(target, route, body, request, job=job, stream=False)
            upstream = channel.client
            headers = _upstream_headers(target, channel)
            reply, raw = await upstream.post_json(target.path, sent, headers, key.secret)
            uid = reply.get("id")
            return Answer(
                reply,
                usage_of(reply, request, len(body)),
                raw=raw,
                upstream_id=upstream.redactor.text(uid[:200]) if isinstance(uid, str) else "",
            )

        job.call = lambda: self.routed(route, attempt, job)
        return job

    def stream_job(
        self,
        target: Target,
        route: Route,
        body: bytes,
        request: dict[str, Any],
        sink: StreamSink,
        *,
        model: str,
    ) -> Job:
        """A streamed call. OpenAI's streams always ask the upstream for usage (dropped again
        if the client did not ask); the Responses and Messages APIs always report it."""
        job = self._job(target, body, request, model)

        async def attempt(channel: Channel, key: KeyState) -> Answer:
            sent, wanted = self._upstream_body(target, route, body, request, job=job, stream=True)
            upstream = channel.client
            sse = SSERelay(
                sink,
                request,
                not wanted,
                redactor=upstream.redactor,
                max_event=self.config.max_event_size,
                size=len(sent),
                api=target.api,
            )
            try:
                error = await upstream.stream(
                    target.path,
                    sent,
                    sse.on_header,
                    sse.on_chunk,
                    headers=_upstream_headers(target, channel),
                    key=key.secret,
                )
            except Exception:
                if not sse.started:
                    raise
                # Bytes reached the client: whatever broke, the call is charged.
                log.exception("stream for %s failed after it started", request.get("model"))
                error = "the gateway could not finish relaying the stream"
            return await sse.finish(error)

        job.call = lambda: self.routed(route, attempt, job)
        return job

    async def uncharged(
        self,
        target: Target,
        body: bytes,
        request: dict[str, Any],
        *,
        user: User,
        on_job: Callable[[Job], None],
    ) -> bytes:
        """A call that costs the user nothing (Anthropic's count_tokens): through the queue,
        so it too waits for a worker, but with no slot reserved and nothing charged."""
        self.check_accepting(target.upstream_api)
        route = self.route(target, request.get("model"))
        job = Job(call=_no_call, api=target.upstream_api)
        sent, _ = self._upstream_body(target, route, body, request, job=job, stream=False)

        async def attempt(channel: Channel, key: KeyState) -> Answer:
            headers = _upstream_headers(target, channel)
            reply, raw = await channel.client.post_json(target.path, sent, headers, key.secret)
            return Answer(reply, Usage(0, 0, 0), raw=raw)

        job.call = lambda: self.routed(route, attempt, job)
        job.user, job.weight = user.name, user.policy.weight  # its own place in fair share
        on_job(job)  # the handler keeps the body counted and tells the job if its client left
        try:
            self.queue.submit(job)
        except tornado.queues.QueueFull:
            raise self._queue_full() from None
        return (await job.future).raw

    async def models(self) -> dict[str, Any]:
        """The model list: --models; else the upstream's (cached; stale beats none); with
        upstreams.yaml, the union of each upstream's list filtered by its globs, plus the
        mapped names."""
        if self.config.models:
            return _model_list([m.strip() for m in self.config.models.split(",") if m.strip()])
        # One fetch at a time: concurrent requests wait for it and share its (cached) list.
        async with self._models_lock:
            return await self._fetch_models()

    async def _fetch_models(self) -> dict[str, Any]:
        router = self.router
        if not router.spec.from_file:
            return await self._model_doc(router.channels["default"])  # as the upstream sent it
        names: list[str] = []
        for channel in router.channels.values():
            if channel.spec.api != API_OPENAI or not channel.keys:
                continue
            ids = await self._upstream_list(channel)
            if ids is None:  # the upstream cannot say: the globs that name one model
                ids = [g for g in channel.spec.models if not any(c in g for c in "*?[")]
            names.extend(i for i in ids if channel.serves(i))
        names.extend(router.spec.aliases)
        return _model_list(list(dict.fromkeys(names)))

    async def _model_doc(self, channel: Channel) -> dict[str, Any]:
        """An upstream's /models answer, cached 5 minutes; when it fails, the last good one
        (stale beats none), or UpstreamFailure if it never answered."""
        now = time.monotonic()
        cached = self._upstream_models.get(channel.name)
        if cached is not None and now - cached[0] < MODELS_CACHE_SECONDS:
            return cached[1]
        try:
            key = channel.keys[0].secret if channel.keys else None
            doc = await channel.client.get_json("/models", key)
        except UpstreamFailure as e:
            if cached is None:
                raise
            log.warning("model list of upstream %s failed (%s); kept the last", channel.name, e)
            return cached[1]
        self._upstream_models[channel.name] = (now, doc)
        return doc

    async def _upstream_list(self, channel: Channel) -> list[str] | None:
        """An upstream's model ids; None if it never answered."""
        try:
            doc = await self._model_doc(channel)
        except UpstreamFailure as e:
            log.warning("model list of upstream %s failed (%s)", channel.name, e)
            return None
        data = doc.get("data")
        return [
            m["id"][:200]
            for m in (data if isinstance(data, list) else [])[:10_000]
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]

    async def admin_state(self) -> dict[str, Any]:
        """Everything the dashboard shows: live figures, users today, history, failures."""
        today = self.clock.today()
        live = await self.figures()
        counts = await self.store.all_counts(today)
        users = []
        for u in self.users.by_name.values():
            c = counts.get(u.name) or Counts()
            users.append(
                {
                    "name": u.name,
                    "enabled": u.enabled,
                    "requests": c.requests + c.reserved,
                    "request_limit": u.daily_request_limit,
                    "tokens": c.tokens,
                    "token_limit": u.daily_token_limit,
                    "in_flight": c.reserved,
                    "held": c.held,
                    "policy": policy_summary(u),
                }
            )
        history = []
        first = date.fromisoformat(today) - timedelta(days=HISTORY_DAYS - 1)
        for n in range(HISTORY_DAYS):
            day = (first + timedelta(days=n)).isoformat()
            usage = await self.store.usage(day)
            history.append(
                {
                    "date": day,
                    "requests": sum(r for r, _ in usage.values()),
                    "tokens": sum(t for _, t in usage.values()),
                }
            )
        return {
            "now": datetime.fromtimestamp(self.clock.now(), self.clock.tz).isoformat(),
            "today": today,
            "gateway": {
                "status": live.status,
                "queue_length": live.queue_length,
                "queue_size": self.queue.size,
                "in_flight": live.processing,
                "concurrency": self.queue.concurrency,
                "latency": self.metrics.latency_quantiles(),
                "today_requests": live.today_requests,
                "today_tokens": live.today_tokens,
            },
            "users": users,
            "history": history,
            "failures": self.calls.recent_failures(50),
            "upstreams": self.router.describe(self.clock.now()),
            "audit": self.audit.recent(20),
            "cost": await self.cost_report(today),
        }

    async def cost_report(self, today: str) -> dict[str, Any]:
        """For the dashboard, from the call log: today's cost per user and per model, and
        each model's requests, tokens and cost on each of the last 14 days (a past day is
        read once and kept while its file does not change)."""
        first = date.fromisoformat(today) - timedelta(days=HISTORY_DAYS - 1)
        days = [(first + timedelta(days=n)).isoformat() for n in range(HISTORY_DAYS)]
        async with self._cost_lock:  # one poll reads at a time, in a thread: not the loop's time
            loop = asyncio.get_running_loop()
            per_day = {day: await loop.run_in_executor(None, self._day_costs, day) for day in days}
        users, models, _ = per_day[today]
        history: dict[str, list[Any]] = {}
        # The 50 models with the most requests in the 14 days; the rest as "(other)".
        calls: dict[str, int] = {}
        for day in days:
            for model, (requests, _, _) in per_day[day][2].items():
                calls[model] = calls.get(model, 0) + requests
        shown = set(sorted(calls, key=lambda m: -calls[m])[:50])
        for n, day in enumerate(days):
            for model, (requests, tokens, cost) in per_day[day][2].items():
                name = model if model in shown else "(other)"
                row = history.setdefault(name, [[0, 0, 0.0] for _ in days])
                row[n] = [row[n][0] + requests, row[n][1] + tokens, round(row[n][2] + cost, 6)]
        return {
            "currency": self.config.currency,
            "users": {u: round(c, 6) for u, c in users.items()},
            "models": {m: round(c, 6) for m, c in models.items()},
            "days": days,
            "history": history,
        }

    def _day_costs(
        self, day: str
    ) -> tuple[dict[str, float], dict[str, float], dict[str, tuple[int, int, float]]]:
        """A day's costs from its call log, read on from where the last poll stopped (at
        most 32 MiB a poll; a file that shrank is read again from the start)."""
        path = self.calls.path(day)
        try:
            size = os.stat(path).st_size
        except OSError:
            return {}, {}, {}
        entry = self._cost_days.get(day)
        if entry is None or size < entry[0]:
            entry = [0, {}, {}]
        if size > entry[0]:
            try:
                fd = open_private(path, os.O_RDONLY)
                try:
                    chunk = os.pread(fd, min(size - entry[0], 32 << 20), entry[0])
                finally:
                    os.close(fd)
            except OSError:
                chunk = b""
            end = chunk.rfind(b"\n") + 1  # complete lines only
            users, models = entry[1], entry[2]
            for raw in chunk[:end].splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if charged_line(line):
                    users.setdefault(line["user"], Tally()).add(line)
                    models.setdefault(str(line.get("model") or "")[:100], Tally()).add(line)
            entry[0] += end
        self._cost_days[day] = entry
        for old in sorted(self._cost_days)[:-HISTORY_DAYS]:
            del self._cost_days[old]
        users, models = entry[1], entry[2]
        return (
            {u: t.cost for u, t in users.items()},
            {m: t.cost for m, t in models.items()},
            {m: (t.requests, t.tokens, t.cost) for m, t in models.items()},
        )

    async def figures(self) -> Figures:
        """The live figures that the status route, the dashboard and /metrics all show."""
        status = "stopping" if self.stopping else "running"
        try:
            requests, tokens = self._totals = await self.store.totals(self.clock.today())
        except StoreError:
            requests, tokens = self._totals  # the last known, while the store is away
            status = "store_unavailable"
        waiting, running = len(self.queue), self.queue.processing
        if self.config.processes != 1:
            waiting, running = self.machine_figures(waiting, running)
        return Figures(
            status=status,
            queue_length=waiting,
            processing=running,
            today_requests=requests,
            today_tokens=tokens,
        )

    LIVE_SECONDS = 0.5  # how often each process of --processes publishes its live figures

    def publish_figures(self) -> None:
        """--processes: this process's queue and calls running, for its siblings to add up
        (data/live/<pid>.json, replaced every LIVE_SECONDS; a dead process's file goes stale)."""
        live = Path(self.config.data_dir) / "live"
        doc = {"w": len(self.queue), "p": self.queue.processing, "t": time.time()}
        try:
            make_private_dir(live)
            tmp = live / f".{os.getpid()}.tmp"
            fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(fd, json.dumps(doc).encode())
            finally:
                os.close(fd)
            os.replace(tmp, live / f"{os.getpid()}.json")
        except OSError as e:
            log.warning("cannot publish live figures in %s: %s", live, e.strerror)

    def machine_figures(self, waiting: int, running: int) -> tuple[int, int]:
        """Calls waiting and running in every process of this machine (the others' figures
        are at most 2 x LIVE_SECONDS old; a file older than 3 s is a dead process's)."""
        live = Path(self.config.data_dir) / "live"
        now = time.time()
        try:
            names = os.listdir(live)
        except OSError:
            return waiting, running
        for name in names:
            if not name.endswith(".json") or name == f"{os.getpid()}.json":
                continue
            try:
                doc = json.loads(read_private(live / name))
                if now - float(doc["t"]) < 3:
                    waiting += int(doc["w"])
                    running += int(doc["p"])
                else:
                    (live / name).unlink(missing_ok=True)
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return waiting, running

    async def status(self) -> dict[str, Any]:
        """GET /api/status.php, in the contract's shape."""
        live = await self.figures()
        return {
            "status": live.status,
            "api_key_configured": self.router.configured(API_OPENAI),
            "queue_enabled": self.queue.enabled,
            "stats": {
                "total_users": len(self.users),
                "queue_length": live.queue_length,
                "processing": live.processing,
                "today_requests": live.today_requests,
                "today_tokens": live.today_tokens,
            },
        }


# ---------------------------------------------------------------------------------------------
# HTTP handlers: the API routes
# ---------------------------------------------------------------------------------------------

MAX_HEADER_BYTES = 32 * 1024  # request headers, names and values together


# CORS: what a page of an allowed origin may send and read.
_CORS_HEADERS = "Authorization, Content-Type, X-API-Key"
_CORS_EXPOSED = (
    "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-limit-tokens, "
    "x-ratelimit-remaining-tokens, Retry-After, x-should-retry"
)
FORM_BODY = 16 * 1024  # the body allowed on the admin's form and action routes
_LENGTH = re.compile(r"[0-9]{1,15}")  # a Content-Length we act on; Tornado refuses the rest


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """JSON everywhere: every response, errors included, is the contract's envelope.

    Every route reads its own body (stream_request_body), so nothing of a body is read until
    prepare() has checked the headers, the route and the key: a stranger's upload is never
    buffered. A body is kept up to the route's `body_limit` (413 past it; routes that take no
    body have 0); the relay routes' bodies, which only key holders can send, also count
    against the process's BodyBudget (503 past it). A request answered before its body was
    read has its connection closed once the answer is sent (Tornado does so), so the body is
    never taken in.
    """

    service: Service
    record: CallRecord | None = None  # set by the relay endpoints
    body_limit = 0
    budgeted = False  # whether this route's bodies count against --max-body-memory
    api = False  # an API route: pages of the --cors-origins may call it from a browser

    def client_address(self) -> str:
        """The client's address for allow_ips: the connection's peer, or with --xheaders
        the last X-Forwarded-For entry (the one our proxy added). X-Real-Ip is not read
        here: a client could send it itself through a proxy that only appends."""
        context = getattr(self.request.connection, "context", None)
        peer = getattr(context, "_orig_remote_ip", None) or self.request.remote_ip or ""
        if not self.service.config.xheaders:
            return peer
        forwarded = self.request.headers.get("X-Forwarded-For", "")
        return forwarded.split(",")[-1].strip() or peer

    def initialize(self, service: Service) -> None:
        self.service = service
        self.user: User | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._held = 0  # bytes of the BodyBudget this request holds
        self._form_read = False
        self.admin = False  # the admin's session or key was checked and holds
        if self.api:
            self.set_cors_headers()

    @property
    def identified(self) -> bool:
        """Whether the request showed a valid user key or admin login (else a stranger's)."""
        return self.user is not None or self.admin

    def prepare(self) -> None:
        # Tornado reads up to MAX_HEADER_BYTES * 4 of headers (beyond that it drops the
        # connection); between the two, the client gets a clear 431.
        size = sum(len(k) + len(v) for k, v in self.request.headers.get_all())
        if size > MAX_HEADER_BYTES:
            raise GatewayError(431, MSG_HEADERS_TOO_LARGE, {"max_header_bytes": MAX_HEADER_BYTES})
        if self.request.method == "OPTIONS":
            return  # a browser's preflight carries no key; options() answers it
        method = self.request.method.lower() if self.request.method else ""
        if getattr(type(self), method, None) is getattr(tornado.web.RequestHandler, method, None):
            raise tornado.web.HTTPError(405)  # the route has no such method: 405 before the rest
        self.check_access()
        length = self.request.headers.get("Content-Length", "")
        if _LENGTH.fullmatch(length) and int(length) > 0:
            if int(length) > self.body_limit:
                raise self._too_large()
            if self.budgeted and not self.service.bodies.take(int(length)):
                raise self._bodies_full()
            self._held = int(length)

    def check_access(self) -> None:
        """The route's own checks from the headers alone (key, admin key); raise to refuse."""

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return  # answered already; Tornado closes the connection after the answer
        self._size += len(chunk)
        if self._size > self.body_limit:
            self._chunks.clear()
            self._refuse(self._too_large())
        elif self._size <= self._held or not self.budgeted:
            self._chunks.append(chunk)
        elif self.service.bodies.take(self._size - self._held):  # chunked: admitted as it comes
            self._held = self._size
            self._chunks.append(chunk)
        else:
            self._chunks.clear()
            self._refuse(self._bodies_full())

    def _bodies_full(self) -> GatewayError:
        return GatewayError(
            503,
            MSG_QUEUE_FULL,
            {
                "error": "the gateway holds as many request bodies as it may "
                "(--max-body-memory); retry shortly",
                "max_body_memory": self.service.bodies.limit,
            },
            {"Retry-After": "1"},
        )

    def _too_large(self) -> GatewayError:
        return GatewayError(413, MSG_TOO_LARGE, {"max_body_size": self.body_limit})

    def _refuse(self, error: GatewayError) -> None:
        """Answer in the middle of the body. Tornado closes the connection once the answer
        is sent, since the rest of the body was not read: none of it is taken in."""
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.render_error(error.status, error.message, error.data)

    def body(self) -> bytes:
        """The body, joined once (the pieces are replaced by the whole)."""
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

    def read_form(self) -> None:
        """Parse a form body into the request's arguments (Tornado does not, for a body it
        did not read itself); a malformed one is a 400."""
        if self._form_read:
            return
        self._form_read = True
        req = self.request
        try:
            tornado.httputil.parse_body_arguments(
                req.headers.get("Content-Type", ""), self.body(), req.body_arguments, req.files
            )
        except (tornado.httputil.HTTPInputError, ValueError) as e:
            raise bad_request(f"malformed form body: {e}") from None
        for name, values in req.body_arguments.items():
            req.arguments.setdefault(name, []).extend(values)

    def _let_body_go(self) -> None:
        if self.budgeted:
            self.service.bodies.give(self._held)
        self._held = 0
        self._chunks.clear()

    def on_finish(self) -> None:
        self._let_body_go()

    def on_connection_close(self) -> None:
        # Tornado's own fails the request's body future, which ends a request whose client
        # left mid-body; without it the request would wait for its body forever.
        super().on_connection_close()
        if not self.body_in_use():
            self._let_body_go()

    def body_in_use(self) -> bool:
        """Whether the body is still needed after the client left (a call carries it)."""
        return False

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        # Also after send_error() cleared the headers: errors are readable too. (Tornado calls
        # this once before initialize(), when there is no service yet; initialize() does it.)
        if self.api and hasattr(self, "service"):
            self.set_cors_headers()

    def set_cors_headers(self) -> None:
        origin = self.allowed_origin()
        if origin is not None:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", _CORS_EXPOSED)
        self.set_header("Vary", "Origin")

    def allowed_origin(self) -> str | None:
        """The value for Access-Control-Allow-Origin, if this request's Origin may call."""
        origin = self.request.headers.get("Origin")
        allowed = self.service.cors_origins
        if origin is None or not allowed:
            return None
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    def options(self, *args: str, **kwargs: str) -> None:
        """A CORS preflight: 204 for an allowed origin on an API route, else 405."""
        if not self.api or self.allowed_origin() is None:
            raise GatewayError(405, MSG_METHOD, None)
        requested = self.request.headers.get("Access-Control-Request-Headers", "")
        self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", requested[:2000] or _CORS_HEADERS)
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def send_json(self, payload: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.finish(_compact(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = answer_for(exc, self.service.clock) if exc is not None else None
        if error is not None:
            # send_error() cleared the headers; put back ours (e.g. Retry-After).
            for name, value in error.headers.items():
                self.set_header(name, value)
            self.render_error(error.status, error.message, error.data)
            return
        message = MESSAGE_BY_STATUS.get(status_code, MSG_INTERNAL)
        data = None if status_code < 500 else {"error": "internal error; see the gateway log"}
        self.render_error(status_code, message, data)

    def note_error(self, status: int, message: str, data: dict[str, Any] | None) -> None:
        """Keep an error's status and reason for the call log."""
        if self.record is not None:
            detail = data.get("error") if data else None
            code = _OPENAI_CODES.get(message, "error")
            self.record.status = status
            self.record.error = f"{code}: {detail}" if detail else code

    def render_error(self, status: int, message: str, data: dict[str, Any] | None) -> None:
        self.note_error(status, message, data)
        self.send_json(envelope(False, message, data), status)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, GatewayError | tornado.web.HTTPError | QuotaExceeded | UnknownModel):
            return  # an answer, not a fault; the access log records it
        who = self.user.name if self.user else "-"
        if isinstance(value, StoreError | ConfigError):
            log.error("%s %s (user %s): %s", self.request.method, self.request.path, who, value)
            return
        if isinstance(value, UpstreamFailure):
            log.warning("upstream call for %s failed: %s %s", who, value.status, value.error)
            return
        # Tornado would log the request repr (with its URI); ours names only method and path.
        log.error(
            "uncaught exception in %s %s",
            self.request.method,
            self.request.path,
            exc_info=(typ, value, tb),
            extra={"stranger": not self.identified},  # rate-limited for strangers
        )


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:  # any method, any headers: the route does not exist
        raise GatewayError(404, MSG_NOT_FOUND, {"path": self.request.path[:200]})


class StatusHandler(BaseHandler):
    api = True

    async def get(self) -> None:
        self.send_json(envelope(True, "OK", await self.service.status()))


class RelayHandler(BaseHandler, StreamSink):
    """A relay route. Its request goes through the pipeline in this order:

    authenticate  prepare() → check_access(), from the headers, before any body byte
    validate      run(): parse the body, the route's validate()
    admit         Service.relay: the gateway can take it; the user gets a slot (reserved)
    relay         Service.relay: a worker makes the Job's upstream call
    settle        Service.relay: charge it, or release the slot if it failed
    answer        the route's post(), in its own shape; failures in write_error

    Takes a body up to --max-body-size, notices a client that leaves, can stream events.
    """

    upstream_path = "/chat/completions"
    budgeted = True
    api = True

    def initialize(self, service: Service) -> None:  # type: ignore[override]
        super().initialize(service)
        self.body_limit = service.config.max_body_size
        self.job: Job | None = None
        self.deployment: str | None = None  # Azure's /deployments/{model}/… path
        self.left = False  # the client closed its connection
        self.record = CallRecord(self.request.path)

    def validate(self, request: dict[str, Any]) -> bool:
        """Check the parsed body (raise a 400); return whether it asks for a stream."""
        raise NotImplementedError

    async def run(self) -> tuple[Outcome, bool] | None:
        """validate → admit → relay → settle or release: the outcome and whether it is a
        stream, or None when the client left while its call waited (nothing charged)."""
        service, rec = self.service, cast(CallRecord, self.record)
        body = self.body()
        request = parse_json_object(body)
        if self.deployment is not None and "model" not in request:
            # Azure OpenAI's clients name the model in the path, not the body.
            request["model"] = self.deployment
            body = json.dumps(request, ensure_ascii=False).encode()
        stream = rec.stream = self.validate(request)
        rec.model = str(request.get("model"))[:100]
        if not cast(User, self.user).policy.allows_model(str(request.get("model"))):
            raise GatewayError(403, MSG_MODEL_NOT_ALLOWED, {"error": "model_not_allowed"})
        target = self.target()
        route = service.route(target, request.get("model"))
        if stream:
            self.job = service.stream_job(target, route, body, request, self, model=rec.model)
        else:
            self.job = service.json_job(target, route, body, request, model=rec.model)
        try:
            return await service.relay(cast(User, self.user), self.job, rec), stream
        except ClientLeft:
            rec.status, rec.error = 499, "client_closed_request: left while queued"
            return None
        finally:
            self._let_body_go()  # the call is over: its body is no longer held

    def target(self) -> Target:
        """Where this route's calls go."""
        return Target(self.upstream_path)

    def body_in_use(self) -> bool:
        return self.job is not None

    def api_key(self) -> str | None:
        """The contract's X-API-Key header, else an `Authorization: Bearer` token."""
        return self.request.headers.get("X-API-Key") or bearer_token(self.request)

    def check_access(self) -> None:
        self.user = self.service.authenticate(self.api_key(), self.client_address())
        cast(CallRecord, self.record).user = self.user.name

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.left = True
        if self.job is not None:
            self.job.client_left = True

    def start_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # tell nginx not to buffer the stream

    async def send(self, data: bytes) -> None:
        if self.left:
            raise ClientLeft("client disconnected")
        self.write(data)
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            self.left = True
            raise ClientLeft("client disconnected") from None


class CallHandler(RelayHandler):
    """POST /api/call.php: the contract's chat relay, in the contract's envelope."""

    def validate(self, request: dict[str, Any]) -> bool:
        return validate_chat(request)

    async def post(self) -> None:
        done = await self.run()
        if done is None:
            return  # the client left while queued: nobody to answer
        outcome, user = done[0], cast(User, self.user)
        answer = outcome.answer
        # The envelope is built around the upstream's bytes rather than re-encoding its JSON.
        self.finish(
            b'{"success":true,"message":"'
            + MSG_OK.encode()
            + b'","data":{"response":'
            + answer.raw
            + b',"usage":'
            + _compact(answer.usage.as_dict())
            + b',"daily_limits":'
            + _compact(daily_limits(user, outcome.counts))
            + b"}}"
        )


def bearer_token(request: tornado.httputil.HTTPServerRequest) -> str | None:
    """The token of an `Authorization: Bearer …` header, if there is one."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


class OpenAIHandler(BaseHandler):
    """/v1 routes: OpenAI's error shape, Bearer keys and x-ratelimit-* headers."""

    api = True

    def api_key(self) -> str | None:
        """A Bearer token, as OpenAI's SDKs send it, the contract's X-API-Key header (also
        what Anthropic's SDKs send), or Azure OpenAI's api-key header."""
        headers = self.request.headers
        return bearer_token(self.request) or headers.get("X-API-Key") or headers.get("api-key")

    def set_limit_headers(self, counts: Counts | None = None) -> None:
        user = self.user
        if user is None:
            return
        if counts is None:  # an error path: what this process last saw, without waiting
            counts = self.service.store.peek(user.name, self.service.clock.today())
            if counts is None:
                counts = Counts()
        requests_left, tokens_left = remaining(user, counts)
        self.set_header("x-ratelimit-limit-requests", str(user.daily_request_limit))
        self.set_header("x-ratelimit-remaining-requests", str(requests_left))
        self.set_header("x-ratelimit-limit-tokens", str(user.daily_token_limit))
        self.set_header("x-ratelimit-remaining-tokens", str(tokens_left))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, UnknownModel):
            error = f"no upstream serves model {exc.model!r}"
            self.render_error(404, MSG_NOT_FOUND, {"error": error, "code": "model_not_found"})
            return
        if isinstance(exc, UpstreamFailure) and exc.status in CLIENT_FAULTS:
            # The upstream says the request is wrong (too long a prompt, an unknown
            # parameter): the client's error, passed on with its status so SDKs do not retry.
            data = {"upstream_status": exc.status, "error": exc.error}
            self.render_error(exc.status, MSG_UPSTREAM, data)
            return
        super().write_error(status_code, **kwargs)

    def render_error(self, status: int, message: str, data: dict[str, Any] | None) -> None:
        self.note_error(status, message, data)
        detail = data.get("error") if data else None
        error: dict[str, Any] = {
            "message": f"{message}: {detail}" if detail else message,
            "type": _OPENAI_TYPES.get(status, "server_error"),
            "param": data.get("field") if data else None,
            "code": (data or {}).pop("code", None) or _OPENAI_CODES.get(message, "error"),
        }
        if data and "error" not in data:
            error["details"] = data  # e.g. the daily counts of a 429
        if data and "attempts" in data:
            error["attempts"] = data["attempts"]  # routing: every upstream tried
        self.set_limit_headers()
        self.send_json({"error": error}, status)


class OpenAIRelayHandler(OpenAIHandler, RelayHandler):
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses: the
    upstream's own answer."""

    def initialize(  # type: ignore[override]
        self,
        service: Service,
        path: str,
        validate: Callable[[dict[str, Any]], bool],
        api: str = API_OPENAI,
    ) -> None:
        super().initialize(service)
        self.upstream_path = path
        self.validator = validate
        self.dialect = api

    def target(self) -> Target:
        return Target(self.upstream_path, self.dialect)

    def validate(self, request: dict[str, Any]) -> bool:
        return self.validator(request)

    async def post(self, deployment: str | None = None) -> None:
        if deployment is not None:
            self.deployment = urllib.parse.unquote(deployment)[:200]
        done = await self.run()
        if done is None:
            return  # the client left while queued: nobody to answer
        outcome, stream = done
        answer = outcome.answer
        if not stream:
            self.set_limit_headers(outcome.counts)
            self.finish(answer.raw)  # the upstream's own body, byte for byte
            return
        if answer.tail:
            try:
                await self.send(answer.tail)  # the closing event, only now: the charge is on disk
            except ClientLeft:
                return  # left at the very end; the call was complete and is charged
        self.finish()

    def start_stream(self) -> None:
        super().start_stream()
        self.set_limit_headers()


class ModelsHandler(OpenAIHandler):
    """GET /v1/models: what the users can call; GET /v1/models/{id}: one of them."""

    def check_access(self) -> None:
        self.user = self.service.authenticate(self.api_key(), self.client_address())

    async def get(self, model_id: str | None = None) -> None:
        models = await self.service.models()
        self.set_limit_headers()
        if model_id is None:
            self.send_json(models)
            return
        listed = models.get("data")
        for model in listed if isinstance(listed, list) else []:
            if isinstance(model, dict) and model.get("id") == model_id:
                self.send_json(model)
                return
        raise GatewayError(404, MSG_NOT_FOUND, {"error": f"no model {model_id[:200]!r}"})


# Anthropic's error `type` for each status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "overloaded_error",
}


class AnthropicHandler(OpenAIRelayHandler):
    """POST /v1/messages: Anthropic's Messages API, relayed to the upstream that speaks it
    (--anthropic-base-url) with the team's key as x-api-key and the client's
    anthropic-version and anthropic-beta headers; errors in Anthropic's shape."""

    def target(self) -> Target:
        headers = {}
        for name in ("anthropic-version", "anthropic-beta"):
            value = self.request.headers.get(name)
            if value is None:
                continue
            if not _HEADER_VALUE.fullmatch(value):
                raise bad_request(f"the {name} header must be 1-512 printable ASCII characters")
            headers[name] = value
        return Target(self.upstream_path, API_ANTHROPIC, headers)

    def render_error(self, status: int, message: str, data: dict[str, Any] | None) -> None:
        self.note_error(status, message, data)
        detail = data.get("error") if data else None
        error: dict[str, Any] = {
            "type": _ANTHROPIC_TYPES.get(status, "api_error"),
            "message": f"{message}: {detail}" if detail else message,
            "code": (data or {}).pop("code", None) or _OPENAI_CODES.get(message, "error"),
        }
        if data and "error" not in data:
            error["details"] = data  # e.g. the daily counts of a 429
        if data and "attempts" in data:
            error["attempts"] = data["attempts"]  # routing: every upstream tried
        self.set_limit_headers()
        self.send_json({"type": "error", "error": error}, status)


class CountTokensHandler(AnthropicHandler):
    """POST /v1/messages/count_tokens: relayed to the Anthropic upstream, never charged."""

    async def post(self) -> None:  # type: ignore[override]  # no Azure path here
        body = self.body()
        request = parse_json_object(body)
        validate_count_tokens(request)
        user = cast(User, self.user)
        if not user.policy.allows_model(str(request.get("model"))):
            raise GatewayError(403, MSG_MODEL_NOT_ALLOWED, {"error": "model_not_allowed"})

        def keep(job: Job) -> None:
            self.job = job

        try:
            raw = await self.service.uncharged(self.target(), body, request, user=user, on_job=keep)
        finally:
            self._let_body_go()
        self.finish(raw)


class AnthropicNotFoundHandler(AnthropicHandler):
    def initialize(self, service: Service) -> None:  # type: ignore[override]
        BaseHandler.initialize(self, service)

    def prepare(self) -> None:  # any method, any headers: the route does not exist
        raise GatewayError(404, MSG_NOT_FOUND, {"error": f"no route {self.request.path[:200]}"})


class OpenAINotFoundHandler(OpenAIHandler):
    def prepare(self) -> None:  # any method, any headers: the route does not exist
        raise GatewayError(404, MSG_NOT_FOUND, {"error": f"no route {self.request.path[:200]}"})


# ---------------------------------------------------------------------------------------------
# Operating: /metrics and the /admin dashboard (both off without --admin-key)
# ---------------------------------------------------------------------------------------------


class AdminBase(BaseHandler):
    """An admin route: absent (404) without --admin-key; needs the admin's login."""

    def check_access(self) -> None:
        if not self.service.config.admin_key:
            raise GatewayError(404, MSG_NOT_FOUND, {"path": self.request.path[:200]})

    def check_key(self, key: str | None, surface: str) -> bool:
        """Compare a presented admin key, within the guess throttle (429 while it is empty)."""
        service, address = self.service, self.request.remote_ip or "?"
        wait = service.admin_guesses.retry_after(address)
        if wait:
            log.warning(
                "admin %s from %s refused unchecked: too many wrong keys",
                surface,
                address,
                extra={"stranger": True},
            )
            raise GatewayError(
                429,
                MSG_TOO_MANY,
                {"error": "too many wrong admin keys; try again later", "retry_after": wait},
                {"Retry-After": str(wait)},
            )
        want = hashlib.sha256(service.config.admin_key.encode()).digest()
        got = hashlib.sha256((key or "").encode("utf-8", "surrogateescape")).digest()
        if hmac.compare_digest(want, got):
            self.admin = True
            return True
        service.admin_guesses.failed(address)
        log.warning("admin %s refused from %s: wrong key", surface, address)
        return False

    def session_id(self) -> str | None:
        value = self.get_signed_cookie(ADMIN_COOKIE, max_age_days=ADMIN_SESSION_DAYS)
        return value.decode("ascii", "replace") if value else None

    def actor(self) -> str:
        """How the audit trail names this administrator: the dashboard session (a digest of
        its id, which names the login without being one)."""
        sid = self.session_id() or ""
        return "dashboard session " + hashlib.sha256(sid.encode()).hexdigest()[:10]

    def logged_in(self) -> bool:
        sid = self.session_id()
        self.admin = sid is not None and self.service.admin_sessions.valid(sid)
        return self.admin

    def require_login(self) -> None:
        if not self.logged_in():
            raise GatewayError(401, MSG_BAD_KEY, {"error": "log in at /admin"})

    def check_origin(self) -> None:
        """A state change must come from our own page: XSRF token and, if sent, Origin."""
        origin = self.request.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != self.request.host:
            raise GatewayError(403, MSG_FORBIDDEN, {"error": "cross-origin request refused"})
        self.read_form()  # a form's _xsrf field
        self.check_xsrf_cookie()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and status_code == 403:
            self.render_error(403, MSG_FORBIDDEN, {"error": "missing or wrong XSRF token"})
            return
        super().write_error(status_code, **kwargs)

    def send_page(self, html: str, status: int = 200) -> None:
        nonce = secrets.token_urlsafe(16)
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header(
            "Content-Security-Policy",
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "img-src data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
            "base-uri 'none'",
        )
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "same-origin")  # no-referrer makes Origin "null"
        token = self.xsrf_token.decode()
        lang = page_language(
            self.get_query_argument("lang", None), self.request.headers.get("Accept-Language", "")
        )
        self.set_header("Content-Language", lang)
        self.set_header("Vary", "Accept-Language")
        html = translate_page(html, lang)
        self.finish(html.replace("{{nonce}}", nonce).replace("{{xsrf}}", token))


# The dashboard in Chinese: the page's words (HTML text between tags) and the script's, by
# their English. Every visible word of the page has an entry (tests/test_dashboard_i18n.py).
DASHBOARD_ZH = {
    "Gateway admin": "网关管理",
    "LLM gateway": "大模型网关",
    "Log out": "退出登录",
    "Log in": "登录",
    "Admin key": "管理密钥",
    "Wrong admin key.": "管理密钥错误。",
    "Too many wrong keys. Try again in": "错误密钥过多，请稍后重试，秒数：",
    "Queue": "队列",
    "In flight": "进行中",
    "Upstream latency (p50 / p95)": "上游延迟 (p50 / p95)",
    "Today, all users": "今天，全部用户",
    "Users today": "今日用户",
    "Last 14 days": "最近 14 天",
    "requests": "请求",
    "tokens": "Token",
    "Upstreams": "上游",
    "Upstream": "上游",
    "State": "状态",
    "Calls": "调用",
    "Failures": "失败",
    "Latency": "延迟",
    "Last error": "最近错误",
    "Keys": "密钥",
    "Last failed calls": "最近失败的调用",
    "Time": "时间",
    "User": "用户",
    "Endpoint": "接口",
    "Model": "模型",
    "Status": "状态码",
    "Reason": "原因",
    "No failed calls.": "没有失败的调用。",
    "Recent changes": "最近的变更",
    "By": "执行者",
    "Action": "操作",
    "Target": "对象",
    "Fields": "字段",
    "No changes recorded.": "没有变更记录。",
    "Models": "模型",
    "Requests today": "今日请求",
    "Tokens today": "今日 Token",
    "Cost today": "今日费用",
    "No calls yet.": "还没有调用。",
    # the script's words
    "Reset today's counters of ": "确定要重置今天的计数吗：",
    "?": "？",
    "enabled": "已启用",
    "disabled": "已停用",
    "enable": "启用",
    "disable": "停用",
    "reset today": "重置今天",
    "Requests": "请求",
    "Tokens": "Token",
    " requests, ": " 次请求，",
    " tokens": " Token",
    " waiting": " 等待中",
    " workers": " 个工作者",
    " requests": " 次请求",
    " calls": " 次调用",
    "re-enable": "重新启用",
    " in flight": " 个进行中",
    " tokens held": " Token 占用",
    " until ": " 直到 ",
    " now": " 进行中",
    "unreachable": "无法连接",
    "running": "运行中",
    "stopping": "正在停止",
    "store_unavailable": "存储不可用",
    "ok": "正常",
    "resting": "休息中",
}
LANGUAGES = ("en", "zh-CN")


def page_language(query: str | None, accept: str) -> str:
    """?lang=en|zh-CN, else the first of the browser's Accept-Language that we speak."""
    if query in LANGUAGES:
        return query
    for part in accept.split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return "en"


def translate_page(html: str, lang: str) -> str:
    """The page in `lang`: its HTML words swapped (between tags, whole), the script's words
    given to it as JSON, and <html lang>."""
    words = DASHBOARD_ZH if lang == "zh-CN" else {}
    for english, chinese in words.items():
        html = html.replace(f">{english}<", f">{chinese}<")
    data = json.dumps(words, ensure_ascii=False).replace("<", "\\u003c")
    return html.replace("{{lang}}", lang).replace("{{i18n}}", data)


class AdminPageHandler(AdminBase):
    """GET /admin: the dashboard, or the login form."""

    def get(self) -> None:
        if self.logged_in():
            self.send_page(DASHBOARD_PAGE)
        else:
            self.send_page(LOGIN_PAGE.replace("{{message}}", ""))


class AdminLoginHandler(AdminBase):
    """POST /admin/login (form: key): a new server-side session in a signed, HttpOnly cookie."""

    body_limit = FORM_BODY

    async def post(self) -> None:
        self.check_origin()
        try:
            right = self.check_key(self.get_body_argument("key", None), "login")
        except GatewayError as e:
            self.set_header("Retry-After", e.headers["Retry-After"])
            wait = e.headers["Retry-After"]
            message = f"<span>Too many wrong keys. Try again in</span> {wait} s."
            self.send_page(LOGIN_PAGE.replace("{{message}}", message), 429)
            return
        if not right:
            await asyncio.sleep(0.5)  # slows a lone guesser; the throttle bounds the rest
            self.send_page(LOGIN_PAGE.replace("{{message}}", "<span>Wrong admin key.</span>"), 403)
            return
        sid = self.service.admin_sessions.create()
        self.set_signed_cookie(
            ADMIN_COOKIE,
            sid,
            expires_days=ADMIN_SESSION_DAYS,
            httponly=True,
            samesite="Strict",
            secure=self.request.protocol == "https",
            path="/",
        )
        self.redirect("/admin", status=303)


class AdminLogoutHandler(AdminBase):
    """POST /admin/logout: ends the session on the server, then clears the cookie."""

    body_limit = FORM_BODY

    def post(self) -> None:
        self.check_origin()
        sid = self.session_id()
        if sid is not None:
            self.service.admin_sessions.end(sid)
        self.clear_cookie(ADMIN_COOKIE, path="/")
        self.redirect("/admin", status=303)


class AdminStateHandler(AdminBase):
    """GET /admin/api/state: what the dashboard draws, refreshed every few seconds."""

    async def get(self) -> None:
        self.require_login()
        self.send_json(envelope(True, MSG_OK, await self.service.admin_state()))


class AdminActionHandler(AdminBase):
    """POST /admin/api/users/(enable|disable|reset) with {"name": …} (the dashboard's form,
    which works for any name, "." and ".." included), or /admin/api/users/NAME/ACTION."""

    body_limit = FORM_BODY

    def check_access(self) -> None:
        super().check_access()
        self.require_login()  # before any body byte is read

    async def post(self, *args: str) -> None:
        self.check_origin()
        if len(args) == 2:
            name, action = args  # `name` arrives URL-decoded
        else:
            action = args[0]
            try:
                doc = json.loads(self.body())
            except (ValueError, RecursionError):
                doc = None
            given = doc.get("name") if isinstance(doc, dict) else None
            if not isinstance(given, str):
                raise bad_request('the body must be {"name": "<user>"}', "name")
            name = given
        service = self.service
        if name not in service.users.by_name:
            raise GatewayError(404, MSG_NOT_FOUND, {"error": f"no user {name!r}"})
        if action == "reset":
            await service.store.reset(name, service.clock.today())
        else:
            value = "true" if action == "enable" else "false"
            await asyncio.get_running_loop().run_in_executor(
                None,
                edit_users_file,
                service.users.path,
                lambda e: e.set(name, "enabled", value),
            )
            service.users.reload_if_changed()
        log.info("admin: %s user %r", action, name)
        service.audit.write(self.actor(), f"user {action}", name)
        self.send_json(envelope(True, MSG_OK, {"user": name, "action": action}))


_STATE_VALUE = {"ok": 0, "resting": 1, "disabled": 2}


def upstream_metrics(router: Router) -> str:
    """Per-upstream counters and state gauges, in Prometheus' text format."""
    now = router.now()
    families = {
        "gateway_upstream_calls_total": ("counter", "Attempts sent to each upstream."),
        "gateway_upstream_failures_total": ("counter", "Failed attempts, by upstream."),
        "gateway_upstream_in_flight": ("gauge", "Calls running on each upstream now."),
        "gateway_upstream_state": ("gauge", "0 ok, 1 resting, 2 every key disabled."),
        "gateway_upstream_key_state": ("gauge", "0 ok, 1 resting, 2 disabled; by key fingerprint."),
    }
    lines = {
        name: [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for name, (kind, text) in families.items()
    }
    for ch in router.channels.values():
        label = f'upstream="{_label(ch.name)}"'
        lines["gateway_upstream_calls_total"].append(
            f"gateway_upstream_calls_total{{{label}}} {ch.calls}"
        )
        lines["gateway_upstream_failures_total"].append(
            f"gateway_upstream_failures_total{{{label}}} {ch.failures}"
        )
        lines["gateway_upstream_in_flight"].append(
            f"gateway_upstream_in_flight{{{label}}} {ch.in_flight}"
        )
        lines["gateway_upstream_state"].append(
            f"gateway_upstream_state{{{label}}} {_STATE_VALUE[ch.state(now)]}"
        )
        for k in ch.keys:
            value = 2 if k.disabled else 1 if k.resting_until > now else 0
            lines["gateway_upstream_key_state"].append(
                f'gateway_upstream_key_state{{{label},key="{k.fingerprint}"}} {value}'
            )
    return "".join(line + "\n" for group in lines.values() for line in group)


class UpstreamKeyHandler(AdminBase):
    """POST /admin/api/upstreams/enable-key with {"upstream": name, "key": fingerprint}:
    a key taken out of use (401/403) or resting (429) is used again at once."""

    body_limit = FORM_BODY

    def check_access(self) -> None:
        super().check_access()
        self.require_login()

    def post(self) -> None:
        self.check_origin()
        try:
            doc = json.loads(self.body())
        except (ValueError, RecursionError):
            doc = None
        upstream = doc.get("upstream") if isinstance(doc, dict) else None
        key = doc.get("key") if isinstance(doc, dict) else None
        if not isinstance(upstream, str) or not isinstance(key, str):
            raise bad_request('the body must be {"upstream": "<name>", "key": "sha256:…"}')
        if not self.service.router.enable_key(upstream, key):
            raise GatewayError(404, MSG_NOT_FOUND, {"error": f"no key {key!r} in {upstream!r}"})
        log.info("admin: re-enabled key %s of upstream %s", key, upstream)
        self.service.audit.write(self.actor(), "key enabled", upstream, key=key)
        self.send_json(envelope(True, MSG_OK, {"upstream": upstream, "key": key}))


class MetricsHandler(AdminBase):
    """GET /metrics: Prometheus text format; Bearer <admin key> or an admin login."""

    async def get(self) -> None:
        bearer = bearer_token(self.request)
        if not (self.check_key(bearer, "metrics key") if bearer else self.logged_in()):
            raise GatewayError(
                401,
                MSG_BAD_KEY,
                {"error": "Authorization: Bearer <admin key>"},
                {"WWW-Authenticate": 'Bearer realm="gateway metrics"'},
            )
        service = self.service
        live = await service.figures()
        gauges = {
            "gateway_queue_length": ("Calls waiting for a worker.", live.queue_length),
            "gateway_in_flight": ("Upstream calls running now.", live.processing),
            "gateway_queue_size": ("Calls that may wait (--queue-size).", service.queue.size),
            "gateway_concurrency": (
                "Upstream calls at once (--concurrency).",
                service.queue.concurrency,
            ),
            "gateway_users": ("Users loaded from the users file.", len(service.users)),
            "gateway_today_requests": (
                "Requests charged today, all processes.",
                live.today_requests,
            ),
            "gateway_today_tokens": ("Tokens charged today, all processes.", live.today_tokens),
            "gateway_body_memory_bytes": (
                "Request body bytes held now (--max-body-memory bounds it).",
                service.bodies.used,
            ),
        }
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(service.metrics.render(gauges) + upstream_metrics(service.router))


# ---------------------------------------------------------------------------------------------
# Demo upstream (--demo): a mock model behind OpenAI's and Anthropic's APIs
# ---------------------------------------------------------------------------------------------


DEMO_SCHEMA_DEPTH = 8  # nested objects the demo fills in; deeper ones get a plain string
_DEMO_FORMATS = {  # JSON schema string formats, as pydantic writes them
    "date": "2026-01-01",
    "date-time": "2026-01-01T00:00:00Z",
    "time": "00:00:00",
    "email": "demo@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _demo_value(schema: Any, root: Any, depth: int = 0) -> Any:
    """A value of the JSON schema's type with its required keys: what structured-output and
    tool-call parsers need from a model (not a generator for every schema)."""
    if not isinstance(schema, dict) or depth > DEMO_SCHEMA_DEPTH:
        return "demo"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _demo_value(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            real = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _demo_value((real or options)[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    properties = schema.get("properties")
    if kind == "object" or (kind is None and isinstance(properties, dict)):
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = list(properties) + [
            n for n in (required if isinstance(required, list) else []) if n not in properties
        ]
        return {
            str(n): _demo_value(properties.get(n), root, depth + 1)
            for n in names[:100]
            if isinstance(n, str)
        }
    if kind == "array":
        least = schema.get("minItems")
        count = least if type(least) is int and 1 <= least <= 10 else 1
        return [_demo_value(schema.get("items"), root, depth + 1) for _ in range(count)]
    if kind == "string" or kind is None:
        text = _DEMO_FORMATS.get(str(schema.get("format")), "demo")
        least = schema.get("minLength")
        if type(least) is int and 0 < least <= 1000 and len(text) < least:
            text = text + "x" * (least - len(text))
        return text
    minimum = schema.get("minimum")
    number = minimum if isinstance(minimum, int | float) and not isinstance(minimum, bool) else 1
    return {
        "integer": int(number),
        "number": float(number),
        "boolean": True,
        "null": None,
    }.get(str(kind), "demo")


def _inner(doc: dict[str, Any], key: str) -> dict[str, Any]:
    """doc[key] if that is an object (OpenAI nests a function's spec there), else doc."""
    value = doc.get(key)
    return value if isinstance(value, dict) else doc


def _demo_embeddings(value: Any, encoding: Any) -> list[dict[str, Any]]:
    """One 16-dimension vector per input (a string, or a list of strings or token ids),
    derived from its text; as floats, or base64 of little-endian float32 as OpenAI sends."""
    inputs = value if isinstance(value, list) and value and not _is_token_ids(value) else [value]
    out = []
    for index, item in enumerate(inputs):
        digest = hashlib.sha256(json.dumps(item, ensure_ascii=False).encode()).digest()
        vector = [round(b / 255 - 0.5, 4) for b in digest[:16]]
        embedding: Any = vector
        if encoding == "base64":
            packed = b"".join(struct.pack("<f", x) for x in vector)
            embedding = base64.b64encode(packed).decode()
        out.append({"object": "embedding", "index": index, "embedding": embedding})
    return out


def _is_token_ids(value: list[Any]) -> bool:
    return all(type(v) is int for v in value)


@dataclass(frozen=True, slots=True)
class DemoReply:
    """What the demo model answers, before it is put in an API's shape: text, or a call of
    one of the request's tools (`tool` names it; `arguments` is its JSON)."""

    text: str
    tool: str = ""
    arguments: str = ""
    prompt_tokens: int = 0

    @property
    def output_tokens(self) -> int:
        return estimate_tokens(self.arguments if self.tool else self.text)


def _demo_reply(request: dict[str, Any], api: str) -> DemoReply:
    """The demo model's answer to a chat, Responses or Messages request.

    With tools offered (and tool_choice not "none"), it calls one (the one tool_choice
    names, else the first) with arguments built from its parameter schema, unless the last
    message is already a tool's result. Asked for JSON (response_format / text.format), it
    answers JSON: `{"reply": …}`, or a value matching the given schema.
    """
    if api == API_ANTHROPIC:
        turns: Any = request.get("messages")
    elif api == API_RESPONSES:
        turns = request.get("input")
    else:
        turns = request.get("messages", request.get("prompt"))
    last = turns[-1] if isinstance(turns, list) and turns else turns
    prompt = estimate_tokens(_prompt_text(request) + " " + _text_of(request.get("system")))
    said = _text_of(last)[:200]
    text = f"你好!我是演示模型 (demo mock model). You said: {said}"
    blocks = last.get("content") if isinstance(last, dict) else None
    answered_tool = isinstance(last, dict) and (
        last.get("role") == "tool"
        or last.get("type") == "function_call_output"
        or any(
            isinstance(b, dict) and b.get("type") == "tool_result"
            for b in (blocks if isinstance(blocks, list) else [])
        )
    )
    tools = request.get("tools")
    choice = request.get("tool_choice")
    if isinstance(tools, list) and tools and choice != "none" and not answered_tool:
        wanted = ""
        if isinstance(choice, dict):
            wanted = str(_inner(choice, "function").get("name") or "")
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            spec = _inner(tool, "function")
            name = spec.get("name")
            if not isinstance(name, str) or (wanted and name != wanted):
                continue
            schema = spec.get("parameters", spec.get("input_schema"))
            arguments = json.dumps(_demo_value(schema, schema), ensure_ascii=False)
            return DemoReply(text, name, arguments, prompt)
    form = request.get("response_format")
    if api == API_RESPONSES and isinstance(request.get("text"), dict):
        form = request["text"].get("format")
    if isinstance(form, dict) and form.get("type") == "json_schema":
        schema = _inner(form, "json_schema").get("schema")
        text = json.dumps(_demo_value(schema, schema), ensure_ascii=False)
    elif isinstance(form, dict) and form.get("type") == "json_object":
        text = json.dumps({"reply": text}, ensure_ascii=False)
    return DemoReply(text, prompt_tokens=prompt)


def _sse(data: dict[str, Any], event: str = "") -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _pieces(text: str) -> list[str]:
    """A text cut into stream deltas of about a word each."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


class DemoModelHandler(BaseHandler):
    """--demo only: a local stand-in for an OpenAI-compatible upstream and an Anthropic one,
    for the gateway itself (it sends the demo upstream key); its bodies are not the relay's
    to count twice. Chat, completions, embeddings, Responses and Messages, JSON and streams,
    with `n`, tools and JSON modes."""

    STEP = 0.02  # seconds between stream events, so that streams are seen to stream

    def initialize(self, service: Service) -> None:
        super().initialize(service)
        self.body_limit = service.config.max_body_size

    def check_access(self) -> None:
        key = bearer_token(self.request) or self.request.headers.get("x-api-key")
        if key != self.service.config.upstream_api_key:
            raise GatewayError(401, MSG_BAD_KEY, {"error": "the demo upstream's own key"})

    async def post(self, endpoint: str) -> None:
        try:
            request = json.loads(self.body())
            if not isinstance(request, dict):
                raise TypeError("not an object")
            model = str(request.get("model", "demo"))
            if endpoint == "embeddings":
                prompt = estimate_tokens(_prompt_text(request))
                data = _demo_embeddings(request.get("input"), request.get("encoding_format"))
                usage = {"prompt_tokens": prompt, "total_tokens": prompt}
                self.send_json({"object": "list", "data": data, "model": model, "usage": usage})
                return
            if endpoint == "messages/count_tokens":
                self.send_json({"input_tokens": _demo_reply(request, API_ANTHROPIC).prompt_tokens})
                return
            api = {"responses": API_RESPONSES, "messages": API_ANTHROPIC}.get(endpoint, API_OPENAI)
            reply = _demo_reply(request, api)
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            self.send_json(
                {"error": {"message": "bad request", "type": "invalid_request_error"}}, 400
            )
            return
        stream = request.get("stream") is True
        if stream:
            self.set_header("Content-Type", "text/event-stream")
        if api == API_RESPONSES:
            await self._responses(request, model, reply, stream)
        elif api == API_ANTHROPIC:
            await self._messages(model, reply, stream)
        else:
            await self._chat(request, model, reply, stream, endpoint == "chat/completions")

    async def _emit(self, events: list[bytes]) -> None:
        for event in events:
            self.write(event)
            await self.flush()
            await asyncio.sleep(self.STEP)
        self.finish()

    async def _chat(
        self, request: dict[str, Any], model: str, reply: DemoReply, stream: bool, chat: bool
    ) -> None:
        n = request.get("n")
        n = n if type(n) is int and 1 <= n <= 16 else 1
        completion = reply.output_tokens * n
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens + completion,
        }
        base = {
            "id": "chatcmpl-demo" + secrets.token_hex(8),
            "created": int(time.time()),
            "model": model,
        }
        call_id = "call_demo" + secrets.token_hex(6)
        tool_call = {"id": call_id, "type": "function"}
        finish = "tool_calls" if reply.tool and chat else "stop"
        if not stream:
            if not chat:
                choice: dict[str, Any] = {"text": reply.text}
            elif reply.tool:
                function = {"name": reply.tool, "arguments": reply.arguments}
                message = {"role": "assistant", "content": None}
                choice = {
                    "message": {**message, "tool_calls": [{**tool_call, "function": function}]}
                }
            else:
                choice = {"message": {"role": "assistant", "content": reply.text}}
            self.send_json(
                {
                    **base,
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [
                        {"index": i, **choice, "logprobs": None, "finish_reason": finish}
                        for i in range(n)
                    ],
                    "usage": usage,
                }
            )
            return
        kind = "chat.completion.chunk" if chat else "text_completion"
        deltas: list[dict[str, Any]]
        if reply.tool and chat:
            function = {"name": reply.tool, "arguments": ""}
            deltas = [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"index": 0, **tool_call, "function": function}],
                },
                {"tool_calls": [{"index": 0, "function": {"arguments": reply.arguments}}]},
            ]
        elif chat:
            deltas = [{"content": piece} for piece in _pieces(reply.text)]
            deltas[0] = {"role": "assistant", **deltas[0]}
        else:
            deltas = [{"text": piece} for piece in _pieces(reply.text)]
        events = []
        for step, delta in enumerate(deltas):
            last = step == len(deltas) - 1
            choices = [
                {
                    "index": i,
                    **({"delta": delta} if chat else delta),
                    "finish_reason": finish if last else None,
                }
                for i in range(n)
            ]
            events.append(_sse({**base, "object": kind, "choices": choices}))
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append(_sse({**base, "object": kind, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        await self._emit(events)

    async def _responses(
        self, request: dict[str, Any], model: str, reply: DemoReply, stream: bool
    ) -> None:
        output = reply.output_tokens
        item_id = ("fc_demo" if reply.tool else "msg_demo") + secrets.token_hex(8)
        if reply.tool:
            item: dict[str, Any] = {
                "type": "function_call",
                "id": item_id,
                "call_id": "call_demo" + secrets.token_hex(6),
                "name": reply.tool,
                "arguments": reply.arguments,
                "status": "completed",
            }
        else:
            part = {"type": "output_text", "text": reply.text, "annotations": []}
            item = {
                "type": "message",
                "id": item_id,
                "status": "completed",
                "role": "assistant",
                "content": [part],
            }
        response: dict[str, Any] = {
            "id": "resp_demo" + secrets.token_hex(8),
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": model,
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": request.get("tools", []),
            "text": request.get("text", {"format": {"type": "text"}}),
            "error": None,
            "incomplete_details": None,
            "usage": {
                "input_tokens": reply.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": reply.prompt_tokens + output,
            },
        }
        if not stream:
            self.send_json(response)
            return
        seq = itertools.count()
        at = {"output_index": 0, "item_id": item_id}

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [
            event("response.created", response=started),
            event("response.in_progress", response=started),
        ]
        if reply.tool:
            events.append(
                event(
                    "response.output_item.added",
                    output_index=0,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            events.append(
                event("response.function_call_arguments.delta", **at, delta=reply.arguments)
            )
            events.append(
                event("response.function_call_arguments.done", **at, arguments=reply.arguments)
            )
        else:
            empty = {"type": "output_text", "text": "", "annotations": []}
            events.append(
                event(
                    "response.output_item.added",
                    output_index=0,
                    item={**item, "status": "in_progress", "content": []},
                )
            )
            events.append(event("response.content_part.added", **at, content_index=0, part=empty))
            for piece in _pieces(reply.text):
                events.append(
                    event(
                        "response.output_text.delta",
                        **at,
                        content_index=0,
                        delta=piece,
                        logprobs=[],
                    )
                )
            done = {"content_index": 0, "text": reply.text, "logprobs": []}
            events.append(event("response.output_text.done", **at, **done))
            events.append(
                event("response.content_part.done", **at, content_index=0, part=item["content"][0])
            )
        events.append(event("response.output_item.done", output_index=0, item=item))
        events.append(event("response.completed", response=response))
        await self._emit(events)

    async def _messages(self, model: str, reply: DemoReply, stream: bool) -> None:
        output = reply.output_tokens
        if reply.tool:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": "toolu_demo" + secrets.token_hex(8),
                "name": reply.tool,
                "input": json.loads(reply.arguments),
            }
        else:
            block = {"type": "text", "text": reply.text}
        usage = {
            "input_tokens": reply.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output,
        }
        message = {
            "id": "msg_demo" + secrets.token_hex(8),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": "tool_use" if reply.tool else "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not stream:
            self.send_json(message)
            return
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**usage, "output_tokens": 1},
        }
        events = [_sse({"type": "message_start", "message": start}, "message_start")]
        if reply.tool:
            opened = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": reply.arguments}]
        else:
            opened = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in _pieces(reply.text)]
        events.append(
            _sse(
                {"type": "content_block_start", "index": 0, "content_block": opened},
                "content_block_start",
            )
        )
        events.append(_sse({"type": "ping"}, "ping"))
        for delta in deltas:
            events.append(
                _sse(
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                    "content_block_delta",
                )
            )
        events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        events.append(
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": output},
                },
                "message_delta",
            )
        )
        events.append(_sse({"type": "message_stop"}, "message_stop"))
        await self._emit(events)

    def get(self, endpoint: str) -> None:
        if endpoint != "models":
            raise GatewayError(404, MSG_NOT_FOUND, {"path": self.request.path})
        self.send_json(
            {
                "object": "list",
                "data": [{"id": "demo", "object": "model", "created": 0, "owned_by": "demo"}],
            }
        )


# ---------------------------------------------------------------------------------------------
# Assets: the dashboard's HTML, CSS and JavaScript
# ---------------------------------------------------------------------------------------------

_PAGE_HEAD = """<!doctype html>
<html lang="{{lang}}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="xsrf" content="{{xsrf}}">
<title>Gateway admin</title>
<style nonce="{{nonce}}">
:root { --ink:#1d2433; --muted:#6b7385; --line:#e4e7ee; --bg:#f5f6fa; --card:#fff;
        --blue:#3b6fe0; --teal:#15a37f; --amber:#e09b1b; --red:#d64545; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--ink); background:var(--bg); }
header { display:flex; align-items:center; gap:12px; padding:14px 24px; background:#1d2433;
         color:#fff; }
header h1 { font-size:17px; margin:0; font-weight:600; }
header .spacer { flex:1; }
main { max-width:1120px; margin:0 auto; padding:20px 24px 40px; }
h2 { font-size:15px; margin:26px 0 10px; color:var(--ink); }
.pill { padding:2px 10px; border-radius:99px; font-size:12px; background:var(--teal); }
.pill.off { background:var(--red); }
button { font:inherit; border:1px solid var(--line); background:#fff; border-radius:6px;
         padding:4px 10px; cursor:pointer; color:var(--ink); }
button:hover { border-color:var(--blue); }
header button { background:transparent; color:#fff; border-color:#4a536a; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit,minmax(220px,1fr)); gap:12px; }
.tile, .card, .panel { background:var(--card); border:1px solid var(--line); border-radius:10px;
                       padding:14px 16px; }
.tile .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.tile .value { font-size:24px; font-weight:600; margin:2px 0 8px; }
.tile .value small { font-size:13px; color:var(--muted); font-weight:400; }
.track { height:10px; background:#edf0f5; border-radius:5px; overflow:hidden; }
.fill { height:100%; width:0; background:var(--blue); border-radius:5px; transition:width .4s; }
.fill.tokens { background:var(--teal); }
.fill.warn { background:var(--amber); } .fill.full { background:var(--red); }
.users { display:grid; grid-template-columns:repeat(auto-fill,minmax(320px,1fr)); gap:12px; }
.card .top { display:flex; align-items:center; gap:8px; margin-bottom:10px; }
.card .name { font-weight:600; font-size:15px; flex:1; overflow:hidden; text-overflow:ellipsis; }
.badge { font-size:11px; padding:1px 8px; border-radius:99px; background:#e3f6ef; color:#0d7a5d; }
.badge.off { background:#fde8e8; color:var(--red); }
.metric { display:grid; grid-template-columns:64px 1fr minmax(96px, auto); align-items:center;
          gap:10px; margin:6px 0; font-size:13px; }
.metric .nums { text-align:right; color:var(--muted); font-variant-numeric:tabular-nums; }
.legend { display:flex; gap:16px; font-size:12px; color:var(--muted); margin-bottom:6px; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px;
            vertical-align:-1px; }
.legend .req { background:var(--blue); } .legend .tok { background:var(--teal); }
svg text { font-size:11px; fill:var(--muted); }
table { width:100%; border-collapse:collapse; font-size:13px; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); }
th { color:var(--muted); font-weight:500; }
td.status { font-weight:600; color:var(--red); }
td.state.resting, .key.resting { color:#b7791f; }
td.state.disabled, .key.disabled { color:var(--red); }
.key button { padding:1px 6px; font-size:11px; }
.spark { display:inline-flex; align-items:flex-end; gap:2px; height:20px; }
.spark i { display:inline-block; width:5px; background:var(--blue); border-radius:1px; }
.cost { color:var(--ink); }
.lang a { margin-left:8px; color:var(--muted); font-size:13px; }
.policy { color:var(--muted); font-size:12px; margin-top:4px; overflow-wrap:anywhere; }
.empty { color:var(--muted); padding:8px 0; }
.login { max-width:360px; margin:12vh auto; }
.login input { width:100%; font:inherit; padding:8px 10px; margin:10px 0;
               border:1px solid var(--line); border-radius:6px; }
.login .error { color:var(--red); min-height:1.4em; }
.login button { width:100%; padding:8px; background:var(--blue); color:#fff; border:0; }
#notice { color:var(--red); }
</style></head>
"""

LOGIN_PAGE = (
    _PAGE_HEAD
    + """<body><main><form class="panel login" method="post" action="/admin/login">
<h2>Gateway admin</h2>
<input type="hidden" name="_xsrf" value="{{xsrf}}">
<label for="key">Admin key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<div class="error">{{message}}</div>
<button type="submit">Log in</button>
</form></main></body></html>
"""
)

DASHBOARD_PAGE = (
    _PAGE_HEAD
    + """<body>
<header><h1>LLM gateway</h1><span id="state" class="pill">…</span>
<span id="notice"></span><span class="spacer"></span><span id="clock"></span>
<nav class="lang"><a href="?lang=en">English</a> <a href="?lang=zh-CN">中文</a></nav>
<form method="post" action="/admin/logout"><input type="hidden" name="_xsrf" value="{{xsrf}}">
<button type="submit">Log out</button></form></header>
<main>
<section class="tiles">
 <div class="tile"><div class="label">Queue</div><div class="value" id="queue">–</div>
  <div class="track"><div class="fill" id="queue-fill"></div></div></div>
 <div class="tile"><div class="label">In flight</div><div class="value" id="inflight">–</div>
  <div class="track"><div class="fill" id="inflight-fill"></div></div></div>
 <div class="tile"><div class="label">Upstream latency (p50 / p95)</div>
  <div class="value" id="latency">–</div>
  <svg id="latency-chart" width="100%" height="34" viewBox="0 0 200 34"
   preserveAspectRatio="none"><polyline id="latency-line" fill="none" stroke="#3b6fe0"
   stroke-width="1.5" points=""/></svg></div>
 <div class="tile"><div class="label">Today, all users</div><div class="value" id="today">–</div>
  <div id="today-tokens" class="label"></div></div>
</section>
<h2>Users today</h2>
<section class="users" id="users"></section>
<h2>Last 14 days</h2>
<section class="panel">
 <div class="legend"><span><i class="req"></i>requests</span>
  <span><i class="tok"></i>tokens</span></div>
 <svg id="history" width="100%" height="230" viewBox="0 0 1060 230"></svg>
</section>
<h2>Models</h2>
<section class="panel"><table><thead><tr><th>Model</th><th>Requests today</th>
<th>Tokens today</th><th>Cost today</th><th>Last 14 days</th></tr></thead>
<tbody id="models"></tbody></table>
<div class="empty" id="no-models">No calls yet.</div></section>
<h2>Upstreams</h2>
<section class="panel"><table><thead><tr><th>Upstream</th><th>State</th><th>Calls</th>
<th>Failures</th><th>Latency</th><th>Last error</th><th>Keys</th></tr></thead>
<tbody id="upstreams"></tbody></table></section>
<h2>Last failed calls</h2>
<section class="panel"><table><thead><tr><th>Time</th><th>User</th><th>Endpoint</th>
<th>Model</th><th>Status</th><th>Reason</th></tr></thead><tbody id="failures"></tbody></table>
<div class="empty" id="no-failures">No failed calls.</div></section>
<h2>Recent changes</h2>
<section class="panel"><table><thead><tr><th>Time</th><th>By</th><th>Action</th>
<th>Target</th><th>Fields</th></tr></thead><tbody id="audit"></tbody></table>
<div class="empty" id="no-audit">No changes recorded.</div></section>
</main>
<script type="application/json" id="i18n">{{i18n}}</script>
<script nonce="{{nonce}}">
"use strict";
const XSRF = document.querySelector('meta[name="xsrf"]').content;
const SVG = "http://www.w3.org/2000/svg";
const latencies = [];
const LANG = document.documentElement.lang;
const T = JSON.parse(document.getElementById("i18n").textContent);
const t = (s) => T[s] || s;
const fmt = (n) => Number(n).toLocaleString(LANG);
function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const k of kids) node.append(k);
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}
function setBar(fill, used, limit) {
  const share = limit > 0 ? Math.min(1, used / limit) : 1;
  fill.style.width = (share * 100).toFixed(1) + "%";
  fill.classList.toggle("warn", share >= 0.8 && share < 1);
  fill.classList.toggle("full", share >= 1);
  fill.dataset.share = share.toFixed(3);
}
function metric(label, kind, used, limit) {
  const fill = el("div", {className: "fill " + kind});
  const row = el("div", {className: "metric " + kind},
    el("span", {textContent: label}), el("div", {className: "track"}, fill),
    el("span", {className: "nums", textContent: fmt(used) + " / " + fmt(limit)}));
  setBar(fill, used, limit);
  return row;
}
async function act(name, action) {
  if (action === "reset" && !confirm(t("Reset today's counters of ") + name + t("?"))) return;
  // The name goes in the body: a path segment "." or ".." would be resolved away by the URL.
  const r = await fetch("/admin/api/users/" + action, {method: "POST",
    headers: {"X-XSRFToken": XSRF, "Content-Type": "application/json"},
    body: JSON.stringify({name: name}), credentials: "same-origin"});
  const body = await r.json().catch(() => ({}));
  document.getElementById("notice").textContent =
    r.ok ? "" : (body.data && body.data.error) || body.message || ("HTTP " + r.status);
  refresh();
}
function drawUsers(users) {
  const box = document.getElementById("users");
  box.replaceChildren(...users.map((u) => {
    const toggle = u.enabled ? "disable" : "enable";
    return el("div", {className: "card"},
      el("div", {className: "top"},
        el("span", {className: "name", textContent: u.name, title: u.name}),
        el("span", {className: "badge" + (u.enabled ? "" : " off"),
                    textContent: t(u.enabled ? "enabled" : "disabled")}),
        el("button", {textContent: t(toggle), onclick: () => act(u.name, toggle)}),
        el("button", {textContent: t("reset today"), onclick: () => act(u.name, "reset")})),
      metric(t("Requests"), "requests", u.requests, u.request_limit),
      metric(t("Tokens"), "tokens", u.tokens, u.token_limit),
      el("div", {className: "policy", textContent: (u.in_flight ? u.in_flight + t(" in flight") +
        (u.held ? ", " + fmt(u.held) + t(" tokens held") : "") + "  " : "") + (u.policy || "")}));
  }));
  for (const [i, card] of [...box.children].entries()) card.dataset.user = users[i].name;
}
function drawHistory(days) {
  const chart = document.getElementById("history");
  const W = 1060, H = 230, left = 56, right = 56, top = 12, bottom = 26;
  const plotW = W - left - right, plotH = H - top - bottom;
  const maxReq = Math.max(1, ...days.map((d) => d.requests));
  const maxTok = Math.max(1, ...days.map((d) => d.tokens));
  const step = plotW / days.length, barW = step * 0.6;
  const kids = [];
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    kids.push(svg("line", {x1: left, x2: W - right, y1: y, y2: y, stroke: "#e4e7ee"}));
    const a = svg("text", {x: left - 6, y: y + 4, "text-anchor": "end"});
    a.textContent = fmt(Math.round(maxReq * f));
    const b = svg("text", {x: W - right + 6, y: y + 4});
    b.textContent = fmt(Math.round(maxTok * f));
    kids.push(a, b);
  }
  const points = [];
  days.forEach((d, i) => {
    const x = left + i * step + (step - barW) / 2;
    const h = plotH * d.requests / maxReq;
    const bar = svg("rect", {x: x, y: top + plotH - h, width: barW, height: h, rx: 2,
                             fill: "#3b6fe0", class: "day"});
    bar.dataset.date = d.date;
    bar.dataset.requests = d.requests;
    const tip = svg("title", {});
    tip.textContent = d.date + ": " + fmt(d.requests) + t(" requests, ") + fmt(d.tokens) +
      t(" tokens");
    bar.append(tip);
    kids.push(bar);
    const ty = top + plotH * (1 - d.tokens / maxTok);
    points.push((x + barW / 2).toFixed(1) + "," + ty.toFixed(1));
    const label = svg("text", {x: x + barW / 2, y: H - 8, "text-anchor": "middle"});
    label.textContent = d.date.slice(5);
    kids.push(label);
  });
  kids.push(svg("polyline", {points: points.join(" "), fill: "none", stroke: "#15a37f",
                             "stroke-width": 2, id: "tokens-line"}));
  chart.replaceChildren(...kids);
}
function drawLive(g) {
  document.getElementById("state").textContent = t(g.status);
  document.getElementById("state").classList.toggle("off", g.status !== "running");
  document.getElementById("queue").replaceChildren(fmt(g.queue_length),
    el("small", {textContent: " / " + fmt(g.queue_size) + t(" waiting")}));
  setBar(document.getElementById("queue-fill"), g.queue_length, g.queue_size);
  document.getElementById("inflight").replaceChildren(fmt(g.in_flight),
    el("small", {textContent: " / " + fmt(g.concurrency) + t(" workers")}));
  setBar(document.getElementById("inflight-fill"), g.in_flight, g.concurrency);
  const ms = (s) => s == null ? "–" : Math.round(s * 1000) + " ms";
  document.getElementById("latency").textContent = ms(g.latency.p50) + " / " + ms(g.latency.p95);
  latencies.push(g.latency.p50 || 0);
  if (latencies.length > 60) latencies.shift();
  const low = Math.min(...latencies), span = Math.max(0.001, Math.max(...latencies) - low);
  document.getElementById("latency-line").setAttribute("points", latencies.map((v, i) =>
    (i * 200 / 59).toFixed(1) + "," + (32 - 30 * (v - low) / span).toFixed(1)).join(" "));
  document.getElementById("today").replaceChildren(fmt(g.today_requests),
    el("small", {textContent: t(" requests")}));
  document.getElementById("today-tokens").textContent = fmt(g.today_tokens) + t(" tokens");
}
async function enableKey(upstream, fingerprint) {
  const r = await fetch("/admin/api/upstreams/enable-key", {method: "POST",
    headers: {"X-XSRFToken": XSRF, "Content-Type": "application/json"},
    body: JSON.stringify({upstream: upstream, key: fingerprint}), credentials: "same-origin"});
  const body = await r.json().catch(() => ({}));
  document.getElementById("notice").textContent =
    r.ok ? "" : (body.data && body.data.error) || body.message || ("HTTP " + r.status);
  refresh();
}
function drawUpstreams(rows) {
  const state = (s, until) => t(s) + (until ? t(" until ") + until.slice(11, 19) : "");
  document.getElementById("upstreams").replaceChildren(...rows.map((u) => {
    const keys = el("td", {});
    for (const k of u.keys) {
      const line = el("div", {className: "key " + k.state,
        textContent: k.fingerprint + ": " + state(k.state, k.resting_until) + ", " +
          fmt(k.calls) + t(" calls") + (k.disabled ? " (" + k.disabled + ")" : "")});
      if (k.state !== "ok") line.append(" ", el("button", {textContent: t("re-enable"),
        onclick: () => enableKey(u.name, k.fingerprint)}));
      keys.append(line);
    }
    const row = el("tr", {},
      el("td", {textContent: u.name, title: u.base_url + " " + u.models.join(", ")}),
      el("td", {className: "state " + u.state, textContent: state(u.state, u.resting_until)}),
      el("td", {textContent: fmt(u.calls) + (u.in_flight ?
        " (" + u.in_flight + t(" now") + ")" : "")}),
      el("td", {textContent: fmt(u.failures)}),
      el("td", {textContent: u.latency_ms ? u.latency_ms + " ms" : "–"}),
      el("td", {textContent: u.last_error || ""}), keys);
    row.dataset.upstream = u.name;
    return row;
  }));
}
function drawFailures(rows) {
  document.getElementById("failures").replaceChildren(...rows.map((f) => el("tr", {},
    el("td", {textContent: (f.time || "").replace("T", " ").slice(0, 19)}),
    el("td", {textContent: f.user || "–"}), el("td", {textContent: f.endpoint}),
    el("td", {textContent: f.model || ""}),
    el("td", {className: "status", textContent: f.status}),
    el("td", {textContent: f.error || ""}))));
  document.getElementById("no-failures").hidden = rows.length > 0;
}
function money(n) {
  return Number(n).toLocaleString(LANG, {maximumFractionDigits: 4}) + " " + COST.currency;
}
let COST = {currency: "", users: {}, models: {}, days: [], history: {}};
function drawModels(cost) {
  COST = cost;
  const today = cost.days.length - 1;
  const names = Object.keys(cost.history).sort();
  document.getElementById("models").replaceChildren(...names.map((m) => {
    const days = cost.history[m];
    const [requests, tokens, spent] = days[today];
    const top = Math.max(1, ...days.map((d) => d[0]));
    const bars = el("span", {className: "spark", title: cost.days.map((d, i) =>
      d + ": " + fmt(days[i][0]) + t(" requests, ") + money(days[i][2])).join("\\n")});
    for (const d of days) {
      const bar = el("i", {});
      bar.style.height = Math.round(2 + 18 * d[0] / top) + "px";  // CSSOM: allowed by the CSP
      bars.append(bar);
    }
    const row = el("tr", {}, el("td", {textContent: m || "–"}),
      el("td", {textContent: fmt(requests)}), el("td", {textContent: fmt(tokens)}),
      el("td", {textContent: money(spent)}), el("td", {}, bars));
    row.dataset.model = m;
    return row;
  }));
  document.getElementById("no-models").hidden = names.length > 0;
}
function drawAudit(rows) {
  document.getElementById("audit").replaceChildren(...rows.map((a) => el("tr", {},
    el("td", {textContent: (a.time || "").replace("T", " ").slice(0, 19)}),
    el("td", {textContent: a.actor || ""}), el("td", {textContent: a.action || ""}),
    el("td", {textContent: a.target || ""}),
    el("td", {textContent: Array.isArray(a.fields) ? a.fields.join(", ") : ""}))));
  document.getElementById("no-audit").hidden = rows.length > 0;
}
async function refresh() {
  let r;
  try { r = await fetch("/admin/api/state", {cache: "no-store", credentials: "same-origin"}); }
  catch (e) { document.getElementById("state").textContent = t("unreachable"); return; }
  if (r.status === 401) { location.reload(); return; }
  const data = (await r.json()).data;
  document.getElementById("clock").textContent = data.now.replace("T", " ").slice(0, 19);
  drawLive(data.gateway);
  drawUsers(data.users);
  drawHistory(data.history);
  drawFailures(data.failures);
  drawUpstreams(data.upstreams);
  drawAudit(data.audit || []);
  drawModels(data.cost);
  for (const card of document.querySelectorAll("#users .card")) {
    const spent = (data.cost.users || {})[card.dataset.user] || 0;
    card.append(el("div", {className: "policy cost",
      textContent: t("Cost today") + ": " + money(spent)}));
  }
  document.body.dataset.loaded = "1";
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
)


# ---------------------------------------------------------------------------------------------
# Administration commands: python gateway.py user … | usage …
# ---------------------------------------------------------------------------------------------

EXIT_OK, EXIT_NOT_FOUND, EXIT_CONFIG = 0, 1, 2


class AdminError(Exception):
    """A command that cannot be done as asked (unknown user, duplicate…): exit status 1."""


USER_POLICY_FIELDS = frozenset(_POLICY_FIELDS | {"group"})


def policy_values(args: argparse.Namespace) -> dict[str, str]:
    """`user policy` options as YAML values for users.yaml (strings quoted as JSON, which
    is YAML too; lists in flow style)."""
    values: dict[str, str] = {}
    for field in ("rpm", "tpm", "max_concurrency", "weight"):
        if getattr(args, field, None) is not None:
            values[field] = str(getattr(args, field))
    for field in ("models", "allow_ips"):
        text = getattr(args, field, None)
        if text is not None:
            items = [i.strip() for i in text.split(",") if i.strip()]
            values[field] = "[" + ", ".join(json.dumps(i) for i in items) + "]"
    for field in ("expires", "token_policy", "group"):
        if getattr(args, field, None) is not None:
            values[field] = json.dumps(getattr(args, field))
    return values


def describe_policy(u: User) -> str:
    p = u.policy
    parts = [
        f"group {u.group or '-'}",
        f"models {','.join(p.models)}",
        f"rpm {p.rpm or '-'}",
        f"tpm {p.tpm or '-'}",
        f"max_concurrency {p.max_concurrency or '-'}",
        f"expires {p.expires or '-'}",
        f"allow_ips {','.join(map(str, p.allow_ips)) or 'any'}",
        f"weight {p.weight}",
        f"token_policy {p.token_policy}",
    ]
    return "; ".join(parts)


def _admin_parser() -> argparse.ArgumentParser:
    # Accepted before or after the action; SUPPRESS keeps a later parser's default from
    # overwriting a value given earlier.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--users-file", help="users file (GATEWAY_USERS_FILE; users.yaml)")
    common.add_argument("--data-dir", help="data directory (GATEWAY_DATA_DIR; data)")
    common.add_argument("--store", help="usage store (GATEWAY_STORE; the data directory)")
    common.add_argument(
        "--timezone", help="IANA zone for 'today', as the gateway's (GATEWAY_TIMEZONE)"
    )
    formats = ("table", "csv", "json")
    top = argparse.ArgumentParser(
        prog="gateway.py", description="Manage users and read usage; see README 'Operating'."
    )
    sub = top.add_subparsers(dest="command", required=True)
    user = sub.add_parser("user", help="manage users in users.yaml", parents=[common])
    actions = user.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user; prints the new key once", parents=[common])
    add.add_argument("name")
    for p in (add, actions.add_parser("limits", help="set daily limits", parents=[common])):
        if p is not add:
            p.add_argument("name")
        p.add_argument("--requests", type=int, help="daily request limit (default: defaults)")
        p.add_argument("--tokens", type=int, help="daily token limit (default: defaults)")
    pol = actions.add_parser(
        "policy",
        help="set or remove a user's policy settings (models, rpm, tpm, …)",
        parents=[common],
    )
    pol.add_argument("name")
    pol.add_argument("--models", help="comma-separated model globs the key may call (gpt-4o*)")
    pol.add_argument("--rpm", type=int, help="requests per rolling minute (0: no limit)")
    pol.add_argument("--tpm", type=int, help="tokens per rolling minute (0: no limit)")
    pol.add_argument("--max-concurrency", type=int, help="calls in flight at once (0: no limit)")
    pol.add_argument("--expires", help="the key stops working after this day, YYYY-MM-DD")
    pol.add_argument("--allow-ips", help="comma-separated addresses or networks (10.0.0.0/8)")
    pol.add_argument("--weight", type=int, help="share of the workers when calls wait (1-1000)")
    pol.add_argument("--token-policy", choices=TOKEN_POLICIES, help="admit, reserve or strict")
    pol.add_argument("--group", help="the user's group (from groups: in users.yaml)")
    pol.add_argument(
        "--unset",
        action="append",
        default=[],
        choices=sorted(USER_POLICY_FIELDS),
        metavar="FIELD",
        help="remove a setting, so the group's or defaults' applies (repeatable)",
    )
    lst = actions.add_parser("list", help="users, limits and today's usage", parents=[common])
    lst.add_argument("--format", choices=formats, default="table")
    for action, text in (
        ("disable", "refuse the user's key (401) until enabled"),
        ("enable", "accept the user's key again"),
        ("rotate", "new key (printed once); the old one stops working"),
        ("remove", "delete the user from users.yaml (their usage records stay)"),
        ("reset", "zero today's counters (calls in flight are still charged)"),
    ):
        actions.add_parser(action, help=text, parents=[common]).add_argument("name")
    usage = sub.add_parser("usage", help="requests and tokens per user per day", parents=[common])
    when = usage.add_mutually_exclusive_group()
    when.add_argument("--date", help="one day, YYYY-MM-DD")
    when.add_argument("--days", type=int, default=None, help="the last N days up to today (1)")
    when.add_argument("--month", help="one month, YYYY-MM")
    when.add_argument("--from", dest="start", help="from this day, YYYY-MM-DD (with --to)")
    usage.add_argument("--to", dest="end", help="to this day, YYYY-MM-DD (default: today)")
    usage.add_argument(
        "--by",
        default="",
        help="group by user, model, day, comma-separated (e.g. user,model); from the call log, "
        "with cost",
    )
    usage.add_argument("--user", help="only this user")
    usage.add_argument("--format", choices=formats, default="table")
    audit = sub.add_parser(
        "audit", help="the latest administrators' changes (data/audit/)", parents=[common]
    )
    audit.add_argument("--days", type=int, default=7, help="the last N days (7)")
    audit.add_argument("--limit", type=int, default=100, help="at most N entries (100)")
    audit.add_argument("--format", choices=formats, default="table")
    return top


def _emit(rows: list[dict[str, Any]], fmt: str, columns: list[str]) -> str:
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False, indent=2)
    rows = [
        {k: ("yes" if v else "no") if type(v) is bool else v for k, v in r.items()} for r in rows
    ]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    cells = [columns] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(
            v.rjust(w) if i else v.ljust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


_LIST_COLUMNS = (
    "name",
    "enabled",
    "requests_today",
    "request_limit",
    "requests_left",
    "tokens_today",
    "token_limit",
    "tokens_left",
    "policy",
)


def policy_summary(user: User) -> str:
    """A user's policy in one short line, for `user list` and the dashboard (defaults left out)."""
    p, default = user.policy, Policy()
    parts = [f"group={user.group}"] if user.group else []
    if p.models != default.models:
        parts.append("models=" + ",".join(p.models))
    parts += [f"{k}={getattr(p, k)}" for k in ("rpm", "tpm", "max_concurrency") if getattr(p, k)]
    if p.expires:
        parts.append(f"expires={p.expires.isoformat()}")
    if p.allow_ips:
        parts.append("allow_ips=" + ",".join(map(str, p.allow_ips)))
    if p.weight != 1:
        parts.append(f"weight={p.weight}")
    if p.token_policy != default.token_policy:
        parts.append(f"token_policy={p.token_policy}")
    return " ".join(parts)


class Admin:
    """The `user` and `usage` commands, on the same files a running gateway uses."""

    def __init__(self, users_file: str, data_dir: str, timezone: str, store: str = "") -> None:
        self.users_file = users_file
        self.clock = DayClock(Config(timezone=timezone).tz())
        self.store = open_store(store, data_dir, self.clock)
        self.audit = AuditLog(data_dir, self.clock)
        self._opened = False

    async def _open(self) -> UsageStore:
        """The store, connected if it is a network one (the file store needs no start: a
        command takes no owner lock and writes only what it changes)."""
        if not self._opened and not isinstance(self.store, JournalStore):
            await self.store.start()
        self._opened = True
        return self.store

    async def close(self) -> None:
        if self._opened and not isinstance(self.store, JournalStore):
            await self.store.close()

    def _users(self) -> dict[str, User]:
        try:
            text = Path(self.users_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {self.users_file}: {e}") from None
        try:
            return parse_users(text, demo=True)
        except ConfigError as e:
            raise ConfigError(f"{self.users_file}: {e}") from None

    def _edit(self, name: str, change: Callable[[UsersEdit], None]) -> dict[str, User]:
        def checked(edit: UsersEdit) -> None:
            if name not in edit.names():
                raise AdminError(f"no user {name!r} in {self.users_file}")
            change(edit)

        return edit_users_file(self.users_file, checked)

    def add(self, name: str, requests: int | None, tokens: int | None) -> str:
        if not valid_name(name):
            raise ConfigError(f"user name {name!r}: 1-64 printable characters, no quotes")
        key = new_api_key()
        fields = {"api_key_sha256": key_digest(key)}
        if requests is not None:
            fields["daily_request_limit"] = str(_limit(requests, "--requests"))
        if tokens is not None:
            fields["daily_token_limit"] = str(_limit(tokens, "--tokens"))

        def change(edit: UsersEdit) -> None:
            if name in edit.names():
                raise AdminError(f"user {name!r} already exists in {self.users_file}")
            edit.add(name, fields)

        edit_users_file(self.users_file, change)
        return key

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._edit(name, lambda e: e.set(name, "enabled", "true" if enabled else "false"))

    def limits(self, name: str, requests: int | None, tokens: int | None) -> User:
        if requests is None and tokens is None:
            raise ConfigError("give --requests N, --tokens N or both")

        def change(edit: UsersEdit) -> None:
            if requests is not None:
                edit.set(name, "daily_request_limit", str(_limit(requests, "--requests")))
            if tokens is not None:
                edit.set(name, "daily_token_limit", str(_limit(tokens, "--tokens")))

        return self._edit(name, change)[name]

    def policy(self, name: str, values: dict[str, str], unset: list[str]) -> User:
        """Set (as YAML values) and remove a user's policy settings; the file is checked as
        a whole before it is written (unknown group, bad glob, bad network…)."""
        if not values and not unset:
            raise ConfigError("give a setting to change (--rpm, --models, … or --unset FIELD)")
        both = sorted(values.keys() & set(unset))
        if both:
            raise ConfigError(f"{', '.join(both)}: set and unset at once")

        def change(edit: UsersEdit) -> None:
            for field, value in values.items():
                edit.set(name, field, value)
            for field in unset:
                edit.unset(name, field)

        return self._edit(name, change)[name]

    def remove(self, name: str) -> None:
        self._edit(name, lambda e: e.remove(name))

    def rotate(self, name: str) -> str:
        key = new_api_key()
        self._edit(name, lambda e: e.set(name, "api_key_sha256", key_digest(key), "api_key"))
        return key

    async def reset(self, name: str) -> Counts:
        if name not in self._users():
            raise AdminError(f"no user {name!r} in {self.users_file}")
        store = await self._open()
        return await store.reset(name, self.clock.today())

    async def list_rows(self) -> list[dict[str, Any]]:
        counts = await (await self._open()).all_counts(self.clock.today())
        rows = []
        for u in self._users().values():
            c = counts.get(u.name, Counts())
            requests_left, tokens_left = remaining(u, c)
            rows.append(
                {
                    "name": u.name,
                    "enabled": u.enabled,
                    "requests_today": c.requests + c.reserved,
                    "request_limit": u.daily_request_limit,
                    "requests_left": requests_left,
                    "tokens_today": c.tokens,
                    "token_limit": u.daily_token_limit,
                    "tokens_left": tokens_left,
                    "policy": policy_summary(u),
                }
            )
        return rows

    async def usage_rows(self, days: list[str], user: str | None) -> list[dict[str, Any]]:
        rows = []
        store = await self._open()
        for day in days:
            for name, (requests, tokens) in sorted((await store.usage(day)).items()):
                if user is None or name == user:
                    rows.append({"date": day, "user": name, "requests": requests, "tokens": tokens})
        return rows

    def span(self, args: argparse.Namespace) -> list[str]:
        """The days a `usage` command asks for: --date, --days, --month or --from/--to."""
        today = date.fromisoformat(self.clock.today())
        try:
            if args.month:
                first = date.fromisoformat(args.month + "-01")
                nxt = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
                last = min(nxt - timedelta(days=1), today)
            elif args.start:
                first = date.fromisoformat(args.start)
                last = date.fromisoformat(args.end) if args.end else today
            else:
                return self.days(args.date, args.days or 1)
        except ValueError:
            raise ConfigError("--month is YYYY-MM, --from and --to YYYY-MM-DD") from None
        if not 0 <= (last - first).days <= 3660:
            raise ConfigError("the span must run forwards, at most 3660 days")
        return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]

    def report_rows(self, days: list[str], by: list[str], user: str | None) -> list[dict[str, Any]]:
        """Charged calls from the call log (data/calls/), grouped: requests, tokens, cost
        (the sum of the priced calls) and how many calls had no price."""
        log_ = CallLog(str(self.audit.dir.parent), self.clock)
        groups: dict[tuple[str, ...], Tally] = {}
        for day in days:
            for line in log_.read(day):
                if not charged_line(line) or (user is not None and line["user"] != user):
                    continue
                key = tuple(day if b == "day" else str(line.get(b) or "") for b in by)
                groups.setdefault(key, Tally()).add(line)
        return [
            {
                **dict(zip(by, key, strict=True)),
                "requests": t.requests,
                "tokens": t.tokens,
                "cost": round(t.cost, 6),
                "unpriced": t.unpriced,
            }
            for key, t in sorted(groups.items())
        ]

    def days(self, on: str | None, last: int) -> list[str]:
        if on is not None:
            try:
                return [date.fromisoformat(on).isoformat()]
            except ValueError:
                raise ConfigError(f"--date {on!r} is not YYYY-MM-DD") from None
        if not 1 <= last <= 3660:
            raise ConfigError("--days must be 1..3660")
        today = date.fromisoformat(self.clock.today())
        return [(today - timedelta(days=n)).isoformat() for n in range(last - 1, -1, -1)]


def admin_main(argv: list[str], env: dict[str, str]) -> int:
    """Run one administration command; exit 0 done, 1 not found or duplicate, 2 bad input."""
    args = _admin_parser().parse_args(argv)
    given = vars(args)
    out = sys.stdout
    try:
        admin = Admin(
            given.get("users_file") or env.get("GATEWAY_USERS_FILE") or Config.users_file,
            given.get("data_dir") or env.get("GATEWAY_DATA_DIR") or Config.data_dir,
            given.get("timezone") or env.get("GATEWAY_TIMEZONE") or Config.timezone,
            given.get("store") or env.get("GATEWAY_STORE") or Config.store,
        )

        def run(work: Awaitable[Any]) -> Any:
            async def once() -> Any:
                try:
                    return await work
                finally:
                    await admin.close()

            return asyncio.run(once())

        if args.command == "audit":
            entries = admin.audit.recent(max(1, args.limit), max(1, args.days))
            rows = [
                {**e, "fields": ",".join(e["fields"]) if isinstance(e.get("fields"), list) else ""}
                for e in entries
            ]
            print(_emit(rows, args.format, ["time", "actor", "action", "target", "fields"]))
            return EXIT_OK
        if args.command == "usage":
            days = admin.span(args)
            if args.by:
                by = [b.strip() for b in args.by.split(",") if b.strip()]
                if not by or set(by) - {"user", "model", "day"} or len(set(by)) != len(by):
                    raise ConfigError("--by takes user, model and day, comma-separated")
                rows = admin.report_rows(days, by, args.user)
                columns = [*by, "requests", "tokens", "cost", "unpriced"]
                print(_emit(rows, args.format, columns), file=out)
                return EXIT_OK
            rows = run(admin.usage_rows(days, args.user))
            costs = {
                (r["day"], r["user"]): r["cost"]
                for r in admin.report_rows(days, ["day", "user"], args.user)
            }
            for row in rows:
                row["cost"] = costs.get((row["date"], row["user"]), 0.0)
            columns = ["date", "user", "requests", "tokens", "cost"]
            print(_emit(rows, args.format, columns), file=out)
            return EXIT_OK
        action, name = args.action, str(getattr(args, "name", ""))
        if action == "add":
            key = admin.add(name, args.requests, args.tokens)
            print(f"added user {name!r}; their API key (shown only now):", file=sys.stderr)
            print(key, file=out)
        elif action == "rotate":
            key = admin.rotate(name)
            print(f"new API key for {name!r} (the old one stops working):", file=sys.stderr)
            print(key, file=out)
        elif action in ("disable", "enable"):
            admin.set_enabled(name, action == "enable")
            print(f"user {name!r} {action}d", file=out)
        elif action == "remove":
            admin.remove(name)
            print(f"user {name!r} removed", file=out)
        elif action == "limits":
            u = admin.limits(name, args.requests, args.tokens)
            print(
                f"user {name!r}: {u.daily_request_limit} requests, "
                f"{u.daily_token_limit} tokens a day",
                file=out,
            )
        elif action == "policy":
            values = policy_values(args)
            u = admin.policy(name, values, args.unset)
            print(f"user {name!r}: {describe_policy(u)}", file=out)
        elif action == "reset":
            before = run(admin.reset(name))
            print(
                f"user {name!r}: today's counters reset "
                f"(were {before.requests} requests, {before.tokens} tokens)",
                file=out,
            )
        else:
            columns = list(_LIST_COLUMNS)
            print(_emit(run(admin.list_rows()), args.format, columns), file=out)
        if action != "list":
            details: dict[str, Any] = {}
            if action in ("add", "limits"):
                details["fields"] = [
                    f
                    for f, v in (
                        ("daily_request_limit", args.requests),
                        ("daily_token_limit", args.tokens),
                    )
                    if v is not None
                ] + (["api_key"] if action == "add" else [])
            elif action == "rotate":
                details["fields"] = ["api_key"]
            elif action == "policy":
                details["fields"] = sorted([*policy_values(args), *args.unset])
            admin.audit.write(audit_actor(), f"user {action}", name, **details)
    except AdminError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (ConfigError, StoreError) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


async def check_upstreams(config: Config, spec: RoutingSpec) -> list[dict[str, Any]]:
    """Ask every upstream for its model list with each of its keys (16 at a time); one row
    per key, naming it by fingerprint."""
    router = Router(spec, config, Redactor(config.secrets() + routing_secrets(spec)))
    gate = asyncio.Semaphore(16)

    async def one(ch: Channel, key: KeyState | None) -> dict[str, Any]:
        row: dict[str, Any] = {"upstream": ch.name, "key": key.fingerprint if key else "-"}
        if key is None:
            return {**row, "result": "failed", "status": "", "models": "", "error": "no key"}
        headers = {**ch.headers}
        if ch.spec.api == API_ANTHROPIC:
            headers["anthropic-version"] = "2023-06-01"
        async with gate:
            t0 = time.monotonic()
            try:
                doc = await ch.client.get_json("/models", key.secret, headers)
            except UpstreamFailure as e:
                return {
                    **row,
                    "result": "failed",
                    "status": e.status or "",
                    "models": "",
                    "error": e.error,
                }
        data = doc.get("data")
        count = len(data) if isinstance(data, list) else 0
        ms = round((time.monotonic() - t0) * 1000)
        return {**row, "result": "ok", "status": 200, "models": count, "error": f"{ms} ms"}

    try:
        return list(
            await asyncio.gather(
                *(
                    one(ch, k)
                    for ch in router.channels.values()
                    for k in (list[KeyState | None](ch.keys) or [None])
                )
            )
        )
    finally:
        router.close()


def upstreams_main(argv: list[str], env: dict[str, str]) -> int:
    """`python gateway.py upstreams check`: exit 0 when every key of every upstream works."""
    parser = argparse.ArgumentParser(
        prog="gateway.py upstreams",
        description="Check each upstream and key of upstreams.yaml (or the command line's "
        "upstream) by asking for its model list. Gateway options (--upstreams-file, "
        "--users-file, --upstream-base-url, ...) are accepted as for the server.",
    )
    parser.add_argument("action", choices=["check"])
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args, rest = parser.parse_known_args(argv)
    try:
        config = parse_config(rest, env)
        spec = RoutingFile(str(config.routing_file()), config, env).load()
    except (ConfigError, tornado.options.Error) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return EXIT_CONFIG
    rows = asyncio.run(check_upstreams(config, spec))
    columns = ["upstream", "key", "result", "status", "models", "error"]
    print(_emit(rows, args.format, columns))
    return EXIT_OK if all(r["result"] == "ok" for r in rows) else EXIT_NOT_FOUND


# ---------------------------------------------------------------------------------------------
# Main: routes, the HTTP server, the running service, the command line
# ---------------------------------------------------------------------------------------------


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log: method, path (never the query string), status, user, time.

    Also the call log's entry for a relay request that ended before being charged.
    """
    status = handler.get_status()
    rec = getattr(handler, "record", None)
    if rec is not None and not rec.written:
        rec.status = rec.status or status
        cast(BaseHandler, handler).service.record_call(rec)
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not tornado.log.access_log.isEnabledFor(level):
        return
    user = getattr(handler, "user", None)
    stranger = not getattr(handler, "identified", False)
    tornado.log.access_log.log(
        level,
        "%d %s %s user=%s %.1fms",
        status,
        handler.request.method,
        handler.request.path,
        user.name if user else "-",
        1000.0 * handler.request.request_time(),
        # Requests without a valid key or admin login: their lines are rate-limited (LogGuard).
        extra={"stranger": stranger},
    )


def make_app(service: Service) -> tornado.web.Application:
    """The routes; every handler gets the Service (users, store, queue, upstream) injected."""
    deps = {"service": service}
    routes: list[Any] = [
        (r"/api/call(?:\.php)?", CallHandler, deps),
        (r"/api/status(?:\.php)?", StatusHandler, deps),
        (
            r"/v1/chat/completions",
            OpenAIRelayHandler,
            {**deps, "path": "/chat/completions", "validate": validate_chat_stream},
        ),
        (
            r"/v1/completions",
            OpenAIRelayHandler,
            {**deps, "path": "/completions", "validate": validate_completion},
        ),
        (
            r"/v1/embeddings",
            OpenAIRelayHandler,
            {**deps, "path": "/embeddings", "validate": validate_embedding},
        ),
        (
            r"/v1/responses",
            OpenAIRelayHandler,
            {**deps, "path": "/responses", "validate": validate_responses, "api": API_RESPONSES},
        ),
        (
            r"/v1/messages",
            AnthropicHandler,
            {**deps, "path": "/messages", "validate": validate_messages, "api": API_ANTHROPIC},
        ),
        (
            r"/v1/messages/count_tokens",
            CountTokensHandler,
            {**deps, "path": "/messages/count_tokens", "validate": validate_count_tokens},
        ),
        *(
            # Azure OpenAI's paths (its SDK, with an `api-key` header): the deployment is the model.
            (
                rf"/(?:v1|openai)/deployments/([^/]+)/{name}",
                OpenAIRelayHandler,
                {**deps, "path": f"/{name}", "validate": validate},
            )
            for name, validate in (
                ("chat/completions", validate_chat_stream),
                ("completions", validate_completion),
                ("embeddings", validate_embedding),
            )
        ),
        (r"/v1/models", ModelsHandler, deps),
        (r"/v1/models/(.+)", ModelsHandler, deps),
        (r"/v1/messages/.*", AnthropicNotFoundHandler, deps),
        (r"/(?:v1|openai)/.*", OpenAINotFoundHandler, deps),
        (r"/metrics", MetricsHandler, deps),
        (r"/admin/?", AdminPageHandler, deps),
        (r"/admin/login", AdminLoginHandler, deps),
        (r"/admin/logout", AdminLogoutHandler, deps),
        (r"/admin/api/state", AdminStateHandler, deps),
        (r"/admin/api/users/(enable|disable|reset)", AdminActionHandler, deps),
        (r"/admin/api/upstreams/enable-key", UpstreamKeyHandler, deps),
        (r"/admin/api/users/([^/]+)/(enable|disable|reset)", AdminActionHandler, deps),
    ]
    if service.config.demo:
        routes.append(
            (
                r"/demo/v1/(chat/completions|completions|embeddings|responses|models)",
                DemoModelHandler,
                deps,
            )
        )
        routes.append(
            (r"/demo/anthropic/v1/(messages|messages/count_tokens)", DemoModelHandler, deps)
        )
    routes.append((r".*", NotFoundHandler, deps))
    return tornado.web.Application(
        routes,
        log_function=log_request,
        compress_response=False,
        cookie_secret=admin_cookie_secret(service.config.admin_key),
        xsrf_cookie_kwargs={"httponly": True, "samesite": "Strict"},
    )


_BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_MALFORMED = "malformed HTTP request"
_JSON_400 = {  # by the path's API: Anthropic's, OpenAI's, else the contract's envelope
    "/v1/messages": _compact(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": f"{MSG_BAD_REQUEST}: {_MALFORMED}",
                "code": "invalid_request",
            },
        }
    ),
    "/v1/": _compact(
        {
            "error": {
                "message": f"{MSG_BAD_REQUEST}: {_MALFORMED}",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request",
            }
        }
    ),
    "": _compact(envelope(False, MSG_BAD_REQUEST, {"error": _MALFORMED})),
}


class _JSONErrorStream(tornado.iostream.IOStream):
    """A connection whose one non-JSON answer, Tornado's bare 400 for a request it cannot
    parse (bad chunked encoding, invalid header, bad Content-Length), is sent as JSON, in the
    error shape of the API its request line named."""

    _path = b""

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Any:
        read = cast("asyncio.Future[bytes]", super().read_until_regex(regex, max_bytes))
        read.add_done_callback(self._note_path)  # Tornado reads each header block this way
        return read

    def _note_path(self, read: asyncio.Future[bytes]) -> None:
        if not read.cancelled() and read.exception() is None:
            parts = read.result().lstrip(b"\r\n").split(b"\r\n", 1)[0].split(b" ")
            self._path = parts[1][:200] if len(parts) > 1 else b""

    def write(self, data: bytes | memoryview) -> asyncio.Future[None]:
        if data == _BARE_400:
            path = self._path.decode("latin-1")
            body = next(v for k, v in _JSON_400.items() if path.startswith(k))
            data = (
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=utf-8\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        return super().write(data)


class HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's server, with malformed requests answered in JSON (see _JSONErrorStream)."""

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        if type(stream) is tornado.iostream.IOStream:
            stream.__class__ = _JSONErrorStream  # the same object: only write() differs
        super().handle_stream(stream, address)


class Gateway:
    """The running process: users, store, the Service, the HTTP server and periodic chores."""

    def __init__(self, config: Config, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = DayClock(config.tz(), now)
        self.users = UserDirectory(config.users_file, demo=config.demo)
        self.routing = RoutingFile(str(config.routing_file()), config, os.environ)
        self.store = open_store(config.store, config.data_dir, self.clock, fsync=config.fsync)
        self.service: Service | None = None
        self.server: tornado.httpserver.HTTPServer | None = None
        self.port = config.port
        self._chores: list[asyncio.Task[None]] = []
        self._pruned = ""  # the day retention last ran

    async def start(self, sockets: list[Any] | None = None) -> None:
        """Load users, open the store, start workers and listen (on `sockets` if given)."""
        config = self.config
        LOG_GUARD.install(Redactor(config.secrets()))
        self.users.load()
        await self.store.start()
        if sockets is None:
            sockets = tornado.netutil.bind_sockets(config.port, config.host, backlog=1024)
        self.port = sockets[0].getsockname()[1]
        if config.demo:
            host = config.host if config.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            config = dataclasses.replace(
                config,
                upstream_base_url=f"http://{host}:{self.port}/demo/v1",
                upstream_api_key="demo-upstream",
                anthropic_base_url=f"http://{host}:{self.port}/demo/anthropic/v1",
                anthropic_api_key="demo-upstream",
            )
        routing = None
        if config.demo:
            if self.routing.path.exists():
                log.warning("--demo: %s is not used; the demo model answers", self.routing.path)
        else:
            routing = self.routing.load()
            LOG_GUARD.install(Redactor(config.secrets() + routing_secrets(routing)))
        self.service = Service(config, self.users, self.store, self.clock, routing)
        self.service.queue.start()
        self.service.alerts.start()
        self.server = HTTPServer(
            make_app(self.service),
            xheaders=config.xheaders,
            # Each route bounds its own body (BaseHandler) and answers in JSON; Tornado's own
            # limit would answer a bare 400 first.
            max_body_size=1 << 62,
            max_header_size=4 * MAX_HEADER_BYTES,
            idle_connection_timeout=config.idle_timeout,
            body_timeout=config.body_timeout,
        )
        self.server.add_sockets(sockets)
        self._chores = [
            asyncio.ensure_future(self._every(config.reload_interval, self._reload_users)),
            asyncio.ensure_future(self._every(2.0, self._maintain)),
        ]
        if config.processes != 1:
            service = self.service

            async def publish() -> None:
                service.publish_figures()

            self._chores.append(asyncio.ensure_future(self._every(Service.LIVE_SECONDS, publish)))
        await self._maintain()

    @staticmethod
    async def _every(seconds: float, chore: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await chore()
            except Exception:
                log.exception("periodic task failed")

    async def _reload_users(self) -> None:
        before = dict(self.users.by_name)
        if self.users.reload_if_changed() and self.service is not None:
            for change in user_changes(before, self.users.by_name):
                self.service.audit.write("file", file=self.config.users_file, **change)
        if self.service is not None and not self.config.demo:
            routing = self.routing.changed()
            if routing is not None:
                previous = self.service.router.spec
                self.service.install_routing(routing)
                for change in upstream_changes(previous, routing):
                    self.service.audit.write("file", file=str(self.routing.path), **change)

    async def _maintain(self) -> None:
        LOG_GUARD.flush()
        today = self.clock.today()
        try:
            await self.store.maintain(today)
        except StoreError as e:
            log.error("usage store: %s", e)
        if self.config.retention_days and self._pruned != today:
            self._pruned = today
            keep = self.config.retention_days
            removed = await self.store.prune(keep, today)
            removed += prune_call_logs(self.config.data_dir, keep, today)
            for path in removed:
                log.info("retention: deleted %s", path)

    async def stop(self) -> None:
        """Stop accepting, finish queued and in-flight calls, write counters."""
        assert self.server is not None and self.service is not None
        self.server.stop()
        self.service.stopping = True
        try:
            await asyncio.wait_for(self._drain(), self.config.shutdown_timeout)
        except TimeoutError:
            log.warning("shutdown timeout: %d calls still running", self.service.active)
        for task in self._chores:
            task.cancel()
        await self.store.close()
        self.service.calls.close()
        self.service.router.close()
        await self.service.alerts.stop()
        await self.server.close_all_connections()

    async def _drain(self) -> None:
        assert self.service is not None
        await self.service.queue.drain()
        await self.service.idle.wait()


async def serve(config: Config, sockets: list[Any] | None = None) -> None:
    # Signals first: a SIGTERM that arrives while starting still stops the gateway cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(config)
    await gateway.start(sockets)
    # Objects from start-up (modules, users) live as long as the process: frozen, full
    # collections skip them. With a larger young generation, collections run less often; a
    # full one with 2,000 open streams took 100-200 ms before.
    gc.freeze()
    gc.set_threshold(5_000, 10, 10)
    log.info(
        "gateway listening on http://%s:%d (%d users, upstream %s%s)",
        config.host,
        gateway.port,
        len(gateway.users),
        "demo mock model" if config.demo else config.upstream_base_url,
        "" if config.demo or config.upstream_api_key else ", NO UPSTREAM KEY",
    )
    await stop.wait()
    log.info("stopping: finishing queued and in-flight calls")
    await gateway.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("user", "usage", "audit"):
        return admin_main(argv, dict(os.environ))
    if argv and argv[0] == "upstreams":
        return upstreams_main(argv[1:], dict(os.environ))
    try:
        config = parse_config(argv, dict(os.environ))
    except (ConfigError, tornado.options.Error) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    if config.processes != 1:
        return supervise(config)
    try:
        asyncio.run(serve(config))
    except (ConfigError, StoreError) as e:
        log.error("cannot start: %s", e)
        return 2
    return 0


def supervise(config: Config) -> int:
    """--processes=N: bind the port once, fork N serving processes on it (each a whole
    gateway on the same users, store and data dir), start a new one when one dies, and on
    SIGTERM or SIGINT pass the signal on and wait until every one has drained."""
    count = config.processes or os.cpu_count() or 1
    sockets = tornado.netutil.bind_sockets(config.port, config.host, backlog=1024)
    children: dict[int, int] = {}  # pid -> slot
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: serve until told to stop
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                asyncio.run(serve(config, sockets))
            except (ConfigError, StoreError) as e:
                log.error("cannot start: %s", e)
                code = 2
            except BaseException:
                log.exception("serving process %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = slot

    def forward(sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in range(count):
        spawn(slot)
    log.info("supervising %d serving processes on port %d", count, config.port)
    code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        slot = children.pop(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        if exit_code == 2:  # a configuration or store problem: another try would fail too
            code = 2
            forward(signal.SIGTERM, None)
            continue
        log.error("serving process %d exited (%s); starting another", pid, exit_code)
        time.sleep(0.2)
        spawn(slot)
    return code


if __name__ == "__main__":
    sys.exit(main())
