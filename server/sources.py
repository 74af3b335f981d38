"""Adapters from where teams keep them: `lora_path` may name, besides a folder under the
adapter roots, an S3 prefix (`s3://bucket/prefix`), a tarball on a web server
(`https://host/adapter.tar.gz#sha256=<hex>`: the digest is required) or a hub repository
at a pinned revision (`hf://org/name@revision`).

Each source is one class with one method, `fetch(into)`: the adapter's files into an
empty folder. `AdapterCache` fetches into a per-replica cache folder (under the data dir,
one of the adapter roots), into a partial folder renamed into place only when complete (a
fetch cut short never counts), once however many ask for the same source at once, within
a size budget (least recently used first out, pinned ones never). The engine then reads
what was fetched as it reads any local adapter: safetensors only, shapes, finite values.
"""

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import threading
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import httpx

from lorag.errors import InvalidRequest, NotFound, TooLarge, Unavailable

SCHEMES = ("s3", "https", "http", "hf")
CACHE_MB = 2048  # the cache's default budget (`lorag serve --adapter-cache-mb`)
_SHA256 = re.compile(r"sha256=([0-9a-f]{64})")


def is_remote(path: str) -> bool:
    """Whether `path` names a source (scheme://...) rather than a local folder."""
    return "://" in str(path)


def source_of(url: str, budget: int):
    """The source `url` names, checked; `budget`: the most bytes it may bring."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3Source(url, budget)
    if parts.scheme in ("https", "http"):
        return TarballSource(url, budget)
    if parts.scheme == "hf":
        return HubSource(url)
    raise InvalidRequest(f"lora_path {url!r}: unknown source {parts.scheme!r}; a path is a "
                         f"folder under the adapter roots, or one of {', '.join(SCHEMES)}"
                         " (s3://bucket/prefix, https://host/file.tar.gz#sha256=<hex>, "
                         "hf://org/name@revision)", field="path")


def _safe_relative(name: str, where: str) -> PurePosixPath:
    """A member's path inside the adapter folder; refused when it would leave it."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise InvalidRequest(f"{where}: {name!r} would be written outside the adapter's "
                             "folder", field="path")
    return path


class S3Source:
    """Every object under `s3://bucket/prefix/`, from any S3-compatible store: boto3 takes
    the endpoint, region and credentials from the standard AWS variables and config
    (AWS_ENDPOINT_URL for MinIO, moto or another non-AWS store)."""

    def __init__(self, url: str, budget: int):
        parts = urlsplit(url)
        self.url, self.bucket, self.budget = url, parts.netloc, budget
        self.prefix = parts.path.strip("/")
        if not self.bucket or not self.prefix:
            raise InvalidRequest(f"lora_path {url!r}: an S3 source is s3://bucket/prefix",
                                 field="path")
        _safe_relative(self.prefix, url)

    def fetch(self, into: Path) -> None:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = boto3.client("s3")
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + "/")
            objects = [item for page in pages for item in page.get("Contents", [])]
            if not objects:
                raise NotFound(f"lora_path {self.url!r}: no objects under that prefix",
                               field="path")
            total = sum(item["Size"] for item in objects)
            if total > self.budget:
                raise TooLarge(f"lora_path {self.url!r} holds {total} bytes, over the "
                               f"adapter cache's budget of {self.budget}", field="path")
            for item in objects:
                relative = _safe_relative(item["Key"][len(self.prefix) + 1:], self.url)
                if item["Key"].endswith("/"):
                    continue  # a folder marker
                target = into / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(self.bucket, item["Key"], str(target))
        except (BotoCoreError, ClientError) as e:
            raise Unavailable(f"could not fetch {self.url}: {e}") from e


class TarballSource:
    """A tar archive (gzip or not) of one adapter folder, checked against the sha256 in the
    URL's fragment; no member may leave the folder, be a link or a device, or bring more
    bytes than the budget."""

    def __init__(self, url: str, budget: int):
        parts = urlsplit(url)
        digest = _SHA256.fullmatch(parts.fragment)
        if digest is None:
            raise InvalidRequest(f"lora_path {url!r}: a tarball's URL carries its digest, "
                                 "#sha256=<64 lowercase hex digits>", field="path")
        self.url, self.sha256, self.budget = parts._replace(fragment="").geturl(), \
            digest[1], budget

    def fetch(self, into: Path) -> None:
        with tempfile.TemporaryFile() as archive:
            digest, size = hashlib.sha256(), 0
            try:
                with httpx.stream("GET", self.url, timeout=60, follow_redirects=True) as reply:
                    reply.raise_for_status()
                    for chunk in reply.iter_bytes():
                        size += len(chunk)
                        if size > self.budget:
                            raise TooLarge(f"{self.url} is over the adapter cache's budget "
                                           f"of {self.budget} bytes", field="path")
                        digest.update(chunk)
                        archive.write(chunk)
            except httpx.HTTPStatusError as e:
                if e.response.status_code == 404:
                    raise NotFound(f"{self.url}: not found (404)", field="path") from e
                raise Unavailable(f"could not fetch {self.url}: {e}") from e
            except httpx.HTTPError as e:
                raise Unavailable(f"could not fetch {self.url}: {e}") from e
            if digest.hexdigest() != self.sha256:
                raise InvalidRequest(f"{self.url} has sha256 {digest.hexdigest()}, not the "
                                     f"{self.sha256} its lora_path names", field="path")
            archive.seek(0)
            self._extract(archive, into)

    def _extract(self, archive, into: Path) -> None:
        try:
            with tarfile.open(fileobj=archive) as tar:
                members, total = tar.getmembers(), 0
                for member in members:
                    _safe_relative(member.name, self.url)
                    if not (member.isfile() or member.isdir()):
                        raise InvalidRequest(f"{self.url}: {member.name!r} is a link or a "
                                             "device; an adapter's archive holds files",
                                             field="path")
                    total += member.size
                    if total > self.budget:
                        raise TooLarge(f"{self.url} unpacks to over the adapter cache's "
                                       f"budget of {self.budget} bytes", field="path")
                tar.extractall(into, members=members, filter="data")
        except tarfile.TarError as e:
            raise InvalidRequest(f"{self.url} is not a tar archive: {e}", field="path") from e
        # an archive of one folder: that folder is the adapter
        entries = list(into.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            for child in entries[0].iterdir():
                child.rename(into / child.name)
            entries[0].rmdir()


class HubSource:
    """`hf://org/name@revision` through huggingface_hub, the revision pinned; it needs a
    hub the replica can reach (none is, offline: refused saying so)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        repo, _, revision = (parts.netloc + parts.path).partition("@")
        if repo.count("/") != 1 or not revision:
            raise InvalidRequest(f"lora_path {url!r}: a hub source is hf://org/name@revision "
                                 "(the revision pinned: a commit, tag or branch)",
                                 field="path")
        self.url, self.repo, self.revision = url, repo, revision

    def fetch(self, into: Path) -> None:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise Unavailable(f"{self.url} needs a Hugging Face hub, and this replica is "
                              "offline (HF_HUB_OFFLINE is set)")
        try:
            snapshot_download(self.repo, revision=self.revision, local_dir=into,
                              allow_patterns=["adapter_config.json",
                                              "adapter_model.safetensors", "*.json"])
        except (HfHubHTTPError, OSError) as e:
            raise Unavailable(f"could not fetch {self.url}: {e}") from e


class AdapterCache:
    """Fetched adapters under `folder`, at most `budget` bytes of them."""

    def __init__(self, folder: Path, budget: int):
        self.folder, self.budget = folder, budget
        folder.mkdir(parents=True, exist_ok=True)
        for partial in folder.glob(".partial-*"):  # what a crash left: never counted
            shutil.rmtree(partial, ignore_errors=True)
        self.lock = threading.Lock()
        self.fetching: dict[str, threading.Lock] = {}
        self.pinned: set[str] = set()  # cache folder names
        self.fetches = 0  # how many fetches ran (the tests count them)

    def _name(self, url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:32]

    def cached(self, url: str) -> Path | None:
        """`url`'s cached folder if the cache holds it now; fetches nothing."""
        folder = self.folder / self._name(url)
        return folder if folder.is_dir() else None

    def local(self, url: str) -> Path:
        """The cached folder of `url`'s adapter, fetched first if it is not there (once,
        however many callers ask at once: the others wait for that fetch)."""
        name = self._name(url)
        folder = self.folder / name
        with self.lock:
            gate = self.fetching.setdefault(name, threading.Lock())
        with gate:
            if folder.is_dir():  # found (every request on it asks): nothing to fetch
                folder.touch()  # its use, for least-recently-used eviction
                return folder
            source = source_of(url, self.budget)
            partial = self.folder / f".partial-{name}-{uuid.uuid4().hex[:8]}"
            partial.mkdir()
            try:
                self.fetches += 1
                source.fetch(partial)
                self._make_room(_size(partial), keep=name)
                partial.rename(folder)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return folder

    def drop(self, url: str) -> None:
        """Forget `url`'s cached copy (one the engine refused)."""
        name = self._name(url)
        with self.lock:
            gate = self.fetching.setdefault(name, threading.Lock())
        with gate:
            shutil.rmtree(self.folder / name, ignore_errors=True)

    def pin(self, folder: Path, pinned: bool) -> None:
        """Keep a cached adapter (a pinned one) out of eviction, or let it go again."""
        if folder.parent == self.folder:
            (self.pinned.add if pinned else self.pinned.discard)(folder.name)

    def _make_room(self, incoming: int, keep: str) -> None:
        """Evict the least recently used unpinned adapters until `incoming` fits."""
        with self.lock:
            cached = sorted((entry for entry in self.folder.iterdir()
                             if entry.is_dir() and not entry.name.startswith(".")),
                            key=lambda entry: entry.stat().st_mtime)
            used = sum(_size(entry) for entry in cached)
            for entry in cached:
                if used + incoming <= self.budget:
                    break
                if entry.name in self.pinned or entry.name == keep:
                    continue
                used -= _size(entry)
                shutil.rmtree(entry, ignore_errors=True)
            if used + incoming > self.budget:
                raise TooLarge(f"the adapter cache cannot make room for {incoming} bytes "
                               f"within its {self.budget} (pinned adapters stay); raise "
                               "--adapter-cache-mb", field="path")


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
