"""The daemon over HTTP: the official `openai` client and raw HTTP, against the daemon on
each backend (tests/server/conftest.py) on 127.0.0.1 with adapters for its base model."""

import asyncio
import json
import re
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.client import sse_data
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import (
    ALICE,
    ALICE_USER,
    BASE,
    BOB,
    CAROL,
    DAVE,
    KEYS,
    LIMITS,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    MAX_WAITING,
    client,
)
from tests.polling import wait_for
from tests.tiny import tiny_model

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def post(daemon, path: str, body: dict, key: str = ALICE) -> httpx.Response:
    return httpx.post(f"{daemon.url}{path}", json=body, headers={"Authorization": key},
                      timeout=60)


def load(daemon, name: str, path, key: str = ALICE) -> httpx.Response:
    return post(daemon, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                key)


def chat(daemon, model: str, key: str = ALICE, **extra) -> str:
    response = client(daemon, key).chat.completions.create(
        model=model, messages=QUESTION, max_tokens=12, temperature=0, **extra)
    return response.choices[0].message.content


def test_base_chat_non_streaming_with_usage(daemon):
    response = client(daemon).chat.completions.create(model=BASE, messages=QUESTION,
                                                      max_tokens=12, temperature=0)
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 5
    assert response.model == BASE and response.id.startswith("chatcmpl-")


def test_n_choices_are_each_seeds_own_stream_and_usage_counts_the_prompt_once(daemon):
    ask = dict(messages=QUESTION, max_tokens=8, temperature=1.0, seed=7)
    three = client(daemon).chat.completions.create(model=BASE, n=3, **ask)
    assert [c.index for c in three.choices] == [0, 1, 2]
    alone = [client(daemon).chat.completions.create(model=BASE, **{**ask, "seed": 7 + i})
             for i in range(3)]
    assert [c.message.content for c in three.choices] == \
        [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in three.choices}) > 1  # sampled apart
    assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    greedy = client(daemon).completions.create(model=BASE, prompt="The sea is", n=2,
                                               max_tokens=6, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text
    assert [c.index for c in greedy.choices] == [0, 1]


def test_n_choices_stream_interleaved_by_index_with_one_usage_chunk(daemon):
    ask = dict(model=BASE, messages=QUESTION, max_tokens=8, temperature=1.0, seed=3, n=3)
    whole = client(daemon).chat.completions.create(**ask)
    chunks = list(client(daemon).chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}))
    texts, finished = ["", "", ""], set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert texts == [c.message.content for c in whole.choices] and finished == {0, 1, 2}
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == \
        whole.usage.model_dump()


@pytest.mark.parametrize("n", [0, 17, "3", 2.5])
def test_n_outside_1_to_16_is_refused_naming_n(daemon, n):
    response = post(daemon, "/v1/chat/completions", {"model": BASE, "messages": QUESTION,
                                                     "n": n})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"


def test_streaming_equals_non_streaming_and_reports_usage(daemon):
    whole = chat(daemon, BASE)
    chunks = list(client(daemon).chat.completions.create(
        model=BASE, messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices


def test_a_completion_ends_before_its_stop_string(daemon):
    openai_client = client(daemon)
    whole = openai_client.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=20,
                                             temperature=0, extra_body={"ignore_eos": True})
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and len(text) > 8
    stop = text[len(text) // 2:len(text) // 2 + 3]  # whatever it says, cut where it says it
    cut = openai_client.completions.create(model=BASE, prompt="1, 2, 3, 4,", max_tokens=20,
                                           temperature=0, stop=[stop],
                                           extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_a_seed_makes_a_sampled_completion_repeatable(daemon):
    openai_client = client(daemon)
    sampled = [openai_client.completions.create(model=BASE, prompt="Once upon a time",
                                                max_tokens=8, temperature=1.0, seed=11)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable...
    unseeded = {openai_client.completions.create(model=BASE, prompt="Once upon a time",
                                                 max_tokens=8, temperature=1.0).choices[0].text
                for _ in range(3)}
    assert len(unseeded) > 1  # ...and without one it is not


def test_runtime_adapter_answers_differently_then_unload_gives_404(daemon, daemon_adapters):
    response = load(daemon, "style", daemon_adapters / "style")
    assert response.status_code == 200, response.text
    assert load(daemon, "style", daemon_adapters / "style").status_code == 200  # idempotent
    base, tuned = chat(daemon, BASE), chat(daemon, "style")
    assert tuned != base
    models = client(daemon).models.list().data
    entry = next(m for m in models if m.id == "style")
    assert entry.parent == BASE and entry.root == str(daemon_adapters / "style")
    streamed = "".join(c.choices[0].delta.content or "" for c in client(daemon).chat.completions
                       .create(model="style", messages=QUESTION, max_tokens=12,
                               temperature=0, stream=True))
    assert streamed == tuned

    assert post(daemon, "/v1/unload_lora_adapter", {"lora_name": "style"}).status_code == 200
    with pytest.raises(openai.NotFoundError) as error:
        chat(daemon, "style")
    assert "'style' is neither the base model" in str(error.value)
    again = post(daemon, "/v1/unload_lora_adapter", {"lora_name": "style"})
    assert again.status_code == 404 and again.json()["error"]["type"] == "not_found_error"
    assert daemon.health()["status"] == "ok"


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_ia3_prompt_and_prefix_adapters_serve_and_every_listing_names_each_kind(
        daemon, daemon_adapters):
    make_adapters(tiny_model(), daemon_adapters, {
        "ia3-kind": AdapterSpec(ia3=True, targets=("k_proj", "v_proj", "down_proj"),
                                feedforward=("down_proj",), scale=0.3),
        "prompt-kind": AdapterSpec(virtual="prompt", virtual_tokens=12, scale=0.1),
        "prefix-kind": AdapterSpec(virtual="prefix", virtual_tokens=40, scale=1.0)}, seed=3)
    kinds = {"ia3-kind": "ia3", "prompt-kind": "prompt", "prefix-kind": "prefix",
             "lora-kind": "lora"}
    for name in kinds:
        folder = "style" if name == "lora-kind" else name
        assert load(daemon, name, daemon_adapters / folder).status_code == 200
    answers = {name: chat(daemon, name) for name in kinds}
    assert len({*answers.values(), chat(daemon, BASE)}) == 5, answers
    pinned = post(daemon, "/v1/adapters/prefix-kind/pin", {})
    assert pinned.status_code == 200, pinned.text
    assert chat(daemon, "prefix-kind") == answers["prefix-kind"]  # from its held blocks
    models = {m.id: m.model_extra.get("kind") for m in client(daemon).models.list().data}
    assert {name: models[name] for name in kinds} == kinds
    listed = httpx.get(f"{daemon.url}/v1/adapters", headers={"Authorization": ALICE}).json()
    assert {row["name"]: row["kind"] for row in listed["data"]
            if row["name"].endswith("-kind")} == kinds
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        rows = lorag_pb2_grpc.LoragServiceStub(channel).ListAdapters(
            lorag_pb2.ListAdaptersRequest(), metadata=[("authorization", ALICE)], timeout=60)
    assert {a.name: a.kind for a in rows.adapters if a.name.endswith("-kind")} == kinds
    for name in kinds:
        assert post(daemon, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
    assert daemon.health()["status"] == "ok"


# an adapter error names the field of the body the caller sent: vLLM's route calls the
# name and folder lora_name and lora_path, lorag's own route name and path
ADAPTER_ROUTES = [("/v1/load_lora_adapter", "lora_name", "lora_path"),
                  ("/v1/adapters", "name", "path")]


@pytest.mark.parametrize(("route", "name", "path"), ADAPTER_ROUTES)
def test_a_refused_folder_names_the_routes_path_field(daemon, tmp_path, route, name, path):
    refused = post(daemon, route, {name: "nowhere", path: str(tmp_path / "missing")})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == path


@pytest.mark.parametrize(("route", "name", "path"), ADAPTER_ROUTES)
def test_a_refused_name_names_the_routes_name_field(daemon, daemon_adapters, route, name,
                                                   path):
    refused = post(daemon, route, {name: BASE, path: str(daemon_adapters / "style")})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == name


def test_an_unknown_adapter_names_the_requests_model_or_adapters(daemon):
    unknown = post(daemon, "/v1/chat/completions",
                   {"model": "nobody", "messages": QUESTION, "max_tokens": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    part = post(daemon, "/v1/chat/completions",
                {"model": BASE, "messages": QUESTION, "max_tokens": 1,
                 "adapters": [{"name": "nobody", "weight": 1.0}]})
    assert part.status_code == 404 and part.json()["error"]["param"] == "adapters"


def test_composition_extension(daemon, daemon_adapters):
    for name in ("style", "other"):
        assert load(daemon, name, daemon_adapters / name).status_code == 200
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 12, "temperature": 0,
            "adapters": [{"name": "style", "weight": 0.5}, {"name": "other", "weight": 0.5}]}
    response = post(daemon, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    mixed = response.json()["choices"][0]["message"]["content"]
    assert mixed and mixed != chat(daemon, BASE)
    body["model"] = "style"
    conflict = post(daemon, "/v1/chat/completions", body)
    assert conflict.status_code == 400 and conflict.json()["error"]["param"] == "adapters"


def test_tenants_see_only_their_own_adapters(daemon, daemon_adapters):
    assert load(daemon, "other", daemon_adapters / "other").status_code == 200  # alice's
    with pytest.raises(openai.NotFoundError) as theirs:
        chat(daemon, "other", key=BOB)
    with pytest.raises(openai.NotFoundError) as nobody:
        chat(daemon, "no-such-adapter", key=BOB)
    # the same answer as for a name nobody has: nothing tells bob alice has one
    assert str(theirs.value).replace("other", "X") == \
        str(nobody.value).replace("no-such-adapter", "X")
    assert "other" not in {m.id for m in client(daemon, BOB).models.list().data}
    bob_list = httpx.get(f"{daemon.url}/v1/adapters", headers={"Authorization": BOB}).json()
    assert all(a["owner"] == "bob" or a["shared"] for a in bob_list["data"])
    assert post(daemon, "/v1/unload_lora_adapter", {"lora_name": "other"}, BOB).status_code \
        == 404
    assert chat(daemon, "other", key=ALICE_USER)  # alice's non-admin key may use it...
    denied = load(daemon, "x", daemon_adapters / "other", key=ALICE_USER)
    assert denied.status_code == 403  # ...but not manage adapters
    no_key = httpx.get(f"{daemon.url}/v1/models")
    assert no_key.status_code == 401 and "Authorization: Bearer" in no_key.text
    bad_key = httpx.get(f"{daemon.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert bad_key.status_code == 401


def test_shared_adapters_are_visible_to_every_tenant(daemon, daemon_adapters):
    response = post(daemon, "/v1/adapters", {"name": "house-style", "path":
                                             str(daemon_adapters / "style"), "shared": True})
    assert response.status_code == 200 and response.json()["shared"] is True
    assert chat(daemon, "house-style", key=BOB)
    assert post(daemon, "/v1/unload_lora_adapter", {"lora_name": "house-style"}, BOB) \
        .status_code == 404  # bob may use it, not remove it
    assert httpx.delete(f"{daemon.url}/v1/adapters/house-style",
                        headers={"Authorization": ALICE}).status_code == 200


def test_requests_draft_only_from_their_own_tenants_answers(daemon, daemon_adapters,
                                                            monkeypatch):
    """Speculation's history key (server/engine/speculative.py) is the tenant and the
    adapter: two tenants on one shared adapter never draft from each other's answers."""
    assert post(daemon, "/v1/adapters", {"name": "shared-style", "shared": True, "path":
                                         str(daemon_adapters / "style")}).status_code == 200
    keys = []
    submit = daemon.service.engine.submit

    def spy(*args, **kwargs):
        keys.append(kwargs["history"])
        return submit(*args, **kwargs)

    monkeypatch.setattr(daemon.service.engine, "submit", spy)
    try:
        for key in (ALICE, BOB, ALICE):
            assert chat(daemon, "shared-style", key=key)
    finally:
        httpx.delete(f"{daemon.url}/v1/adapters/shared-style",
                     headers={"Authorization": ALICE})
    assert [tenant for tenant, _ in keys] == ["alice", "bob", "alice"]
    assert len({adapter for _, adapter in keys}) == 1  # the one shared adapter


def test_a_pinned_adapter_is_listed_active_and_pinned_until_unpinned(daemon, daemon_adapters):
    assert load(daemon, "other", daemon_adapters / "other").status_code == 200
    pinned = post(daemon, "/v1/adapters/other/pin", {})
    assert pinned.status_code == 200 and pinned.json()["pinned"] and pinned.json()["active"]
    listed = httpx.get(f"{daemon.url}/v1/adapters", headers={"Authorization": ALICE}).json()
    row = next(a for a in listed["data"] if a["name"] == "other")
    assert row["in_ram"] and row["active"] and row["pinned"] and row["running_requests"] == 0
    unpinned = post(daemon, "/v1/adapters/other/unpin", {})
    assert unpinned.status_code == 200 and not unpinned.json()["pinned"]
    assert post(daemon, "/v1/adapters/nope/pin", {}).status_code == 404


def test_metrics_have_per_adapter_labels(daemon, daemon_adapters):
    assert load(daemon, "style", daemon_adapters / "style").status_code == 200
    chat(daemon, "style")
    text = httpx.get(daemon.metrics_url).text
    assert 'lorag_requests_total{adapter="alice.style"' in text
    assert 'lorag_generation_tokens_total{adapter="alice.style"}' in text
    assert 'lorag_time_to_first_token_seconds_bucket{adapter="alice.style"' in text
    assert "lorag_inter_token_latency_seconds_bucket" in text
    assert 'lorag_adapter_resident{adapter="alice.style",tier="ram"} 1.0' in text
    for name in ("lorag_adapter_load_seconds_count", "lorag_waiting", "lorag_running"):
        assert name in text
    if daemon.backend == "native":  # it knows its slots and counts its evictions
        assert 'lorag_adapter_resident{adapter="alice.style",tier="active"} 1.0' in text
        assert "lorag_adapter_evictions_total" in text
        assert "lorag_adapter_slot_loads_total" in text
    else:  # vLLM's own families beside lorag's, by vLLM's names
        assert 'vllm:generation_tokens_total{engine="0"' in text
        assert "vllm:prompt_tokens_total" in text


def test_a_key_sees_only_its_own_tenants_adapters_in_metrics(daemon, daemon_adapters):
    """The API port's /metrics: a key's own tenant's adapters, never another's (the full
    exposition, every adapter named, is on the metrics port); no key, no metrics."""
    assert load(daemon, "style", daemon_adapters / "style").status_code == 200
    assert load(daemon, "bobs-own", daemon_adapters / "other", key=BOB).status_code == 200
    body = {"messages": QUESTION, "max_tokens": MAX_MODEL_LEN - 64, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=daemon.url, timeout=120) as http, ExitStack() as streams:
        readers = []  # kept: a reader collected closes its stream
        for name, key in (("style", ALICE), ("bobs-own", BOB)):  # running while scraped
            readers.append(streams.enter_context(http.stream(
                "POST", "/v1/chat/completions", json={**body, "model": name},
                headers={"Authorization": key})).iter_lines())
            next(line for line in readers[-1] if sse_data(line) is not None)
        full = httpx.get(daemon.metrics_url).text
        alice, bob = (httpx.get(f"{daemon.url}/metrics", headers={"Authorization": key}).text
                      for key in (ALICE, BOB))
    for text in (full, alice, bob):  # each family once, as Prometheus reads it
        names = [family.name for family in text_string_to_metric_families(text)]
        assert len(names) == len(set(names)), names
    assert "alice.style" in full and "bob.bobs-own" in full, full
    assert "bobs-own,style" in full, full
    assert 'lorag_adapter_resident{adapter="alice.style",tier="ram"} 1.0' in alice
    assert 'running_lora_adapters="style"' in alice
    assert "bobs-own" not in alice
    assert 'running_lora_adapters="bobs-own"' in bob
    assert "alice" not in bob and "style" not in bob
    assert httpx.get(f"{daemon.url}/metrics").status_code == 401
    assert post(daemon, "/v1/unload_lora_adapter", {"lora_name": "bobs-own"}, BOB) \
        .status_code == 200


def router_gauges(daemon) -> dict:
    """The families routers read from the metrics port, parsed."""
    response = httpx.get(daemon.metrics_url, timeout=10)
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    gauges = {name: families[name].samples for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info")}
    for name, samples in gauges.items():
        assert len(samples) == 1, f"{name}: one sample, not {samples}"  # not vLLM's too
    return {name: samples[0] for name, samples in gauges.items()}


def running(daemon) -> float:
    return router_gauges(daemon)["vllm:num_requests_running"].value


def test_metrics_speak_the_routers_vllm_names(daemon, daemon_adapters):
    """What the endpoint picker's lora-affinity-scorer and production-stack read: the
    adapters of running requests by the name the request gave, the adapter slots, queue
    and KV-cache usage; the same on both backends."""
    for name in ("style", "other"):
        assert load(daemon, name, daemon_adapters / name).status_code == 200
    body = {"messages": QUESTION, "max_tokens": MAX_MODEL_LEN - 64, "ignore_eos": True,
            "stream": True}  # long enough to be running at the scrapes
    with httpx.Client(base_url=daemon.url, headers={"Authorization": ALICE},
                      timeout=120) as http, ExitStack() as streams:
        readers = []  # kept: a reader collected closes its stream
        for name in ("style", "other"):  # both running once each has its first chunk
            readers.append(streams.enter_context(http.stream(
                "POST", "/v1/chat/completions", json={**body, "model": name})).iter_lines())
            next(line for line in readers[-1] if sse_data(line) is not None)
        # vLLM's figures arrive with its next step's stats
        wait_for(lambda: running(daemon) >= 2, 30, 0.1, "both requests running")
        busy = router_gauges(daemon)
        info = busy["vllm:lora_requests_info"]
        assert info.labels["running_lora_adapters"] == "other,style"  # not alice.style
        assert info.labels["max_lora"] == str(LIMITS["max_active_adapters"]
                                              if daemon.backend == "native" else 8)
        assert 0 < busy["vllm:kv_cache_usage_perc"].value <= 1
        assert busy["vllm:kv_cache_usage_perc"].labels == {"model_name": BASE}
        assert busy["vllm:gpu_cache_usage_perc"].value == busy["vllm:kv_cache_usage_perc"].value
    # the clients left: their requests are cancelled
    wait_for(lambda: running(daemon) == 0, 30, 0.1, "no request running")
    idle = router_gauges(daemon)
    info = idle["vllm:lora_requests_info"]
    assert info.labels["running_lora_adapters"] == info.labels["waiting_lora_adapters"] == ""
    assert abs(info.value - time.time()) < 60  # the Unix time of the reading
    assert idle["vllm:num_requests_waiting"].value == 0
    # residency: both adapters stay loaded after their requests; a pinned one holds a slot
    assert post(daemon, "/v1/adapters/style/pin", {}).status_code == 200
    try:
        resident = residency(daemon)
    finally:
        assert post(daemon, "/v1/adapters/style/unpin", {}).status_code == 200
    loaded = {s.labels["adapter_name"]: s.labels for s in resident["vllm:lora_adapter_loaded"]}
    assert {"style", "other"} <= set(loaded), loaded  # by the name requests give
    assert loaded["style"] == {"model_name": BASE, "adapter_name": "style", "level": "gpu",
                               "pinned": "true"}
    assert loaded["other"]["pinned"] == "false"
    levels = [labels["level"] for labels in loaded.values()]
    assert resident["vllm:num_gpu_loaded_lora_adapters"][0].value == levels.count("gpu")
    assert resident["vllm:num_cpu_loaded_lora_adapters"][0].value == levels.count("cpu")
    assert resident["vllm:max_gpu_lora_adapters"][0].value == int(info.labels["max_lora"])


def residency(daemon) -> dict:
    """vLLM's adapter residency families from the metrics port, each family's samples."""
    text = httpx.get(daemon.metrics_url, timeout=10).text
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    return {name: families[name] for name in (
        "vllm:lora_adapter_loaded", "vllm:num_gpu_loaded_lora_adapters",
        "vllm:num_cpu_loaded_lora_adapters", "vllm:max_gpu_lora_adapters")}


def test_the_fleet_dashboard_reads_metrics_the_daemon_writes(daemon):
    """deploy/grafana's dashboard and the HPA's queue metric name only families /metrics
    has (a renamed metric would leave a panel empty, or the autoscaler blind)."""
    text = httpx.get(daemon.metrics_url).text
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lorag.json").read_text())
    names = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\b(?:lorag_|vllm:)[a-z_:]+", target["expr"])}
    names.add(re.search(r"name: (lorag_\w+)",
                        (DEPLOY / "k8s" / "base" / "hpa.yaml").read_text())[1])
    assert len(names) >= 9
    for name in sorted(names):
        if daemon.backend == "vllm" and name in ("lorag_adapter_slot_loads_total",
                                                 "lorag_adapter_evictions_total"):
            continue  # vLLM does not say (docs/backends.md)
        family = name.removesuffix("_bucket")  # a histogram's TYPE line names its family
        assert re.search(rf"^(# TYPE )?{re.escape(family)}[{{ ]", text, re.M), name


def test_cli_adapters_list_load_pin_unpin_unload(daemon, daemon_adapters):
    from typer.testing import CliRunner

    from lorag.cli import app
    from lorag.errors import NotFound, PermissionDenied

    def lorag(*args: str, key: str = ALICE):
        result = CliRunner().invoke(app, ["adapters", *args, "--url", daemon.url,
                                          "--api-key", key.split()[1]])
        return result, " ".join(result.output.split())

    result, out = lorag("load", "cli-style", str(daemon_adapters / "style"))
    assert result.exit_code == 0 and "cli-style: loaded" in out and "in RAM" in out
    result, out = lorag("pin", "cli-style")
    assert result.exit_code == 0 and "in a slot" in out and "yes" in out
    result, out = lorag("list")
    assert result.exit_code == 0 and "cli-style" in out
    result, out = lorag("unpin", "cli-style")
    assert result.exit_code == 0 and "cli-style" in out
    result, out = lorag("list", key=BOB)
    assert result.exit_code == 0 and "cli-style" not in out  # not bob's adapter
    result, _ = lorag("unload", "cli-style", key=ALICE_USER)
    assert isinstance(result.exception, PermissionDenied)
    assert "(403)" in result.exception.message and "admin key" in result.exception.message
    result, out = lorag("unload", "cli-style")
    assert result.exit_code == 0 and "cli-style: unloaded" in out
    result, _ = lorag("unload", "cli-style")
    assert isinstance(result.exception, NotFound) and "(404)" in result.exception.message


def cancelled_count(daemon) -> float:
    text = httpx.get(daemon.metrics_url).text
    found = re.search(r'lorag_requests_total\{adapter="base",finish_reason="cancelled"\} (\S+)',
                      text)
    return float(found[1]) if found else 0.0


@pytest.mark.slow
def test_a_full_queue_answers_429_and_clients_that_leave_cancel(daemon):
    """More streams at once than running + waiting slots: the rest get a 429 in OpenAI's
    shape; the accepted ones are cancelled when their clients disconnect, and the engine
    is empty again afterwards."""
    flood, before = MAX_NUM_SEQS + MAX_WAITING + 8, cancelled_count(daemon)
    body = {"model": BASE, "messages": QUESTION, "max_tokens": MAX_MODEL_LEN - 64,
            "ignore_eos": True, "stream": True}

    async def run() -> list[tuple[int, dict | None]]:
        answered, everyone = [], asyncio.Event()
        limits = httpx.Limits(max_connections=flood)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60, limits=limits,
                                     headers={"Authorization": ALICE}) as http:
            async def one() -> tuple[int, dict | None]:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    error = (await response.aread()) if response.status_code != 200 else None
                    answered.append(response.status_code)
                    if len(answered) == flood:
                        everyone.set()
                    await everyone.wait()  # hold every accepted stream open until then
                    return response.status_code, error and httpx.Response(
                        response.status_code, content=error).json()["error"]
            return await asyncio.gather(*(one() for _ in range(flood)))

    results = asyncio.run(run())
    refused = [error for status, error in results if status == 429]
    accepted = [status for status, _ in results if status == 200]
    assert len(refused) + len(accepted) == flood and len(refused) >= 8, results
    assert all(e["type"] == "rate_limit_error" and "queue is full" in e["message"]
               for e in refused)
    wait_for(lambda: daemon.health()["running"] + daemon.health()["waiting"] == 0, 60, 0.2,
             "an idle engine")
    wait_for(lambda: cancelled_count(daemon) >= before + len(accepted), 10, 0.1,
             "every request counted as cancelled")
    assert cancelled_count(daemon) == before + len(accepted)
    assert chat(daemon, BASE)  # and it serves again


def prefix_cache_counters(daemon) -> dict[str, float]:
    """vLLM's prefix-cache counters from /metrics, each exactly one sample."""
    text = httpx.get(daemon.metrics_url, timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counters = {}
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        samples = families[name].samples
        assert len(samples) == 1, f"{name}: one sample, not {samples}"  # not vLLM's too
        assert samples[0].labels == {"model_name": BASE}
        counters[name] = samples[0].value
    return counters


def test_a_repeated_prompt_prefix_is_served_from_the_prefix_cache(daemon):
    """The same long system prompt twice on the base model: the second request's full
    blocks come from the prefix cache, counted under vLLM's names on both backends."""
    before = prefix_cache_counters(daemon)
    messages = [{"role": "system", "content": "You answer from the passages. " * 30},
                {"role": "user", "content": "What is the capital of France?"}]
    body = {"model": BASE, "messages": messages, "max_tokens": 2, "temperature": 0}
    answers = []
    for _ in range(2):
        response = httpx.post(f"{daemon.url}/v1/chat/completions", json=body,
                              headers={"Authorization": ALICE}, timeout=60)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0]["message"]["content"])
    after = prefix_cache_counters(daemon)
    prompt = response.json()["usage"]["prompt_tokens"]
    assert after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"] >= \
        2 * prompt
    assert after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"] >= 128
    assert answers[0] == answers[1]  # a hit gives what a miss gave


@pytest.mark.slow
def test_each_key_gets_its_fair_share_and_only_that_key_is_refused(daemon):
    """carol's key may have 2 requests in flight, dave's use 1 token a second (the keys
    file, tests/daemons.py): past that, each gets a 429 with Retry-After, while alice's
    requests go through."""
    body = {"model": BASE, "messages": QUESTION, "max_tokens": MAX_MODEL_LEN - 64,
            "ignore_eos": True, "stream": True}
    with ExitStack() as streams:
        if daemon.backend == "native":  # the tiny model would end both streams in a blink:
            slow = daemon.service.engine  # 50 ms a step (vLLM's real model is slower still)
            slow.fault_hook = lambda sampled, logits: time.sleep(0.05)
            streams.callback(setattr, slow, "fault_hook", None)
        running = []
        for _ in range(2):
            response = streams.enter_context(httpx.stream(
                "POST", f"{daemon.url}/v1/chat/completions", json=body, timeout=60,
                headers={"Authorization": CAROL}))
            assert response.status_code == 200
            running.append(response.iter_lines())  # kept: a dropped reader closes it
            next(running[-1])
        third = post(daemon, "/v1/chat/completions", {**body, "stream": False}, CAROL)
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        error = third.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert "this API key has 2 requests in flight, its share" in error["message"]
        assert chat(daemon, BASE)  # alice is not held back by carol's share
    first = post(daemon, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 4},
                 DAVE)
    assert first.status_code == 200, first.text  # a full bucket: 10 s of 1 token/s
    second = post(daemon, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 4},
                  DAVE)
    assert second.status_code == 429, second.text
    assert "this API key used its 1 tokens per second" in second.json()["error"]["message"]
    spent = first.json()["usage"]["total_tokens"]
    assert 1 <= int(second.headers["retry-after"]) <= spent - 10 + 1
    assert chat(daemon, BASE)


@pytest.mark.slow
def test_a_key_with_its_own_adapter_roots_registers_from_them_alone(daemon, keys_file):
    """A key added to the keys file while the daemon runs works within a second; its
    adapter_roots confine what it may register (here one adapter's folder), even inside
    the daemon's roots."""
    erin = "Bearer erin-own-roots-key-01"
    own = {"tenant": "erin", "admin": True, "adapter_roots": [str(daemon.adapters / "style")]}
    keys_file.write_text(json.dumps({**KEYS, erin.split()[1]: own}))
    try:
        wait_for(lambda: load(daemon, "style", daemon.adapters / "style", erin).status_code
                 != 401, 10, 0.2, "the new key read")
        response = load(daemon, "style", daemon.adapters / "style", erin)  # again: a no-op
        assert response.status_code == 200, response.text
        refused = load(daemon, "other", daemon.adapters / "other", erin)
        assert refused.status_code == 400
        assert "is outside the configured adapter roots" in refused.json()["error"]["message"]
    finally:
        keys_file.write_text(json.dumps(KEYS))
    wait_for(lambda: load(daemon, "style", daemon.adapters / "style", erin).status_code
             == 401, 10, 0.2, "the removed key refused")
