"""The CLI's state and the daemon name a tenant's namespaces alike: what `lorag ingest`
writes to the state for tenant "default" is what an open daemon (no API keys) searches."""

from pathlib import Path

from lorag.cli.retrieval import StoreNamespaces
from lorag.retrieval.ingest import ingest
from lorag.server.auth import OPEN_TENANT
from lorag.server.limits import RequestLimits
from lorag.server.namespaces import Namespaces
from lorag.server.tenancy import Caller
from lorag.state import state_url

BAKERY = Path(__file__).parents[1] / "data" / "corpus" / "guides" / "bakery.txt"


def test_a_state_namespace_is_the_open_daemons(tmp_path):
    local = StoreNamespaces(state_url(None, tmp_path), tmp_path)  # the CLI's default tenant
    assert ingest(local, "docs", [BAKERY])["added"] == 1
    daemon = Namespaces(local.store, RequestLimits())
    hits = daemon.search(Caller(OPEN_TENANT, admin=True), "docs", "who is the head baker")
    assert hits[0].document_id == "bakery.txt"
    assert [row["name"] for row in daemon.list(Caller(OPEN_TENANT, admin=True))] == ["docs"]
    assert daemon.list(Caller("alice", admin=True)) == []  # another tenant sees nothing
    assert [(r["name"], r["owner"]) for r in local.namespaces()] == [("docs", OPEN_TENANT)]
