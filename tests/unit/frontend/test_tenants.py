"""Tenant config, token -> tenant mapping and the tenant accounting, without gRPC (issue 22)."""

from __future__ import annotations

import pytest

from bitserve import cli
from bitserve.api.security import TenantOf, load_token_tenants
from bitserve.engine.sched.policy import TENANT_SEP, Budget, Policy, Waiting, fair_order, tenant_fair_order
from bitserve.errors import ConfigError, InvalidArgument, ResourceExhausted
from bitserve.frontend.tenants import Tenants, fairness_key
from bitserve.metrics import Metrics
from bitserve.settings import ServerSettings, TenantSettings, build_settings

# config ------------------------------------------------------------------------------------


def _server(tmp_path, lines: str, **kw) -> ServerSettings:
    path = tmp_path / "tokens"
    path.write_text(lines)
    return ServerSettings(auth_tokens_file=str(path), **kw)


def test_plain_token_file_has_no_tenants(tmp_path):
    s = _server(tmp_path, "# ops\ntok-a\n\ntok-b\n")
    assert load_token_tenants(s) == [(b"tok-a", None), (b"tok-b", None)]


def test_token_lines_name_their_tenant_and_default_tenant_fills_in(tmp_path):
    s = _server(
        tmp_path,
        "tok-a acme\ntok-b\n",
        tenants={"acme": TenantSettings(), "beta": TenantSettings()},
        default_tenant="beta",
    )
    entries = load_token_tenants(s, environ={})
    assert entries == [(b"tok-a", "acme"), (b"tok-b", "beta")]
    tenant_of = TenantOf(entries)
    assert tenant_of([("authorization", "Bearer tok-a")]) == "acme"
    assert tenant_of([("authorization", "bearer tok-b")]) == "beta"
    assert tenant_of([("authorization", "Bearer nope")]) is None
    assert tenant_of([]) is None


def test_unknown_tenant_in_token_file_is_refused_naming_key_and_line(tmp_path):
    s = _server(tmp_path, "tok-a acme\ntok-secret-b acne\n", tenants={"acme": TenantSettings()})
    with pytest.raises(ConfigError) as e:
        load_token_tenants(s)
    msg = str(e.value)
    assert msg.startswith("server.auth_tokens_file: line 2 names tenant 'acne'")
    assert "acme" in msg and "tok-secret-b" not in msg  # the defined ones, never the secret


def test_unknown_tenant_in_token_env_is_refused_naming_key():
    s = ServerSettings(auth_tokens_env="TOKS", tenants={"acme": TenantSettings()})
    with pytest.raises(ConfigError, match=r"^server.auth_tokens_env: item 2 names tenant 'zed'"):
        load_token_tenants(s, environ={"TOKS": "t1 acme, t2 zed"})


def test_unknown_default_tenant_is_refused_naming_key(tiny_models):
    cfg = {
        "server": {"tenants": {"acme": {}}, "default_tenant": "acm"},
        "models": [{"name": "lm", "task": "generate", "path": str(tiny_models["lm"])}],
    }
    with pytest.raises(ConfigError, match=r"^server: default_tenant: 'acm' is not defined in server.tenants"):
        build_settings(config_data=cfg, environ={})


def test_serve_with_an_unknown_tenant_exits_2_with_one_line(tmp_path, tiny_models, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-1 acme\ntok-2 ghost\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"server: {{port: 0, metrics_port: -1, auth_tokens_file: {tokens}, tenants: {{acme: {{}}}}}}\n"
        f"models: [{{name: lm, task: generate, path: {tiny_models['lm']}}}]\n"
    )
    for command in ("check-config", "serve"):
        assert cli.main([command, "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "server.auth_tokens_file: line 2 names tenant 'ghost'" in err[0]


def test_burst_without_rate_is_a_config_error():
    with pytest.raises(ValueError, match="burst needs requests_per_second"):
        TenantSettings(burst=3)


# accounting --------------------------------------------------------------------------------


def _tenant(**limits):
    book = Tenants({"t": TenantSettings(**limits)}, Metrics())
    tenant = book.get("t")
    assert tenant is not None
    return book, tenant


def test_requests_per_second_with_burst():
    _, t = _tenant(requests_per_second=2, burst=4)
    for _ in range(4):  # the burst passes at once
        t.admit_call()
    with pytest.raises(ResourceExhausted) as e:
        t.admit_call()
    assert "tenant 't'" in e.value.message and "2 requests per second (burst 4)" in e.value.message
    # 4 calls per ceil(4 / 2) = 2 s window: the first frees up at most 2 s after it was made.
    assert e.value.retry_after is not None and 0 < e.value.retry_after <= 2.0


def test_concurrent_sequences_are_held_until_finished():
    _, t = _tenant(max_concurrent_sequences=3)
    tickets = t.admit_sequences("lm", 100, [5, 5], 8)
    with pytest.raises(ResourceExhausted, match="at its limit of 3 concurrent sequences") as e:
        t.admit_sequences("lm", 100, [5, 5], 8)
    assert e.value.retry_after is not None and e.value.retry_after > 0
    tickets[0].finish(3)
    tickets[0].finish(3)  # once only
    assert t.sequences == 1
    t.admit_sequences("lm", 100, [5, 5], 8)
    with pytest.raises(InvalidArgument, match="needs 4 sequences, more than tenant 't'"):
        t.admit_sequences("lm", 100, [1, 1, 1, 1], 8)


def test_queue_share_is_per_model():
    _, t = _tenant(queue_share=0.25)
    t.admit_sequences("lm", 8, [3, 3], 4)  # 0.25 x 8 = 2 places
    with pytest.raises(ResourceExhausted, match=r"at its queue_share of 0.25 \(2 places\)"):
        t.admit_sequences("lm", 8, [3], 4)
    t.admit_sequences("other", 8, [3], 4)  # another model's queue is another share
    assert t.per_model == {"lm": 2, "other": 1}


def test_prompt_tokens_per_minute_counts_the_prompts():
    book, t = _tenant(prompt_tokens_per_minute=20)
    t.admit_sequences("lm", 100, [6, 6], 4)
    with pytest.raises(
        ResourceExhausted, match="limit of 20 prompt tokens per minute: this request needs 9, 8"
    ) as e:
        t.admit_sequences("lm", 100, [9], 4)
    assert e.value.retry_after is not None and 0 < e.value.retry_after <= 60
    t.admit_sequences("lm", 100, [8], 4)  # exactly what is left
    assert book.metrics is not None
    assert book.metrics.tenant_prompt_tokens.labels("t")._value.get() == 20


def test_generated_tokens_reserve_max_new_tokens_and_give_back_the_rest():
    book, t = _tenant(generated_tokens_per_minute=30)
    (a,) = t.admit_sequences("lm", 100, [4], 20)  # reserves 20 of 30
    with pytest.raises(ResourceExhausted, match="needs 20, 10 are left"):
        t.admit_sequences("lm", 100, [4], 20)
    a.finish(5)  # generated 5: 15 come back
    (b,) = t.admit_sequences("lm", 100, [4], 20)  # 5 + 20 = 25 <= 30
    b.finish(20)
    with pytest.raises(ResourceExhausted, match="needs 20, 5 are left"):
        t.admit_sequences("lm", 100, [4], 20)
    assert book.metrics is not None
    assert book.metrics.tenant_generated_tokens.labels("t")._value.get() == 25
    with pytest.raises(InvalidArgument, match=r"needs 62 tokens \(texts x max_new_tokens\)"):
        t.admit_sequences("lm", 100, [1, 1], 31)


def test_a_refused_request_takes_nothing():
    _, t = _tenant(max_concurrent_sequences=10, prompt_tokens_per_minute=10, generated_tokens_per_minute=10)
    t.admit_sequences("lm", 100, [5], 5)
    with pytest.raises(ResourceExhausted, match="generated tokens per minute"):
        t.admit_sequences("lm", 100, [5], 6)  # prompt fits (10), generation does not (11)
    assert t.sequences == 1
    t.admit_sequences("lm", 100, [5], 5)  # the prompt window was not charged by the refusal


def test_metric_labels_are_only_configured_tenants():
    m = Metrics()
    book = Tenants({"a": TenantSettings(max_concurrent_sequences=2), "b": TenantSettings()}, m)
    book.count(book.get(None), "OK")
    book.count(book.get("intruder"), "OK")
    labels = {s.labels.get("tenant") for f in m.registry.collect() for s in f.samples if "tenant" in s.labels}
    assert labels == {"a", "b", "(none)"}
    assert Tenants({}, m).get("a") is None


# fairness ----------------------------------------------------------------------------------


def _w(client: str) -> Waiting:
    return Waiting(prompt_len=4, arrived=0.0, client=client)


def test_tenant_fair_order_is_round_robin_by_tenant_then_caller():
    a1, a2, a3 = (fairness_key("a", f"c{i}") for i in range(3))
    b1 = fairness_key("b", "c0")
    waiting = [_w(a1), _w(a2), _w(a3), _w(a1), _w(b1), _w(b1)]
    # a's three callers get one turn between them per round, as b's single caller does.
    assert tenant_fair_order(waiting) == [0, 4, 1, 5, 2, 3]
    # Caller-level fair_order would give tenant a three turns per round.
    assert fair_order(waiting)[:4] == [0, 1, 2, 4]


def test_tenant_fair_order_without_tenants_is_fair_order():
    waiting = [_w("x"), _w("x"), _w("y"), _w("z")]
    assert tenant_fair_order(waiting, {"x": 5}) == fair_order(waiting, {"x": 5})
    assert TENANT_SEP not in fairness_key(None, "x")


def test_policy_serves_tenants_alternately_however_many_callers_they_use():
    # One slot per step: tenant a floods with a new caller id per request (ids cost nothing),
    # tenant b has one caller. b must get every other admission.
    policy = Policy(Budget(max_concurrent=1, prefill_tokens=1000))
    waiting = [_w(fairness_key("a", f"c{i}")) for i in range(8)] + [_w(fairness_key("b", "only"))] * 4
    admitted: list[str] = []
    while waiting:
        d = policy.schedule(waiting, [], now=0.0)
        (i,) = d.admit
        admitted.append(waiting[i].client.partition(TENANT_SEP)[0])
        waiting = waiting[:i] + waiting[i + 1 :]
    assert admitted[:8] == ["a", "b"] * 4 or admitted[:8] == ["b", "a"] * 4


def test_a_tenant_arriving_behind_a_hogs_backlog_gets_the_next_free_slot():
    """Issue 22: the engine's order, not the clock. The hog fills every slot and keeps a backlog
    from eight callers; the victim arrives last. When one row finishes, that slot is the
    victim's, ahead of every hog request that waited longer."""
    policy = Policy(Budget(max_concurrent=4, prefill_tokens=1000))
    hog = [
        Waiting(prompt_len=4, arrived=float(i), client=fairness_key("hog", f"c{i % 8}")) for i in range(12)
    ]
    first = policy.schedule(hog, [], now=20.0)
    assert len(first.admit) == 4  # the batch is the hog's
    backlog = [w for i, w in enumerate(hog) if i not in first.admit]
    victim = Waiting(prompt_len=4, arrived=30.0, client=fairness_key("victim", "v"))
    waiting = [*backlog, victim]
    nxt = policy.schedule(waiting, [10, 10, 10], now=31.0)  # one of the four rows has ended
    assert [waiting[i] for i in nxt.admit] == [victim]
    # With two free slots, the victim's one request goes first, then the hog's oldest.
    waiting = [*backlog, victim]
    both = Policy(Budget(max_concurrent=4, prefill_tokens=1000))
    both.schedule(hog, [], now=20.0)
    two = both.schedule(waiting, [10, 10], now=31.0)
    assert [waiting[i] for i in two.admit][0] is victim and len(two.admit) == 2
