"""A throwaway PostgreSQL server for the tests: Debian's binaries, `initdb` into a temporary
folder, `pg_ctl` on a free loopback port (TCP only, trust auth). Never a mock.

`initdb` and `pg_ctl` refuse to run as root, so as root they run as the `postgres` user
(`runuser`). A machine without PostgreSQL gets Debian's package installed; if that is
impossible the tests that need it fail with that message, never skip.
"""

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

from lorag.benchmarks.daemon import free_port
from tests.system import apt_install

SUPERUSER = "lorag"


def _binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def postgres_binaries() -> Path:
    """The folder with initdb and pg_ctl; installs Debian's postgresql if none is there."""
    folder = _binaries()
    if folder is None:
        apt_install("postgresql")
        folder = _binaries()
    if folder is None:
        raise RuntimeError("PostgreSQL's server binaries (initdb, pg_ctl) are not installed "
                           "and could not be installed: apt-get install postgresql")
    return folder


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, stopped and started at will."""

    def __init__(self):
        self.bin = postgres_binaries()
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="lorag-pg-"))  # postgres must reach it
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        self.start()

    def start(self) -> None:
        """Start (or start again) and wait until it accepts connections."""
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   "-c unix_socket_directories='' -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop: "fast" (clients cut off, clean shutdown) or "immediate" (a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stdout}{done.stderr}{log}")
