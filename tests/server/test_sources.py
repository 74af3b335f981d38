"""Adapters registered from remote sources (server/sources.py) on the tiny model's daemon:
a tarball from a web server on loopback (its sha256 in the URL) and objects from a real S3
API endpoint on loopback (moto's standalone server; MinIO or AWS S3 work the same way),
each serving the greedy answers of the same adapter registered from its folder; what is
refused (a wrong digest, members that leave the folder, links, a tarball bomb, an unknown
scheme, a hub source offline) is refused by name with nothing registered or cached."""

import hashlib
import io
import shutil
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from lorag.benchmarks.adapters import AdapterSpec, make_adapters
from lorag.benchmarks.daemon import free_port
from tests.daemons import ALICE
from tests.server.test_http import chat, load
from tests.tiny import tiny_model

pytestmark = pytest.mark.parametrize("daemon", ["native"], indirect=True)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A plain HTTP server on loopback serving a folder; (url, folder)."""
    folder = tmp_path_factory.mktemp("web")
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(SimpleHTTPRequestHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()


def tarball(folder: Path, members: dict[str, bytes] | None = None, link: str | None = None
            ) -> bytes:
    """A gzipped tar of `folder`'s files under one top folder, with extra `members` and a
    symlink named `link`."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"adapter/{path.name}")
        for name, content in (members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return data.getvalue()


def publish(web, name: str, content: bytes) -> str:
    url, folder = web
    (folder / name).write_bytes(content)
    return f"{url}/{name}#sha256={hashlib.sha256(content).hexdigest()}"


def cached(daemon) -> list[str]:
    return sorted(p.name for p in daemon.service.adapters.cache.folder.iterdir())


def names(daemon) -> set[str]:
    return {a["id"] for a in httpx.get(f"{daemon.url}/v1/models", timeout=30,
                                       headers={"Authorization": ALICE}).json()["data"]}


def test_a_tarball_serves_as_its_folder_does(daemon, daemon_adapters, web):
    url = publish(web, "style.tar.gz", tarball(daemon_adapters / "style"))
    response = load(daemon, "from-web", url)
    assert response.status_code == 200, response.text
    assert load(daemon, "from-folder", daemon_adapters / "style").status_code == 200
    assert chat(daemon, "from-web") == chat(daemon, "from-folder")
    assert load(daemon, "from-web", url).status_code == 200  # again: the cached copy
    assert daemon.service.adapters.cache.fetches == 1
    listed = httpx.get(f"{daemon.url}/v1/adapters/from-web", timeout=30,
                       headers={"Authorization": ALICE}).json()
    assert listed["path"] == url and listed["kind"] == "lora"


@pytest.mark.parametrize(("case", "status", "message"), [
    ("wrong-digest", 400, "not the"),
    ("no-digest", 400, "#sha256=<64 lowercase hex digits>"),
    ("escaping-member", 400, "would be written outside the adapter's folder"),
    ("symlink", 400, "is a link or a device"),
    ("bomb", 413, "over the adapter cache's budget"),
    ("unknown-scheme", 400, "unknown source 'ftp'"),
    ("hub-without-revision", 400, "hf://org/name@revision"),
    ("hub-offline", 503, "needs a Hugging Face hub"),
    ("another-base", 400, "the adapter was trained for a different base model"),
])
def test_bad_sources_are_refused_by_name_leaving_nothing(daemon, daemon_adapters, web, case,
                                                        status, message, monkeypatch,
                                                        tmp_path):
    style = daemon_adapters / "style"
    before = cached(daemon)
    if case == "wrong-digest":
        url = publish(web, "w.tar.gz", tarball(style)).rsplit("=", 1)[0] + "=" + "0" * 64
    elif case == "no-digest":
        url = publish(web, "n.tar.gz", tarball(style)).split("#")[0]
    elif case == "escaping-member":
        url = publish(web, "e.tar.gz", tarball(style, {"../../evil.txt": b"x"}))
    elif case == "symlink":
        url = publish(web, "s.tar.gz", tarball(style, link="adapter/passwd"))
    elif case == "bomb":
        monkeypatch.setattr(daemon.service.adapters.cache, "budget", 64 << 10)
        url = publish(web, "b.tar.gz", tarball(style, {"adapter/zeros.bin": bytes(1 << 20)}))
    elif case == "unknown-scheme":
        url = "ftp://example.com/adapter"
    elif case == "hub-without-revision":
        url = "hf://org/adapter"
    elif case == "another-base":  # an adapter trained on a model twice as wide
        other = tmp_path / "wide"
        make_adapters(tiny_model(hidden_size=128, intermediate_size=256), other,
                      {"wide": AdapterSpec(rank=4, alpha=8)})
        url = publish(web, "wide.tar.gz", tarball(other / "wide"))
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        url = "hf://org/adapter@main"
    response = load(daemon, f"bad-{case}", url)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert f"bad-{case}" not in names(daemon) and cached(daemon) == before


class S3(NamedTuple):
    client: object  # boto3's
    gets: list[str]  # the paths of the GET requests the server answered, in order


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    """moto's S3 API server on loopback, with boto3 pointed at it (AWS_ENDPOINT_URL), and
    the GETs it answers logged."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    gets, app = [], server._server.app  # werkzeug's server calls .app per request

    def logged(environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            gets.append(environ["PATH_INFO"])
        return app(environ, start_response)

    server._server.app = logged
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_module.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="adapters")
    yield S3(client, gets)
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def upload(s3: S3, folder: Path, prefix: str) -> int:
    """`folder`'s files under `prefix`; how many."""
    for path in folder.iterdir():
        s3.client.upload_file(str(path), "adapters", f"{prefix}/{path.name}")
    return len(list(folder.iterdir()))


def test_an_s3_prefix_serves_as_its_folder_does(daemon, daemon_adapters, s3):
    upload(s3, daemon_adapters / "other", "alice/other")
    assert load(daemon, "from-s3", "s3://adapters/alice/other").status_code == 200
    assert load(daemon, "other-folder", daemon_adapters / "other").status_code == 200
    assert chat(daemon, "from-s3") == chat(daemon, "other-folder")
    missing = load(daemon, "nothing", "s3://adapters/alice/nothing")
    assert missing.status_code == 404 and "no objects under that prefix" in missing.text
    s3.client.put_object(Bucket="adapters", Key="alice/escape/../../x", Body=b"x")
    escaping = load(daemon, "escape", "s3://adapters/alice/escape")
    assert escaping.status_code == 400 and "outside the adapter's folder" in escaping.text


def test_an_evicted_adapter_is_fetched_again_and_a_pinned_one_stays(daemon, daemon_adapters,
                                                                   web, monkeypatch):
    cache = daemon.service.adapters.cache
    first = publish(web, "third.tar.gz", tarball(daemon_adapters / "third"))
    second = publish(web, "fourth.tar.gz", tarball(daemon_adapters / "fourth"))
    size = sum(p.stat().st_size for p in (daemon_adapters / "third").iterdir())
    for stale in cache.folder.iterdir():  # this test's own budget, from an empty cache
        shutil.rmtree(stale)
    monkeypatch.setattr(cache, "budget", int(1.5 * size))
    assert load(daemon, "evictable", first).status_code == 200
    assert load(daemon, "newer", second).status_code == 200  # the first goes
    assert cache.cached(first) is None
    fetches = cache.fetches
    assert load(daemon, "third-folder", daemon_adapters / "third").status_code == 200
    assert chat(daemon, "evictable") == chat(daemon, "third-folder")  # its next request
    assert cache.fetches == fetches + 1 and cache.cached(first) is not None
    assert cache.cached(second) is None  # the budget holds one: the other went
    pinned = httpx.post(f"{daemon.url}/v1/adapters/evictable/pin", timeout=30,
                        headers={"Authorization": ALICE})
    assert pinned.status_code == 200, pinned.text
    over = load(daemon, "over", second)  # no room but the pinned one's: refused
    assert over.status_code == 413 and "pinned adapters stay" in over.text
    assert cache.cached(first) is not None


def test_a_request_naming_an_adapter_in_the_source_registers_it_once(daemon, daemon_adapters,
                                                                    s3, monkeypatch):
    """--adapter-source: the first requests naming an unregistered adapter fetch it from
    <source>/<tenant>/<name> once, register and serve it; a miss says where it looked."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(daemon.service.adapters, "source", "s3://adapters")
    files = upload(s3, daemon_adapters / "fourth", "alice/resolved")
    assert load(daemon, "fourth-folder", daemon_adapters / "fourth").status_code == 200
    s3.gets.clear()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: chat(daemon, "resolved"), range(8)))
    assert answers == [chat(daemon, "fourth-folder")] * 8
    # one fetch for the eight first requests: one listing, each object read once
    assert sorted(s3.gets) == ["/adapters"] + sorted(
        f"/adapters/alice/resolved/{p.name}" for p in (daemon_adapters / "fourth").iterdir())
    assert len(s3.gets) == files + 1
    assert "resolved" in names(daemon)
    ghost = httpx.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                       headers={"Authorization": ALICE},
                       json={"model": "ghost", "max_tokens": 2,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert ghost.status_code == 404
    assert "looked at s3://adapters/alice/ghost" in ghost.json()["error"]["message"]
    assert "ghost" not in names(daemon)


def test_grpc_registers_a_tarball_and_refuses_a_wrong_digest(daemon, daemon_adapters, web):
    """LoadAdapter takes a remote source as HTTP's lora_path does; a refusal is
    INVALID_ARGUMENT with the reason, and nothing is registered."""
    import grpc

    from lorag.v1 import lorag_pb2, lorag_pb2_grpc
    from tests.server.test_grpc import GREEDY, PROMPT, call

    url = publish(web, "grpc.tar.gz", tarball(daemon_adapters / "other"))
    with grpc.insecure_channel(daemon.grpc_target) as channel:
        stub = lorag_pb2_grpc.LoragServiceStub(channel)
        assert call(stub.LoadAdapter, lorag_pb2.LoadAdapterRequest(name="grpc-tar",
                                                                   path=url)).loaded
        assert load(daemon, "other-folder", daemon_adapters / "other").status_code == 200
        answers = [call(stub.Generate, lorag_pb2.GenerateRequest(
            prompt=PROMPT, adapter=name, sampling=GREEDY)).text
            for name in ("grpc-tar", "other-folder")]
        assert answers[0] == answers[1]
        wrong = url.split("#")[0] + "#sha256=" + "0" * 64
        with pytest.raises(grpc.RpcError) as refused:
            call(stub.LoadAdapter, lorag_pb2.LoadAdapterRequest(name="grpc-bad", path=wrong))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in refused.value.details()
    assert "grpc-bad" not in names(daemon)
