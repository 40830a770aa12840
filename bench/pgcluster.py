"""A throwaway PostgreSQL cluster for the benchmarks, from Debian's `postgresql` package.

initdb in a temporary folder, the server on 127.0.0.1 at a given port with its unix socket in
that folder too, one database; stop() stops it and removes the folder. The binaries are taken
from the directory of the `initdb` on PATH, else from the newest /usr/lib/postgresql/*/bin
(Debian puts only wrappers on PATH, and no initdb). initdb and postgres refuse to run as root:
as root, every PostgreSQL command runs as `nobody` through runuser (util-linux, on every
Debian), with the folder handed to that user. Stdlib only, CPython 3.8+.
"""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile

DB_USER = DB_NAME = "prefect"


class PostgresError(Exception):
    pass


def bin_dir():
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))

    def version(path):
        name = path.split("/")[4]
        return [int(p) for p in name.split(".") if p.isdigit()]
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if not candidates:
        raise PostgresError("no initdb on PATH nor in /usr/lib/postgresql/*/bin: install "
                            "Debian's postgresql package")
    return os.path.dirname(candidates[-1])


class PostgresCluster:
    def __init__(self, user="nobody"):
        self.user = user
        self.bin = None
        self.dir = None
        self.port = None
        self.as_user = []
        self.running = False

    @property
    def data(self):
        return os.path.join(self.dir, "data")

    @property
    def log_path(self):
        return os.path.join(self.dir, "postgres.log")

    def start(self, port):
        """Create, start, make the database; returns its SQLAlchemy asyncpg URL."""
        self.bin = bin_dir()
        self.dir = tempfile.mkdtemp(prefix="agentpy-postgres-")
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # PATH may lack sbin
            self.as_user = [runuser, "-u", self.user, "--"]
        self.run("initdb", "-D", self.data, "-U", DB_USER, "-A", "trust", "-E", "UTF8",
                 "--no-locale")
        self.port = port
        self.running = True  # from here on, stop() tries pg_ctl stop
        self.run("pg_ctl", "-D", self.data, "-l", self.log_path, "-w", "-t", "60",
                 "-o", "-h 127.0.0.1 -p %d -k %s" % (port, self.dir), "start")
        self.run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME)
        return "postgresql+asyncpg://%s@127.0.0.1:%d/%s" % (DB_USER, port, DB_NAME)

    def version(self):
        return self.run("postgres", "--version").strip()

    def run(self, program, *args):
        argv = self.as_user + [os.path.join(self.bin, program)] + list(args)
        # cwd: a directory the unprivileged user may enter. A session of its own: a Ctrl-C
        # meant for the benchmark must not reach PostgreSQL before the benchmark stops it.
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, cwd=self.dir, timeout=120,
                                  start_new_session=True, universal_newlines=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresError("%s: %s" % (" ".join(argv), exc))
        if done.returncode != 0:
            raise PostgresError("%s exited with %d (log %s):\n%s" % (
                " ".join(argv), done.returncode, self.log_path, done.stdout[-2000:]))
        return done.stdout

    def stop(self, remove=True):
        """Stop the server (fast shutdown; SIGKILL to the postmaster if that fails) and remove
        the folder unless remove is False. Safe to call more than once."""
        if self.running:
            try:
                self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "30", "stop")
            except PostgresError:
                self.kill_postmaster()
            self.running = False
        if remove and self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def kill_postmaster(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as handle:
                os.kill(int(handle.readline()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
