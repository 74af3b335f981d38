"""Tenant isolation as a property: a hypothesis state machine over two tenants (register,
share, unshare, unload adapters; chat on them; create, share, fill, search and delete
namespaces; over HTTP and gRPC) checks after every step that nothing a tenant can see
(its lists of adapters, models and namespaces on both transports, its /metrics, the
answers to its own requests, their errors) names another tenant's private adapter,
namespace or document, and that it does see its own things and every shared one.

Names carry their tenant (`alice-thing-1`), so a leak is a plain substring; a name the
caller sent itself is not a leak when an answer repeats it.
"""

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lorag.v1 import lorag_pb2, lorag_pb2_grpc
from tests.daemons import ALICE, BOB, LocalDaemon

pytestmark = pytest.mark.fuzz
KEYS = {"alice": ALICE, "bob": BOB}
TENANTS = st.sampled_from(sorted(KEYS))
NUMBER = st.integers(1, 2)


@pytest.fixture(scope="module")
def daemon(own_daemon):
    return own_daemon


class Tenants(RuleBasedStateMachine):
    """The model: what each tenant registered and whether it is shared."""

    daemon: LocalDaemon  # set by the test

    def __init__(self):
        super().__init__()
        self.adapters: dict[tuple[str, str], bool] = {}  # (tenant, name) -> shared
        self.namespaces: dict[tuple[str, str], bool] = {}
        self.documents: dict[tuple[str, str], set[str]] = {}  # namespace -> document ids
        self.http = httpx.Client(base_url=self.daemon.url, timeout=60)
        self.channel = grpc.insecure_channel(self.daemon.grpc_target)
        self.stub = lorag_pb2_grpc.LoragServiceStub(self.channel)

    def teardown(self):  # leave the daemon empty for the next run
        for tenant, name in list(self.adapters):
            self._http(tenant, "DELETE", f"/v1/adapters/{name}")
        for tenant, name in list(self.namespaces):
            self._http(tenant, "DELETE", f"/v1/namespaces/{name}")
        self.http.close()
        self.channel.close()

    # ---- what must hold ----

    def private(self, viewer: str) -> set[str]:
        """Names `viewer` must never be told: other tenants' unshared things."""
        names = set()
        for (tenant, name), shared in self.adapters.items():
            if tenant != viewer and not shared:
                names.add(name)
        for (tenant, name), shared in self.namespaces.items():
            if tenant != viewer and not shared:
                names.add(name)
                names.update(self.documents.get((tenant, name), ()))
        return names

    def check(self, viewer: str, answer: str, sent: str = "") -> None:
        leaked = {name for name in self.private(viewer) if name in answer and name not in sent}
        assert not leaked, f"{viewer} was told {sorted(leaked)}: {answer[:500]}"

    @invariant()
    def each_tenant_sees_its_own_and_shared_things_and_nothing_else(self):
        for viewer in KEYS:
            adapters = self._http(viewer, "GET", "/v1/adapters")
            models = self._http(viewer, "GET", "/v1/models")
            namespaces = self._http(viewer, "GET", "/v1/namespaces")
            metrics = self._http(viewer, "GET", "/metrics")  # labels of requests served
            listed = self.stub.ListAdapters(lorag_pb2.ListAdaptersRequest(),
                                            metadata=[("authorization", KEYS[viewer])])
            for answer in (adapters.text, models.text, namespaces.text, metrics.text,
                           str(listed)):
                self.check(viewer, answer)
            names = {row["name"] for row in adapters.json()["data"]}
            assert names == {name for (tenant, name), shared in self.adapters.items()
                             if tenant == viewer or shared}
            assert {row["name"] for row in namespaces.json()["data"]} == {
                name for (tenant, name), shared in self.namespaces.items()
                if tenant == viewer or shared}

    # ---- adapters ----

    @rule(tenant=TENANTS, number=NUMBER, shared=st.booleans())
    def register(self, tenant, number, shared):
        name = f"{tenant}-adapter-{number}"
        body = {"name": name, "path": str(self.daemon.adapters / "style"), "shared": shared}
        answer = self._http(tenant, "POST", "/v1/adapters", json=body)
        self.check(tenant, answer.text, name)
        assert answer.status_code == 200, answer.text
        self.adapters[(tenant, name)] = shared

    @rule(tenant=TENANTS, number=NUMBER)
    def unload(self, tenant, number):
        name = f"{tenant}-adapter-{number}"
        answer = self._http(tenant, "DELETE", f"/v1/adapters/{name}")
        self.check(tenant, answer.text, name)
        assert answer.status_code == (200 if (tenant, name) in self.adapters else 404)
        self.adapters.pop((tenant, name), None)

    @rule(tenant=TENANTS, owner=TENANTS, number=NUMBER, grpc_=st.booleans())
    def chat(self, tenant, owner, number, grpc_):
        """On one's own adapter, another's shared one (200), or another's private one (404
        exactly as for a name nobody has)."""
        name = f"{owner}-adapter-{number}"
        usable = self.adapters.get((owner, name)) is not None and (
            owner == tenant or self.adapters[(owner, name)])
        if grpc_:
            answer, code = self._rpc(tenant, self.stub.Chat, lorag_pb2.ChatRequest(
                model=name, messages=[lorag_pb2.ChatMessage(role="user", content="hi")],
                sampling=lorag_pb2.SamplingOptions(max_tokens=2)))
            assert code == (grpc.StatusCode.OK if usable else grpc.StatusCode.NOT_FOUND)
        else:
            response = self._http(tenant, "POST", "/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2})
            answer = response.text
            assert response.status_code == (200 if usable else 404), answer
        self.check(tenant, answer, name)

    # ---- namespaces ----

    @rule(tenant=TENANTS, number=NUMBER, shared=st.booleans(), document=NUMBER)
    def fill(self, tenant, number, shared, document):
        name, doc = f"{tenant}-kb-{number}", f"{tenant}-doc-{number}-{document}"
        created = self._http(tenant, "PUT", f"/v1/namespaces/{name}", json={"shared": shared})
        added = self._http(tenant, "POST", f"/v1/namespaces/{name}/documents",
                           json={"id": doc, "text": f"The harbour log {doc} says the tide."})
        for answer in (created, added):
            self.check(tenant, answer.text, name + doc)
            assert answer.status_code == 200, answer.text
        self.namespaces[(tenant, name)] = shared
        self.documents.setdefault((tenant, name), set()).add(doc)

    @rule(tenant=TENANTS, owner=TENANTS, number=NUMBER, grpc_=st.booleans())
    def search(self, tenant, owner, number, grpc_):
        name = f"{owner}-kb-{number}"
        usable = self.namespaces.get((owner, name)) is not None and (
            owner == tenant or self.namespaces[(owner, name)])
        if grpc_:
            answer, code = self._rpc(tenant, self.stub.Search, lorag_pb2.SearchRequest(
                namespace=name, query="harbour tide"))
            ok = code == grpc.StatusCode.OK
        else:
            response = self._http(tenant, "POST", f"/v1/namespaces/{name}/search",
                                  json={"query": "harbour tide"})
            answer, ok = response.text, response.status_code == 200
        assert ok == usable, answer
        self.check(tenant, answer, name)

    @rule(tenant=TENANTS, number=NUMBER)
    def drop(self, tenant, number):
        name = f"{tenant}-kb-{number}"
        answer = self._http(tenant, "DELETE", f"/v1/namespaces/{name}")
        self.check(tenant, answer.text, name)
        assert answer.status_code == (200 if (tenant, name) in self.namespaces else 404)
        self.namespaces.pop((tenant, name), None)
        self.documents.pop((tenant, name), None)

    def _rpc(self, tenant: str, method, request) -> tuple[str, grpc.StatusCode]:
        """A gRPC call as `tenant`: (the answer or the error's details, the status)."""
        try:
            answer = method(request, metadata=[("authorization", KEYS[tenant])], timeout=60)
        except grpc.RpcError as error:
            return error.details(), error.code()
        return str(answer), grpc.StatusCode.OK

    def _http(self, tenant: str, method: str, path: str, **body) -> httpx.Response:
        return self.http.request(method, path, headers={"Authorization": KEYS[tenant]},
                                 **body)


def test_no_tenant_learns_another_tenants_private_names(daemon, request):
    Tenants.daemon = daemon
    runs = request.config.getoption("--fuzz-examples")
    Tenants.TestCase.settings = settings(
        max_examples=runs, stateful_step_count=12, deadline=None, derandomize=True,
        database=None, suppress_health_check=[HealthCheck.too_slow])
    Tenants.TestCase().runTest()
    assert daemon.health()["status"] == "ok"
