"""The migration's metrics sources (llmgw_operator.analysis): pure parts, then ScrapeSource and
PrometheusSource against real proxies with fake providers and a real Prometheus, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import math
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
from aiohttp import web
from prometheus import PrometheusServer, StartPrometheus, Target, free_port
from prometheus_client import generate_latest

from conftest import Fakes, proxy_config, set_weight, write_config
from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw.metrics import Metrics
from llmgw.server import ProxyServer
from llmgw_dev.fakes import FakeProvider
from llmgw_operator.analysis import (
    ERROR_CODES,
    Measurements,
    MetricsUnavailable,
    PrometheusSource,
    Proxies,
    ScrapeSource,
    Targets,
    counter_increase,
    is_server_error,
    promql_duration,
    quantile_from_buckets,
    split_routes,
    window_increase,
)

INF = math.inf
ROUTE = "demo-model"

# -- pure: quantiles ---------------------------------------------------------------------------------

# 100 observations: 10 <= 0.1, 50 in (0.1, 0.5], 30 in (0.5, 1], 10 above 1.
HIST = [(0.1, 10.0), (0.5, 60.0), (1.0, 90.0), (INF, 100.0)]


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, HIST, 0.1 + 0.4 * (40 / 50)),  # rank 50 in (0.1, 0.5]: 40 of its 50 -> 0.42
        (0.05, HIST, 0.1 * (5 / 10)),  # lowest bucket starts at 0 -> 0.05
        (0.0, HIST, 0.0),
        (0.9, HIST, 1.0),  # rank 90: the top of (0.5, 1]
        (0.99, HIST, 1.0),  # rank 99 is in +Inf: the highest finite bound
        (1.0, HIST, 1.0),
        (0.75, HIST, 0.5 + 0.5 * (15 / 30)),  # rank 75: 15 of 30 in (0.5, 1] -> 0.75
        (0.5, list(reversed(HIST)), 0.42),  # order does not matter
        (0.5, [(0.1, 4.0), (0.1, 6.0), (0.5, 60.0), (1.0, 90.0), (INF, 100.0)], 0.42),  # same bound: summed
        (0.5, [(0.1, 10.0), (0.5, 60.0), (1.0, 55.0), (INF, 100.0)], 0.42),  # non-monotonic: made monotonic
        (0.2, [(-1.0, 5.0), (0.5, 8.0), (INF, 10.0)], -1.0),  # rank in a lowest bucket bounded <= 0
        (0.99, [(0.025, 0.0), (0.05, 200.0), (INF, 200.0)], 0.025 + 0.025 * 0.99),
    ],
)
def test_quantile_hand_computed(q: float, buckets: list[tuple[float, float]], expected: float) -> None:
    assert quantile_from_buckets(q, buckets) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.99, [(0.1, 0.0), (INF, 0.0)], None),  # no observations
        (0.99, [(0.1, 3.0), (1.0, 5.0)], None),  # no +Inf bucket
        (0.99, [(INF, 5.0)], None),  # +Inf alone
        (0.99, [], None),
        (math.nan, HIST, None),
        (-0.1, HIST, -INF),
        (1.5, HIST, INF),
        (0.0, [(0.1, 0.0), (0.5, 5.0), (INF, 5.0)], None),  # PromQL's 0/0
    ],
)
def test_quantile_edge_cases(q: float, buckets: list[tuple[float, float]], expected: float | None) -> None:
    assert quantile_from_buckets(q, buckets) == expected


# -- pure: counters, errors, PromQL text --------------------------------------------------------------


def test_counter_increase_like_prometheus() -> None:
    assert counter_increase(None, 7.0) == 7.0  # no earlier reading: from zero
    assert counter_increase(3.0, 10.0) == 7.0
    assert counter_increase(10.0, 10.0) == 0.0
    assert counter_increase(10.0, 4.0) == 4.0  # went down: a reset, the new value is all new


def test_window_increase_resets_a_proxy_as_a_whole() -> None:
    ok, err = ("c", (("code", "200"),)), ("c", (("code", "500"),))
    assert window_increase({ok: 10.0, err: 2.0}, {ok: 15.0, err: 2.0}) == {ok: 5.0, err: 0.0}
    # A series first seen now counts from zero.
    assert window_increase({ok: 10.0}, {ok: 12.0, err: 3.0}) == {ok: 2.0, err: 3.0}
    # One counter went down: the proxy restarted, so every value is new, even one that looks like +1.
    assert window_increase({ok: 10.0, err: 2.0}, {ok: 4.0, err: 3.0}) == {ok: 4.0, err: 3.0}
    # A series gone since the baseline also means a restart.
    assert window_increase({ok: 10.0, err: 2.0}, {ok: 12.0}) == {ok: 12.0}
    # A proxy not in the baseline (a new pod) counts whole.
    assert window_increase(None, {ok: 4.0}) == {ok: 4.0}


@pytest.mark.parametrize(
    ("code", "server_side"),
    [
        ("500", True),
        ("501", True),
        ("502", True),
        ("503", True),
        ("504", True),
        ("529", True),  # Anthropic's overloaded
        ("408", True),  # the provider timed out
        ("401", True),  # the provider refused the gateway's own key
        ("403", True),
        ("200", False),
        ("400", False),
        ("404", False),
        ("413", False),
        ("429", False),
        ("499", False),
        ("5000", False),
        ("", False),
    ],
)
def test_error_classification(code: str, server_side: bool) -> None:
    assert is_server_error(code) is server_side


def test_the_proxy_precreates_the_error_series_the_analysis_counts() -> None:
    """Every code the proxy creates at 0 besides success is one the analysis counts as an error, and the
    errors the gateway itself reports (unreachable, bad gateway, timeout) are among them."""
    from llmgw.metrics import PRECREATED_CODES

    assert [c for c in PRECREATED_CODES if not is_server_error(c)] == ["200"]
    assert {"502", "503", "504"} <= set(PRECREATED_CODES)


def test_promql_text() -> None:
    assert promql_duration(300) == "300s"
    assert promql_duration(1.5) == "1500ms"
    assert promql_duration(0.0001) == "1ms"
    source = PrometheusSource("http://127.0.0.1:9/", namespace_label="ns", gateway_label="gw")
    targets = Targets("team-a", 'we"ird', (), routes=("demo-model", "gpt-4o*", "a.b"))
    assert source.selector(targets) == r'ns="team-a", gw="we\"ird", route=~"demo-model|gpt-4o\\*|a\\.b"'
    queries = source.queries(Targets("team-a", "gw1", (), routes=(ROUTE,)), 300)
    sel = 'ns="team-a", gw="gw1", route=~"demo-model"'
    requests = "llmgw_upstream_requests_total"
    duration = "gen_ai_server_request_duration_seconds_bucket"
    ttft = "gen_ai_server_time_to_first_token_seconds_bucket"
    assert queries == {
        "targets": 'count(up{ns="team-a", gw="gw1"})',
        "grpc_requests": f'sum(increase({requests}{{path="grpc", {sel}}}[300s]))',
        "grpc_errors": f'sum(increase({requests}{{path="grpc", code=~"{ERROR_CODES}", {sel}}}[300s]))',
        "grpc_p99_seconds": f'histogram_quantile(0.99, sum by (le) (rate({duration}{{path="grpc", {sel}}}[300s])))',
        "rest_p99_seconds": f'histogram_quantile(0.99, sum by (le) (rate({duration}{{path="rest", {sel}}}[300s])))',
        "grpc_ttft_p99_seconds": f'histogram_quantile(0.99, sum by (le) (rate({ttft}{{path="grpc", {sel}}}[300s])))',
    }
    assert 'route=""' in source.selector(Targets("a", "b", (), routes=()))  # no split route: nothing
    assert "route" not in source.selector(Targets("a", "b", ()))  # None: every route
    assert split_routes(
        {
            "routes": [
                {"model": "m", "rest": "r", "grpc": "g"},
                {"model": "r-only", "rest": "r"},
                {"model": "g", "grpc": "g"},
            ]
        }
    ) == ("m",)


# -- ScrapeSource against /metrics made by the proxy's own Metrics class --------------------------------


class MetricsServer:
    """Serves a :class:`Metrics` registry on 127.0.0.1 like a proxy's admin port; ``metrics`` can be replaced
    by a fresh one to act out a restart."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.endpoint = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> MetricsServer:
        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", handler)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def outcome(self, path: str, code: str, n: int = 1, route: str = ROUTE, seconds: float = 0.02) -> None:
        m = self.metrics.path(route, path, f"{path}-provider")
        for _ in range(n):
            m.outcome(code).inc()
            m.duration.observe(seconds)


@pytest.fixture
async def metrics_servers() -> AsyncIterator[Callable[[], Any]]:
    servers: list[MetricsServer] = []

    async def start() -> MetricsServer:
        server = await MetricsServer().start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


class Clock:
    """ScrapeSource's clock, moved by hand: window bookkeeping without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def test_scrape_counts_classifies_and_survives_restarts(
    metrics_servers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await metrics_servers(), await metrics_servers()
    a.metrics.grpc_weight.labels(ROUTE).set(25)
    a.metrics.grpc_weight.labels("grpc-only").set(100)
    a.metrics.generation.set(7)
    b.metrics.grpc_weight.labels(ROUTE).set(25)
    b.metrics.generation.set(6)
    a.outcome("grpc", "200", 50)  # before the baseline: not in the window
    targets = Targets("ns", "gw", (a.endpoint, b.endpoint), routes=(ROUTE,))
    clock = Clock()
    async with ScrapeSource(clock=clock) as source:
        assert await source.proxies(targets) == Proxies(2, (25, 25), (7, 6))
        assert await source.measure("gw", targets, 60) is None  # the baseline
        a.outcome("grpc", "200", 30, seconds=0.02)
        a.outcome("grpc", "503", 2)
        a.outcome("grpc", "429", 5)  # rate limited: not a server-side error
        a.outcome("grpc", "499", 1)  # the client went away
        b.outcome("grpc", "200", 10, seconds=0.3)
        b.outcome("grpc", "500", 3)  # b's first 500s: a new series, counted from zero
        b.outcome("rest", "200", 40, seconds=0.7)
        b.outcome("grpc", "500", 100, route="grpc-only")  # not a split route
        clock.advance(60)
        m = await source.measure("gw", targets, 60)
        assert m is not None
        assert (m.grpc_requests, m.grpc_errors) == (30 + 2 + 5 + 1 + 10 + 3, 2 + 3)
        assert m.window_seconds == 60
        # 51 gRPC observations: 41 in (0.01, 0.025], 10 in (0.25, 0.5]; rank 50.49 -> 0.25 + 0.25 * 9.49 / 10
        assert m.grpc_p99_seconds == pytest.approx(0.25 + 0.25 * (0.99 * 51 - 41) / 10)
        assert m.rest_p99_seconds == pytest.approx(0.5 + 0.5 * 0.99)  # 40 in (0.5, 1]
        assert m.grpc_ttft_p99_seconds is None  # no streams

        # Every route summed by path, under another key (its own baseline).
        every = Targets("ns", "gw", targets.endpoints)
        assert await source.measure("every", every, 60) is None
        b.outcome("grpc", "500", 4, route="grpc-only")
        clock.advance(60)
        m = await source.measure("every", every, 60)
        assert m is not None and (m.grpc_requests, m.grpc_errors) == (4, 4)

        # b restarts: its counters start over, lower than before; a new proxy c appears.
        b.metrics = Metrics()
        b.outcome("grpc", "200", 6)
        b.outcome("grpc", "500", 4)  # "500" was 3: it looks like +1, but the proxy restarted
        c = await metrics_servers()
        c.outcome("grpc", "504", 2)
        three = Targets("ns", "gw", (a.endpoint, b.endpoint, c.endpoint), routes=(ROUTE,))
        m = await source.measure("gw", three, 60)  # 60 s since the last reading of "gw"
        assert m is not None and (m.grpc_requests, m.grpc_errors) == (6 + 4 + 2, 4 + 2)
        clock.advance(60)
        m = await source.measure("gw", three, 60)
        assert m is not None and (m.grpc_requests, m.grpc_errors) == (0, 0)
        assert m.grpc_p99_seconds is None and m.rest_p99_seconds is None  # nothing observed: NaN in PromQL

        # A proxy that cannot be read fails a measurement, naming it; proxies() leaves it out (and logs it).
        await c.stop()
        with pytest.raises(
            MetricsUnavailable, match=rf"1 of 3 proxies unreadable: cannot read http://{c.endpoint}/metrics"
        ):
            await source.measure("gw", three, 60)
        with caplog.at_level(logging.WARNING, logger="llmgw_operator.analysis"):
            assert await source.proxies(three) == Proxies(3, (25, 0), (7, 0))  # b restarted: a fresh registry
        assert f"gateway ns/gw: cannot read http://{c.endpoint}/metrics" in caplog.text


async def test_scrape_windows_need_a_baseline_of_the_right_age(metrics_servers: Any) -> None:
    a = await metrics_servers()
    targets = Targets("ns", "gw", (a.endpoint,))
    clock = Clock()
    async with ScrapeSource(clock=clock) as source:
        with pytest.raises(ValueError, match="window_seconds"):
            await source.measure("k", targets, 0)
        assert await source.measure("k", targets, 60) is None  # first call: baseline only
        clock.advance(50)
        assert await source.measure("k", targets, 60) is None  # no reading covers 0.9 windows yet
        clock.advance(10)
        a.outcome("grpc", "200", 3)
        m = await source.measure("k", targets, 60)  # readings 60 s and 10 s old: the first is the base
        assert m is not None and m.grpc_requests == 3 and m.window_seconds == 60
        clock.advance(121)  # more than two windows: too old a base to stand for "the last 60 s"
        assert await source.measure("k", targets, 60) is None
        clock.advance(70)  # a base 70 s old: a bit long, but the only one
        a.outcome("grpc", "200", 1)
        m = await source.measure("k", targets, 60)
        assert m is not None and m.grpc_requests == 1 and m.window_seconds == 70
        # Between 0.9 and 1.05 windows old, the oldest wins: the window starts at its start or just after.
        for _ in range(6):
            clock.advance(12)
            a.outcome("grpc", "200", 1)
            await source.measure("k", targets, 60)  # readings 12 s apart
        m = await source.measure("k", targets, 60)
        assert m is not None and m.window_seconds == 60 and m.grpc_requests == 5
        m = await source.measure("k", targets, 56)  # 60 s is too old for 56 (1.07 windows); 48 s too young
        assert m is not None and m.window_seconds == 60
        m = await source.measure("k", targets, 50)  # 48 s: over 0.9 windows
        assert m is not None and m.window_seconds == 48
        # Frequent calls keep at most 64 readings per window (one in two at least 1/32 window apart), for two
        # windows.
        for _ in range(150):  # 140 s
            clock.advance(60 / 64)
            await source.measure("k", targets, 60)
        assert len(source._histories["k"].readings) <= 2 * 64 + 2
        m = await source.measure("k", targets, 60)
        assert m is not None and 54 <= m.window_seconds <= 63
        source.forget("k")
        assert await source.measure("k", targets, 60) is None


async def test_scrape_windows_start_at_the_proxies_reading(metrics_servers: Any) -> None:
    """The migration reads the proxies every tick: the reading that saw the weight live starts the window."""
    a = await metrics_servers()
    a.metrics.generation.set(3)
    targets = Targets("ns", "gw", (a.endpoint,))
    clock = Clock()
    async with ScrapeSource(clock=clock) as source:
        a.outcome("grpc", "200", 5)  # before the weight went live
        assert await source.proxies(targets) == Proxies(1, (0,), (3,))  # the tick that sees it live
        a.outcome("grpc", "500", 2)
        for _ in range(6):
            clock.advance(10)
            assert await source.proxies(targets) == Proxies(1, (0,), (3,))  # later ticks
        a.outcome("grpc", "200", 3)
        m = await source.measure(targets.key, targets, 60)
        assert m is not None and (m.grpc_requests, m.grpc_errors) == (5, 2) and m.window_seconds == 60
        assert await source.measure("another key", targets, 60) is None  # only its own readings


# -- real proxies, real traffic ---------------------------------------------------------------------


def chat(model: str = ROUTE) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=model, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello there")], max_tokens=5
    )


async def send(
    proxies: Sequence[ProxyServer], count: int, *, model: str = ROUTE, concurrency: int = 8
) -> None:
    """``count`` requests through the proxies' gRPC fronts, round robin; every fourth one streams."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") for p in proxies]
    stubs = [pb_grpc.LLMServiceStub(c) for c in channels]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            stub = stubs[i % len(stubs)]
            if i % 4 == 3:
                chunks = [c async for c in stub.StreamingChat(chat(model), timeout=10)]
                assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
            else:
                reply = await stub.ChatCompletion(chat(model), timeout=10)
                assert reply.usage.completion_tokens == 5

    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=30)
    finally:
        for channel in channels:
            await channel.close()


def local(
    proxies: Sequence[ProxyServer], path: str = "grpc", codes: Callable[[str], bool] = lambda c: True
) -> int:
    """``llmgw_upstream_requests_total`` of the split route summed over the proxies, read in-process."""
    total = 0.0
    for proxy in proxies:
        for family in proxy.metrics.registry.collect():
            for s in family.samples:
                if (
                    s.name == "llmgw_upstream_requests_total"
                    and s.labels["route"] == ROUTE
                    and s.labels["path"] == path
                    and codes(s.labels["code"])
                ):
                    total += s.value
    return round(total)


def set_faults(fakes: Fakes, error_rate: float) -> None:
    fakes.grpc.faults.update({"latency_ms": 20, "error_rate": error_rate, "error_status": 500})
    fakes.openai.faults.update({"latency_ms": 60})


def check_plausible(m: Measurements) -> None:
    """The fakes answer the gRPC path after 20 ms and the REST path after 60 ms: no p99 can be below that
    (bucket bounds ... 0.01, 0.025, 0.05, 0.1 ...), and on a quiet machine they are in the next bucket up.
    The upper bound leaves room for a busy machine; it catches a unit or bucket mix-up."""
    assert m.grpc_p99_seconds is not None and 0.02 <= m.grpc_p99_seconds <= 5.0, m
    assert m.rest_p99_seconds is not None and 0.05 <= m.rest_p99_seconds <= 5.0, m
    assert m.grpc_ttft_p99_seconds is not None and 0.02 <= m.grpc_ttft_p99_seconds <= 5.0, m


@pytest.mark.parametrize("error_rate", [0.0, 0.25])
async def test_scrape_source_against_real_proxies(fakes: Fakes, start_proxy: Any, error_rate: float) -> None:
    set_faults(fakes, error_rate)
    proxies = [await start_proxy(proxy_config(fakes)), await start_proxy(proxy_config(fakes))]
    targets = Targets("team", "gw", tuple(f"127.0.0.1:{p.admin_port}" for p in proxies), routes=(ROUTE,))
    async with ScrapeSource() as source:
        assert await source.proxies(targets) == Proxies(2, (50, 50), (1, 1))
        started = time.monotonic()
        assert await source.measure(targets.key, targets, 1.0) is None
        grpc_before, errors_before = fakes.grpc.stats["requests"], fakes.grpc.stats["injected_errors"]
        await send(proxies, 200)
        m = await source.measure(targets.key, targets, time.monotonic() - started)
        assert m is not None
        # Exactly what the gRPC fake saw: every gRPC-path attempt, and the 500s it injected.
        assert m.grpc_requests == fakes.grpc.stats["requests"] - grpc_before
        assert m.grpc_errors == fakes.grpc.stats["injected_errors"] - errors_before
        assert 60 <= m.grpc_requests <= 140  # weight 50 of 200
        assert (m.grpc_errors > 0) is (error_rate > 0)
        check_plausible(m)

        # A new weight goes live on one proxy: proxies() sees it there.
        write_config(
            pathlib.Path(proxies[1].config_path),
            set_weight(proxy_config(fakes, generation=2), 75),
        )
        assert proxies[1].reload_if_changed()
        assert await source.proxies(targets) == Proxies(2, (50, 75), (1, 2))


# -- PrometheusSource against a real Prometheus --------------------------------------------------------


async def test_quantile_matches_promql(start_prometheus: StartPrometheus) -> None:
    """quantile_from_buckets against histogram_quantile itself, on literal buckets."""
    server = await start_prometheus()
    cases = [
        HIST,
        [(0.1, 4.0), (0.1, 6.0), (0.5, 60.0), (1.0, 90.0), (INF, 100.0)],
        [(0.1, 10.0), (0.5, 60.0), (1.0, 55.0), (INF, 100.0)],
        [(-1.0, 5.0), (0.5, 8.0), (INF, 10.0)],
        [(0.025, 0.0), (0.05, 200.0), (INF, 200.0)],
        [(0.1, 0.0), (0.5, 5.0), (INF, 5.0)],
        [(0.1, 0.0), (INF, 0.0)],
        [(0.1, 3.0), (1.0, 5.0)],
        [(0.001, 1.0), (0.0025, 1.0), (0.005, 3.0), (0.01, 7.0), (0.025, 70.0), (INF, 71.0)],
    ]
    async with PrometheusSource(server.url) as source:
        for buckets in cases:
            # Two series per bound where a bound repeats: label them apart so `or` keeps both, then sum by le.
            vector = " or ".join(
                f'label_replace(label_replace(vector({count}), "le", "{"+Inf" if bound == INF else bound}", "", ""),'
                f' "i", "{i}", "", "")'
                for i, (bound, count) in enumerate(buckets)
            )
            for q in (0.0, 0.05, 0.5, 0.75, 0.9, 0.99, 1.0):
                promql = await source.query(f"histogram_quantile({q}, sum by (le) ({vector}))")
                mine = quantile_from_buckets(q, buckets)
                assert mine == pytest.approx(promql), (buckets, q)


async def scrape_times(server: PrometheusServer, pod: str) -> list[float]:
    """When Prometheus scraped ``pod`` (the timestamps of its ``up`` samples)."""
    (series,) = await server.query(f'up{{pod="{pod}"}}[2m]')
    return [float(at) for at, _ in series["values"]]


async def test_prometheus_and_scrape_sources_agree(
    fakes: Fakes, start_proxy: Any, start_prometheus: StartPrometheus
) -> None:
    """The same traffic measured both ways. Prometheus's increase() and rate() extrapolate to the window's
    edges, each series by its own factor near zero, which moves a sparse histogram tail across buckets; a
    window from just before one scrape to just after another makes that negligible, so the two sources must
    agree exactly on counts and closely on p99s. One proxy per gateway, as Prometheus scrapes one target's
    series together (summing over proxies is ScrapeSource's part, tested above)."""
    set_faults(fakes, 0.25)
    gw = [await start_proxy(proxy_config(fakes))]
    async with FakeProvider("openai") as o2, FakeProvider("anthropic") as a2, FakeProvider("grpc") as g2:
        # Another gateway in the same namespace, all gRPC: its traffic must not count for gw.
        other = await start_proxy(set_weight(proxy_config(Fakes(o2, a2, g2)), 100))
        server = await start_prometheus(
            [
                Target(
                    f"127.0.0.1:{gw[0].admin_port}",
                    {"namespace": "team", "pod": "gw-proxy-0", "llmgateway_io_gateway": "gw"},
                ),
                Target(
                    f"127.0.0.1:{other.admin_port}",
                    {"namespace": "team", "pod": "other-proxy-0", "llmgateway_io_gateway": "other"},
                ),
            ],
            scrape_interval="250ms",
        )
        print(f"prometheus ready {server.startup_seconds:.2f}s after start")
        await server.wait_scraped()
        targets = Targets("team", "gw", (f"127.0.0.1:{gw[0].admin_port}",), routes=(ROUTE,))
        prometheus = PrometheusSource(server.url, bearer_token="tok-3f9a-not-sent-anywhere")
        scrape = ScrapeSource()
        try:
            # Warm up until every series the window counts exists: Prometheus cannot count what a series
            # held when first scraped (see the analysis module docstring).
            for _ in range(20):
                if local(gw, "grpc", lambda c: c == "200") and local(gw, "grpc", lambda c: c == "500"):
                    break
                await send(gw, 10)
            else:
                raise AssertionError("warm-up did not produce gRPC 200s and 500s")
            await send([other], 4)
            warm = local(gw, "grpc") + local(gw, "rest")
            gw_total = 'sum(llmgw_upstream_requests_total{llmgateway_io_gateway="gw"})'
            await server.wait_until(gw_total, lambda v: v == warm, "warm-up scraped")
            window_start = time.time()  # for the other gateway: a flat stretch follows
            await asyncio.sleep(0.6)
            load_start = time.time()
            assert await scrape.measure(targets.key, targets, 1.0) is None
            started = time.monotonic()
            grpc_before, errors_before = local(gw, "grpc"), local(gw, "grpc", lambda c: c == "500")

            await asyncio.gather(send(gw, 200), send([other], 60, concurrency=2))

            grpc_sent = local(gw, "grpc") - grpc_before
            errors = local(gw, "grpc", lambda c: c == "500") - errors_before
            total = local(gw, "grpc") + local(gw, "rest")
            await server.wait_until(gw_total, lambda v: v == total, "load scraped")
            await asyncio.sleep(0.3)
            by_scrape = await scrape.measure(targets.key, targets, time.monotonic() - started)
            assert by_scrape is not None
            assert (by_scrape.grpc_requests, by_scrape.grpc_errors) == (grpc_sent, errors)
            assert errors > 0
            check_plausible(by_scrape)

            # From 1 ms before the last scrape before the load to 1 ms after the last scrape.
            times = await scrape_times(server, "gw-proxy-0")
            first, last = max(t for t in times if t <= load_start - 0.05), times[-1]
            aligned = PrometheusSource(server.url, clock=lambda: last + 0.001)
            by_prometheus = await aligned.measure(targets.key, targets, last - first + 0.002)
            await aligned.close()
            print(f"scrape: {by_scrape}\nprometheus: {by_prometheus}")
            assert by_prometheus is not None
            assert (by_prometheus.grpc_requests, by_prometheus.grpc_errors) == (grpc_sent, errors)
            check_plausible(by_prometheus)
            for field in ("grpc_p99_seconds", "rest_p99_seconds", "grpc_ttft_p99_seconds"):
                assert getattr(by_prometheus, field) == pytest.approx(getattr(by_scrape, field), rel=0.01), (
                    field
                )

            # A window ending now, as the migration asks: the other gateway is measured on its own, all
            # gRPC, its 60 requests of the window; extrapolation makes that a little more, never less.
            mine = await prometheus.measure(
                ("team", "other"), Targets("team", "other", (), routes=(ROUTE,)), time.time() - window_start
            )
            assert mine is not None and 60 <= mine.grpc_requests <= 60 * 1.5 and mine.grpc_errors == 0

            # Live state comes from the proxies themselves, the same for both sources.
            assert (
                await prometheus.proxies(targets) == await scrape.proxies(targets) == Proxies(1, (50,), (1,))
            )

            # A gateway Prometheus does not scrape: an error a person can act on, not zeros.
            with pytest.raises(
                MetricsUnavailable,
                match=r'no scrape target labelled namespace="team", llmgateway_io_gateway="nope"',
            ):
                await prometheus.measure("team/nope", Targets("team", "nope", ()), 60)
            # Wrong labels configured: the same.
            relabelled = PrometheusSource(server.url, gateway_label="gateway")
            with pytest.raises(MetricsUnavailable, match=r'gateway="gw": check that it scrapes'):
                await relabelled.measure("team/gw", targets, 60)
            await relabelled.close()
            # Not Prometheus's API under this URL.
            wrong_path = PrometheusSource(
                server.url + "/prometheus", bearer_token="tok-3f9a-not-sent-anywhere"
            )
            with pytest.raises(MetricsUnavailable, match=r"answered HTTP 404") as caught:
                await wrong_path.measure("team/gw", targets, 60)
            assert "tok-3f9a" not in str(caught.value)
            await wrong_path.close()
        finally:
            await prometheus.close()
            await scrape.close()


# -- PrometheusSource errors ---------------------------------------------------------------------------


async def test_prometheus_unreachable() -> None:
    port = free_port()
    for url, token in (
        (f"http://127.0.0.1:{port}", "tok-secret-1"),
        (f"http://user:pw-secret@127.0.0.1:{port}/", None),
    ):
        async with PrometheusSource(url, bearer_token=token) as source:
            with pytest.raises(
                MetricsUnavailable, match=rf"cannot reach Prometheus at http://127.0.0.1:{port}:"
            ) as caught:
                await source.measure("k", Targets("ns", "gw", ()), 60)
        assert "secret" not in str(caught.value)
    with pytest.raises(ValueError, match="not both"):
        PrometheusSource(f"http://user:pw@127.0.0.1:{port}", bearer_token="tok")


Answer = Callable[[str], web.Response]


@pytest.fixture
async def fake_prometheus() -> AsyncIterator[tuple[str, list[Answer], list[web.Request]]]:
    """A loopback HTTP server answering /api/v1/query with ``answer[0](query)``."""
    answer: list[Answer] = []
    seen: list[web.Request] = []

    async def query(request: web.Request) -> web.Response:
        seen.append(request)
        return answer[0](request.query["query"])

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", answer, seen
    await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (
            422,
            '{"status":"error","errorType":"execution","error":"query processing would load too many samples"}',
            "application/json",
            r"refused query '.*' \(HTTP 422\): execution: query processing would load too many samples",
        ),
        (
            503,
            "<html>upstream connect error</html>",
            "text/html",
            r"answered HTTP 503, not with the Prometheus API's JSON",
        ),
        (401, "Unauthorized tok-secret-2", "text/plain", r"answered HTTP 401 \(check the bearer token\)"),
        (
            200,
            '{"status":"success","data":{"resultType":"matrix","result":[]}}',
            "application/json",
            r"gave a matrix, not a vector",
        ),
        (
            200,
            '{"status":"success","data":{"resultType":"vector","result":'
            '[{"metric":{},"value":[1,"1"]},{"metric":{},"value":[1,"2"]}]}}',
            "application/json",
            r"gave 2 series, not one",
        ),
    ],
)
async def test_prometheus_errors(
    fake_prometheus: tuple[str, list[Answer], list[web.Request]],
    status: int,
    body: str,
    content_type: str,
    message: str,
) -> None:
    url, answer, seen = fake_prometheus
    answer.append(lambda _: web.Response(status=status, text=body, content_type=content_type))
    async with PrometheusSource(url, bearer_token="tok-secret-2") as source:
        with pytest.raises(MetricsUnavailable, match=message) as caught:
            await source.measure("k", Targets("ns", "gw", ()), 60)
    assert "tok-secret-2" not in str(caught.value)
    assert url in str(caught.value)
    assert seen and all(r.headers["Authorization"] == "Bearer tok-secret-2" for r in seen)


async def test_a_prometheus_url_pointing_elsewhere_reads_nothing_back(
    fake_prometheus: tuple[str, list[Answer], list[web.Request]],
) -> None:
    """The operator fetches the URL from its own network position: a gateway pointing it at another service
    (cloud metadata, an internal API) must not read that service's answer through its status, nor send its
    token on to where a redirect points, nor make the operator hold an endless answer."""
    url, answer, seen = fake_prometheus
    answer.append(
        lambda _: web.Response(text="AccessKeyId=ASIA-other-tenant-secret", content_type="text/plain")
    )
    async with PrometheusSource(url, bearer_token="tok") as source:
        with pytest.raises(MetricsUnavailable) as caught:
            await source.query("up")
    assert "other-tenant-secret" not in str(caught.value)
    assert "not with the Prometheus API's JSON" in str(caught.value)

    answer[0] = lambda _: web.json_response({"status": "success", "secret": "other-tenant-secret"})
    async with PrometheusSource(url) as source:
        with pytest.raises(MetricsUnavailable) as caught:
            await source.query("up")
    assert "other-tenant-secret" not in str(caught.value)

    answer[0] = lambda _: web.Response(
        status=302, headers={"Location": f"{url}/api/v1/query?query=redirected"}
    )
    async with PrometheusSource(url, bearer_token="tok") as source:
        with pytest.raises(MetricsUnavailable, match="HTTP 302"):
            await source.query("up")
    assert [r.query["query"] for r in seen[-1:]] == ["up"]  # the redirect was not followed

    answer[0] = lambda _: web.Response(body=b"x" * (9 * 1024 * 1024), content_type="application/json")
    async with PrometheusSource(url) as source:
        with pytest.raises(MetricsUnavailable, match="answered more than"):
            await source.query("up")


async def test_prometheus_empty_and_nan_results(
    fake_prometheus: tuple[str, list[Answer], list[web.Request]],
) -> None:
    url, answer, seen = fake_prometheus

    def result(query: str) -> web.Response:
        if query.startswith("count(up"):
            value: str | None = "2"
        elif "increase(" in query:
            value = None  # no series matched: no requests
        elif "duration" in query and 'path="grpc"' in query:
            value = "NaN"  # series, but no observations in the window
        elif "duration" in query:
            value = "0.042"
        else:
            value = None
        samples = [{"metric": {}, "value": [1.5, value]}] if value is not None else []
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": samples}})

    answer.append(result)
    async with PrometheusSource(url) as source:
        m = await source.measure("k", Targets("ns", "gw", ()), 60)
    assert m == Measurements(60, 0, 0, None, 0.042, None)
    assert len(seen) == 6 and len({r.query["time"] for r in seen}) == 1  # all at one instant
    assert "Authorization" not in seen[0].headers
