"""Schedule policies on scripted queues over a real radix cache: window order, deadline
promotion, shared-prefix deferral, HRRN aging, and the no-starvation bound of `slo`."""

from __future__ import annotations

import itertools

import pytest

from rollout_accel.serving.engine.kv_pool import SlotAllocator
from rollout_accel.serving.engine.prefill_work import QueueClock, prefill_work
from rollout_accel.serving.engine.radix_cache import RadixCache, common_prefix_len
from rollout_accel.serving.engine.request import Request
from rollout_accel.serving.engine.sampling_params import SamplingParams
from rollout_accel.serving.engine.schedule_policy import (
    HighestResponseRatioNext,
    make_policy,
)
from rollout_accel.serving.engine.slo_policy import SloSettings, SloWindowPolicy

_ids = itertools.count()


def _req(tokens: list[int], arrival: float, **kw) -> Request:
    return Request(
        rid=f"r{next(_ids)}", input_ids=list(tokens), params=SamplingParams(), seed=0,
        arrival_time=arrival, **kw,
    )  # fmt: skip


def _tokens(start: int, count: int) -> list[int]:
    return [(start + i) % 997 for i in range(count)]


@pytest.fixture
def cache() -> RadixCache:
    alloc = SlotAllocator(1 << 16)
    cache = RadixCache(alloc.free)
    cache.alloc = alloc  # type: ignore[attr-defined]
    return cache


def _cache_tokens(cache: RadixCache, tokens: list[int]) -> None:
    slots = cache.alloc.alloc(len(tokens))  # type: ignore[attr-defined]
    cached, _ = cache.insert(tokens, slots)
    cache.alloc.free(slots[:cached])  # type: ignore[attr-defined]


def test_peek_is_read_only_and_matches_match_length(cache: RadixCache) -> None:
    a, b = _tokens(0, 300), _tokens(0, 120) + _tokens(500, 50)
    _cache_tokens(cache, a)
    _cache_tokens(cache, b)
    nodes_before = len(cache._all_nodes())
    access_before = {id(n): n.last_access for n in cache._all_nodes()}
    for probe in (a, b, a[:77], _tokens(0, 150) + [996], _tokens(3, 40), []):
        assert cache.peek(probe) == cache.match_length(probe)
    assert len(cache._all_nodes()) == nodes_before  # no split
    assert {id(n): n.last_access for n in cache._all_nodes()} == access_before
    assert common_prefix_len(a, _tokens(0, 257) + [5]) == 257
    assert common_prefix_len(a, a[:10]) == 10


def test_window_orders_cheapest_prefill_first(cache: RadixCache) -> None:
    history = _tokens(0, 400)
    _cache_tokens(cache, history)
    long_fresh = _req(_tokens(600, 300), arrival=0.0)  # work 300
    continuation = _req(history + _tokens(900, 20), arrival=1.0)  # work 20
    medium = _req(_tokens(100, 80) + _tokens(800, 50), arrival=2.0)  # work 130
    outside = _req(_tokens(700, 5), arrival=3.0)  # cheapest, but outside a window of 3
    policy = SloWindowPolicy(SloSettings(window=3, ttft_slo_ms=1e6))
    order = policy.order([outside, medium, long_fresh, continuation], cache, QueueClock(4.0))
    assert order == [continuation, medium, long_fresh, outside]
    assert [prefill_work(r, cache) for r in order[:3]] == [20, 130, 300]
    # FCFS ignores the cost; LPM puts the most cached first.
    fcfs = make_policy("fcfs").order([outside, medium, long_fresh, continuation], cache)
    assert fcfs == [long_fresh, continuation, medium, outside]


def test_deadline_promotion_and_low_priority(cache: RadixCache) -> None:
    policy = SloWindowPolicy(SloSettings(window=8, ttft_slo_ms=1000.0, promote_margin=0.3))
    expensive_old = _req(_tokens(0, 500), arrival=0.0)
    cheap = _req(_tokens(600, 10), arrival=0.5)
    tight = _req(_tokens(300, 200), arrival=0.6, ttft_slo_ms=100.0)
    doomed = _req(_tokens(800, 5), arrival=0.0, priority=-1)
    # At 0.65 s nobody is due: tight waited 0.05 s < 0.7 * 0.1 s, expensive_old 0.65 s < 0.7 s.
    order = policy.order([expensive_old, cheap, tight, doomed], cache, QueueClock(0.65))
    assert order == [cheap, tight, expensive_old, doomed]
    # At 0.72 s expensive_old has waited 0.72 >= 0.7 * 1 s and tight 0.12 >= 0.07: both urgent,
    # earliest deadline first (tight: 0.7 s, expensive_old: 1.0 s). The doomed request is never
    # promoted, though it waited longest.
    order = policy.order([expensive_old, cheap, tight, doomed], cache, QueueClock(0.72))
    assert order == [tight, expensive_old, cheap, doomed]
    assert policy.order([doomed], cache, QueueClock(100.0)) == [doomed]


def test_prefill_rate_promotes_long_requests_earlier(cache: RadixCache) -> None:
    policy = SloWindowPolicy(SloSettings(window=8, ttft_slo_ms=1000.0, promote_margin=0.3))
    long_req = _req(_tokens(0, 1000), arrival=0.0)
    short_req = _req(_tokens(500, 10), arrival=0.0)
    keep = _req(_tokens(900, 3), arrival=0.0)  # stays waiting, so the rate samples are kept
    # 1000 prefill tokens per second observed over two steps.
    policy.order([keep, long_req, short_req], cache, QueueClock(0.0, 0))
    policy.order([keep, long_req, short_req], cache, QueueClock(0.1, 100))
    assert policy.rate.tokens_per_s == pytest.approx(1000.0)
    # At 0.2 s: the long request needs ~1 s of prefill, so 0.2 + 1.0 >= 0.7 -> urgent already;
    # the short one (0.01 s) is not.
    order = policy.order([keep, short_req, long_req], cache, QueueClock(0.2, 200))
    assert order[0] is long_req
    assert order[1:] == [keep, short_req]


def test_shared_uncached_prefix_is_computed_once(cache: RadixCache) -> None:
    system = _tokens(0, 200)
    first = _req(system + _tokens(300, 10), arrival=0.0)
    second = _req(system + _tokens(400, 12), arrival=0.1)
    other = _req(_tokens(700, 50), arrival=0.2)
    policy = SloWindowPolicy(SloSettings(window=8, ttft_slo_ms=1e6))
    order = policy.order([first, second, other], cache, QueueClock(0.3))
    assert order == [other, first]  # second waits: first computes the shared 200 tokens
    _cache_tokens(cache, first.input_ids)
    order = policy.order([second, other], cache, QueueClock(0.4))
    assert order == [second, other]  # now it hits the cache and is the cheapest
    # HRRN (as SGLang) puts the duplicate last instead of holding it back.
    hrrn = HighestResponseRatioNext()
    third = _req(_tokens(0, 150) + _tokens(50, 40), arrival=0.5)
    fourth = _req(_tokens(0, 150) + _tokens(60, 40), arrival=0.6)
    assert hrrn.order([fourth, third], cache, QueueClock(1.0, 0))[-1] is fourth


def test_hrrn_ages_by_prefill_tokens(cache: RadixCache) -> None:
    hrrn = HighestResponseRatioNext()
    big = _req(_tokens(0, 1000), arrival=0.0)
    hrrn.order([big], cache, QueueClock(0.0, 0))  # big first seen at 0 tokens
    small = _req(_tokens(500, 100), arrival=1.0)
    # At 50 tokens done: big's ratio 50/1000, small's 0/100 -> big first.
    assert hrrn.order([big, small], cache, QueueClock(1.0, 50)) == [big, small]
    # 300 tokens later: big (350/1000 = 0.35) vs small (300/100 = 3) -> small first.
    assert hrrn.order([big, small], cache, QueueClock(2.0, 350)) == [small, big]
    many = [_req(_tokens(i, 10), arrival=float(i)) for i in range(130)]
    assert hrrn.order(many[::-1], cache, QueueClock(0.0, 0)) == many  # FCFS past 128


def _simulate(policy, cache: RadixCache, steps: int, budget: int, dt: float):
    """A step loop shaped like the scheduler's: each step the policy orders the queue, requests
    are admitted in that order under a prefill token budget (a long one in chunks), finished
    prompts go into the radix cache, and time advances by dt. Every step brings enough fresh
    cheap requests to fill the budget on their own. Returns {rid: (arrival, first token)}."""
    waiting: list[Request] = []
    done_tokens = 0
    first_token: dict[str, float] = {}
    arrivals: dict[str, float] = {}
    progress: dict[str, int] = {}
    starved = _req(_tokens(0, 3 * budget), arrival=0.0)
    waiting.append(starved)
    arrivals[starved.rid] = 0.0
    base = 1000
    for step in range(steps):
        now = step * dt
        for _ in range(budget // 40):
            cheap = _req(_tokens(base, 40), arrival=now)
            base += 41
            waiting.append(cheap)
            arrivals[cheap.rid] = now
        left = budget
        for req in policy.order(waiting, cache, QueueClock(now, done_tokens)):
            if left <= 0:
                break
            remaining = prefill_work(req, cache) if req.row is None else req.remaining_prefill()
            count = min(remaining, left)
            if req.row is None:
                req.row = 0  # admitted: now mid-prefill
                req.num_computed = req.fill_len - remaining
            req.num_computed += count
            progress[req.rid] = req.num_computed
            left -= count
            done_tokens += count
        end = now + dt
        for req in list(waiting):
            if req.row is not None and req.num_computed >= req.fill_len:
                first_token[req.rid] = end
                _cache_tokens(cache, req.input_ids)
                waiting.remove(req)
    return arrivals, first_token, starved.rid


def test_no_request_waits_past_its_deadline_plus_one_step(cache: RadixCache) -> None:
    dt, budget, slo_s = 0.1, 400, 2.0
    policy = SloWindowPolicy(SloSettings(window=64, ttft_slo_ms=slo_s * 1000))
    arrivals, first, long_rid = _simulate(policy, cache, steps=60, budget=budget, dt=dt)
    assert long_rid in first, "the long request starved"
    late = [first[r] - (arrivals[r] + slo_s) for r in first]
    assert max(late) <= dt + 1e-9, f"a request waited {max(late):.2f}s past its deadline"


def test_cheapest_first_without_deadlines_starves(cache: RadixCache) -> None:
    """The same scripted queue with deadlines out of reach: the long request never runs, which
    is what the promotion above prevents (so the bound test can fail)."""
    policy = SloWindowPolicy(SloSettings(window=64, ttft_slo_ms=1e9))
    _, first, long_rid = _simulate(policy, cache, steps=60, budget=400, dt=0.1)
    assert long_rid not in first


def test_make_policy_names_and_errors() -> None:
    for name in ("fcfs", "lpm", "hrrn", "slo"):
        assert hasattr(make_policy(name), "order")
    with pytest.raises(ValueError, match="schedule_policy"):
        make_policy("sjf")
    with pytest.raises(ValueError, match="schedule_window"):
        SloSettings(window=0)


def test_long_prefill_sits_out_steps_with_cheaper_ones(cache: RadixCache) -> None:
    policy = SloWindowPolicy(SloSettings(window=8, ttft_slo_ms=1000.0, mix_limit_tokens=100))
    long_req = _req(_tokens(0, 400), arrival=0.0)
    cheap = _req(_tokens(500, 30), arrival=0.1)
    assert policy.order([long_req, cheap], cache, QueueClock(0.2)) == [cheap]
    assert policy.order([long_req], cache, QueueClock(0.3)) == [long_req]  # nothing cheaper
    # Urgent (waited 0.75 s >= 0.7 s): first, whatever it costs.
    assert policy.order([long_req, cheap], cache, QueueClock(0.75)) == [long_req, cheap]
