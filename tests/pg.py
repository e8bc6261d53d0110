"""A throw-away PostgreSQL server on 127.0.0.1 for tests and benchmarks.

``PgServer.start()`` finds the server binaries (``initdb``, ``pg_ctl``: on PATH or under
``/usr/lib/postgresql/*/bin``), makes a cluster in a temporary folder, starts it on a free
port and returns the running server; ``stop()`` stops it and removes the folder. As root the
server runs as the ``postgres`` OS user (PostgreSQL refuses to run as root). Nothing is
started when the binaries are missing: :func:`find_binaries` returns ``None`` and says why.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


def find_binaries() -> tuple[Path | None, str]:
    """The folder holding ``initdb`` and ``pg_ctl``, or ``None`` and the reason."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        cands.insert(0, str(Path(found).resolve().parent))
    for d in cands:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d), ""
    return None, (
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
        "/usr/lib/postgresql/*/bin; install Debian's 'postgresql' package"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    bindir: Path
    root: Path  # temp folder: data/ and the socket
    port: int
    user: str | None  # OS user the server runs as (None: the current one)

    @property
    def base_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def url(self, db: str = "postgres") -> str:
        return f"{self.base_url}/{db}"

    @classmethod
    def start(cls, durable: bool = False) -> PgServer:
        """Start a fresh server. ``durable``: keep PostgreSQL's fsync on commit (benchmarks);
        tests turn it off."""
        bindir, why = find_binaries()
        if bindir is None:
            raise RuntimeError(why)
        user = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError("running as root and there is no 'postgres' OS user") from exc
            user = "postgres"
        root = Path(tempfile.mkdtemp(prefix="archir-pg-"))
        os.chmod(root, 0o755)
        if user is not None:
            shutil.chown(root, user, user)
        srv = cls(bindir, root, _free_port(), user)
        atexit.register(srv.stop)  # also when the caller forgets or fails
        try:
            srv._run(
                str(bindir / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            opts = f"-p {srv.port} -c listen_addresses=127.0.0.1 -k {root} -c max_connections=200"
            if not durable:
                opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            srv._run(
                str(bindir / "pg_ctl"),
                "-D",
                str(root / "data"),
                "-o",
                opts,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            )
        except BaseException:
            srv.stop()
            raise
        return srv

    def _run(self, *cmd: str) -> None:
        full = ["runuser", "-u", self.user, "--", *cmd] if self.user else list(cmd)
        out = subprocess.run(full, capture_output=True, text=True, timeout=120, cwd=self.root)
        if out.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:1])} failed: {out.stderr[-2000:]}\n{tail}")

    def create_db(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg2

        name = name or "t_" + uuid.uuid4().hex[:12]
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            try:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                )
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            deadline = time.time() + 10
            while (self.root / "data" / "postmaster.pid").exists() and time.time() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
