#!/usr/bin/env python3
"""Benchmark: agent.py against Prefect's own `prefect worker start --type process`.

    python bench/compare.py [--repeat 3] [--startup-samples 5] [--agent PATH] [--server URL]
                            [--skip-scale] [--scale-runs 500] [--database sqlite|postgres]
                            [--json PATH] [--write]
    python bench/compare.py --rtt-ms 0,80 [--wan-runs 100,500] [--wan-repeat 1]
                            [--database sqlite,postgres] [--agent PATH] [--json PATH]

Both agents run on one real Prefect 3.9.1 server, in alternation (agent.py, worker, agent.py,
...), each round on a fresh work pool with identical deployments, and talk to the server
through a recording reverse proxy in this script, which times their requests. Every flow run
is a trivial bash command that appends "RUN_ID EPOCHREALTIME PID" to a marker file, so the
moment each child process started is known without any help from either agent.

A round: start-up (process start to first poll; --startup-samples starts, each once the
machine is quiet), idle RSS and CPU, peak RSS over 100 short runs, dispatch of 200 runs
released at once, punctuality of 20 runs scheduled 25 s ahead.
A scale round per agent: 500 concurrent `sleep` runs, RSS growth and CPU while supervising
them, then all ended at once. Zombie children of the agent are watched in every round.

Prints the machine, the versions, the run counts and one table (figure | agent.py | Prefect
worker | ratio | target | met?) with medians over the repeats; a missed target is MISS, not a
failure, and so is a run an agent gave up without starting its child (counted in a row).
Exit status 0 when the benchmark completed, 1 when it could not (server never healthy, a
round that could not be completed, ...), with one PROBLEM line per problem.
The Prefect venv is the one .ci/run uses (created the same way when it is missing); the
server is started here with its own PREFECT_HOME unless --server is given. --only runs one
agent, for trying the script out. A default run takes about 45 minutes on 2 cores.
--database postgres runs the server on a PostgreSQL cluster made here (bench/pgcluster.py:
Debian's postgresql package, initdb in a temp folder, a free port, stopped at the end).

With --rtt-ms, only the WAN section runs (none of the rounds above): for each database, the
server's floor first (N runs claimed by PENDING proposed straight to it on loopback, one after
another and from 16 threads), then for each round trip and each N of --wan-runs, each agent
on N runs already waiting when it starts, talking to the server through bench/wan.py's
latency proxy: start to first claim and to all claimed (the server's own PENDING
timestamps), start to all children started (their markers), API requests per run. Prints a
table per database and PASS/MISS target lines: agent.py's all started <= 1.5 x floor(N) + 1 s,
and its all claimed <= the worker's. `--rtt-ms 0,80 --wan-runs 100,500 --database postgres`
takes about 15-25 minutes on 2 cores.
Stdlib only, CPython 3.8+, traffic only to 127.0.0.1.
"""

import argparse
import concurrent.futures
import datetime
import http.client
import http.server
import importlib.util
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
import zlib

from pgcluster import PostgresCluster, PostgresError
from procfs import ZombieWatch, all_pids, proc_cmdline, proc_stat, proc_status_kib, stat_fields
from wan import LatencyProxy, check as check_wan, check_text as wan_check_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_PY = os.path.join(REPO, "agent.py")
RESULTS_MD = os.path.join(REPO, "bench", "RESULTS.md")
README_MD = os.path.join(REPO, "README.md")
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
WAN_RESULTS_MD = os.path.join(REPO, "bench", "RESULTS-wan.md")
WAN_README_START, WAN_README_END = "<!-- wan:start -->", "<!-- wan:end -->"

PREFECT_VERSION = "3.9.1"
HEALTH_TIMEOUT = 180.0

AGENT, WORKER = "agent.py", "Prefect worker"
KINDS = (AGENT, WORKER)
RETRY_STATUSES = (502, 503, 504)
# Prefect's server answers 307 when a path's trailing slash is not its route's.
REDIRECTS = (301, 302, 303, 307, 308)
POLL_PATH = "/get_scheduled_flow_runs"
STOP_SECONDS = 30.0          # SIGTERM to SIGKILL for an agent at the end of a round
FIRST_POLL_TIMEOUT = 120.0
QUIET_SECONDS = 3.0          # "the agent has gone quiet": no request for this long
QUIET_TIMEOUT = 90.0
MEM_RUNS, DISPATCH_RUNS, PUNCT_RUNS = 100, 200, 20
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# Each start-up is launched once the whole machine has been busy for less than SETTLE_BUSY of
# one core over SETTLE_WINDOW s (waiting at most SETTLE_TIMEOUT s): what the server still
# does for the round before (events of hundreds of runs, deletions) is not the next agent's
# start-up. The figure is the median of all of an agent's start-ups.
SETTLE_BUSY, SETTLE_WINDOW, SETTLE_TIMEOUT = 0.10, 0.5, 60.0
MEM_SLEEP = 3
PUNCT_AHEAD, PUNCT_STEP = 25.0, 0.5
MIB = 1024.0 * 1024.0


class BenchError(Exception):
    """Something that stops the benchmark (or one round of it) from completing."""


def log(text):
    sys.stderr.write("[compare %s] %s\n" % (time.strftime("%H:%M:%S"), text))
    sys.stderr.flush()


def now_iso(offset_seconds=0.0):
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)
    return when.isoformat()


def epoch_iso(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


# -- /proc ------------------------------------------------------------------------------------

def proc_cpu_seconds(pid):
    """CPU time of a process's live threads, from schedstat in nanoseconds: /proc/PID/stat
    counts whole 10 ms ticks, too coarse for an idle agent's minute. None if it is gone."""
    total = 0
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/schedstat" % (pid, task)) as handle:
                total += int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def session_cpu_seconds(sid):
    """CPU time of every live process in session `sid` (the server and its workers)."""
    total = 0.0
    for pid in all_pids():
        fields = stat_fields(pid)
        if fields and int(fields[3]) == sid:
            total += proc_cpu_seconds(pid) or 0.0
    return total


def machine_busy_ticks():
    """(busy, all) clock ticks of all CPUs together since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        ticks = [int(v) for v in handle.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy


def wait_machine_quiet(timeout=SETTLE_TIMEOUT):
    """Until the machine was busy for less than SETTLE_BUSY of one core over SETTLE_WINDOW s,
    or `timeout` s have passed: (seconds waited, busy share of one core in the last
    window)."""
    cpus = os.cpu_count() or 1
    start = time.monotonic()
    while True:
        busy0, all0 = machine_busy_ticks()
        time.sleep(SETTLE_WINDOW)
        busy1, all1 = machine_busy_ticks()
        share = (busy1 - busy0) * cpus / float(max(all1 - all0, 1))
        waited = time.monotonic() - start
        if share < SETTLE_BUSY or waited >= timeout:
            return waited, share


def proc_environ_has(pid, needle):
    try:
        with open("/proc/%d/environ" % pid, "rb") as handle:
            return needle in handle.read().split(b"\0")
    except OSError:
        return False


def kill_tagged(tag):
    """SIGKILL every process (but this one) whose environment carries this run's tag: agents
    and every child they started inherit it, whatever session or group they are in."""
    needle = tag.encode()
    killed = 0
    for pid in all_pids():
        if pid != os.getpid() and proc_environ_has(pid, needle):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


# -- the Prefect API, from this script ---------------------------------------------------------

class ApiError(BenchError):
    pass


class Api:
    """JSON calls to the server, directly (not through the proxy). 502/503/504 and connection
    errors are retried with a short backoff: the SQLite server answers 503 under light load.
    With keep_alive, each thread keeps its connection open between calls."""

    def __init__(self, url, deadline=300.0, keep_alive=False):
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        self.host, self.port = parts.hostname, parts.port or 80
        self.base = parts.path
        self.deadline = deadline
        self.kept = threading.local() if keep_alive else None

    def connection(self):
        conn = getattr(self.kept, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port,
                                              timeout=min(60.0, self.deadline))
            if self.kept is not None:
                self.kept.conn = conn
        return conn

    def done(self, conn, reusable):
        if self.kept is None or not reusable:
            conn.close()
            if self.kept is not None:
                self.kept.conn = None

    def call(self, method, path, body=None):
        target = self.base + path
        data = json.dumps(body).encode() if body is not None else None
        give_up = time.monotonic() + self.deadline
        attempt, last = 0, ""
        while time.monotonic() < give_up:
            attempt += 1
            conn, reusable = self.connection(), False
            try:
                conn.request(method, target, body=data,
                             headers={"Content-Type": "application/json"} if data else {})
                resp = conn.getresponse()
                text = resp.read()
                reusable = not resp.will_close
                if resp.status in REDIRECTS and resp.getheader("Location"):
                    location = urllib.parse.urlsplit(resp.getheader("Location"))
                    target = location.path + ("?" + location.query if location.query else "")
                    continue
                if resp.status in RETRY_STATUSES:
                    last = "HTTP %d" % resp.status
                elif resp.status >= 400:
                    raise ApiError("%s %s answered %d: %s" % (method, target, resp.status,
                                                              text[:300].decode("utf-8", "replace")))
                else:
                    return json.loads(text.decode()) if text.strip() else None
            except (OSError, http.client.HTTPException) as exc:
                last = "%s: %s" % (type(exc).__name__, exc)
            finally:
                self.done(conn, reusable)
            time.sleep(min(2.0, 0.1 * attempt))
        raise ApiError("%s %s failed for %.0f s (last: %s)" % (method, target, self.deadline, last))

    def healthy(self):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request("GET", self.base + "/health")
            resp = conn.getresponse()
            return resp.status == 200 and resp.read().strip() == b"true"
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()


# -- the recording reverse proxy ---------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
              "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}


class Recorder:
    """Every request both agents make: (monotonic arrival, method, path, status, runs), where
    runs is the length of a get_scheduled_flow_runs answer (else None)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = []
        self.poll_times = {}  # pool -> arrivals of its polls
        self.polled = threading.Condition(self.lock)

    def add(self, entry):
        with self.lock:
            self.entries.append(entry)
            if entry[1] == "POST" and entry[2].split("?")[0].endswith(POLL_PATH):
                pool = urllib.parse.unquote(entry[2].split("/work_pools/", 1)[-1].split("/")[0])
                self.poll_times.setdefault(pool, []).append(entry[0])
                self.polled.notify_all()

    def wait_poll(self, pool, since, timeout):
        """Arrival of the pool's first poll at or after `since`, waiting up to `timeout`;
        None if none yet."""
        def first():
            return next((t for t in self.poll_times.get(pool, ()) if t >= since), None)
        with self.lock:
            self.polled.wait_for(lambda: first() is not None, timeout)
            return first()

    def since(self, start, end=None):
        with self.lock:
            return [e for e in self.entries if e[0] >= start and (end is None or e[0] < end)]

    def polls(self, pool, start, end=None):
        needle = "/work_pools/%s%s" % (urllib.parse.quote(pool), POLL_PATH)
        return [e for e in self.since(start, end) if e[1] == "POST" and needle in e[2]]

    def last_time(self):
        with self.lock:
            return self.entries[-1][0] if self.entries else 0.0


def count_runs(data, headers):
    """How many runs a poll answer holds. The worker's httpx asks for gzip, which the server
    uses for big answers."""
    try:
        encoding = dict((k.lower(), v) for k, v in headers).get("content-encoding", "")
        if encoding.lower() == "gzip":
            data = zlib.decompress(data, 16 + zlib.MAX_WBITS)
        elif encoding:
            return None
        return len(json.loads(data.decode()))
    except (ValueError, TypeError, zlib.error):
        return None


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forwards each request verbatim to the server on one upstream connection per client
    connection (so per handler thread), and the answer back verbatim, redirects included.
    A websocket upgrade (the Prefect client's events) becomes a raw two-way tunnel."""

    protocol_version = "HTTP/1.1"
    upstream = None
    upstream_used = 0.0

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def setup(self):
        http.server.BaseHTTPRequestHandler.setup(self)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_any(self):
        arrived = time.monotonic()
        if self.headers.get("Upgrade"):
            self.server.recorder.add((arrived, self.command, self.path, 101, None))
            return self.tunnel()
        body = self.read_body()
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            status, reason, answer_headers, data = self.forward(body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self.server.recorder.add((arrived, self.command, self.path, 502, None))
            data = json.dumps({"detail": "bench proxy: %s" % exc}).encode()
            return self.respond(502, "Bad Gateway", [("Content-Type", "application/json")],
                                data)
        runs = None
        if POLL_PATH in self.path and status == 200:
            runs = count_runs(data, answer_headers)
        self.server.recorder.add((arrived, self.command, self.path, status, runs))
        self.respond(status, reason, answer_headers, data)

    def respond(self, status, reason, answer_headers, data):
        """The answer in a single write: status line, headers and body sent separately would
        meet the client's delayed ACK and cost tens of milliseconds per request."""
        lines = ["%s %d %s" % (self.protocol_version, status, reason)]
        lines += ["%s: %s" % (k, v) for k, v in answer_headers
                  if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in answer_headers).get("content-length")
            if length is not None:
                lines.append("Content-Length: %s" % length)
            data = b""
        elif not (status < 200 or status in (204, 304)):
            lines.append("Content-Length: %d" % len(data))
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (data or b""))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_any

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def forward(self, body, headers):
        # uvicorn closes a keep-alive connection idle for 5 s: reopen before that, and retry
        # once on a fresh connection when a reused one turns out to be closed.
        for attempt in (1, 2):
            if self.upstream is not None and (attempt == 2 or
                                              time.monotonic() - self.upstream_used > 4.0):
                self.upstream.close()
                self.upstream = None
            reused = self.upstream is not None
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(self.server.upstream_host,
                                                           self.server.upstream_port, timeout=300)
                self.upstream.connect()
                self.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.upstream.putrequest(self.command, self.path, skip_host=True,
                                         skip_accept_encoding=True)
                for key, value in headers:
                    self.upstream.putheader(key, value)
                if body is not None and not any(k.lower() == "content-length" for k, _ in headers):
                    self.upstream.putheader("Content-Length", str(len(body)))
                self.upstream.endheaders(body)
                resp = self.upstream.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if reused and attempt == 1:
                    continue
                raise
            finally:
                self.upstream_used = time.monotonic()
            if resp.will_close:
                self.upstream.close()
                self.upstream = None
            return resp.status, resp.reason, resp.getheaders(), data
        raise OSError("unreachable")

    def tunnel(self):
        self.close_connection = True
        try:
            upstream = socket.create_connection(
                (self.server.upstream_host, self.server.upstream_port), timeout=10)
        except OSError:
            return
        try:
            head = ["%s %s %s" % (self.command, self.path, self.request_version)]
            head += ["%s: %s" % (k, v) for k, v in self.headers.items()]
            upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            # A websocket client sends nothing before the 101, so rfile holds nothing more
            # and the socket itself can be relayed from here on.
            client = self.connection
            upstream.settimeout(None)
            # poll, not select: the worker keeps two websockets per running flow run, so a
            # scale round takes this process past select's 1024 file descriptors.
            poller = select.poll()
            peer = {client.fileno(): (client, upstream), upstream.fileno(): (upstream, client)}
            for fd in peer:
                poller.register(fd, select.POLLIN)
            while True:
                events = poller.poll(60000)
                if not events and self.server.stopping:
                    return
                for fd, _event in events:
                    source, target = peer[fd]
                    data = source.recv(65536)
                    if not data:
                        return
                    target.sendall(data)
        except OSError:
            return
        finally:
            upstream.close()

    def finish(self):
        if self.upstream is not None:
            self.upstream.close()
        http.server.BaseHTTPRequestHandler.finish(self)


class Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, upstream_url):
        http.server.ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), ProxyHandler)
        parts = urllib.parse.urlsplit(upstream_url)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.api_path = parts.path.rstrip("/")
        self.recorder = Recorder()
        self.stopping = False
        self.thread = threading.Thread(target=self.serve_forever, name="proxy", daemon=True)

    @property
    def url(self):
        return "http://127.0.0.1:%d%s" % (self.server_address[1], self.api_path)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.shutdown()
        self.server_close()


# -- venv and server ---------------------------------------------------------------------------

def ensure_venv(venv, base_python, version=PREFECT_VERSION, pins=()):
    """A venv with prefect==version, then `pins` (asked for with prefect at once, some are a
    resolver conflict) and vermin, made once: with no pins, .ci/run's recipe and stamp."""
    stamp = os.path.join(venv, "-".join([".agentpy-ci-ok", version] + list(pins)))
    if os.path.exists(stamp):
        return
    log("creating venv %s (prefect==%s, then %s)" % (venv, version, " ".join(
        list(pins) + ["vermin"])))
    shutil.rmtree(venv, ignore_errors=True)
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    python = os.path.join(venv, "bin", "python")
    steps = [[base_python, "-m", "venv", venv],
             [python, "-m", "pip", "install", "-q", "prefect==" + version],
             [python, "-m", "pip", "install", "-q", "vermin"] + list(pins),
             [python, "-c", "import prefect.server.api.server, prefect; assert "
                            "prefect.__version__ == %r, prefect.__version__" % version]]
    for step in steps:
        if subprocess.call(step) != 0:
            raise BenchError("creating the venv failed at: %s" % " ".join(step))
    open(stamp, "w").close()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(tag=None):
    """The environment of the processes started here: ours without Prefect settings; for the
    agents, plus the tag that lets kill_tagged find them and every child they started."""
    env = dict((k, v) for k, v in os.environ.items() if not k.startswith("PREFECT_"))
    if tag:
        env["BENCH_COMPARE_TAG"] = tag.split("=", 1)[1]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_server(venv, tmp, database_url=None):
    """The server on SQLite in its PREFECT_HOME, or on the database at `database_url`."""
    home = os.path.join(tmp, "server-home")
    os.makedirs(home)
    port = free_port()
    env = base_env()
    # No late-runs service: it would mark the hundreds of runs held in paused queues Late
    # (a SCHEDULED state, so polls still return them) and, on SQLite, its bulk writes lock
    # the database and turn the agents' requests into 503s. No agent depends on it.
    env.update(PREFECT_HOME=home, PREFECT_UI_ENABLED="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false")
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log_path = os.path.join(tmp, "server.log")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([os.path.join(venv, "bin", "prefect"), "server", "start",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp, start_new_session=True)
    url = "http://127.0.0.1:%d/api" % port
    api = Api(url)
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while not api.healthy():
        if proc.poll() is not None:
            raise BenchError("the Prefect server exited with %s before it was healthy; log %s"
                             % (proc.returncode, log_path))
        if time.monotonic() > deadline:
            stop_group(proc, 10)
            raise BenchError("the Prefect server was not healthy within %.0f s; log %s"
                             % (HEALTH_TIMEOUT, log_path))
        time.sleep(0.5)
    return proc, url


def stop_group(proc, grace):
    """SIGTERM the process group, SIGKILL it after `grace` seconds. True if it stopped in time."""
    if proc is None:
        return True
    clean = True
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            clean = False
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # and whatever is left in its group
    except OSError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    return clean


# -- measuring an agent process ----------------------------------------------------------------

class Markers:
    """The marker file the runs' commands append to: run id -> [(monotonic start, pid), ...]."""

    def __init__(self, path, offset):
        self.path = path
        self.offset = offset  # time.time() - time.monotonic(), taken once
        self.position = 0
        self.partial = b""
        self.starts = {}

    def refresh(self):
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.position)
                data = handle.read()
        except FileNotFoundError:
            return self.starts
        self.position += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            fields = line.decode("utf-8", "replace").split()
            if len(fields) == 3:
                epoch = float(fields[1].replace(",", "."))  # EPOCHREALTIME follows the locale
                self.starts.setdefault(fields[0], []).append((epoch - self.offset, int(fields[2])))
        return self.starts

    def started(self, run_ids):
        """{run id: first start (monotonic)} for those of run_ids that have started."""
        starts = self.refresh()
        return dict((r, starts[r][0][0]) for r in run_ids if r in starts)


    def pids(self, run_ids=None):
        starts = self.refresh()
        return [(r, pid) for r, items in starts.items() if run_ids is None or r in run_ids
                for _, pid in items]

    def twice(self):
        return sorted(r for r, items in self.refresh().items() if len(items) > 1)


def marker_command(markers_path, sleep=None):
    """The run's command: one bash that appends its own start and then, for long runs, becomes
    `sleep` (same pid). EPOCHREALTIME (bash 5) needs no fork, so the time is bash's start."""
    script = 'echo "$PREFECT__FLOW_RUN_ID $EPOCHREALTIME $$" >> %s' % shlex.quote(markers_path)
    if sleep:
        script += "; exec sleep %d" % sleep
    return "bash -c %s" % shlex.quote(script)


class AgentProcess:
    def __init__(self, kind, argv, env, log_path, cwd):
        self.kind, self.argv, self.env, self.log_path, self.cwd = kind, argv, env, log_path, cwd
        self.proc = None
        self.t0 = None

    def start(self):
        with open(self.log_path, "wb") as out:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        return self.t0

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self):
        return proc_status_kib(self.pid, "VmRSS")

    def hwm_kib(self):
        return proc_status_kib(self.pid, "VmHWM")

    def cpu(self):
        seconds = proc_cpu_seconds(self.pid) if self.alive() else None
        if seconds is None:
            raise BenchError("%s exited (%s) in the middle of a measurement; log %s" % (
                self.kind, self.proc.poll(), self.log_path))
        return seconds

    def stop(self):
        """SIGTERM (the agent alone: it decides what to do with its runs), wait, then SIGKILL
        the group. Returns (exit code or None, clean)."""
        if self.proc is None:
            return None, True
        clean = True
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                clean = False
        stop_group(self.proc, 0)
        return self.proc.returncode, clean

    def log_tail(self, lines=15):
        try:
            with open(self.log_path, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no log)"


def sleep_until(when):
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def percentile(values, fraction):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


# -- one benchmark run -------------------------------------------------------------------------

class Bench:
    def __init__(self, args, database="sqlite"):
        self.args = args
        self.database = database
        self.postgres = None
        self.venv = args.prefect_venv
        self.tmp = tempfile.mkdtemp(prefix="agentpy-compare-")
        self.tag = "BENCH_COMPARE_TAG=%s" % uuid.uuid4().hex
        self.offset = time.time() - time.monotonic()
        self.server = None
        self.proxy = None
        self.api = self.quick_api = None
        self.template = None
        self.agent_version = None
        self.flow_id = None
        self.problems = []
        self.rounds = []
        self.scale_rounds = []
        self.info = {}
        self.live_agent = None

    # -- setup ------------------------------------------------------------------------------
    def setup(self):
        self.connect(self.start_backend())
        self.proxy = Proxy(self.info["server"])
        self.proxy.start()
        log("server %s, proxy %s, temp dir %s" % (self.info["server"], self.proxy.url, self.tmp))

    def start_backend(self):
        """The venv, the agent under test read, the server (and its database) started, unless
        --server names one; returns the server's API URL."""
        ensure_venv(self.venv, self.args.base_python)
        module = load_agent_module(self.args.agent)
        self.template = module.PROCESS_BASE_JOB_TEMPLATE
        self.agent_version = getattr(module, "__version__", "?")
        if self.args.server:
            log("note: with --server, the server's late-runs service may mark the held runs "
                "Late and, on SQLite, lock the database while it does")
            return self.args.server.rstrip("/")
        database_url = None
        self.info["database"] = "SQLite (the server's default, in its PREFECT_HOME)"
        if self.database == "postgres":
            self.postgres = PostgresCluster()
            try:
                database_url = self.postgres.start(free_port())
                self.info["database"] = "%s, initdb'd here, port %d" % (
                    self.postgres.version(), self.postgres.port)
            except PostgresError as exc:
                raise BenchError("PostgreSQL did not start: %s" % exc)
            log("PostgreSQL at %s (%s)" % (database_url, self.postgres.dir))
        log("starting a Prefect %s server on %s (up to %.0f s)" % (
            PREFECT_VERSION, self.database, HEALTH_TIMEOUT))
        self.server, url = start_server(self.venv, self.tmp, database_url)
        return url

    def connect(self, url):
        self.api = Api(url)
        # For the states of runs that did not start: a shortcut, not worth a long wait when
        # the server is swamped.
        self.quick_api = Api(url, deadline=15.0)
        if not self.api.healthy():
            raise BenchError("the server at %s is not healthy" % url)
        self.info["server"] = url
        self.info["server_version"] = self.api.call("GET", "/admin/version")
        self.flow_id = self.api.call("POST", "/flows/", {"name": "bench-compare"})["id"]

    def cleanup(self):
        if self.live_agent is not None:
            self.live_agent.stop()
        kill_tagged(self.tag)
        if self.proxy is not None:
            self.proxy.stop()
        if self.server is not None:
            if not stop_group(self.server, 20):
                log("the server did not stop within 20 s of SIGTERM; killed")
        kill_tagged(self.tag)
        if self.postgres is not None:
            self.postgres.stop(remove=not self.args.keep)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- pools, deployments, runs ----------------------------------------------------------------
    def make_pool(self, label, queues):
        """A fresh process pool with agent.py's base job template, the given queues (name ->
        paused) and one deployment per queue whose command is the given one."""
        pool = "bench-%s-%s" % (label, uuid.uuid4().hex[:8])
        self.api.call("POST", "/work_pools/", {"name": pool, "type": "process",
                                               "base_job_template": self.template})
        deployments = {}
        for queue, (paused, command) in queues.items():
            # Created paused: its runs stay invisible to polls until it is unpaused.
            self.api.call("POST", "/work_pools/%s/queues" % pool,
                          {"name": queue, "is_paused": paused})
            deployments[queue] = self.api.call("POST", "/deployments/", {
                "name": "%s-%s" % (pool, queue), "flow_id": self.flow_id,
                "work_pool_name": pool, "work_queue_name": queue,
                "job_variables": {"command": command}})["id"]
        return pool, deployments

    def create_runs(self, deployment, scheduled, threads=1):
        """One SCHEDULED run per wall-clock time in `scheduled`; returns their ids in order.
        An idempotency key per run makes a retried create harmless."""
        def create(when):
            return self.api.call("POST", "/deployments/%s/create_flow_run" % deployment, {
                "idempotency_key": uuid.uuid4().hex,
                "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when}}})["id"]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return list(pool.map(create, scheduled))

    def run_states(self, run_ids):
        """{run id: state type} from the server."""
        states = {}
        for i in range(0, len(run_ids), 200):
            chunk = run_ids[i:i + 200]
            for run in self.quick_api.call("POST", "/flow_runs/filter", {
                    "flow_runs": {"id": {"any_": chunk}}, "limit": len(chunk)}):
                states[run["id"]] = (run.get("state") or {}).get("type")
        return states

    def wait_started(self, markers, run_ids, timeout, agent, record, prefix, tick=None):
        """Until every run's child has started, or `timeout`, or the runs still missing are all
        final on the server (an agent can give a run up before starting it), or no further
        child has started for --stall-seconds since one did. (Before the first child, only the
        timeout: the first poll, the scheduled times and the worker's submissions take a while.)
        Records how many did not start, their states, and how long it waited for them."""
        start = time.monotonic()
        deadline, progress, count, next_check = start + timeout, None, 0, start + 5.0
        while True:
            started = markers.started(run_ids)
            now = time.monotonic()
            if tick is not None:
                tick()
            if len(started) == len(run_ids):
                break
            if len(started) != count:
                count, progress = len(started), now
            stalled = progress is not None and now - progress > self.args.stall_seconds
            if now > deadline or not agent.alive() or stalled:
                record[prefix + "_waited_s"] = now - start
                break
            if now >= next_check:
                next_check = now + 5.0
                missing = [r for r in run_ids if r not in started]
                try:
                    if all(s in FINAL_STATES for s in self.run_states(missing).values()):
                        record[prefix + "_waited_s"] = now - start  # they will never start
                        break
                except BenchError as exc:  # only a shortcut: the other limits still apply
                    log("could not read the states of the runs not started: %s" % exc)
            time.sleep(0.1)
        started = markers.started(run_ids)
        record[prefix + "_started"] = len(started)
        if not started:  # nothing to measure: the round cannot complete
            raise BenchError("no child of the %d %s runs started in %.0f s; agent log %s" % (
                len(run_ids), prefix, time.monotonic() - start, agent.log_path))
        missing = [r for r in run_ids if r not in started]
        if missing:
            states = {}
            try:
                for state in self.run_states(missing).values():
                    states[state] = states.get(state, 0) + 1
            except BenchError as exc:
                log("could not read the states of the runs not started: %s" % exc)
                states["unknown"] = len(missing)
            record[prefix + "_not_started"] = states
            self.problem("%s round %d: %d of %d %s runs never started in %.0f s (their states: "
                         "%s)" % (agent.kind, record["round"], len(missing), len(run_ids), prefix,
                                  time.monotonic() - start,
                                  ", ".join("%s %d" % kv for kv in sorted(states.items()))))
        return started

    def unpause(self, pool, queue):
        self.api.call("PATCH", "/work_pools/%s/queues/%s" % (pool, queue), {"is_paused": False})

    def drop_pool(self, pool, deployments):
        """Best effort: the pool and its deployments (leaving the flow runs' history)."""
        try:
            for deployment in deployments.values():
                self.api.call("DELETE", "/deployments/%s" % deployment)
            self.api.call("DELETE", "/work_pools/%s" % pool)
        except BenchError as exc:
            log("could not delete pool %s: %s" % (pool, exc))

    # -- agents ----------------------------------------------------------------------------------
    def agent_process(self, kind, pool, workdir, api_url=None):
        """The agent of this kind on this pool, talking to the API at api_url (default: through
        the recording proxy)."""
        api_url = api_url or self.proxy.url
        env = base_env(self.tag)
        env["TMPDIR"] = os.path.join(workdir, "tmp")  # the runs' temporary working dirs
        os.makedirs(env["TMPDIR"])
        if kind == AGENT:
            argv = [self.args.agent_python, self.args.agent, "--api", api_url,
                    "--pool", pool, "--poll-interval", fmt_num(self.args.poll_interval),
                    "--prefetch-seconds", fmt_num(self.args.prefetch), "--hide-welcome",
                    "--state-dir", os.path.join(workdir, "state")]
        else:
            argv = [os.path.join(self.venv, "bin", "prefect"), "worker", "start",
                    "--pool", pool, "--type", "process"]
            env.update(PREFECT_API_URL=api_url, PREFECT_HOME=os.path.join(workdir, "home"),
                       PREFECT_WORKER_QUERY_SECONDS=fmt_num(self.args.poll_interval),
                       PREFECT_WORKER_PREFETCH_SECONDS=fmt_num(self.args.prefetch),
                       PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        return AgentProcess(kind, argv, env, os.path.join(workdir, "agent.log"), workdir)

    def launch(self, agent, pool, record):
        """Start the agent once the machine is quiet; wait for its first poll. Appends its
        start-up (process start to first poll) and the conditions to the record's lists."""
        settled_after, busy = wait_machine_quiet()
        server_cpu = session_cpu_seconds(self.server.pid) if self.server else None
        t0 = agent.start()
        self.live_agent = agent
        deadline = t0 + FIRST_POLL_TIMEOUT
        while True:
            first = self.proxy.recorder.wait_poll(pool, t0, 0.5)
            if first is not None:
                if server_cpu is not None:
                    server_cpu = session_cpu_seconds(self.server.pid) - server_cpu
                for key, value in (("startup_samples_s", first - t0),
                                   ("startup_settle_s", settled_after),
                                   ("startup_busy_before", busy),
                                   ("startup_server_cpu_s", server_cpu)):
                    record.setdefault(key, []).append(value)
                return first - t0
            if not agent.alive():
                raise BenchError("%s exited with %s before its first poll; log %s:\n%s" % (
                    agent.kind, agent.proc.returncode, agent.log_path, agent.log_tail()))
            if time.monotonic() > deadline:
                raise BenchError("%s did not poll within %.0f s; log %s" % (
                    agent.kind, FIRST_POLL_TIMEOUT, agent.log_path))

    def sample_startups(self, kind, pool, workdir, record):
        """All but the last of the round's start-ups: the agent started in a directory of its
        own and stopped after its first poll (the round's queues are paused: nothing to claim)."""
        for number in range(1, self.args.startup_samples):
            sample_dir = os.path.join(workdir, "startup-%d" % number)
            os.makedirs(sample_dir)
            sample = self.agent_process(kind, pool, sample_dir)
            try:
                self.launch(sample, pool, record)
            finally:
                sample.stop()
                self.live_agent = None

    def wait_quiet(self, since, timeout=QUIET_TIMEOUT, requests=None):
        """Until the agent made no request for QUIET_SECONDS (its runs are all reported), as
        seen by `requests` (a log with last_time(); default the recording proxy's)."""
        requests = self.proxy.recorder if requests is None else requests
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = max(requests.last_time(), since)
            if time.monotonic() - last >= QUIET_SECONDS:
                return True
            time.sleep(0.2)
        return False

    def end_round(self, agent, watch, record, markers, pool, deployments):
        """What closes every round, also one that failed: the zombies seen, the agent
        finished, the pool dropped."""
        if watch is not None:
            watch.stop()
            record["zombies"] = len(watch.counted)
            record["zombies_max_at_once"] = watch.max_at_once
        self.finish_agent(agent, record, markers)
        self.drop_pool(pool, deployments)

    def finish_agent(self, agent, record, markers):
        code, clean = agent.stop()
        self.live_agent = None
        record["exit_code"] = code
        record["stopped_by_sigterm"] = clean
        # Leftover children: every marked pid that still carries its run id (agent.py's runs
        # are in their own sessions, so stopping the agent's group does not reach them).
        for run_id, pid in markers.pids():
            if proc_environ_has(pid, ("PREFECT__FLOW_RUN_ID=" + run_id).encode()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        record["leftovers_killed"] = kill_tagged(self.tag)

    # -- a round -----------------------------------------------------------------------------------
    def run_round(self, kind, index):
        args = self.args
        workdir = tempfile.mkdtemp(prefix="round-%d-%s-" % (index, slug(kind)), dir=self.tmp)
        markers_path = os.path.join(workdir, "started")
        markers = Markers(markers_path, self.offset)
        record = {"kind": kind, "round": index, "workdir": workdir}
        log("round %d, %s: creating pool and %d + %d runs" % (index, kind, MEM_RUNS,
                                                             DISPATCH_RUNS))
        pool, deployments = self.make_pool(slug(kind), {
            "mem": (True, marker_command(markers_path, MEM_SLEEP)),
            "dispatch": (True, marker_command(markers_path)),
            "punct": (False, marker_command(markers_path))})
        record["pool"] = pool
        mem_ids = self.create_runs(deployments["mem"], [now_iso()] * MEM_RUNS)
        dispatch_ids = self.create_runs(deployments["dispatch"], [now_iso()] * DISPATCH_RUNS)
        agent = self.agent_process(kind, pool, workdir)
        watch = None
        try:
            self.sample_startups(kind, pool, workdir, record)
            self.launch(agent, pool, record)
            record["startup_s"] = statistics.median(record["startup_samples_s"])
            t0 = agent.t0
            record["pid_cmdline"] = proc_cmdline(agent.pid)[:3]
            watch = ZombieWatch(agent.pid)
            watch.start()
            log("round %d, %s: first poll after %s s (median %.3f); idle for %.0f s" % (
                index, kind, " ".join("%.3f" % v for v in record["startup_samples_s"]),
                record["startup_s"], args.idle_rss_after + args.idle_seconds))
            sleep_until(t0 + args.idle_rss_after)
            record["idle_rss_kib"] = agent.rss_kib()
            cpu_start = agent.cpu()
            sleep_until(t0 + args.idle_rss_after + args.idle_seconds)
            record["idle_cpu_s"] = agent.cpu() - cpu_start
            self.phase_memory(agent, pool, markers, mem_ids, record)
            self.phase_dispatch(agent, pool, markers, dispatch_ids, record)
            self.phase_punctuality(agent, deployments["punct"], markers, record)
            window = self.proxy.recorder.since(t0)
            record["requests"] = len(window)
            record["requests_by_path"] = count_paths(window)
            record["runs_started"] = len(markers.refresh())
            record["started_twice"] = markers.twice()
        finally:
            self.end_round(agent, watch, record, markers, pool, deployments)
        log("round %d, %s: done (%s)" % (index, kind, short_summary(record)))
        return record

    def phase_memory(self, agent, pool, markers, run_ids, record):
        start = time.monotonic()
        self.unpause(pool, "mem")
        self.wait_started(markers, run_ids, self.args.phase_timeout, agent, record, "mem")
        # All the `sleep 3` children ended (gone, or at worst a zombie), then the agent quiet.
        pids = [pid for _, pid in markers.pids(set(run_ids))]
        deadline = time.monotonic() + MEM_SLEEP + 60
        while time.monotonic() < deadline:
            if all((proc_stat(pid) or ("Z",))[0] == "Z" for pid in pids):
                break
            time.sleep(0.2)
        self.wait_quiet(start)
        record["peak_hwm_kib"] = agent.hwm_kib()
        record["mem_requests"] = len(self.proxy.recorder.since(start))

    def phase_dispatch(self, agent, pool, markers, run_ids, record):
        released = time.monotonic()
        self.unpause(pool, "dispatch")
        started = self.wait_started(markers, run_ids, self.args.phase_timeout, agent, record,
                                    "dispatch")
        # The poll that picks the batch up: the first one answered with runs. A poll that
        # arrived just before the unpause may already see them, hence the 5 s of slack.
        polls = [p for p in self.proxy.recorder.polls(pool, released - 5.0) if p[4]]
        record["dispatch_poll_sizes"] = [p[4] for p in polls]
        if not started or not polls:
            self.problem("%s round %d: no dispatch poll answered with runs (%d started)"
                         % (agent.kind, record["round"], len(started)))
            return
        first_poll = polls[0][0]
        record["dispatch_first_s"] = min(started.values()) - first_poll
        record["dispatch_last_started_s"] = max(started.values()) - first_poll
        if len(started) == len(run_ids):
            record["dispatch_s"] = record["dispatch_last_started_s"]
        else:  # its time to all started is longer than this, if it ever comes
            record["dispatch_more_than_s"] = released + record["dispatch_waited_s"] - first_poll
        quiet_from = time.monotonic()
        self.wait_quiet(quiet_from)
        record["dispatch_requests"] = len(self.proxy.recorder.since(released))

    def phase_punctuality(self, agent, deployment, markers, record):
        base = time.time() + PUNCT_AHEAD
        scheduled = [base + i * PUNCT_STEP for i in range(PUNCT_RUNS)]
        run_ids = self.create_runs(deployment, [epoch_iso(t) for t in scheduled])
        due = dict(zip(run_ids, scheduled))
        timeout = base - time.time() + PUNCT_RUNS * PUNCT_STEP + self.args.phase_timeout
        started = self.wait_started(markers, run_ids, timeout, agent, record, "punct")
        lateness = sorted(started[r] + self.offset - due[r] for r in started)
        record["punct_lateness_s"] = lateness
        if lateness:
            record["punct_median_s"] = statistics.median(lateness)
            record["punct_p95_s"] = percentile(lateness, 0.95)
            record["punct_early"] = sum(1 for x in lateness if x < 0)
        self.wait_quiet(time.monotonic())

    # -- scale -----------------------------------------------------------------------------------
    def run_scale_round(self, kind, index):
        args = self.args
        workdir = tempfile.mkdtemp(prefix="scale-%d-%s-" % (index, slug(kind)), dir=self.tmp)
        markers = Markers(os.path.join(workdir, "started"), self.offset)
        record = {"kind": kind, "round": index, "runs": args.scale_runs, "workdir": workdir}
        log("scale %d, %s: creating pool and %d runs" % (index, kind, args.scale_runs))
        # The runs sleep until ended here: the worker can take minutes to start them all, and
        # the window must see all of them running.
        sleep = int(args.scale_timeout + args.stall_seconds + args.scale_window + 300)
        pool, deployments = self.make_pool("scale-" + slug(kind), {
            "scale": (True, marker_command(markers.path, sleep))})
        record["pool"] = pool
        run_ids = self.create_runs(deployments["scale"], [now_iso()] * args.scale_runs)
        agent = self.agent_process(kind, pool, workdir)
        watch = None
        try:
            record["startup_s"] = self.launch(agent, pool, record)
            watch = ZombieWatch(agent.pid)
            watch.start()
            sleep_until(agent.t0 + args.idle_rss_after)
            record["rss_before_kib"] = rss_before = agent.rss_kib()
            released = time.monotonic()
            self.unpause(pool, "scale")
            log("scale %d, %s: released %d runs" % (index, kind, args.scale_runs))
            peak = [rss_before]

            def sample_rss():
                peak[0] = max(peak[0], agent.rss_kib() or 0)
            started = self.wait_started(markers, run_ids, args.scale_timeout, agent, record,
                                        "scale", tick=sample_rss)
            record["rss_peak_dispatch_kib"] = peak[0]
            if len(started) == len(run_ids):
                record["all_started_s"] = max(started.values()) - released
            if started:
                # With some runs never started, the window still runs with the others.
                pids = [pid for _, pid in markers.pids()]
                record["alive_at_window_start"] = sum(
                    1 for pid in pids if (proc_stat(pid) or ("Z",))[0] != "Z")
                cpu_start, window_start = agent.cpu(), time.monotonic()
                rss_max = self.max_rss_over(agent, args.scale_window)
                record["cpu_window_s"] = agent.cpu() - cpu_start
                record["window_s"] = time.monotonic() - window_start
                record["rss_max_kib"] = rss_max
                record["rss_growth_kib"] = rss_max - rss_before
                record["alive_at_window_end"] = sum(
                    1 for pid in pids if (proc_stat(pid) or ("Z",))[0] != "Z")
            # End them all at once (SIGTERM, as a cancellation would), wait until every one has
            # exited, and 15 s more for the agent to reap and report them.
            ended = time.monotonic()
            pids = self.end_runs(markers)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if all((proc_stat(pid) or ("Z",))[0] == "Z" for pid in pids):
                    break
                time.sleep(0.2)
            record["all_exited_s"] = time.monotonic() - ended
            time.sleep(15)
            record["rss_end_kib"] = agent.rss_kib()
            record["started_twice"] = markers.twice()
            record["requests"] = len(self.proxy.recorder.since(agent.t0))
            record["poll_sizes"] = [p[4] for p in self.proxy.recorder.polls(pool, released) if p[4]]
        finally:
            self.end_round(agent, watch, record, markers, pool, deployments)
        log("scale %d, %s: done (%s)" % (index, kind, short_summary(record)))
        return record

    @staticmethod
    def end_runs(markers):
        """SIGTERM every started run's child (still carrying its run id); returns their pids."""
        pids = []
        for run_id, pid in markers.pids():
            if proc_environ_has(pid, ("PREFECT__FLOW_RUN_ID=" + run_id).encode()):
                try:
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
                except OSError:
                    pass
        return pids

    @staticmethod
    def max_rss_over(agent, seconds):
        """The agent's highest RSS (KiB) sampled every 0.25 s for `seconds`."""
        deadline, highest = time.monotonic() + seconds, 0
        while agent.alive():
            highest = max(highest, agent.rss_kib() or 0)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        return highest

    def problem(self, text):
        log("PROBLEM: " + text)
        self.problems.append(text)

    # -- the whole thing ---------------------------------------------------------------------------
    def run(self):
        kinds = [k for k in KINDS if self.args.only in (None, slug(k))]
        order = [kinds[i % len(kinds)] for i in range(len(kinds) * self.args.repeat)]
        for i, kind in enumerate(order):
            try:
                self.rounds.append(self.run_round(kind, i // len(kinds) + 1))
            except BenchError as exc:
                number = i // len(kinds) + 1
                self.problem("%s round %d did not complete: %s" % (kind, number, exc))
                self.rounds.append({"kind": kind, "round": number, "failed": str(exc)})
        if not self.args.skip_scale:
            for i in range(self.args.scale_repeat):
                for kind in kinds:
                    try:
                        self.scale_rounds.append(self.run_scale_round(kind, i + 1))
                    except BenchError as exc:
                        self.problem("%s scale %d did not complete: %s" % (kind, i + 1, exc))
                        self.scale_rounds.append({"kind": kind, "round": i + 1,
                                                  "failed": str(exc)})


def load_agent_module(path):
    spec = importlib.util.spec_from_file_location("bench_agent_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fmt_num(value):
    return ("%d" % value) if float(value).is_integer() else ("%g" % value)


def slug(kind):
    return "agentpy" if kind == AGENT else "worker"


def count_paths(entries):
    """Requests by kind: the path with ids and the pool name replaced, so it is short."""
    counts = {}
    for entry in entries:
        parts = entry[2].split("?")[0].split("/")
        key = "/".join("{id}" if len(p) == 36 and p.count("-") == 4 else
                       "{pool}" if p.startswith("bench-") else p for p in parts)
        key = entry[1] + " " + key
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def short_summary(record):
    keys = ("startup_s", "idle_rss_kib", "idle_cpu_s", "peak_hwm_kib", "dispatch_s",
            "punct_median_s", "punct_p95_s", "rss_growth_kib", "cpu_window_s", "zombies")
    return ", ".join("%s=%s" % (k, ("%.3f" % record[k]) if isinstance(record[k], float)
                                else record[k]) for k in keys if k in record)


# -- machine, versions, install size -----------------------------------------------------------

def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = proc_meminfo_total()
    return "%s, %d cores, %.1f GiB RAM, Linux %s" % (model, os.cpu_count() or 0,
                                                    mem_kib / MIB if mem_kib else 0,
                                                    platform.release())


def proc_meminfo_total():
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def output_of(argv, cwd=None):
    try:
        return subprocess.check_output(argv, cwd=cwd, stderr=subprocess.DEVNULL,
                                       universal_newlines=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def agent_git_text(agent_path):
    """The repo's commit, and whether the agent file measured is the committed agent.py."""
    commit = output_of(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    if not commit:
        return "no git commit"
    committed = output_of(["git", "-C", REPO, "show", "HEAD:agent.py"])
    try:
        with open(agent_path) as handle:
            same = committed is not None and handle.read().strip() == committed
    except OSError:
        same = False
    return "repo at %s, agent file %s" % (commit, "= HEAD:agent.py" if same
                                          else "differs from HEAD:agent.py")


# Run with the venv's python: the size of prefect and everything it requires (its dependency
# closure, markers evaluated, extras not followed), from each distribution's RECORD.
CLOSURE_CODE = r'''
import json, os, re
from importlib import metadata
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
dists = {}
for d in metadata.distributions():
    dists.setdefault(norm(d.metadata["Name"]), d)
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
todo, seen = ["prefect"], set()
while todo:
    name = norm(todo.pop())
    if name in seen or name not in dists:
        continue
    seen.add(name)
    for text in dists[name].requires or []:
        if Requirement is not None:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
        elif "extra ==" not in text:
            todo.append(re.split(r"[ ;<>=!~\[(]", text, 1)[0])
size = 0
for name in seen:
    for f in dists[name].files or []:
        path = f.locate()
        if os.path.isfile(path) and not os.path.islink(path):
            size += os.path.getsize(path)
print(json.dumps({"bytes": size, "dists": len(seen), "all_dists": len(dists)}))
'''


def install_sizes(agent_path, venv):
    python = os.path.join(venv, "bin", "python")
    info = {"agent_bytes": os.path.getsize(agent_path)}
    text = output_of([python, "-c", CLOSURE_CODE])
    lib_bytes = 0
    for root, _dirs, files in os.walk(os.path.join(venv, "lib"), followlinks=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                lib_bytes += os.path.getsize(path)
    info["venv_lib_bytes"] = lib_bytes
    if text:
        closure = json.loads(text)
        info["worker_bytes"], info["worker_dists"] = closure["bytes"], closure["dists"]
        info["venv_dists"] = closure["all_dists"]
    else:  # fall back to the whole of lib/
        info["worker_bytes"] = lib_bytes
        info["worker_dists"] = None
    return info


# -- the table ---------------------------------------------------------------------------------

def median_of(records, key):
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def pooled(records, key):
    """Every value of a per-round list, all rounds together."""
    return [v for r in records for v in r.get(key) or () if v is not None]


def pooled_median(records, key):
    values = pooled(records, key)
    return statistics.median(values) if values else None


def by_kind(records, kind):
    return [r for r in records if r["kind"] == kind and "failed" not in r]


def ratio_text(worker, agent):
    if worker is None or agent is None:
        return "-"
    if agent <= 0:
        return "inf" if worker > 0 else "-"
    return "%.1fx" % (worker / agent)


def verdict(ok):
    return "-" if ok is None else ("met" if ok else "MISS")


def build_rows(bench, install):
    a = by_kind(bench.rounds, AGENT)
    w = by_kind(bench.rounds, WORKER)
    sa = by_kind(bench.scale_rounds, AGENT)
    sw = by_kind(bench.scale_rounds, WORKER)
    rows = []

    def both(key, records_a=a, records_w=w):
        return median_of(records_a, key), median_of(records_w, key)

    def row(figure, va, vw, fmt, target, ok, ratio=True, scale=1.0, missing=("-", "-")):
        sa_, sw_ = (None if va is None else va * scale), (None if vw is None else vw * scale)
        rows.append((figure, missing[0] if sa_ is None else fmt % sa_,
                     missing[1] if sw_ is None else fmt % sw_,
                     ratio_text(vw, va) if ratio else "-", target, verdict(ok)))

    def partial(records, started_key, total):
        """What to show when no round started all its runs: how many did (median)."""
        count = median_of(records, started_key)
        return "-" if count is None else "not all started (%g/%d)" % (count, total)

    def known(*values):
        return all(v is not None for v in values)

    va, vw = pooled_median(a, "startup_samples_s"), pooled_median(w, "startup_samples_s")
    row("start-up: process start to first poll (s)", va, vw, "%.3f",
        "20x faster and < 0.2 s",
        (va * 20 <= vw and va < 0.2) if known(va, vw) else None)
    va, vw = both("idle_rss_kib")
    row("memory: RSS idle after %.0f s (MB)" % bench.args.idle_rss_after, va, vw, "%.1f",
        "<= 25 MB and <= 1/5", (va / 1024.0 <= 25 and va * 5 <= vw) if known(va, vw) else None,
        scale=1 / 1024.0)
    va, vw = both("peak_hwm_kib")
    row("memory: peak RSS over %d runs (MB)" % MEM_RUNS, va, vw, "%.1f", "<= 1/5",
        (va * 5 <= vw) if known(va, vw) else None, scale=1 / 1024.0)
    dists = install.get("worker_dists")
    rows.append(("install: bytes on the host (MB)", "%.3f (1 file)" % (install["agent_bytes"] / 1e6),
                 "%.1f (%s distributions)" % (install["worker_bytes"] / 1e6,
                                              dists if dists is not None else "venv lib/"),
                 ratio_text(install["worker_bytes"], install["agent_bytes"]), "the one file",
                 verdict(True)))
    va, vw = both("idle_cpu_s")
    row("idle cost: CPU s over %.0f s idle" % bench.args.idle_seconds, va, vw, "%.4f", "<= 1/5",
        (va * 5 <= vw) if known(va, vw) else None)
    va, vw = both("dispatch_s")
    row("dispatch: %d runs, poll to last child started (s)" % DISPATCH_RUNS, va, vw, "%.2f",
        "5x faster", (va * 5 <= vw) if known(va, vw) else None,
        missing=(partial(a, "dispatch_started", DISPATCH_RUNS),
                 partial(w, "dispatch_started", DISPATCH_RUNS)))
    worker_over = median_of(w, "dispatch_more_than_s")
    if va is not None and vw is None and worker_over is not None:
        # The worker never started all of them: its time is at least how long it was waited
        # for, so agent.py's ratio is at least that over its own time.
        figure, agent_text, worker_text = rows.pop()[:3]
        rows.append((figure, agent_text, "%s after %.0f s" % (worker_text, worker_over),
                     "> %.1fx" % (worker_over / va), "5x faster",
                     verdict(True) if va * 5 <= worker_over else "-"))
    elif va is None and vw is not None:
        rows[-1] = rows[-1][:5] + (verdict(False),)
    va, vw = both("dispatch_first_s")
    row("dispatch: poll to first child started (s)", va, vw, "%.3f", "-", None)
    va, vw = both("punct_median_s")
    row("punctuality: child start - scheduled, median (s)", va, vw, "%+.3f", "-", None,
        ratio=False)
    va, vw = both("punct_p95_s")
    row("punctuality: child start - scheduled, p95 (s)", va, vw, "%+.3f", "p95 < 0.1 s",
        (va < 0.1) if va is not None else None, ratio=False)
    va, vw = both("punct_early")
    row("punctuality: children started early (of %d)" % PUNCT_RUNS, va, vw, "%g", "-", None,
        ratio=False)
    if sa or sw:
        runs = bench.args.scale_runs
        va, vw = both("rss_growth_kib", sa, sw)
        row("scale: RSS growth, %d running (MB)" % runs, va, vw, "%.1f", "<= 10 MB",
            (va / 1024.0 <= 10) if va is not None else None, scale=1 / 1024.0)
        va, vw = both("cpu_window_s", sa, sw)
        row("scale: CPU s over %.0f s supervising %d" % (bench.args.scale_window, runs), va, vw,
            "%.3f", "-", None)
        va, vw = both("all_started_s", sa, sw)
        row("scale: release to all %d started (s)" % runs, va, vw, "%.1f", "-", None,
            missing=(partial(sa, "scale_started", runs), partial(sw, "scale_started", runs)))

    def not_started(records):
        return sum(sum(r.get(key, {}).values()) for r in records
                   for key in ("mem_not_started", "dispatch_not_started", "punct_not_started",
                               "scale_not_started"))
    na, nw = not_started(a + sa), not_started(w + sw)
    row("runs whose child never started, all rounds", na, nw, "%d", "-", None, ratio=False)
    za = sum(r.get("zombies", 0) for r in a + sa)
    zw = sum(r.get("zombies", 0) for r in w + sw)
    row("zombies seen, all rounds", za, zw, "%d", "0", za == 0, ratio=False)
    runs_per_round = MEM_RUNS + DISPATCH_RUNS + PUNCT_RUNS
    va = median_of([dict(r, rpr=r["requests"] / float(runs_per_round)) for r in a
                    if "requests" in r], "rpr")
    vw = median_of([dict(r, rpr=r["requests"] / float(runs_per_round)) for r in w
                    if "requests" in r], "rpr")
    row("API requests per run (whole round, info)", va, vw, "%.1f", "-", None)
    return rows


def table_text(rows, header=("figure", AGENT, WORKER, "ratio", "target", "met?")):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(header)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) + " |")
    return "\n".join(lines)


HOW_MEASURED = """\
- Both agents poll one Prefect {prefect} server through a recording reverse proxy in
  bench/compare.py, with poll interval {poll} s and prefetch {prefetch} s, in alternating
  rounds, each on a fresh process work pool (agent.py's base job template) with identical
  deployments. Figures are medians over the rounds; ratio = Prefect worker / agent.py.
- Every run's command is `bash -c 'echo "$PREFECT__FLOW_RUN_ID $EPOCHREALTIME $$" >> FILE'`
  (`; exec sleep N` for long runs): the child's own start time, independent of either agent.
- start-up: process start to the proxy receiving its first `get_scheduled_flow_runs`; the
  median of all start-ups, {samples} per round (all but the round's own stopped after their
  first poll), each launched once the machine had been under {settle_busy:.0%} of one core
  busy for {settle_window} s, so that the server's work for the round before is not counted.
- memory: VmRSS of the agent process {idle_after} s after start; peak = VmHWM after 100 runs
  (`sleep {mem_sleep}`) released at once have ended. MB = 2^20 bytes.
- install: agent.py's size; for the worker, the files of prefect and its dependency closure.
- idle cost: CPU time of the agent process's threads (schedstat, ns) over {idle} s idle, after
  the RSS sample.
- dispatch: 200 runs waiting in a paused queue are released (unpaused); time from the poll
  that returned them to the 200th child's start. An agent that never starts all 200 (it gave
  runs up, or stalled) is shown with the time it was waited for, a lower bound of its time,
  and the ratio as "> N".
- punctuality: 20 runs scheduled {ahead:.0f} s ahead, 0.5 s apart; child start minus
  scheduled time (negative: started before its scheduled time).
- scale: {scale_runs} long `sleep` runs released at once; RSS growth = highest RSS over {window:.0f} s
  with all running minus RSS before release; CPU over the same {window:.0f} s; then all are
  ended at once with SIGTERM and the agent has to reap and report them.
- zombies: children of the agent seen as Z in samples at least 1 s apart (every 0.2 s).
- The server started by compare.py has its late-runs service off: it would mark the runs
  held in paused queues Late and its writes lock the SQLite database. A run "whose child never
  started" is one the agent gave up (the worker proposes Crashed when a request of its
  submission still fails after the client's retries of 503) or left Pending.
"""


def header_lines(bench, install):
    args = bench.args
    a_rounds = len(by_kind(bench.rounds, AGENT))
    w_rounds = len(by_kind(bench.rounds, WORKER))
    python = output_of([args.agent_python, "-c", "import sys; print(sys.version.split()[0])"])
    prefect = output_of([os.path.join(bench.venv, "bin", "python"), "-c",
                         "import prefect; print(prefect.__version__)"])
    lines = [
        "machine:  %s" % machine_info(),
        "versions: agent.py %s (%s); CPython %s for both; prefect %s; server API %s" % (
            bench.agent_version, agent_git_text(args.agent), python, prefect,
            bench.info.get("server_version")),
        "runs:     %d + %d rounds (agent.py + worker) of %d runs each (%d, %d, %d)%s" % (
            a_rounds, w_rounds, MEM_RUNS + DISPATCH_RUNS + PUNCT_RUNS, MEM_RUNS, DISPATCH_RUNS,
            PUNCT_RUNS, "" if args.skip_scale else "; %d + %d scale rounds of %d runs" % (
                len(by_kind(bench.scale_rounds, AGENT)), len(by_kind(bench.scale_rounds, WORKER)),
                args.scale_runs)),
        "settings: poll interval %s s, prefetch %s s, idle RSS after %s s, idle CPU over %s s" % (
            fmt_num(args.poll_interval), fmt_num(args.prefetch), fmt_num(args.idle_rss_after),
            fmt_num(args.idle_seconds)),
        "database: %s" % bench.info.get("database", "the one behind --server"),
    ]
    for kind in KINDS:
        rounds = by_kind(bench.rounds, kind)
        samples = pooled(rounds, "startup_samples_s")
        if samples:
            lines.append(startup_line(kind, rounds, samples))
    return lines


def startup_line(kind, rounds, samples):
    """How one agent's start-ups went, and how busy the machine and server were around them:
    the figures that tell a slow start-up from a busy machine."""
    def median_text(key, fmt, scale=1.0):
        values = pooled(rounds, key)
        return fmt % (statistics.median(values) * scale) if values else "-"
    return ("start-up: %s %d samples, %.3f-%.3f s; machine settled in %s s (busy %s of a core "
            "before launch); server CPU from launch to answering the first poll %s ms "
            "(medians)" % (
                kind, len(samples), min(samples), max(samples),
                median_text("startup_settle_s", "%.1f"),
                median_text("startup_busy_before", "%.2f"),
                median_text("startup_server_cpu_s", "%.0f", 1000.0)))


def write_results(bench, install, rows, argv):
    args = bench.args
    table = table_text(rows)
    how = HOW_MEASURED.format(prefect=PREFECT_VERSION, poll=fmt_num(args.poll_interval),
                              prefetch=fmt_num(args.prefetch), idle_after=fmt_num(args.idle_rss_after),
                              mem_sleep=MEM_SLEEP, idle=fmt_num(args.idle_seconds),
                              ahead=PUNCT_AHEAD, scale_runs=args.scale_runs,
                              window=args.scale_window, samples=args.startup_samples,
                              settle_busy=SETTLE_BUSY, settle_window=fmt_num(SETTLE_WINDOW))
    text = "\n".join([
        "# agent.py against Prefect's process worker",
        "",
        "Written by `bench/compare.py --write` on %s." % time.strftime("%Y-%m-%d %H:%M %Z"),
        "",
        "```",
        "\n".join(header_lines(bench, install)),
        "command:  python bench/compare.py %s" % " ".join(shlex.quote(a) for a in argv),
        "```",
        "",
        table,
        "",
        "How measured:",
        "",
        how,
    ])
    with open(RESULTS_MD, "w") as handle:
        handle.write(text)
    log("wrote %s" % RESULTS_MD)
    replace_in_readme(README_START, README_END, table + "\n\nFrom `bench/compare.py`; see "
                      "bench/RESULTS.md for the machine and how each figure is measured.")


def replace_in_readme(start_marker, end_marker, text):
    """Put `text` between the README's two markers (a warning, and no change, without them)."""
    try:
        with open(README_MD) as handle:
            readme = handle.read()
    except OSError as exc:
        log("WARNING: cannot read %s: %s" % (README_MD, exc))
        return
    start, end = readme.find(start_marker), readme.find(end_marker)
    if start < 0 or end < start:
        log("WARNING: README.md has no %s ... %s markers; left alone" % (start_marker, end_marker))
        return
    with open(README_MD, "w") as handle:
        handle.write(readme[:start + len(start_marker)] + "\n" + text + "\n" + readme[end:])
    log("updated the table between %s and %s in %s" % (start_marker, end_marker, README_MD))


# -- the WAN section (--rtt-ms) ----------------------------------------------------------------

FLOOR_THREADS = 16
CREATE_THREADS = 4           # runs are created (and their states read) from this many threads
WAN_SCHEDULED_AGO = 10.0     # the runs are waiting already: scheduled this long before creation
WAN_SETTLE_TIMEOUT = 15.0    # shorter than the rounds': a shared machine may never be quiet
WAN_HEADER = ("rtt ms", "runs", "floor s (claims/s)",
              "agent.py first", "agent.py claimed", "agent.py started", "agent.py req/run",
              "worker first", "worker claimed", "worker started", "worker req/run")
WAN_HOW = """\
- A cell: a fresh process pool whose one deployment's command appends the run id and
  $EPOCHREALTIME to a marker file; N runs created in it, scheduled {ago:g} s in the
  past, all before the agent starts; the agent then started (poll interval {poll} s, prefetch
  {prefetch} s) with its API URL on bench/wan.py's proxy in front of the server, and stopped
  once every child had started and it had made no request for {quiet:g} s.
- Times are from the agent's process start. first / claimed: to the earliest / latest of the
  runs' first PENDING state, by the state's own timestamp, which the server sets when it takes
  the proposal (Prefect 3.8.8: StateCreate has no timestamp field); read from
  /flow_run_states afterwards. started: to the last child's own marker. req/run: HTTP requests
  the proxy saw from the agent's start to its stop, over the runs (a websocket counts one).
- wan proxy: each chunk is passed on rtt/2 after it arrived, in each direction, in order,
  without waiting behind earlier chunks' delays; a new connection pays one more round trip
  before its first bytes reach the server (a TCP handshake; TLS not modelled).
- floor: on loopback, straight to the server, N runs like a cell's claimed by POST
  /flow_runs/{{id}}/set_state PENDING over kept-alive connections, one after another, then N
  fresh runs from {threads} threads; the floor is the faster of the two. Measured once per
  database, before the agents, on the same server.
- Targets: start to all N children started <= 1.5 x floor(N) + 1 s, for every N (dispatch
  paced by the server, not by the round trip, at 100 runs and at 500); start to all claimed
  <= the worker's. They are set for 80 ms, and shown for every rtt measured.
- Figures are medians over --wan-repeat rounds ({repeat} here); "k/N" is how many of N runs
  were claimed or started when an agent did not get to all of them.
"""


def iso_epoch(text):
    """An API timestamp as a time.time() value. fromisoformat before 3.11 takes neither "Z"
    nor a fraction of other than 3 or 6 digits."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$", text or "")
    if not match:
        raise BenchError("not an API timestamp: %r" % (text,))
    whole = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    zone = (match.group(3) or "Z").replace(":", "")
    offset = 0 if zone == "Z" else int(zone[0] + "1") * (int(zone[1:3]) * 3600 +
                                                        int(zone[3:5]) * 60)
    epoch = whole.replace(tzinfo=datetime.timezone.utc).timestamp() - offset
    return epoch + float(match.group(2) or 0)


class WanBench(Bench):
    """The --rtt-ms section on one database: the server's floor, then each agent through the
    latency proxy for each rtt and run count."""

    def __init__(self, args, database):
        Bench.__init__(self, args, database)
        self.floors = []   # a record per run count
        self.cells = []    # a record per rtt, run count, round and agent
        self.checks = {}   # rtt -> the proxy's own check
        self.wan = None
        self.kept_api = None

    def setup(self):
        self.connect(self.start_backend())
        self.kept_api = Api(self.info["server"], keep_alive=True)
        log("server %s on %s, temp dir %s" % (self.info["server"], self.database, self.tmp))

    def cleanup(self):
        Bench.cleanup(self)
        if self.wan is not None:
            self.wan.stop()

    def run(self):
        kinds = [k for k in KINDS if self.args.only in (None, slug(k))]
        for count in self.args.wan_runs:
            self.floors.append(self.measure_floor(count))
        server = urllib.parse.urlsplit(self.info["server"])
        for rtt in self.args.rtt_ms:
            self.checks[rtt] = check_wan(rtt)
            log(wan_check_text(rtt, self.checks[rtt]))
            self.wan = LatencyProxy(server.hostname, server.port or 80, rtt).start()
            url = "http://127.0.0.1:%d%s" % (self.wan.port, server.path)
            try:
                for count in self.args.wan_runs:
                    for number in range(1, self.args.wan_repeat + 1):
                        for kind in kinds:
                            self.cells.append(self.wan_cell(kind, rtt, count, number, url))
            finally:
                self.wan.stop()
                self.wan = None

    def measure_floor(self, count):
        """The server's own pace: `count` waiting runs claimed straight on loopback, one after
        another, then `count` fresh ones from FLOOR_THREADS threads."""
        record = {"runs": count, "threads": FLOOR_THREADS}
        pool, deployments = self.make_pool("floor", {"floor": (True, "true")})
        try:
            for key, threads in (("serial", 1), ("threads", FLOOR_THREADS)):
                run_ids = self.create_runs(deployments["floor"],
                                           [now_iso(-WAN_SCHEDULED_AGO)] * count, CREATE_THREADS)
                wait_machine_quiet(WAN_SETTLE_TIMEOUT)
                start = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(threads) as workers:
                    accepted = list(workers.map(self.claim, run_ids))
                record[key + "_s"] = time.monotonic() - start
                record[key + "_refused"] = accepted.count(False)
        finally:
            self.drop_pool(pool, deployments)
        record["floor_s"] = min(record["serial_s"], record["threads_s"])
        log(floor_text(record))
        return record

    def claim(self, run_id):
        answer = self.kept_api.call("POST", "/flow_runs/%s/set_state" % run_id, {
            "state": {"type": "PENDING", "state_details": {
                "flow_run_id": run_id, "transition_id": str(uuid.uuid4())}},
            "force": False})
        return answer.get("status") == "ACCEPT"

    def wan_cell(self, kind, rtt, count, number, api_url):
        label = "rtt %g ms, %d runs, %s round %d" % (rtt, count, kind, number)
        record = {"kind": kind, "rtt_ms": rtt, "runs": count, "round": number}
        workdir = tempfile.mkdtemp(prefix="wan-%g-%d-%s-" % (rtt, count, slug(kind)),
                                   dir=self.tmp)
        markers = Markers(os.path.join(workdir, "started"), self.offset)
        pool, deployments = self.make_pool("wan-" + slug(kind), {
            "wan": (False, marker_command(markers.path))})
        agent = None
        try:
            created = time.monotonic()
            run_ids = self.create_runs(deployments["wan"], [now_iso(-WAN_SCHEDULED_AGO)] * count,
                                       CREATE_THREADS)
            record["create_s"] = time.monotonic() - created
            agent = self.agent_process(kind, pool, workdir, api_url)
            wait_machine_quiet(WAN_SETTLE_TIMEOUT)
            t0 = agent.start()
            self.live_agent = agent
            started = self.wait_started(markers, run_ids, self.args.wan_timeout, agent, record,
                                        "wan")
            record["first_started_s"] = min(started.values()) - t0
            if len(started) == count:
                record["all_started_s"] = max(started.values()) - t0
            self.wait_quiet(time.monotonic(), requests=self.wan.requests)
            requests = self.wan.requests.since(t0)
            record["requests"] = len(requests)
            record["requests_by_path"] = count_paths(requests)
            record["first_request_s"] = requests[0][0] - t0 if requests else None
            # When each poll went out: a cell that waits for its next poll shows it here.
            record["polls_s"] = [round(e[0] - t0, 3) for e in requests
                                 if e[1] == "POST" and POLL_PATH in e[2]]
            claims = self.claim_times(run_ids)
            record["claimed"] = len(claims)
            if claims:
                record["first_claim_s"] = min(claims.values()) - t0
            if len(claims) == count:
                record["all_claimed_s"] = max(claims.values()) - t0
            record["started_twice"] = markers.twice()
            if record["started_twice"]:
                self.problem("%s: %d runs started more than once" % (
                    label, len(record["started_twice"])))
        except BenchError as exc:
            self.problem("%s did not complete: %s" % (label, exc))
            record["failed"] = str(exc)
        finally:
            if agent is not None:
                self.finish_agent(agent, record, markers)
            self.drop_pool(pool, deployments)
        log("%s: %s" % (label, ", ".join("%s=%s" % (k, fmt_value(record.get(k))) for k in (
            "create_s", "first_claim_s", "all_claimed_s", "all_started_s", "requests"))))
        return record

    def claim_times(self, run_ids):
        """{run id: monotonic time of its first PENDING state}, by the state's timestamp."""
        def first_pending(run_id):
            states = self.kept_api.call("GET", "/flow_run_states/?flow_run_id=%s" % run_id)
            times = [iso_epoch(s.get("timestamp")) for s in states or ()
                     if s.get("type") == "PENDING"]
            return run_id, (min(times) - self.offset) if times else None
        with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as workers:
            return dict(item for item in workers.map(first_pending, run_ids)
                        if item[1] is not None)


def fmt_value(value):
    return "%.3f" % value if isinstance(value, float) else str(value)


def floor_text(record):
    def pace(key):
        seconds = record[key + "_s"]
        refused = record[key + "_refused"]
        return "%.2f s (%.0f/s%s)" % (seconds, record["runs"] / seconds,
                                      ", %d not accepted" % refused if refused else "")
    return ("server floor, %d runs claimed on loopback: one after another %s, from %d threads "
            "%s" % (record["runs"], pace("serial"), record["threads"], pace("threads")))


def cells_of(bench, kind, rtt, count):
    return [c for c in bench.cells if c["kind"] == kind and c["rtt_ms"] == rtt
            and c["runs"] == count and "failed" not in c]


def floor_of(bench, count):
    return next((f["floor_s"] for f in bench.floors if f["runs"] == count), None)


def wan_rows(bench):
    rows = []
    for rtt in bench.args.rtt_ms:
        for count in bench.args.wan_runs:
            floor = floor_of(bench, count)
            row = ["%g" % rtt, "%d" % count,
                   "-" if floor is None else "%.2f (%.0f/s)" % (floor, count / floor)]
            for kind in KINDS:
                cells = cells_of(bench, kind, rtt, count)
                row += [cell_text(cells, "first_claim_s"),
                        cell_text(cells, "all_claimed_s", "claimed", count),
                        cell_text(cells, "all_started_s", "wan_started", count)]
                per_run = median_of(cells, "requests")
                row.append("-" if per_run is None else "%.1f" % (per_run / count))
            rows.append(tuple(row))
    return rows


def cell_text(cells, key, count_key=None, total=None):
    value = median_of(cells, key)
    if value is not None:
        return "%.2f" % value
    done = median_of(cells, count_key) if count_key else None
    return "-" if done is None else "%g/%d" % (done, total)


def wan_targets(bench):
    """PASS/MISS lines: agent.py against the server's floor and against the worker."""
    lines = []
    for rtt in bench.args.rtt_ms:
        for count in bench.args.wan_runs:
            where = "rtt %g ms, %d runs" % (rtt, count)
            floor = floor_of(bench, count)
            started = median_of(cells_of(bench, AGENT, rtt, count), "all_started_s")
            if floor is not None:
                limit = 1.5 * floor + 1.0
                lines.append("target %s: agent.py start to all children started %s <= 1.5 x "
                             "floor %.2f s + 1 s = %.2f s: %s" % (
                                 where, seconds_text(started), floor, limit,
                                 pass_text(started is not None and started <= limit)))
            claimed = median_of(cells_of(bench, AGENT, rtt, count), "all_claimed_s")
            worker_cells = cells_of(bench, WORKER, rtt, count)
            worker = median_of(worker_cells, "all_claimed_s")
            if worker_cells:
                # A worker that never claimed them all is beaten by any agent.py that did.
                ok = claimed is not None and (worker is None or claimed <= worker)
                lines.append("target %s: agent.py start to all claimed %s <= Prefect worker's "
                             "%s: %s" % (where, seconds_text(claimed), seconds_text(worker),
                                         pass_text(ok)))
    return lines


def seconds_text(value):
    return "not all" if value is None else "%.2f s" % value


def pass_text(ok):
    return "PASS" if ok else "MISS"


def wan_report(benches, argv, wall):
    args = benches[0].args
    versions = next((b for b in benches if b.agent_version), benches[0])
    python = output_of([args.agent_python, "-c", "import sys; print(sys.version.split()[0])"])
    lines = [
        "",
        "machine:  %s" % machine_info(),
        "versions: agent.py %s (%s); CPython %s for both; prefect %s, server API %s" % (
            versions.agent_version, agent_git_text(args.agent), python, PREFECT_VERSION,
            versions.info.get("server_version")),
        "settings: poll interval %s s, prefetch %s s; %d round(s) per agent per cell" % (
            fmt_num(args.poll_interval), fmt_num(args.prefetch), args.wan_repeat),
        "command:  python bench/compare.py %s" % " ".join(shlex.quote(a) for a in argv),
        "wall time: %.1f min" % (wall / 60.0),
    ]
    for bench in benches:
        lines += ["", "database %s: %s" % (bench.database, bench.info.get("database", "-"))]
        lines += [floor_text(f) for f in bench.floors]
        lines += [wan_check_text(rtt, c) for rtt, c in sorted(bench.checks.items())]
        lines += ["", table_text(wan_rows(bench), WAN_HEADER), ""]
        lines += wan_targets(bench)
    lines += ["", "first / claimed / started: seconds from the agent's process start to the "
                  "first claim, all claimed, all children started; req/run: API requests per "
                  "run.", "", "How measured:", "",
              WAN_HOW.format(ago=WAN_SCHEDULED_AGO, poll=fmt_num(args.poll_interval),
                             prefetch=fmt_num(args.prefetch), quiet=QUIET_SECONDS,
                             threads=FLOOR_THREADS, repeat=args.wan_repeat)]
    return "\n".join(lines)


def wan_main(args, argv):
    started = time.monotonic()
    benches, completed = [], True
    for database in args.database:
        bench = WanBench(args, database)
        benches.append(bench)
        done, interrupted = run_bench(bench)
        completed = completed and done
        if interrupted:
            break
    report = wan_report(benches, argv, time.monotonic() - started)
    print(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"argv": argv, "machine": machine_info(), "databases": [
                {"database": b.database, "info": b.info, "floors": b.floors, "cells": b.cells,
                 "wan_checks": dict(("%g" % k, v) for k, v in b.checks.items()),
                 "problems": b.problems} for b in benches]}, handle, indent=1, sort_keys=True)
        log("wrote %s" % args.json)
    for bench in benches:
        for text in bench.problems:
            print("PROBLEM: " + text)
    failed = [c for b in benches for c in b.cells if "failed" in c]
    if completed and not failed and args.write:
        write_wan_results(benches, report)
    return 0 if completed and not failed else 1


def write_wan_results(benches, report):
    """bench/RESULTS-wan.md: the whole report; the README: each database's table and targets."""
    with open(WAN_RESULTS_MD, "w") as handle:
        handle.write("# agent.py and Prefect's worker over a slow link\n\nWritten by "
                     "`bench/compare.py --write` on %s.\n\n%s\n"
                     % (time.strftime("%Y-%m-%d %H:%M %Z"), fence_all_but_tables(report)))
    log("wrote %s" % WAN_RESULTS_MD)
    parts = []
    for bench in benches:
        parts += ["Prefect %s server, %s database:" % (PREFECT_VERSION, bench.database), "",
                  table_text(wan_rows(bench), WAN_HEADER), "",
                  "```", "\n".join(wan_targets(bench)), "```", ""]
    parts.append("From `bench/compare.py --rtt-ms`; see bench/RESULTS-wan.md for the machine, "
                 "the proxy's own check and how each figure is measured.")
    replace_in_readme(WAN_README_START, WAN_README_END, "\n".join(parts))


def fence_all_but_tables(text):
    """Markdown: the table lines as they are, every other run of lines in a code block."""
    blocks, lines = [], text.strip("\n").split("\n")
    for line in lines:
        is_table = line.startswith("|")
        if not blocks or blocks[-1][0] != is_table:
            blocks.append((is_table, []))
        blocks[-1][1].append(line)
    return "\n\n".join("\n".join(body) if is_table else "```\n%s\n```" % "\n".join(body).strip("\n")
                       for is_table, body in blocks)


# -- main --------------------------------------------------------------------------------------

def default_venv():
    cache = os.environ.get("AGENTPY_CI_CACHE") or os.path.join(
        os.environ.get("TMPDIR") or "/tmp", "agentpy-ci")
    return os.path.join(cache, "venv-prefect-" + PREFECT_VERSION)


def raise_file_limit():
    """The proxy holds two sockets per request or websocket in flight: with the worker's two
    websockets per running flow run, a 500-run scale round needs a few thousand."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass


def on_signal(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def run_bench(bench):
    """Set up and run; clean up whatever happened (Ctrl-C and SIGTERM wait for the cleanup).
    Returns (completed, interrupted)."""
    completed = interrupted = False
    try:
        bench.setup()
        bench.run()
        completed = True
    except BenchError as exc:
        bench.problem(str(exc))
    except KeyboardInterrupt as exc:
        bench.problem("interrupted (%s)" % (str(exc) or "SIGINT"))
        interrupted = True
    except Exception:  # a bug here: say where, still clean up
        bench.problem("compare.py failed:\n" + traceback.format_exc())
    finally:
        handlers = (signal.signal(signal.SIGINT, signal.SIG_IGN),
                    signal.signal(signal.SIGTERM, signal.SIG_IGN))
        bench.cleanup()
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return completed, interrupted


def number_list(kind):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError("not a comma list of numbers: %r" % text)
        if not values or min(values) < 0:
            raise argparse.ArgumentTypeError("want a comma list of numbers >= 0: %r" % text)
        return values
    return parse


def database_list(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not set(values) <= {"sqlite", "postgres"}:
        raise argparse.ArgumentTypeError("sqlite, postgres or both, comma separated: %r" % text)
    return values


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--agent", default=AGENT_PY, help="agent.py to measure (default: the repo's)")
    add("--prefect-venv", default=default_venv(),
        help="venv with prefect %s (default: .ci/run's, created if missing)" % PREFECT_VERSION)
    add("--base-python", default="python3", help="python that creates the venv if missing")
    add("--agent-python", help="python that runs agent.py (default: the venv's, the one "
                               "the worker runs on)")
    add("--server", metavar="URL", help="use this Prefect API instead of starting a server")
    add("--repeat", type=int, default=3, help="rounds per agent (default 3)")
    add("--startup-samples", type=int, default=5,
        help="start-ups measured per round, the round's own included (default 5)")
    add("--poll-interval", type=float, default=10.0, help="both agents' poll interval (s)")
    add("--prefetch", type=float, default=20.0, help="both agents' prefetch (s)")
    add("--idle-rss-after", type=float, default=30.0, help="idle RSS sample after start (s)")
    add("--idle-seconds", type=float, default=60.0, help="idle CPU window (s)")
    add("--phase-timeout", type=float, default=300.0,
        help="how long a batch of runs may take to start (s)")
    add("--stall-seconds", type=float, default=60.0,
        help="stop waiting for a batch when, after its first child, no other has started "
             "for this long (s)")
    add("--skip-scale", action="store_true", help="no scale rounds")
    add("--scale-repeat", type=int, default=1, help="scale rounds per agent (default 1)")
    add("--scale-runs", type=int, default=500, help="concurrent runs in a scale round")
    add("--scale-window", type=float, default=30.0, help="seconds sampled with all running")
    add("--scale-timeout", type=float, default=300.0,
        help="how long all scale runs may take to start (s)")
    add("--only", choices=("agentpy", "worker"),
        help="measure one agent only (for trying the script out; ratios need both)")
    add("--json", metavar="PATH", help="write every per-round figure here")
    add("--write", action="store_true",
        help="rewrite bench/RESULTS.md and the table between the README's bench markers "
             "(with --rtt-ms: bench/RESULTS-wan.md and the README's wan markers)")
    add("--keep", action="store_true", help="keep the temp dir (agent and server logs)")
    add("--database", type=database_list, default=["sqlite"],
        help="the server's database: sqlite (default) or postgres (a PostgreSQL cluster "
             "initdb'd and started here, stopped at the end); with --rtt-ms a comma list, "
             "one table each")
    add("--rtt-ms", type=number_list(float), metavar="MS[,MS...]",
        help="run the WAN section instead of the rounds: both agents through a proxy adding "
             "this round trip (each value a section), on runs already waiting, beside the "
             "server's floor")
    add("--wan-runs", type=number_list(int), default=[100, 500], metavar="N[,N...]",
        help="waiting runs per WAN cell (default 100,500)")
    add("--wan-repeat", type=int, default=1, help="rounds per agent per WAN cell (default 1)")
    add("--wan-timeout", type=float, default=600.0,
        help="how long a WAN cell's runs may take to start (s)")
    args = parser.parse_args(argv)
    args.agent = os.path.abspath(args.agent)
    args.prefect_venv = os.path.abspath(args.prefect_venv)
    if args.agent_python is None:
        args.agent_python = os.path.join(args.prefect_venv, "bin", "python")
    if min(args.repeat, args.scale_repeat, args.scale_runs, args.startup_samples) < 1:
        parser.error("--repeat, --scale-repeat, --scale-runs and --startup-samples must be "
                     "at least 1")
    if not os.path.isfile(args.agent):
        parser.error("--agent %s: no such file" % args.agent)
    if args.rtt_ms is None and len(args.database) > 1:
        parser.error("more than one --database needs --rtt-ms")
    if args.server and args.database != ["sqlite"]:
        parser.error("--database starts the server's database: not with --server")
    if args.wan_repeat < 1 or min(args.wan_runs) < 1:
        parser.error("--wan-repeat and --wan-runs must be at least 1")

    raise_file_limit()
    signal.signal(signal.SIGTERM, on_signal)
    if args.rtt_ms is not None:
        return wan_main(args, argv)
    bench = Bench(args, args.database[0])
    completed, _ = run_bench(bench)
    if not (bench.rounds or bench.scale_rounds):
        for text in bench.problems:
            print("PROBLEM: " + text)
        return 1

    install = install_sizes(args.agent, bench.venv)
    rows = build_rows(bench, install)
    print()
    for line in header_lines(bench, install):
        print(line)
    print()
    print(table_text(rows))
    print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"argv": argv, "machine": machine_info(), "install": install,
                       "info": bench.info, "rounds": bench.rounds,
                       "scale_rounds": bench.scale_rounds, "problems": bench.problems},
                      handle, indent=1, sort_keys=True)
        log("wrote %s" % args.json)
    failed_rounds = [r for r in bench.rounds + bench.scale_rounds if "failed" in r]
    if completed and not failed_rounds and args.write:
        write_results(bench, install, rows, argv)
    for text in bench.problems:
        print("PROBLEM: " + text)
    return 0 if completed and not failed_rounds else 1


if __name__ == "__main__":
    sys.exit(main())
