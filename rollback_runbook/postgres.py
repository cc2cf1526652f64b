"""A throwaway PostgreSQL cluster for the Prefect server: ``initdb`` + ``pg_ctl`` in a folder.

Prefect's SQLite database serialises every write through one file; with several workers
and many runs its event persister stalls (see docs/scale-out.md). This module starts a
real PostgreSQL on 127.0.0.1 (and a Unix socket in its own folder) for the stack and the
tests, and gives the SQLAlchemy URL Prefect reads from
``PREFECT_SERVER_DATABASE_CONNECTION_URL``.

``initdb`` refuses to run as root. As root the cluster runs as the ``postgres`` user the
Debian package creates (``runuser -u postgres``), in a folder that user owns; as anyone
else it runs as that user. Authentication is ``trust`` on 127.0.0.1 only: a throwaway
cluster for one machine, not a production database.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

USER = "prefect"
DATABASE = "prefect"
RUN_AS_ROOT_USER = "postgres"


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, started or stopped; the message says what to do."""


def find_bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: $RUNBOOK_PG_BIN, PATH, or Debian's layout."""
    given = os.environ.get("RUNBOOK_PG_BIN")
    candidates = [Path(given)] if given else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        for v in sorted(versions, key=lambda p: float(p.name), reverse=True):
            candidates.append(v / "bin")
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    where = f"$RUNBOOK_PG_BIN={given}" if given else "PATH or /usr/lib/postgresql/*/bin"
    raise PostgresError(
        f"PostgreSQL's initdb and pg_ctl were not found in {where}: install PostgreSQL "
        "(Debian: apt-get install postgresql, or scripts/install-test-deps), or set "
        "RUNBOOK_PG_BIN to the folder that holds them"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def database_url(port: int, host: str = "127.0.0.1", database: str = DATABASE) -> str:
    """The URL Prefect's server takes (``PREFECT_SERVER_DATABASE_CONNECTION_URL``)."""
    return f"postgresql+asyncpg://{USER}@{host}:{port}/{database}"


@dataclass
class Cluster:
    """One PostgreSQL cluster in ``folder`` (its data in ``folder/data``) on ``port``.

    ``start()`` creates the cluster when the folder is new and reuses it otherwise, so a
    stack restarted on the same state folder finds its runs again.
    """

    folder: Path
    port: int = 0  # 0: a free port, chosen at start
    host: str = "127.0.0.1"
    bin_dir: Path | None = None

    @property
    def _as(self) -> list[str]:
        """The command prefix that runs PostgreSQL's tools: as ``postgres`` when root."""
        return ["runuser", "-u", RUN_AS_ROOT_USER, "--"] if os.geteuid() == 0 else []

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    @property
    def url(self) -> str:
        return database_url(self.port, self.host)

    def _bin(self, name: str) -> str:
        return str((self.bin_dir or find_bin_dir()) / name)

    def _run(self, args: list[str], what: str, timeout: float = 120) -> str:
        try:
            res = subprocess.run(
                [*self._as, *args], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise PostgresError(f"{what} did not finish within {timeout:.0f}s") from None
        if res.returncode != 0:
            raise PostgresError(
                f"{what} failed (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-800:]}; log: {self.log}"
            )
        return res.stdout

    def _prepare_owner(self) -> None:
        """As root: run everything as ``postgres``, in a folder it owns and can reach."""
        if os.geteuid() != 0:
            return
        import pwd

        try:
            pw = pwd.getpwnam(RUN_AS_ROOT_USER)
        except KeyError:
            raise PostgresError(
                "initdb refuses to run as root and there is no 'postgres' user to run it as: "
                "install Debian's postgresql package or run as an unprivileged user"
            ) from None
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in [self.folder, *self.folder.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
        probe = subprocess.run([*self._as, "test", "-w", str(self.folder)], capture_output=True)
        if probe.returncode != 0:
            raise PostgresError(
                f"the postgres user cannot write {self.folder} (a parent folder is closed to "
                "it): choose a state folder under a path other users can traverse"
            )

    def start(self, timeout: float = 60) -> Cluster:
        self.folder = self.folder.resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prepare_owner()
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data),
                    "-A",
                    "trust",
                    "-U",
                    USER,
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                "initdb",
            )
        if self.port == 0:
            self.port = free_port(self.host)
        opts = f"-p {self.port} -k {self.folder} -h {self.host} -c max_connections=200"
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                opts,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            f"starting PostgreSQL on {self.host}:{self.port}",
            timeout=timeout + 10,
        )
        self._create_database()
        return self

    def _create_database(self) -> None:
        res = subprocess.run(
            [
                *self._as,
                self._bin("psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                USER,
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode == 0 and res.stdout.strip() == "1":
            return
        self._run(
            [self._bin("createdb"), "-h", self.host, "-p", str(self.port), "-U", USER, DATABASE],
            f"creating database {DATABASE}",
        )

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").exists():
            return False
        res = subprocess.run(
            [*self._as, self._bin("pg_ctl"), "-D", str(self.data), "status"], capture_output=True
        )
        return res.returncode == 0

    def stop(self, timeout: float = 30) -> None:
        """Stop the cluster (fast shutdown: open sessions are ended); a no-op if stopped."""
        if not self.running():
            return
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
                "stop",
            ],
            "stopping PostgreSQL",
            timeout=timeout + 10,
        )


@contextlib.contextmanager
def throwaway_cluster(folder: Path | None = None) -> Iterator[Cluster]:
    """A cluster for the length of a ``with`` block; its folder is deleted afterwards."""
    made = folder is None
    where = Path(tempfile.mkdtemp(prefix="runbook-pg-")) if made else folder
    cluster = Cluster(where)
    try:
        yield cluster.start()
    finally:
        try:
            cluster.stop()
        finally:
            if made:
                shutil.rmtree(where, ignore_errors=True)
