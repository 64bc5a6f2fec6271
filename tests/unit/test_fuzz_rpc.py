"""Fuzz every gRPC handler with random and mutated request messages, against the real core.

The servicers (RelayServicer, DiscoveryServicer, NodeServicer), the auth interceptor and the
listener's query answerer run unchanged on a real in-process :class:`Node` and :class:`Relay`
(not listening: no socket is opened). Requests are built from the protobuf descriptors of
``homenet/control/v1`` (every field, oneof and map, with hostile values), sometimes with their
wire bytes mutated. The only failure a handler may show is the project's own:
``context.abort(<status>, <one bounded message>)``; any other exception, or a hang, fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homenet.control.auth import CURRENT_KEY, AuthInterceptor, call_metadata, method_roles
from homenet.control.discovery import DiscoveryServicer
from homenet.control.relay import RelayServicer
from homenet.control.rl import RLClient, RLOptions
from homenet.control.server import NodeServicer
from homenet.control.v1 import discovery_pb2, node_pb2, relay_pb2
from homenet.node.address import parse_url
from homenet.node.assembly import assemble
from homenet.node.auth import Credentials
from homenet.node.fleet import FLEET_ROLE
from homenet.node.keys import Key, KeyStore
from homenet.node.listeners import QueryEvent
from homenet.node.query import QueryAnswer, query_context
from homenet.node.relay import Registration
from homenet.node.settings import Settings

M = TypeVar("M", bound=Message)

#: Longest status message a handler may send back (it echoes bounded pieces of the request).
MAX_DETAILS = 1000
#: Upper bound of one example's run (the core answers in microseconds; a hang fails).
EXAMPLE_TIMEOUT = 5.0
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# -- values -------------------------------------------------------------------------------------

#: Strings the handlers treat specially, plus hostile ones. ``@...`` are filled in at run time
#: with live values (a real resumption secret, this relay's node id, a ticket it granted).
INTERESTING = [
    "",
    "home1",
    "alice",
    "bob",
    "root",
    "a" * 64,
    "a" * 65,
    "x" * 5000,
    "../../etc/passwd",
    "home1/other",
    "ho me",
    "\x00",
    "é",
    "\u202e",
    "\n",
    "hn://127.0.0.1:1/home1",
    "_ssh._tcp.local.",
    "1800000000",
    "n" * 16,
    "A" * 43,
    "@home1_secret",
    "@node_id",
    "@ticket",
]
_STRING = st.one_of(st.sampled_from(INTERESTING), st.text(max_size=16))
_DOUBLE = st.one_of(
    st.sampled_from([0.0, -1.0, 0.05, 1.0, 1e300, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_INTS: dict[int, st.SearchStrategy[int]] = {
    FieldDescriptor.TYPE_UINT32: st.one_of(
        st.sampled_from([0, 1, 4, 16, 17, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
    ),
    FieldDescriptor.TYPE_UINT64: st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)),
    FieldDescriptor.TYPE_INT32: st.one_of(
        st.sampled_from([0, 1, 5, 7, 14, 16, 2**31 - 1, -1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
    ),
}


# protobuf's runtime descriptors (upb) and its typing stubs disagree: descriptors are Any here
Desc = Any


def _scalar(f: Desc) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_STRING:
        return _STRING
    if f.type == FieldDescriptor.TYPE_DOUBLE:
        return _DOUBLE
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type in _INTS:
        return _INTS[f.type]
    raise AssertionError(f"no strategy for field {f.full_name} of type {f.type}: extend this test")


def _is_map(f: Desc) -> bool:
    return f.message_type is not None and bool(f.message_type.GetOptions().map_entry)


def _field(f: Desc, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(f):
        k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(k), _scalar(v), max_size=4)
    one = (
        st.deferred(lambda: built(message_factory.GetMessageClass(f.message_type), depth + 1))
        if f.type == FieldDescriptor.TYPE_MESSAGE
        else _scalar(f)
    )
    return st.lists(one, max_size=2 if depth else 6) if f.is_repeated else one


def _fill(msg: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if _is_map(f):
            target.update(value)
        elif f.type == FieldDescriptor.TYPE_MESSAGE and f.is_repeated:
            for m in value:
                target.add().CopyFrom(m)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        elif f.is_repeated:
            target.extend(value)
        else:
            setattr(msg, name, value)
    return msg


_BUILT: dict[tuple[str, int], st.SearchStrategy[Message]] = {}


def _named(name: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {name: value}


def built(cls: type[Message], depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``cls`` with any subset of fields set (one member per oneof); cached, as
    building strategies is what costs most."""
    key = (cls.DESCRIPTOR.full_name, depth)
    if key not in _BUILT:
        _BUILT[key] = _build(cls, depth)
    return _BUILT[key]


def _build(cls: type[Message], depth: int) -> st.SearchStrategy[Message]:
    desc: Desc = cls.DESCRIPTOR
    if depth > 2:
        return st.just(cls())
    plain = {f.name: _field(f, depth) for f in desc.fields if f.containing_oneof is None}
    oneofs = [st.one_of(st.just({}), *(_field(f, depth).map(_named(f.name)) for f in o.fields)) for o in desc.oneofs]
    parts = st.tuples(st.fixed_dictionaries({}, optional=plain), *oneofs)

    def make(p: tuple[dict[str, Any], ...]) -> Message:
        values: dict[str, Any] = {}
        for d in p:
            values.update(d)
        return _fill(cls(), values)

    return parts.map(make)


@st.composite
def messages(draw: st.DrawFn, cls: type[Message]) -> Message:
    """A built message, or one whose wire bytes were mutated (if they still parse)."""
    msg = draw(built(cls))
    if draw(st.integers(0, 3)) != 0:
        return msg
    raw = bytearray(msg.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "append"]))
        pos = draw(st.integers(0, len(raw)))
        byte = draw(st.integers(0, 255))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= byte or 1
        elif op == "insert":
            raw[pos:pos] = bytes([byte])
        elif op == "delete" and pos < len(raw):
            del raw[pos]
        elif op == "append":
            raw += draw(st.binary(max_size=16))
    try:
        return cls.FromString(bytes(raw))
    except DecodeError:
        return msg  # gRPC would refuse it before any handler runs


# -- a real core, no sockets -------------------------------------------------------------------------


class Aborted(Exception):
    """What grpc.aio's ``context.abort`` raises, for this fake context."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The part of grpc.aio.ServicerContext the handlers use; ``abort`` raises."""

    def __init__(
        self,
        metadata: tuple[tuple[str, str], ...] = (),
        remaining: float | None = None,
        peer: str = "ipv4:127.0.0.1:40000",
    ) -> None:
        self._metadata = metadata
        self._remaining = remaining
        self._peer = peer
        self.aborts: list[Aborted] = []

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()) -> NoReturn:
        assert isinstance(code, grpc.StatusCode), code
        assert isinstance(details, str), details
        err = Aborted(code, details)
        self.aborts.append(err)
        raise err

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return self._remaining


def ctx(**kw: Any) -> Any:
    """A FakeContext where the handlers want a ServicerContext."""
    return FakeContext(**kw)


def checked(err: Aborted) -> Aborted:
    assert err.code is not grpc.StatusCode.OK
    assert len(err.details) <= MAX_DETAILS, len(err.details)
    return err


KEY_ROLES = {"alice": ["listen"], "bob": ["listen"], "root": ["admin"], "q": ["query"], "c": ["connect"]}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-rpc") / "keys.toml"
    store = KeyStore(path)
    for kid, roles in KEY_ROLES.items():
        store.add(kid, roles)
    return path


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


class Core:
    """One node with its relay role, servicers and interceptor, fresh for each example."""

    def __init__(self, keys_file: Path, rl_auth: str = "required", query_auth: str = "required") -> None:
        self.settings = Settings(
            name="fuzz", mdns=False, bind="127.0.0.1", port=0, keys_file=str(keys_file),
            state_dir=str(keys_file.parent / "state"), rl_auth=rl_auth, query_auth=query_auth,
        )  # fmt: skip
        self.core = assemble(self.settings.replace(ping_interval=60.0))
        self.node = self.core.node
        self.relay = self.core.relay
        self.router = self.core.queries
        self.relay_svc = RelayServicer(self.relay, self.node.grpc, "fuzz")
        self.discovery_svc = DiscoveryServicer(self.router)
        self.node_svc = NodeServicer(self.node, self.relay.registry.online_count)
        self.interceptor = AuthInterceptor(self.settings, self.core.authorizer, self.node.grpc)
        self.home1_secret = ""
        self.tickets: list[str] = []
        self._responder: asyncio.Future[None] | None = None

    def key(self, kid: str | None) -> Key | None:
        return None if kid is None else self.core.keys.get(kid)

    def creds(self, kid: str) -> Credentials:
        key = self.key(kid)
        assert key is not None
        return Credentials(key.id, key.secret)

    def preregister(self) -> None:
        """A live listener ``home1`` (held by the admin key), for conflicts, kicks and queries;
        it answers every query at once with an empty table."""
        _, session, self.home1_secret = self.relay.register(
            Registration("home1", "", "home", "1", 0, "other-node"), "127.0.0.9:1", self.key("root")
        )

        async def answer_queries() -> None:
            while (event := await session.next_event()) is not None:
                if isinstance(event, QueryEvent):
                    self.relay.queries.answered(session, event.id, QueryAnswer([], "home", True))

        self._responder = asyncio.ensure_future(answer_queries())

    def fill(self, msg: M) -> M:
        """Replace the ``@...`` placeholders with live values, everywhere in ``msg``."""
        live = {
            "@home1_secret": self.home1_secret,
            "@node_id": self.core.node_id,
            "@ticket": self.tickets[-1] if self.tickets else "no-ticket-yet",
        }
        for f, value in msg.ListFields():
            if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated and value in live:
                setattr(msg, f.name, live[value])
            elif f.type == FieldDescriptor.TYPE_MESSAGE and not f.is_repeated and not _is_map(f):
                self.fill(value)
        return msg

    async def close(self) -> None:
        await self.relay.close()
        await self.node.close()
        if self._responder is not None:
            self._responder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._responder


async def run_example(runner_coro: Callable[[], Any]) -> Any:
    async with asyncio.timeout(EXAMPLE_TIMEOUT):
        return await runner_coro()


# -- RelayService.Listen ---------------------------------------------------------------------------------


async def _listen(
    core: Core, requests: list[relay_pb2.ListenerMessage], kid: str | None
) -> list[relay_pb2.RelayMessage]:
    CURRENT_KEY.set(core.key(kid))

    async def incoming() -> AsyncIterator[relay_pb2.ListenerMessage]:
        for m in requests:
            yield core.fill(m)

    out: list[relay_pb2.RelayMessage] = []
    source = incoming()
    gen = listen(core, source)
    try:
        async for msg in gen:
            assert isinstance(msg, relay_pb2.RelayMessage)
            out.append(msg)
            if msg.WhichOneof("msg") == "pool_grant":
                core.tickets.append(msg.pool_grant.ticket)
    finally:
        await gen.aclose()
        await cast(AsyncGenerator[relay_pb2.ListenerMessage, None], source).aclose()
    return out


def listen(
    core: Core, source: AsyncIterator[relay_pb2.ListenerMessage]
) -> AsyncGenerator[relay_pb2.RelayMessage, None]:
    """RelayServicer.Listen as the async generator it is (its annotation says AsyncIterator)."""
    return cast(
        AsyncGenerator[relay_pb2.RelayMessage, None], core.relay_svc.Listen(source, ctx(peer="ipv4:127.0.0.7:5000"))
    )


def _register(listen_id: str, pool: int = 0, secret: str = "") -> relay_pb2.ListenerMessage:
    return relay_pb2.ListenerMessage(
        register=relay_pb2.Register(listen_id=listen_id, pool_size=pool, resume_secret=secret)
    )


_LISTENER_MSGS = st.lists(messages(relay_pb2.ListenerMessage), max_size=3)
_REGISTER_FIRST = st.builds(
    lambda reg, rest: [relay_pb2.ListenerMessage(register=reg), *rest], messages(relay_pb2.Register), _LISTENER_MSGS
)


@settings(FUZZ, max_examples=800)
@given(
    requests=st.one_of(_LISTENER_MSGS, _REGISTER_FIRST),
    kid=st.sampled_from([None, "alice", "bob", "root"]),
    rl_auth=st.sampled_from(["required", "open"]),
)
def test_fuzz_listen(
    runner: asyncio.Runner, keys_file: Path, requests: list[relay_pb2.ListenerMessage], kid: str | None, rl_auth: str
) -> None:
    async def go() -> None:
        core = Core(keys_file, rl_auth=rl_auth)
        core.preregister()
        try:
            out = await _listen(core, requests, kid)
        except Aborted as err:
            checked(err)
            assert core.relay.registry.lookup("home1") is not None
            return
        finally:
            await core.close()
        # registered first, then only events; the stream ended with the requests
        assert out, "Listen ended without a word"
        assert out[0].WhichOneof("msg") == "registered"
        reg = out[0].registered
        assert reg.listen_id
        if rl_auth == "required":
            assert kid is not None, "an anonymous listener registered on a relay that requires keys"
        key = core.key(kid)
        if key is not None and "admin" not in key.roles:
            own = reg.listen_id == key.id or reg.listen_id.startswith(f"{key.id}-")
            assert own, "a listen key claimed an id outside its own namespace"
        if key is None:
            assert reg.listen_id not in core.core.keys.reserved_listen_ids() or reg.listen_id == "home1"
        assert all(m.WhichOneof("msg") in ("pool_grant", "ping", "query") for m in out[1:])
        assert len(out) - 1 <= core.relay.settings.max_pool

    runner.run(run_example(go))


@settings(FUZZ, max_examples=300)
@given(query=messages(discovery_pb2.QueryRequest), result=messages(relay_pb2.QueryResult), right_id=st.booleans())
def test_fuzz_query_through_a_listener(
    runner: asyncio.Runner, keys_file: Path, query: discovery_pb2.QueryRequest, result: relay_pb2.QueryResult,
    right_id: bool,
) -> None:  # fmt: skip
    """A query forwarded down a (fuzzed) listener's stream, answered with a fuzzed QueryResult."""

    async def go() -> None:
        core = Core(keys_file, rl_auth="open", query_auth="open")
        queue: asyncio.Queue[relay_pb2.ListenerMessage | None] = asyncio.Queue()

        async def incoming() -> AsyncIterator[relay_pb2.ListenerMessage]:
            while (m := await queue.get()) is not None:
                yield m

        CURRENT_KEY.set(None)
        gen = listen(core, incoming())
        queue.put_nowait(_register("home1"))
        first = await anext(gen)
        assert first.WhichOneof("msg") == "registered"
        core.fill(query)
        if query.path:
            query.path[0] = "home1"
        asked = asyncio.ensure_future(core.discovery_svc.Query(query, ctx(remaining=2.0)))
        event = asyncio.ensure_future(anext(gen))
        try:
            await asyncio.wait({asked, event}, return_when=asyncio.FIRST_COMPLETED)
            if event.done():
                msg = event.result()
                assert msg.WhichOneof("msg") == "query"
                if right_id:
                    result.id = msg.query.id
                queue.put_nowait(relay_pb2.ListenerMessage(query_result=result))
            queue.put_nowait(None)  # then the listener goes away: nothing may be left waiting
            drained = asyncio.ensure_future(_drain(gen, event))  # gRPC pulls responses all along
            try:
                resp = await asked
                assert isinstance(resp, discovery_pb2.QueryResponse)
            except Aborted as err:
                checked(err)
            await drained
        finally:
            for task in (asked, event):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(StopAsyncIteration, asyncio.CancelledError, Aborted):
                    await task
            await gen.aclose()
            await core.close()

    runner.run(run_example(go))


async def _drain(gen: AsyncGenerator[relay_pb2.RelayMessage, None], pending: asyncio.Future[Any]) -> None:
    with contextlib.suppress(StopAsyncIteration):
        await pending
    async for _ in gen:
        pass


# -- unary calls ----------------------------------------------------------------------------------------


_UNARY = st.one_of(
    messages(relay_pb2.KickRequest),
    messages(relay_pb2.ListListenersRequest),
    messages(node_pb2.GetStatusRequest),
    messages(node_pb2.ListSessionsRequest),
    messages(node_pb2.GetMetricsRequest),
    messages(discovery_pb2.QueryRequest),
)


@settings(FUZZ, max_examples=1000)
@given(
    request=_UNARY,
    remaining=st.one_of(st.none(), st.floats(-1.0, 0.3)),
    query_auth=st.sampled_from(["required", "open"]),
)
def test_fuzz_unary(
    runner: asyncio.Runner, keys_file: Path, request: Message, remaining: float | None, query_auth: str
) -> None:
    async def go() -> None:
        core = Core(keys_file, query_auth=query_auth)
        core.preregister()
        core.fill(request)
        try:
            c = ctx(remaining=remaining)
            if isinstance(request, relay_pb2.KickRequest):
                resp: Message = await core.relay_svc.Kick(request, c)
                assert request.listen_id == "home1"
                assert core.relay.registry.lookup("home1") is None
            elif isinstance(request, relay_pb2.ListListenersRequest):
                resp = await core.relay_svc.ListListeners(request, c)
                assert [x.listen_id for x in resp.listeners] == ["home1"]
            elif isinstance(request, node_pb2.GetStatusRequest):
                await core.node.start()  # its status names its address (127.0.0.1, a free port)
                resp = await core.node_svc.GetStatus(request, c)
            elif isinstance(request, node_pb2.ListSessionsRequest):
                resp = await core.node_svc.ListSessions(request, c)
            elif isinstance(request, node_pb2.GetMetricsRequest):
                resp = await core.node_svc.GetMetrics(request, c)
            else:
                assert isinstance(request, discovery_pb2.QueryRequest)
                resp = await core.discovery_svc.Query(request, c)
                # the relay forwards to its listener home1 (the fake answers whatever path is left)
                assert not request.path or request.path[0] == "home1", "answered without its listener"
            assert isinstance(resp, Message)
        except Aborted as err:
            checked(err)
        finally:
            await core.close()

    runner.run(run_example(go))


@settings(FUZZ, max_examples=800)
@given(
    fq=messages(relay_pb2.ForwardedQuery),
    signer=st.sampled_from([None, "q", "root", "c", "forged"]),
    sign_origin=st.booleans(),
)
def test_fuzz_forwarded_query_at_the_home_node(
    runner: asyncio.Runner, keys_file: Path, fq: relay_pb2.ForwardedQuery, signer: str | None, sign_origin: bool
) -> None:
    """A home node answers a relay's ForwardedQuery (RLClient._answer -> QueryRouter) with query auth."""

    async def go() -> None:
        core = Core(keys_file, query_auth="required")
        q = fq.request
        if signer is not None and sign_origin:  # a real token over what the request says
            origin = list(q.origin_path) or list(q.path)
            creds = core.creds(signer) if signer != "forged" else Credentials("q", core.creds("alice").secret)
            q.auth.CopyFrom(discovery_pb2.QueryAuth(**creds.token(query_context(origin, q.name, q.type))))
        sent: list[relay_pb2.ListenerMessage] = []

        async def send(msg: relay_pb2.ListenerMessage) -> None:
            sent.append(msg)

        async def answer(query: Any, listen_id: str) -> QueryAnswer:
            return await core.router.query(query, listen_id)

        opts = RLOptions(route=parse_url("hn://127.0.0.1:1"), state_dir="")
        client = RLClient(opts, serve=_never_served, announce=lambda _line: None, answer=answer)
        client.listen_id = "home1"
        await client._answer(fq, send)
        assert len(sent) == 1
        result = sent[0].query_result
        assert result.id == fq.id
        if not result.error_code:
            # an answer from our own table: only for a good query key over a query meant for us
            assert not q.path
            assert signer in ("q", "root")
            assert sign_origin
            assert (list(q.origin_path) or ["home1"])[-1] == "home1"
        else:
            assert result.error
            assert len(result.error) <= MAX_DETAILS
        await core.close()

    runner.run(run_example(go))


async def _never_served(*_: Any) -> None:
    raise AssertionError("a query made the listener serve a connection")


# -- the auth interceptor -------------------------------------------------------------------------------

METHODS = sorted(method_roles(Settings(name="x", mdns=False, keys_file="/nonexistent/keys.toml")))
_META_VALUE = st.one_of(st.sampled_from(INTERESTING[:20]), st.text(max_size=24))


@settings(FUZZ, max_examples=800)
@given(
    method=st.sampled_from(METHODS),
    signer=st.sampled_from([None, "q", "root", "c", "alice"]),
    signed_for=st.sampled_from(["same", "other"]),
    tamper=st.dictionaries(st.sampled_from(["key", "ts", "nonce", "mac"]), _META_VALUE, max_size=2),
    junk=st.lists(st.tuples(st.text(max_size=12), _META_VALUE), max_size=2),
    replay=st.booleans(),
    request=st.one_of(
        st.sampled_from([discovery_pb2.QueryRequest(), discovery_pb2.QueryRequest(path=["home1"])]),
        messages(discovery_pb2.QueryRequest),
    ),
    modes=st.tuples(st.sampled_from(["required", "open"]), st.sampled_from(["required", "open"])),
)
def test_fuzz_auth_interceptor(
    runner: asyncio.Runner, keys_file: Path, method: str, signer: str | None, signed_for: str,
    tamper: dict[str, str], junk: list[tuple[str, str]], replay: bool, request: discovery_pb2.QueryRequest,
    modes: tuple[str, str],
) -> None:  # fmt: skip
    async def go() -> None:
        core = Core(keys_file, rl_auth=modes[0], query_auth=modes[1])
        role, needs = core.interceptor.roles[method]
        req = request if method.endswith("/Query") else None
        need = needs(req)
        meta: list[tuple[str, str]] = list(junk)
        if signer is not None:
            signed = method if signed_for == "same" else "/homenet.v1.NodeService/GetStatus"
            original = {k.removeprefix("x-homenet-"): v for k, v in call_metadata(core.creds(signer), signed)}
            token = {**original, **tamper}
            meta += [(f"x-homenet-{k}", v) for k, v in token.items()]
            genuine = signed_for == "same" and token == original
        else:
            genuine = False
        holds_role = signer is not None and (signer == "root" or role in KEY_ROLES[signer])
        for attempt in range(2 if replay else 1):
            c = ctx(metadata=tuple(meta))
            try:
                key = await core.interceptor._check(method, c, req)
            except Aborted as err:
                # a relay without a fleet key refuses every peer call as forbidden, whoever asks
                refusal_ok(err, forbidden_ok=(genuine and attempt == 0 and not holds_role) or role == FLEET_ROLE)
                continue
            if key is None:
                assert need != "required", f"{method} let an anonymous call through"
                if need == "optional":  # a key that is there is checked, never ignored
                    assert not any(k == "x-homenet-key" and v for k, v in meta)
            else:
                assert genuine, f"{method} accepted a token that was not made for it: {meta}"
                assert attempt == 0, "a replayed token was accepted"
                assert key.allows(role)
        await core.close()

    runner.run(run_example(go))


def refusal_ok(err: Aborted, forbidden_ok: bool) -> None:
    """The interceptor refuses with UNAUTHENTICATED, or PERMISSION_DENIED for a good key without the role."""
    checked(err)
    if err.code is grpc.StatusCode.PERMISSION_DENIED:
        assert forbidden_ok, err
    else:
        assert err.code is grpc.StatusCode.UNAUTHENTICATED, err


def test_strategies_cover_every_request_message() -> None:
    """Every request type of every service is fuzzed above (a new RPC needs a new strategy)."""
    fuzzed = {
        "ListenerMessage", "KickRequest", "ListListenersRequest", "GetStatusRequest", "ListSessionsRequest",
        "GetMetricsRequest", "QueryRequest", "ForwardedQuery", "QueryResult",
    }  # fmt: skip
    for module in (relay_pb2, node_pb2, discovery_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                assert m.input_type.name in fuzzed, f"{service.name}.{m.name} takes {m.input_type.name}: fuzz it"
