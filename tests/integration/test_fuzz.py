"""Hostile input through the real server: hypothesis-generated requests for every RPC, and raw bytes.

Whatever a client sends, the server answers with a status that says what is wrong with the request
(INVALID_ARGUMENT naming the field; RESOURCE_EXHAUSTED beyond max_receive_bytes) or a coherent
answer; never INTERNAL or UNKNOWN, and it keeps serving. Its own `python -m ranker serve` (the fuzzed
UpsertItems / DeleteItems change the catalog) over the session's tritonserver. Reproducible:
derandomized, no example database.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import polars as pl
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ranker.release import ITEMS
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import SERVING, RankerProcess, health_status

pytestmark = [pytest.mark.triton, pytest.mark.slow]

CALL_TIMEOUT_S = 30.0  # a fuzzed request that takes this long is a failure (DEADLINE_EXCEEDED is not allowed)
HEALTH_EVERY = 1000  # requests between health checks
# Examples per RPC: 10,000 requests in all.
EXAMPLES = {
    "Rank": 2600,
    "RecordEvents": 1500,
    "UpsertItems": 800,
    "DeleteItems": 1000,
    "ForgetUser": 1000,
    "LoadRelease": 500,
    "raw": 2600,
}
assert sum(EXAMPLES.values()) >= 10_000
BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,  # `timed` times the whole test, not one example
    ],
)


def fuzz(rpc: str) -> settings:
    return settings(BASE, max_examples=EXAMPLES[rpc])


OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED  # a message over max_receive_bytes, refused by grpc itself
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED  # a handler not written yet: reported, tolerated
ALLOWED = {
    "Rank": {OK, INVALID, TOO_LARGE},
    "RecordEvents": {OK, INVALID, TOO_LARGE, UNIMPLEMENTED},
    "ForgetUser": {OK, INVALID, TOO_LARGE, UNIMPLEMENTED},
    "UpsertItems": {OK, INVALID, TOO_LARGE, UNIMPLEMENTED},
    "DeleteItems": {OK, INVALID, TOO_LARGE, UNIMPLEMENTED},
    "LoadRelease": {INVALID, TOO_LARGE, UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION},
    "Check": {OK, INVALID, TOO_LARGE, grpc.StatusCode.NOT_FOUND},  # grpc.health.v1: unknown service
}
PATHS = {
    "Rank": ("/ranker.v1.Ranker/Rank", ranker_pb2.RankRequest),
    "RecordEvents": ("/ranker.v1.Ranker/RecordEvents", ranker_pb2.RecordEventsRequest),
    "ForgetUser": ("/ranker.v1.Ranker/ForgetUser", ranker_pb2.ForgetUserRequest),
    "UpsertItems": ("/ranker.v1.Ranker/UpsertItems", ranker_pb2.UpsertItemsRequest),
    "DeleteItems": ("/ranker.v1.Ranker/DeleteItems", ranker_pb2.DeleteItemsRequest),
    "LoadRelease": ("/ranker.v1.RankerAdmin/LoadRelease", ranker_pb2.LoadReleaseRequest),
    "Check": ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest),
}
EVENT_REASON = re.compile(r"^(event_id|user_id|item_id|type|timestamp|query): ")


def names_a_field(rpc: str, details: str) -> bool:
    """INVALID_ARGUMENT details start with a field path of the request: `rules[3].amount: ...`."""
    fields = PATHS[rpc][1].DESCRIPTOR.fields_by_name
    return re.match(rf"^({'|'.join(map(re.escape, fields))})(\[|\.|:)", details) is not None


@dataclass
class Ledger:
    """Every request sent, by RPC and status; a health check every HEALTH_EVERY requests."""

    channel: grpc.Channel
    ranker: RankerProcess
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    health_checks: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    release_id: str = ""  # served before the fuzzing; no fuzzed LoadRelease may replace it

    def __post_init__(self) -> None:
        self.stub = ranker_pb2_grpc.RankerStub(self.channel)

    def record(self, rpc: str, code: grpc.StatusCode, details: str, *, parsed: bool = True) -> None:
        """`parsed`: the request was a well-formed message, so an INVALID_ARGUMENT names its field."""
        self.sent += 1
        self.codes[(rpc, code.name)] += 1
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (rpc, code, details[:500])
        assert code in ALLOWED[rpc], (rpc, code, details[:500])
        if code is INVALID and parsed:
            assert names_a_field(rpc, details), (rpc, details[:500])
        if self.sent % HEALTH_EVERY == 0:
            self.check_health()

    def check_health(self) -> None:
        assert self.ranker.alive, self.ranker.log_tail()
        assert health_status(self.channel) == SERVING
        assert health_status(self.channel, "ranker.v1.Ranker") == SERVING
        self.health_checks += 1


@dataclass(frozen=True)
class Catalog:
    item_ids: tuple[str, ...]
    categories: tuple[str, ...]
    brands: tuple[str, ...]


@pytest.fixture(scope="module")
def catalog(example_release: Path) -> Catalog:
    items = pl.read_parquet(example_release / ITEMS)
    return Catalog(
        item_ids=tuple(items["item_id"].to_list()),
        categories=tuple(sorted(c for c in items["category"].unique().to_list() if c)),
        brands=tuple(sorted(b for b in items["brand"].unique().to_list() if b)),
    )


@pytest.fixture(scope="module")
def ranker(
    example_release: Path, triton: LocalTritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RankerProcess]:
    process = RankerProcess(
        example_release,
        triton.grpc_url,
        tmp_path_factory.mktemp("fuzz-ranker"),
        # WARNING: no access log line per fuzzed request.
        env={"RANKER_TRITON_TIMEOUT_S": "5", "RANKER_PROFILE_STORE": "embedded", "RANKER_LOG_LEVEL": "WARNING"},
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def ledger(ranker: RankerProcess) -> Iterator[Ledger]:
    # One channel for every request; no size limit on this side: the server's limit is what is tested.
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(ranker.target, options=options) as channel:
        ledger = Ledger(channel, ranker)
        ledger.release_id = ledger.stub.Rank(ranker_pb2.RankRequest(query="drill"), timeout=60).release.release_id
        yield ledger
        ledger.check_health()
        total = sum(ledger.seconds.values())
        print(
            f"\n[fuzz] {ledger.sent} requests in {total:.1f} s, {ledger.health_checks} health checks;"
            f" by RPC and status: {dict(sorted(ledger.codes.items()))}; notes: {dict(ledger.notes)};"
            f" seconds per test: { {k: round(v, 1) for k, v in ledger.seconds.items()} }"
        )


@pytest.fixture
def timed(ledger: Ledger, request: pytest.FixtureRequest) -> Iterator[None]:
    start = time.monotonic()
    yield
    ledger.seconds[request.node.name] = time.monotonic() - start


def call(ledger: Ledger, rpc: str, request: Message) -> tuple[grpc.StatusCode, Any]:
    method = getattr(ledger.stub, rpc)
    try:
        response = method(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        code, details, response = e.code(), e.details() or "", None
    else:
        code, details = OK, ""
    ledger.record(rpc, code, details)
    return code, response


# --- strategies ----------------------------------------------------------------------------------

NASTY_STRINGS = [
    "", " ", "\t\n", "\x00", "\x00drill", "drill\x00", "\u200b", "\ufeff", "\u202edrill", "a\u0301", "İ", "ǅ", "ﬀ",
    "\U0010ffff", "\U0001f6e0\ufe0f drill", "ドリル", "дрель", "🤖" * 50, "' OR 1=1 --", "%s%n", "{0}", "..", "/", "\\",
    "null", "NaN", "-1", "sku-00001 ", " sku-00001", "SKU-00001",
]  # fmt: skip
# Any code point but surrogates (proto3 strings must be valid UTF-8 to be serialized at all).
weird_text = st.one_of(
    st.sampled_from(NASTY_STRINGS),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24),
)


def weighted(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], percent: float) -> st.SearchStrategy[Any]:
    """`rare` about `percent` % of the time (hypothesis also favours the boundaries, so a bit more)."""
    return st.integers(0, 999).flatmap(lambda r: rare if r < percent * 10 else common)


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field valid most of the time, so that most requests get past validation into the pipeline."""
    return weighted(valid, hostile, percent=8)


# 1,001 characters to 2 million (up to 8 MB of UTF-8): within max_receive_bytes and beyond; built by
# repetition, so cheap to draw.
huge_text = st.builds(
    lambda s, size: (s * (size // len(s) + 1))[:size], weird_text.filter(bool), st.integers(1_001, 2_000_000)
)
any_text = weighted(weird_text, huge_text, percent=1)
NASTY_FLOATS = [0.0, -0.0, 1.0, -1.0, 10.0, 10.000001, 100.0, 1e-320, 5e-324, 1e308, -1e308, math.nan, -math.nan,
                math.inf, -math.inf, 2.0**53, 0.5]  # fmt: skip
nasty_floats = st.one_of(st.sampled_from(NASTY_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
NASTY_UINT32 = [0, 1, 2, 5, 20, 199, 200, 201, 1000, 2**31 - 1, 2**31, 2**32 - 1]
uint32 = st.one_of(st.sampled_from(NASTY_UINT32), st.integers(0, 2**32 - 1))
# proto3 enums are open: any int32 goes on the wire.
int32_enum = st.one_of(st.integers(-2, 6), st.sampled_from([-(2**31), 2**31 - 1, 1000]))
SIGNALS = ["ranker", "dense", "lexical", "retrieval", "personal", "popularity", "rating", "price", "margin", "boost",
           "freshness"]  # fmt: skip
QUERY_WORDS = ["drill", "paint", "hose", "saw", "mower", "light bulb", "faucet", "screws", "hammer", "sander", "tile"]
USERS = ["fuzz-user-1", "fuzz-user-2", "u", "Ω"]


def item_ids(catalog: Catalog) -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(catalog.item_ids), weird_text)


def ids_lists(ids: st.SearchStrategy[str], max_size: int = 8) -> st.SearchStrategy[list[str]]:
    """Short lists (duplicates allowed), and now and then a list over the server's limits (by repetition)."""
    short = st.lists(ids, max_size=max_size)
    long = st.builds(lambda xs, n: (xs or ["sku-00001"]) * n, st.lists(ids, max_size=3), st.integers(100, 4000))
    return weighted(short, long, percent=2)


NOW = int(time.time())  # once: a strategy must draw the same way every time (hypothesis checks)


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp | None]:
    now = NOW
    seconds = st.one_of(
        st.sampled_from([0, -1, now, now + 299, now + 301, now + 10**9, 253402300799, 253402300800, -62135596801]),
        st.integers(-(2**63), 2**63 - 1),
    )
    nanos = st.one_of(st.just(0), st.sampled_from([-1, 999_999_999, 1_000_000_000]), st.integers(-(2**31), 2**31 - 1))
    hostile = st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)
    recent = st.builds(timestamp_pb2.Timestamp, seconds=st.integers(now - 86400 * 400, now), nanos=st.just(0))
    return st.none() | mostly(recent, hostile)


@functools.cache
def rank_requests(catalog: Catalog) -> st.SearchStrategy[ranker_pb2.RankRequest]:
    ids = item_ids(catalog)
    known_ids = st.lists(st.sampled_from(catalog.item_ids), unique=True, max_size=30)
    labels = st.sampled_from(catalog.categories + catalog.brands)
    rule = st.builds(
        ranker_pb2.Rule,
        action=mostly(st.integers(1, 4), int32_enum),
        item_ids=mostly(st.lists(st.sampled_from(catalog.item_ids), max_size=1), ids_lists(ids, max_size=3)),
        field=mostly(st.sampled_from(["", "", "category", "brand"]), st.sampled_from(["price", "Category", "x"])),
        values=mostly(st.lists(labels, max_size=3), st.lists(st.one_of(labels, weird_text), max_size=4)),
        amount=mostly(st.floats(0.0, 100.0), nasty_floats),
        position=mostly(st.integers(0, 30), uint32),
    )
    price = st.none() | mostly(st.floats(0.0, 500.0), nasty_floats)
    filters = st.builds(
        ranker_pb2.Filters,
        categories=mostly(st.lists(st.sampled_from(catalog.categories), max_size=3), st.lists(weird_text, max_size=4)),
        min_price=price,
        max_price=price,
        in_stock_only=st.booleans(),
    )
    diversity = st.builds(
        ranker_pb2.DiversityOptions,
        method=mostly(st.integers(0, 4), int32_enum),
        strength=st.none() | mostly(st.floats(0.0, 1.0), nasty_floats),
        max_per_category=mostly(st.integers(0, 10), uint32),
        max_per_brand=mostly(st.integers(0, 10), uint32),
        window=st.none() | mostly(st.integers(0, 10), uint32),
    )
    blend = st.builds(
        ranker_pb2.BlendOverrides,
        weights=st.dictionaries(
            mostly(st.sampled_from(SIGNALS), weird_text), mostly(st.floats(0.0, 10.0), nasty_floats), max_size=4
        ),
    )
    rules = weighted(st.lists(rule, max_size=3), st.lists(rule, min_size=51, max_size=52), percent=3)
    return st.builds(
        ranker_pb2.RankRequest,
        request_id=weighted(st.just(""), any_text, percent=30),
        query=weighted(mostly(st.sampled_from(["", *QUERY_WORDS]), weird_text), huge_text, percent=2),
        user_id=st.none() | mostly(st.sampled_from(USERS), any_text),
        candidate_ids=weighted(st.just([]), mostly(known_ids, ids_lists(ids, max_size=12)), percent=30),
        top_k=st.none() | mostly(st.integers(1, 200), uint32),
        filters=weighted(st.none(), filters, percent=30),
        blend=weighted(st.none(), blend, percent=30),
        diversity=weighted(st.none(), diversity, percent=30),
        rules=weighted(st.just([]), rules, percent=30),
        exclude_purchased=st.booleans(),
    )


@functools.cache
def events(catalog: Catalog) -> st.SearchStrategy[ranker_pb2.RecordEventsRequest]:
    def event(text: st.SearchStrategy[str]) -> st.SearchStrategy[ranker_pb2.Event]:
        return st.builds(
            ranker_pb2.Event,
            event_id=mostly(st.sampled_from([f"e{i}" for i in range(50)]), text),
            user_id=mostly(st.sampled_from(USERS), text),
            item_id=item_ids(catalog),
            type=mostly(st.integers(1, 5), int32_enum),
            timestamp=timestamps(),
            query=mostly(st.sampled_from(["", *QUERY_WORDS]), text),
        )

    batch = st.one_of(
        st.lists(event(weird_text), max_size=6),
        weighted(st.lists(event(weird_text), max_size=1), st.lists(event(huge_text), min_size=1, max_size=1), 5),
    )
    many = st.builds(
        lambda es, n: (es or [ranker_pb2.Event()]) * n, st.lists(event(weird_text), max_size=2), st.integers(200, 1100)
    )
    return st.builds(ranker_pb2.RecordEventsRequest, events=weighted(batch, many, percent=2))


@functools.cache
def upserts(catalog: Catalog) -> st.SearchStrategy[ranker_pb2.UpsertItemsRequest]:
    def number(low: float | None) -> st.SearchStrategy[float | None]:
        return st.none() | mostly(st.floats(low if low is not None else -100.0, 1000.0), nasty_floats)

    item = st.builds(
        ranker_pb2.CatalogItem,
        item_id=mostly(st.sampled_from([f"fuzz-{i}" for i in range(20)]), item_ids(catalog)),
        title=mostly(st.sampled_from(["Fuzz Drill 18V", "Paint roller", "Hose reel ドリル"]), any_text),
        category=mostly(st.sampled_from(["", *catalog.categories]), weird_text),
        brand=mostly(st.sampled_from(["", *catalog.brands]), weird_text),
        price=number(0.0),
        popularity=number(0.0),
        rating=number(0.0),
        margin=number(None),
        boost=number(None),
        in_stock=st.none() | st.booleans(),
        created_at=timestamps(),
    )
    many = st.builds(
        lambda xs, n: (xs or [ranker_pb2.CatalogItem()]) * n, st.lists(item, max_size=2), st.integers(2, 1100)
    )
    return st.builds(ranker_pb2.UpsertItemsRequest, items=weighted(st.lists(item, max_size=3), many, percent=2))


@functools.cache
def deletes(catalog: Catalog) -> st.SearchStrategy[ranker_pb2.DeleteItemsRequest]:
    ids = mostly(st.sampled_from([f"fuzz-{i}" for i in range(20)]), item_ids(catalog))
    many = st.builds(lambda xs, n: (xs or [""]) * n, st.lists(ids, max_size=2), st.integers(2, 11_000))
    return st.builds(ranker_pb2.DeleteItemsRequest, item_ids=weighted(st.lists(ids, max_size=6), many, percent=2))


# --- one test per RPC ----------------------------------------------------------------------------


@fuzz("Rank")
@given(data=st.data())
def test_fuzzed_rank(ledger: Ledger, catalog: Catalog, timed: None, data: st.DataObject) -> None:
    request = data.draw(rank_requests(catalog))
    code, response = call(ledger, "Rank", request)
    if code is not OK:
        return
    top_k = request.top_k if request.HasField("top_k") else 20
    assert len(response.items) <= top_k
    assert len({item.item_id for item in response.items}) == len(response.items)
    scores = [item.score for item in response.items]
    assert all(math.isfinite(s) for s in scores), scores
    assert scores == sorted(scores, reverse=True), scores
    for item in response.items:
        total = sum(c.contribution for c in item.breakdown)
        assert math.isclose(total, item.score, rel_tol=1e-6, abs_tol=1e-6), (item.item_id, item.breakdown)
    if response.degraded:  # Triton is up: only its deadline under load may degrade a response, never an error
        ledger.notes[f"degraded: {response.degraded_reason}"] += 1
        assert "BackendFailed" not in response.degraded_reason, response.degraded_reason


@fuzz("RecordEvents")
@given(data=st.data())
def test_fuzzed_record_events(ledger: Ledger, catalog: Catalog, timed: None, data: st.DataObject) -> None:
    request = data.draw(events(catalog))
    code, response = call(ledger, "RecordEvents", request)
    if code is not OK:
        return
    assert response.applied + response.duplicates + len(response.rejected) == len(request.events), response
    indexes = [r.index for r in response.rejected]
    assert len(set(indexes)) == len(indexes) and all(0 <= i < len(request.events) for i in indexes)
    for rejection in response.rejected:
        assert EVENT_REASON.match(rejection.reason), rejection.reason


@fuzz("UpsertItems")
@given(data=st.data())
def test_fuzzed_upsert_items(ledger: Ledger, catalog: Catalog, timed: None, data: st.DataObject) -> None:
    request = data.draw(upserts(catalog))
    code, response = call(ledger, "UpsertItems", request)
    if code is OK:
        assert response.inserted + response.updated == len(request.items), response


@fuzz("DeleteItems")
@given(data=st.data())
def test_fuzzed_delete_items(ledger: Ledger, catalog: Catalog, timed: None, data: st.DataObject) -> None:
    request = data.draw(deletes(catalog))
    code, response = call(ledger, "DeleteItems", request)
    if code is OK:
        assert response.deleted + len(response.not_found) == len(set(request.item_ids)), response


@fuzz("ForgetUser")
@given(user_id=st.one_of(st.sampled_from(USERS), any_text))
def test_fuzzed_forget_user(ledger: Ledger, timed: None, user_id: str) -> None:
    call(ledger, "ForgetUser", ranker_pb2.ForgetUserRequest(user_id=user_id))


@fuzz("LoadRelease")
@given(data=st.data())
def test_fuzzed_load_release(
    ledger: Ledger, timed: None, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory, example_release: Path
) -> None:
    """Paths that are not releases (missing, a file, empty, corrupt, odd): refused, the serving release kept."""
    not_releases = _not_releases(tmp_path_factory, example_release)
    path = data.draw(st.one_of(st.sampled_from(not_releases), any_text))
    stub = ranker_pb2_grpc.RankerAdminStub(ledger.channel)
    try:
        stub.LoadRelease(ranker_pb2.LoadReleaseRequest(path=path), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        ledger.record("LoadRelease", e.code(), e.details() or "")
    else:
        ledger.record("LoadRelease", OK, "")


_NOT_RELEASES: list[str] = []


def _not_releases(factory: pytest.TempPathFactory, release: Path) -> list[str]:
    if not _NOT_RELEASES:
        root = factory.mktemp("not-releases")
        (root / "empty").mkdir()
        (root / "corrupt").mkdir()
        (root / "corrupt" / "manifest.json").write_text("{not json")
        (root / "half").mkdir()
        (root / "half" / "manifest.json").write_text((release / "manifest.json").read_text())
        _NOT_RELEASES.extend(
            [str(root / "empty"), str(root / "corrupt"), str(root / "half"), str(root / "missing"),
             str(release / "manifest.json"), "", " ", ".", "..", "/", "/dev/null", "/proc/self", "\x00", "a" * 5000]
        )  # fmt: skip
    return _NOT_RELEASES


# --- raw bytes: what a hostile client puts on the wire -------------------------------------------

# Byte sequences that are not UTF-8: a stray continuation byte, 0xFF, an overlong encoding, an encoded
# surrogate, a code point beyond U+10FFFF, a truncated sequence.
INVALID_UTF8 = [b"\x80", b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xe2\x82", b"\xf0\x9f\x98", b"drill\xff", b"\xf8\x88\x80\x80\x80"]  # fmt: skip
PLACEHOLDER = "\x7f"  # stands in, byte for byte, for the invalid sequence in a serialized message


def _with_placeholder(catalog: Catalog, rpc: str, n: int) -> Message:
    """A small valid request of the RPC's type with an n-byte placeholder in one of its string fields."""
    mark = PLACEHOLDER * n
    return {
        "Rank": lambda: ranker_pb2.RankRequest(query=f"drill {mark}", candidate_ids=[catalog.item_ids[0]]),
        "RecordEvents": lambda: ranker_pb2.RecordEventsRequest(
            events=[
                ranker_pb2.Event(
                    event_id="x", user_id=mark, item_id=catalog.item_ids[0], type=ranker_pb2.EVENT_TYPE_VIEW
                )
            ]
        ),
        "ForgetUser": lambda: ranker_pb2.ForgetUserRequest(user_id=mark),
        "UpsertItems": lambda: ranker_pb2.UpsertItemsRequest(
            items=[ranker_pb2.CatalogItem(item_id="fuzz-0", title=mark)]
        ),
        "DeleteItems": lambda: ranker_pb2.DeleteItemsRequest(item_ids=["fuzz-1", mark]),
        "LoadRelease": lambda: ranker_pb2.LoadReleaseRequest(path=mark),
        "Check": lambda: health_pb2.HealthCheckRequest(service=mark),
    }[rpc]()


@functools.cache
def raw_payloads(catalog: Catalog, rpc: str) -> st.SearchStrategy[bytes]:
    def invalid_utf8(bad: bytes) -> bytes:
        wire = _with_placeholder(catalog, rpc, len(bad)).SerializeToString()
        assert wire.count(PLACEHOLDER.encode() * len(bad)) == 1
        return wire.replace(PLACEHOLDER.encode() * len(bad), bad)

    def truncated(cut: int) -> bytes:
        wire = _with_placeholder(catalog, rpc, 4).SerializeToString()
        return wire[: cut % max(1, len(wire))]

    return st.one_of(
        st.sampled_from(INVALID_UTF8).map(invalid_utf8),
        st.integers(0, 1000).map(truncated),
        st.binary(max_size=64),  # garbage: mostly unparseable, sometimes a valid message by chance
        # Large garbage, up to 6 MB: within max_receive_bytes and beyond.
        st.builds(
            lambda b, size: (b * (size // len(b) + 1))[:size],
            st.binary(min_size=1, max_size=8),
            st.integers(1024, 6_000_000),
        ),
    )


@fuzz("raw")
@given(data=st.data())
def test_fuzzed_raw_bytes(ledger: Ledger, catalog: Catalog, timed: None, data: st.DataObject) -> None:
    rpc = data.draw(st.sampled_from(sorted(PATHS)))
    payload = data.draw(raw_payloads(catalog, rpc))
    path, _ = PATHS[rpc]
    method = ledger.channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        method(payload, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    else:
        code, details = OK, ""
    parsed = True
    if code is INVALID and not names_a_field(rpc, details):
        # Nothing parsed, so there is no field to name: the message must say what was expected instead.
        assert PATHS[rpc][1].DESCRIPTOR.full_name in details, details
        parsed = False
    ledger.record(rpc, code, details, parsed=parsed)


def test_still_serving_after_the_fuzzing(ledger: Ledger) -> None:
    ledger.check_health()
    response = ledger.stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5), timeout=CALL_TIMEOUT_S)
    assert response.items and response.release.release_id == ledger.release_id
    fuzzers = [name for name in globals() if name.startswith("test_fuzzed_")]
    if all(name in ledger.seconds for name in fuzzers):  # the whole module ran, not a -k selection
        assert ledger.sent >= 10_000, ledger.sent
