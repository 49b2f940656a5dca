"""Model-based test: random sequences of calls, failures, disconnects, restarts, crashes, new
days, users.yaml edits and admin resets; after every step the gateway's counters, its usage
report and its call log equal a simple model's."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web
from conftest import UPSTREAM_KEY, Clock, FakeUpstream, serve_fake, users_yaml
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import gateway

USERS = ("alice", "bob", "carol")
TOKENS_PER_CALL = 15
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def key_of(user: str) -> str:
    return f"sk-model-{user}-0123456789"


class GatewayModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.tmp = Path(tempfile.mkdtemp(prefix="gw-model-"))
        self.clock = Clock()
        self.limits = {"alice": [3, 10**6], "bob": [6, 10**6], "carol": [100, 40]}
        self.used: dict[str, dict[str, list[int]]] = {}  # day -> user -> [requests, tokens]
        self.spent: dict[str, dict[str, list[int]]] = {}  # the same, never reset
        self.write_users()
        self.fake = FakeUpstream()
        self.run(self._start_upstream())
        self.http = self.run(self._client())
        self.gw: gateway.Gateway | None = None
        self.run(self._start_gateway())

    # ------------------------------------------------------------ plumbing

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    async def _client(self) -> tornado.httpclient.AsyncHTTPClient:
        return tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=50)

    async def _start_upstream(self) -> None:
        serve_fake(self.fake)

    async def _start_gateway(self) -> None:
        config = gateway.Config(
            host="127.0.0.1",
            users_file=str(self.tmp / "users.yaml"),
            data_dir=str(self.tmp / "data"),
            upstream_base_url=self.fake.url,
            upstream_api_key=UPSTREAM_KEY,
            timezone="Asia/Shanghai",
            reload_interval=0.05,
            http_client="simple",
        )
        self.gw = gateway.Gateway(config, now=self.clock)
        sock, _ = tornado.testing.bind_unused_port("127.0.0.1")
        await self.gw.start(sockets=[sock])

    def write_users(self) -> None:
        users = {
            u: {"api_key": key_of(u), "daily_request_limit": r, "daily_token_limit": t}
            for u, (r, t) in self.limits.items()
        }
        (self.tmp / "users.yaml").write_text(users_yaml(users))

    def today(self) -> dict[str, list[int]]:
        assert self.gw is not None
        return self.used.setdefault(self.gw.clock.today(), {u: [0, 0] for u in USERS})

    async def _call(self, user: str) -> int:
        assert self.gw is not None
        resp = await self.http.fetch(
            f"http://127.0.0.1:{self.gw.port}/api/call.php",
            method="POST",
            body=BODY,
            headers={"X-API-Key": key_of(user)},
            raise_error=False,
        )
        return resp.code

    async def _calls(self, user: str, n: int) -> list[int]:
        return list(await asyncio.gather(*(self._call(user) for _ in range(n))))

    def admissible(self, user: str, n: int) -> int:
        """How many of n simultaneous calls the rules admit."""
        requests, tokens = self.today()[user]
        request_limit, token_limit = self.limits[user]
        if tokens >= token_limit:
            return 0
        return max(0, min(n, request_limit - requests))

    def spent_today(self) -> dict[str, list[int]]:
        assert self.gw is not None
        return self.spent.setdefault(self.gw.clock.today(), {u: [0, 0] for u in USERS})

    def charge(self, user: str, calls: int) -> None:
        for table in (self.today(), self.spent_today()):
            table[user][0] += calls
            table[user][1] += calls * TOKENS_PER_CALL

    # ------------------------------------------------------------ rules

    @rule(user=st.sampled_from(USERS), n=st.integers(1, 6))
    def calls_at_once(self, user: str, n: int) -> None:
        expected = self.admissible(user, n)
        # "At once": every call is admitted before any is charged. Without a delay, a busy
        # machine may finish the first calls before the last are read, and the token limit
        # (checked at admission) would then refuse those: right, but not what the model says.
        self.fake.delay = 0.1
        try:
            codes = self.run(self._calls(user, n))
        finally:
            self.fake.delay = 0.0
        assert codes.count(200) == expected, (user, n, codes)
        assert codes.count(429) == n - expected
        self.charge(user, expected)

    @rule(user=st.sampled_from(USERS), n=st.integers(1, 3))
    def upstream_fails(self, user: str, n: int) -> None:
        # At once, as in calls_at_once: a failure that came back before the last call was
        # read would free its slot for that call (right, but not what the model says).
        self.fake.status, self.fake.delay = 503, 0.1
        try:
            codes = self.run(self._calls(user, n))
        finally:
            self.fake.status, self.fake.delay = 200, 0.0
        expected = self.admissible(user, n)
        assert codes.count(502) == expected
        assert codes.count(429) == n - expected

    @rule(user=st.sampled_from(USERS))
    def client_leaves_mid_call(self, user: str) -> None:
        """The client disconnects while the upstream works: charged when the upstream answers."""
        assert self.gw is not None
        expected = self.admissible(user, 1)
        self.fake.delay = 0.15

        async def leave() -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", self.gw.port)  # type: ignore[union-attr]
            writer.write(
                b"POST /api/call.php HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                + key_of(user).encode()
                + b"\r\nContent-Length: %d\r\n\r\n" % len(BODY)
                + BODY
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            # The upstream answers (0.15 s) and the gateway settles: wait until no call is left.
            await asyncio.sleep(0.1)
            for _ in range(250):
                if not self.gw.service.active:  # type: ignore[union-attr]
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("the abandoned call did not finish")

        self.run(leave())
        self.fake.delay = 0.0
        self.charge(user, expected)

    @rule()
    def restart(self) -> None:
        assert self.gw is not None
        self.run(self.gw.stop())
        self.run(self._start_gateway())

    @rule()
    def crash(self) -> None:
        """As kill -9: no drain, no snapshot, the process's owner lock dropped by the kernel."""
        gw = self.gw
        assert gw is not None and gw.server is not None
        gw.server.stop()
        self.run(gw.server.close_all_connections())
        assert gw.service is not None
        for task in [*gw._chores, *gw.service.queue._workers]:
            task.cancel()  # the process is gone, its tasks with it
        store = gw.store
        for ledger in store._ledgers.values():
            ledger.close()
        assert store._owner_lock is not None
        store._owner_lock.release()  # the lock file stays, as after a real crash
        self.run(self._start_gateway())

    @rule()
    def next_day(self) -> None:
        self.clock.t += 86400

    @rule(user=st.sampled_from(USERS), limit=st.integers(0, 8))
    def edit_request_limit(self, user: str, limit: int) -> None:
        assert self.gw is not None
        self.limits[user][0] = limit
        self.write_users()

        async def reloaded() -> None:
            for _ in range(100):
                found = self.gw.users.by_name.get(user)  # type: ignore[union-attr]
                if found is not None and found.daily_request_limit == limit:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("users.yaml was not reloaded")

        self.run(reloaded())

    @rule(user=st.sampled_from(USERS))
    def admin_resets(self, user: str) -> None:
        """`gateway.py user reset`: another process appends the reset to the journal."""
        admin = gateway.Admin(str(self.tmp / "users.yaml"), str(self.tmp / "data"), "Asia/Shanghai")
        admin.clock.now = self.clock
        self.run(admin.reset(user))
        for ledger in admin.store._ledgers.values():
            ledger.close()
        self.today()[user] = [0, 0]

    # ------------------------------------------------------------ invariants

    @invariant()
    def recorded_usage_equals_the_model_and_no_slot_is_left_open(self) -> None:
        assert self.gw is not None
        day = self.gw.clock.today()
        for user in USERS:
            counts = self.run(self.gw.store.counts(user, day))
            assert [counts.requests, counts.tokens] == self.today()[user], user
            assert counts.reserved == 0
        status = self.run(self.gw.service.status())["stats"]  # type: ignore[union-attr]
        spent = self.spent_today()
        assert status["today_requests"] == sum(r for r, _ in spent.values())
        # The usage report and the call log count every charge, resets or not.
        usage = self.run(self.gw.store.usage(day))
        assert usage == {u: tuple(v) for u, v in spent.items() if v[0]}
        logged = {u: [0, 0] for u in USERS}
        path = self.tmp / "data" / "calls" / f"{day}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            rec = json.loads(line)
            if rec["status"] == 200 or rec["partial"]:
                logged[rec["user"]][0] += 1
                logged[rec["user"]][1] += rec["total_tokens"]
        assert logged == spent

    def teardown(self) -> None:
        if self.gw is not None:
            self.run(self.gw.stop())
        assert self.fake.server is not None
        self.fake.server.stop()
        self.http.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


GatewayModel.TestCase.settings = settings(
    max_examples=12, stateful_step_count=20, deadline=None, derandomize=True
)
test_gateway_model = pytest.mark.slow(GatewayModel.TestCase)
