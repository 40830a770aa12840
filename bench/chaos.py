#!/usr/bin/env python3
"""Chaos test: agent.py against a real Prefect 3 server on a bad day.

    python bench/chaos.py [--quick] [--only NAME] [--require-all] [--keep] [--agent PATH]

Starts a Prefect 3.9.1 server (SQLite, a free loopback port, the venv .ci/run builds) and runs
agent.py as a subprocess against it through these scenarios:

  kill9-steps        SIGKILL the agent at the Nth fsync / Popen / HTTP request (before it is
                     sent, or after its answer came back), restart it on the same --state-dir
                     (at once; in the full run also after the children ended): run A reports
                     RUNNING and COMPLETED itself, run B exits 3 (CRASHED). None may run
                     twice; CRASHED "could not tell whether it started" is also accepted.
  chatty             one run printing as fast as it can, many short runs and one cancelled
                     run in the same pool: report latency, cancel latency, output dir size,
                     agent CPU, zombies.
  full-disk          --state-dir on a 2 MB tmpfs that fills up (root only): health 503, no
                     claims while full, recovery once space is back; a read-only --state-dir
                     must exit 2 with one line.
  signal-flood       thousands of SIGHUP/SIGUSR1/SIGUSR2 at an idle and at a busy agent.
  cancel-while-down  runs set CANCELLING while the agent is killed: CANCELLED after restart,
                     temporary working dirs removed.
  descendants        runs that leave background processes behind: stopped when the run ends
                     (and logged), kept with --keep-leftover-processes.

Every run's command records, from the child's side, one line per event ("RUN_ID EVENT EPOCH
PID CWD", one O_APPEND write) in a marker file: a run that started twice is seen there,
whatever the agent or the server believe. Zombies are children of an agent seen in state Z
for over a second (procfs.ZombieWatch); orphans are live processes still carrying one of a
scenario's run ids (PREFECT__FLOW_RUN_ID in /proc/PID/environ) after the run is final.

Prints one markdown row per scenario (runs, right final state, run twice, stuck, zombies,
orphans, key timing, result) and the checks behind it. Exit status 1 if any scenario failed
(wrong final state, double execution, stuck run, zombie, orphan, or a failed check or
target), else 0. --quick runs a short version of everything (about 2.5 minutes on 2 cores,
server start included); the full run takes about 8. Stdlib only, CPython 3.8+, traffic only to 127.0.0.1. Every process,
mount and temp dir it creates is removed at the end, also on failure or Ctrl-C.
"""

import argparse
import collections
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from compare import (Api, ApiError, BenchError, base_env, default_venv, ensure_venv,  # noqa: E402
                     free_port, kill_tagged, load_agent_module, start_server, stop_group)
from procfs import ZombieWatch, all_pids, proc_cmdline, stat_fields, zombie_children  # noqa: E402

REPO = os.path.dirname(BENCH)
AGENT_PY = os.path.join(REPO, "agent.py")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
POLL_INTERVAL = 1.0
SCENARIOS = ("kill9-steps", "chatty", "full-disk", "signal-flood", "cancel-while-down",
             "descendants")
MB = 1000.0 * 1000.0


def log(text):
    sys.stderr.write("[chaos %s] %s\n" % (time.strftime("%H:%M:%S"), text))
    sys.stderr.flush()


# -- parameters: --quick and full ----------------------------------------------------------

def kill_points(quick):
    """(step, N) pairs: the agent is SIGKILLed at the Nth occurrence of the step."""
    if quick:
        return ([("fsync", n) for n in range(1, 5)] + [("popen", 1)]
                + [("answer", n) for n in range(1, 6)])
    return ([("fsync", n) for n in range(1, 7)] + [("popen", 1)]
            + [("send", n) for n in range(1, 9)] + [("answer", n) for n in range(1, 9)])


def params(quick):
    return argparse.Namespace(
        quick=quick,
        kill_points=kill_points(quick),
        kill_restart_late=(False,) if quick else (False, True),  # restart after children ended?
        kill_run_seconds=2.0,            # how long each kill9 run's child sleeps
        kill_wait=25.0,                  # how long the kill point may take to come
        final_timeout=45.0 if quick else 60.0,
        chatty_seconds=10 if quick else 20,
        chatty_shorts=30 if quick else 100,
        chatty_cancel_after=5.0 if quick else 8.0,
        chatty_timeout=60.0 if quick else 180.0,
        disk_early_runs=2 if quick else 3,
        disk_early_sleep=10.0 if quick else 15.0,  # outlives filling and provoking the 503
        disk_hold=3.0 if quick else 5.0,  # seconds to stay full after the early runs ended
        flood_signals=5000,
        flood_rounds=[(False, False), (True, True)] if quick else
        [(False, False), (True, False), (False, True), (True, True)],  # (busy, mixed signals)
        flood_runs=10,
        flood_sleep=8.0 if quick else 20.0,
        down_runs=2 if quick else 3,
        down_sleep=4.0 if quick else 5.0,
        leftover_grace=5.0,
    )


# -- small helpers ---------------------------------------------------------------------------

ISO_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                    r"(Z|[+-]\d\d:?\d\d)?$")


def parse_iso(text):
    """An API timestamp as epoch seconds (UTC when it names no zone); None if unparsable.
    By hand: datetime.fromisoformat of Python 3.8 refuses 'Z' and odd fraction lengths."""
    import calendar
    match = ISO_RE.match(text or "")
    if not match:
        return None
    y, mo, d, h, mi, s, frac, zone = match.groups()
    epoch = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s)))
    epoch += float("0." + frac) if frac else 0.0
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        epoch -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return epoch


def spread(values):
    """'median X / max Y' of a list of seconds, or '-'."""
    if not values:
        return "-"
    return "median %.1f / max %.1f" % (statistics.median(values), max(values))


def pid_alive(pid):
    """Alive and not a zombie: a zombie has ended, it only waits for its parent."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cpu_seconds(pid):
    """utime + stime from /proc/PID/stat: unlike schedstat it keeps ended threads' time."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def environ_of(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as handle:
            return handle.read().split(b"\0")
    except OSError:
        return []


def run_processes(run_ids):
    """[(pid, run id, command)] of live processes that carry one of these run ids."""
    needles = dict((("PREFECT__FLOW_RUN_ID=%s" % r).encode(), r) for r in run_ids)
    found = []
    for pid in all_pids():
        if pid == os.getpid() or not pid_alive(pid):
            continue
        for item in environ_of(pid):
            if item in needles:
                found.append((pid, needles[item], " ".join(proc_cmdline(pid))[:80]))
                break
    return found


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def become_subreaper():
    """Orphans (children of a killed agent, double-forked daemons) become our children, not
    PID 1's: this container's PID 1 never reaps, so they would stay zombies forever."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # CHILD_SUBREAPER
    except (ImportError, OSError, AttributeError):
        return False


# -- what the runs' commands do --------------------------------------------------------------

# A child that reports its own states, for a COMPLETED that only the child can produce:
# `python child.py MARKERS SECONDS EXIT_CODE report|silent`. Retries the server's 503s.
CHILD_PY = r'''
import json, os, sys, time, uuid, urllib.error, urllib.request
markers, seconds, code, report = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
run_id = os.environ["PREFECT__FLOW_RUN_ID"]
api = os.environ["PREFECT_API_URL"].rstrip("/")

def mark(event):
    fd = os.open(markers, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("%s %s %.6f %d %s\n" % (run_id, event, time.time(), os.getpid(),
                                          os.getcwd())).encode())
    os.close(fd)

def propose(kind):
    body = json.dumps({"state": {"type": kind, "state_details": {
        "transition_id": str(uuid.uuid4())}}}).encode()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        req = urllib.request.Request(api + "/flow_runs/%s/set_state" % run_id, data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                answer = json.loads(resp.read().decode())
            print("child: %s -> %s" % (kind, answer.get("status")), flush=True)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                print("child: %s answered %s" % (kind, exc.code), flush=True)
                return
        except Exception:
            pass
        time.sleep(0.3)
    print("child: gave up reporting %s" % kind, flush=True)

mark("start")
if report == "report":
    propose("RUNNING")
time.sleep(seconds)
if report == "report":
    propose("COMPLETED")
mark("exit")
sys.exit(code)
'''

# A daemon the classic way: fork, setsid, fork; the grandchild notes its pid in the marker
# file (`python daemon.py MARKERS`) and sleeps, the parent exits 0.
DAEMON_PY = r'''
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in (0, 1, 2):
            os.close(fd)
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, ("%s child 0 %d -\n" % (os.environ["PREFECT__FLOW_RUN_ID"],
                                              os.getpid())).encode())
        os.close(fd)
        time.sleep(300)
    os._exit(0)
os.wait()
sys.exit(0)
'''


def bash(script):
    """A job `command` (split with shell rules by the agent, never run through a shell)."""
    return "bash -c %s" % shlex.quote(script)


def mark(markers_path, event):
    """Bash that appends 'RUN_ID EVENT EPOCH PID CWD' with one write (echo is a builtin, its
    line one buffered write; EPOCHREALTIME needs no fork)."""
    return ('echo "$PREFECT__FLOW_RUN_ID %s $EPOCHREALTIME $$ $PWD" >> %s'
            % (event, shlex.quote(markers_path)))


class Markers:
    """The marker file: run id -> [(event, epoch, pid, cwd), ...] in the order written."""

    def __init__(self, path):
        self.path = path

    def events(self):
        by_run = collections.defaultdict(list)
        try:
            with open(self.path, "rb") as handle:
                lines = handle.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return by_run
        for line in lines:
            fields = line.split(" ", 4)
            if len(fields) >= 4:
                epoch = float(fields[2].replace(",", "."))  # EPOCHREALTIME follows the locale
                by_run[fields[0]].append((fields[1], epoch, int(fields[3]),
                                          fields[4] if len(fields) > 4 else ""))
        return by_run

    def first(self, run_id, event):
        """(epoch, pid, cwd) of the run's first such event, or None."""
        for kind, epoch, pid, cwd in self.events().get(run_id, ()):
            if kind == event:
                return epoch, pid, cwd
        return None

    def starts(self):
        """Counter: run id -> how many times its command started."""
        return collections.Counter(r for r, items in self.events().items()
                                   for kind, _, _, _ in items if kind == "start")

    def started(self, run_ids):
        starts = self.starts()
        return [r for r in run_ids if starts[r]]


# -- the agent under test --------------------------------------------------------------------

# The fault injector: `python -c INJECTOR agent.py FLAGS...`, CHAOS_KILL_AT=STEP:N in its
# environment. It imports agent.py as module "agent", wraps os.fsync (after the real fsync),
# subprocess.Popen.__init__ (after the child started) and agent.HTTPConnection.request
# ("send": before the request goes out; "answer": after its answer came back, before the
# agent used it), and SIGKILLs itself at the Nth occurrence of the chosen step.
INJECTOR = r'''
import importlib.util, os, signal, subprocess, sys, threading
step, nth = os.environ["CHAOS_KILL_AT"].split(":")
nth = int(nth)
path = sys.argv[1]
spec = importlib.util.spec_from_file_location("agent", path)
agent = importlib.util.module_from_spec(spec)
sys.modules["agent"] = agent
spec.loader.exec_module(agent)
lock = threading.Lock()
seen = [0]

def hit(kind):
    if kind != step:
        return
    with lock:
        seen[0] += 1
        fire = seen[0] == nth
    if fire:
        os.write(2, ("chaos-injector: SIGKILL at %s #%d\n" % (kind, nth)).encode())
        os.kill(os.getpid(), signal.SIGKILL)

real_fsync = os.fsync
def fsync(fd):
    real_fsync(fd)
    hit("fsync")
os.fsync = fsync

real_popen_init = subprocess.Popen.__init__
def popen_init(self, *args, **kwargs):
    real_popen_init(self, *args, **kwargs)
    hit("popen")
subprocess.Popen.__init__ = popen_init

connection = getattr(agent, "HTTPConnection", None)
if connection is None or not hasattr(connection, "request"):
    os.write(2, b"chaos-injector: agent.HTTPConnection.request not found\n")
    os._exit(97)
real_request = connection.request
def request(self, *args, **kwargs):
    hit("send")
    answer = real_request(self, *args, **kwargs)
    hit("answer")
    return answer
connection.request = request

sys.argv = [path] + sys.argv[2:]
sys.exit(agent.main(sys.argv[1:]))
'''
INJECTOR_NO_HOOK = 97


class AgentRun:
    """One agent process: its own session (so it alone gets our signals; its runs are in
    sessions of their own), stdout and stderr to files, zombie children watched."""

    def __init__(self, lab, argv, env, workdir, health_port=None, quiet_stdout=False):
        self.lab, self.argv, self.env, self.workdir = lab, argv, env, workdir
        self.health_port = health_port
        self.quiet_stdout = quiet_stdout
        self.name = "agent-%d" % len(lab.agents)
        self.out_path = os.path.join(workdir, self.name + ".out")
        self.err_path = os.path.join(workdir, self.name + ".err")
        self.proc = self.watch = None
        lab.agents.append(self)

    def start(self):
        out = subprocess.DEVNULL if self.quiet_stdout else open(self.out_path, "wb")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=self.env, cwd=self.workdir,
                                         start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()
        self.lab.own_pids.add(self.proc.pid)
        self.watch = ZombieWatch(self.proc.pid)
        self.watch.start()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def zombies(self):
        return len(self.watch.counted) if self.watch else 0

    def wait_exit(self, timeout):
        """The exit code, or None if still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            self.lab.tick()
            time.sleep(0.1)
        code = self.proc.poll()
        if code is not None and self.watch:
            self.watch.stop()
        return code

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.watch.stop()

    def stop(self, timeout=30.0):
        """SIGTERM, wait; SIGKILL after `timeout`. (exit code, whether SIGTERM sufficed)."""
        if self.proc is None:
            return None, True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if code is None:
            stop_group(self.proc, 0)
            self.watch.stop()
            return None, False
        return code, True

    def health(self):
        """(status, reason text) of GET /api/health, or (None, error)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=3)
        try:
            conn.request("GET", "/api/health")
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
            try:
                data = json.loads(body)
                reason = data.get("reason") if isinstance(data, dict) else None
                text = reason if reason else body
            except ValueError:
                text = body
            return resp.status, text[:300]
        except (OSError, http.client.HTTPException) as exc:
            return None, "%s: %s" % (type(exc).__name__, exc)
        finally:
            conn.close()

    def wait_healthy(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            if self.health()[0] == 200:
                return True
            self.lab.tick()
            time.sleep(0.2)
        return False

    def stderr_lines(self):
        try:
            with open(self.err_path, errors="replace") as handle:
                return handle.read().splitlines()
        except OSError:
            return []

    def tail(self, lines=8):
        return self.stderr_lines()[-lines:]


# -- the lab: server, API, pools, runs, cleanup ----------------------------------------------

class Lab:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="agentpy-chaos-")
        self.tag = "BENCH_COMPARE_TAG=chaos-%s" % uuid.uuid4().hex  # see compare.kill_tagged
        self.server = self.api = self.url = None
        self.template = self.flow_id = None
        self.agents = []
        self.mounts = []
        self.own_pids = set()   # our Popen children: never reaped behind subprocess's back
        self.run_ids = set()    # every run created, for the final sweep
        self.child_py = os.path.join(self.tmp, "child.py")
        self.daemon_py = os.path.join(self.tmp, "daemon.py")
        for path, code in ((self.child_py, CHILD_PY), (self.daemon_py, DAEMON_PY)):
            with open(path, "w") as handle:
                handle.write(code.lstrip())

    def start(self):
        ensure_venv(self.args.prefect_venv, sys.executable)
        self.template = self.load_template()
        log("starting a Prefect server (temp dir %s)" % self.tmp)
        self.server, self.url = start_server(self.args.prefect_venv, self.tmp)
        self.own_pids.add(self.server.pid)
        self.api = Api(self.url, deadline=120.0)
        self.flow_id = self.api.call("POST", "/flows/", {"name": "chaos"})["id"]
        log("server %s" % self.url)

    def load_template(self):
        """The process base job template from agent.py. agent.py may be mid-edit by someone
        else: retry for a while before calling it broken."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return load_agent_module(self.args.agent).PROCESS_BASE_JOB_TEMPLATE
            except Exception as exc:  # noqa: BLE001 - any import failure means: not yet
                if time.monotonic() > deadline:
                    raise BenchError("cannot import %s: %s" % (self.args.agent, exc))
                log("agent.py does not import (%s); retrying" % exc)
                time.sleep(5)

    # -- housekeeping, called from every wait loop -----------------------------------------
    def tick(self):
        """Reap orphans that ended under us (never one of our own Popen children: that
        would rob subprocess of its exit code)."""
        for pid, _ in zombie_children(os.getpid()):
            if pid not in self.own_pids:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if self.server is not None and self.server.poll() is not None:
            raise BenchError("the Prefect server exited with %s" % self.server.returncode)

    def sleep(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    # -- API ----------------------------------------------------------------------------------
    def new_pool(self, label):
        """A fresh process pool and one deployment in it; (pool name, deployment id)."""
        pool = "chaos-%s-%s" % (label, uuid.uuid4().hex[:6])
        try:
            self.api.call("POST", "/work_pools/", {"name": pool, "type": "process",
                                                   "base_job_template": self.template})
        except ApiError as exc:
            if " 409" not in str(exc):  # a retry of a create that went through
                raise
        deployment = self.api.call("POST", "/deployments/", {
            "name": pool, "flow_id": self.flow_id, "work_pool_name": pool,
            "job_variables": {"command": "true"}})["id"]
        return pool, deployment

    def create_runs(self, deployment, commands):
        """One run per command, scheduled now; their ids in order. The idempotency key makes
        a retried create (after a 503) harmless."""
        ids = []
        for command in commands:
            run = self.api.call("POST", "/deployments/%s/create_flow_run" % deployment, {
                "idempotency_key": uuid.uuid4().hex, "job_variables": {"command": command},
                "state": {"type": "SCHEDULED"}})
            ids.append(run["id"])
            self.run_ids.add(run["id"])
        return ids

    def runs(self, run_ids):
        """{run id: flow run dict} from the server."""
        found = {}
        run_ids = list(run_ids)
        for i in range(0, len(run_ids), 200):
            chunk = run_ids[i:i + 200]
            for run in self.api.call("POST", "/flow_runs/filter", {
                    "flow_runs": {"id": {"any_": chunk}}, "limit": len(chunk)}):
                found[run["id"]] = run
        return found

    def states(self, run_ids):
        return dict((r, (run.get("state") or {}).get("type"))
                    for r, run in self.runs(run_ids).items())

    def wait_final(self, run_ids, timeout, every=0.5):
        """Wait until every run is final or `timeout`; {run id: flow run dict} at the end."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs(run_ids)
            if all((runs.get(r, {}).get("state") or {}).get("type") in FINAL for r in run_ids):
                return runs
            if time.monotonic() > deadline:
                return runs
            self.sleep(every)

    def cancel(self, run_id):
        """Set CANCELLING as the UI does; the epoch the server stamped on it."""
        before = time.time()
        answer = self.api.call("POST", "/flow_runs/%s/set_state" % run_id, {
            "state": {"type": "CANCELLING"}, "force": True})
        return parse_iso(((answer or {}).get("state") or {}).get("timestamp")) or before

    def logs(self, run_id):
        entries = self.api.call("POST", "/logs/filter", {
            "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}) or []
        return [e.get("message") or "" for e in entries]

    # -- agents -------------------------------------------------------------------------------
    def scenario_dir(self, name):
        path = tempfile.mkdtemp(prefix=name + "-", dir=self.tmp)
        os.makedirs(os.path.join(path, "tmp"))
        return path

    def agent(self, workdir, pool, state_dir=None, extra=(), kill_at=None, health=False,
              quiet_stdout=False):
        """An AgentRun (not started) for `pool`. Its runs' temporary working dirs go to
        WORKDIR/tmp (TMPDIR), so each scenario sees only its own."""
        flags = ["--pool", pool, "--api", self.url,
                 "--state-dir", state_dir or os.path.join(workdir, "state"),
                 "--poll-interval", "%g" % POLL_INTERVAL, "--prefetch-seconds", "0",
                 "--hide-welcome"] + list(extra)
        port = None
        if health:
            port = free_port()
            flags += ["--agent-address", "http://127.0.0.1:%d" % port]
        env = base_env(self.tag)
        env["TMPDIR"] = os.path.join(workdir, "tmp")
        if kill_at:
            env["CHAOS_KILL_AT"] = "%s:%d" % kill_at
            argv = [sys.executable, "-c", INJECTOR, self.args.agent] + flags
        else:
            argv = [sys.executable, self.args.agent] + flags
        return AgentRun(self, argv, env, workdir, port, quiet_stdout)

    # -- the end ------------------------------------------------------------------------------
    def sweep_runs(self):
        """SIGKILL every live process that carries one of our run ids; how many."""
        found = run_processes(self.run_ids)
        kill_pids(pid for pid, _, _ in found)
        return len(found)

    def cleanup(self):
        for agent in self.agents:
            if agent.proc is not None and agent.proc.poll() is None:
                stop_group(agent.proc, 0)
            if agent.watch is not None:
                agent.watch.stop()
        for _ in range(3):  # runs can fork while we kill: sweep until nothing is left
            if not (self.sweep_runs() + kill_tagged(self.tag)):
                break
            time.sleep(0.2)
        if self.server is not None and not stop_group(self.server, 20):
            log("the server did not stop within 20 s of SIGTERM; killed")
        kill_tagged(self.tag)
        for mount in reversed(self.mounts):
            unmount(mount)
        try:
            self.tick()
        except BenchError:
            pass
        if self.args.keep:
            log("kept %s" % self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def mount_tmpfs(lab, path, size):
    """Mount a tmpfs of `size` at path (created). False when not allowed (not root, or a
    container without CAP_SYS_ADMIN)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0755" % size, "tmpfs",
                           path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if done.returncode != 0:
        return False
    lab.mounts.append(path)
    return True


def remount_ro(path):
    return subprocess.run(["mount", "-o", "remount,ro", path], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def unmount(path):
    if subprocess.run(["umount", path], stderr=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["umount", "-l", path], stderr=subprocess.DEVNULL)  # busy: detach


# -- results ---------------------------------------------------------------------------------

class Result:
    """One scenario's row and the checks behind it."""

    def __init__(self, name):
        self.name = name
        self.scheduled = self.right = self.twice = self.stuck = 0
        self.zombies = self.orphans = 0
        self.timing = ""
        self.checks = []   # (ok, text)
        self.notes = []
        self.skipped = None
        self.error = None
        self.seconds = 0.0

    def check(self, ok, text):
        self.checks.append((bool(ok), text))
        return ok

    def note(self, text):
        self.notes.append(text)

    def wrong(self):
        return self.scheduled - self.right - self.stuck

    def failed(self, require_all):
        if self.skipped is not None:
            return require_all
        return bool(self.error or self.wrong() or self.twice or self.stuck or self.zombies
                    or self.orphans or not all(ok for ok, _ in self.checks))


def ambiguous_start(message):
    """The CRASHED message of a run whose start the agent could not confirm after a kill."""
    return bool(re.search(r"(could not|cannot|can't|couldn't|unable to|not) (tell|know|"
                          r"determine|say|sure|confirm)|whether it (was )?start|may have start|"
                          r"might have start", message or "", re.I))


def judge(lab, res, expected, markers, label="", runs=None, allow_ambiguous=()):
    """Count scheduled / right / stuck / twice for {run id: expected state}; a note per
    wrong or stuck run. Runs in allow_ambiguous may instead end CRASHED with a message
    saying the agent could not tell whether they started."""
    runs = runs if runs is not None else lab.runs(expected)
    starts = markers.starts()
    for run_id, want in expected.items():
        state = (runs.get(run_id) or {}).get("state") or {}
        got, message = state.get("type"), state.get("message") or ""
        res.scheduled += 1
        if starts[run_id] > 1:
            res.twice += 1
            res.note("%s%s started %d times (pids %s)" % (label, run_id[:8], starts[run_id], [
                e[2] for e in markers.events()[run_id] if e[0] == "start"]))
        if got not in FINAL:
            res.stuck += 1
            res.note("%s%s stuck in %s (expected %s); started %d time(s)"
                     % (label, run_id[:8], got, want, starts[run_id]))
        elif got == want or (run_id in allow_ambiguous and got == "CRASHED"
                             and ambiguous_start(message)):
            res.right += 1
            if got != want:
                res.note("%s%s ended CRASHED, start unconfirmed (its command ran %d time(s))"
                         ": %.120s" % (label, run_id[:8], starts[run_id], message))
        else:
            res.note("%s%s ended %s, expected %s: %.150s" % (label, run_id[:8], got, want,
                                                             message))
    return runs


def count_orphans(lab, res, run_ids, grace, label=""):
    """Wait up to `grace` s for every process of these (final) runs to end; count and kill
    what is left. Returns how long it took for them to go (None if some stayed)."""
    start = time.monotonic()
    while True:
        left = run_processes(run_ids)
        if not left:
            return time.monotonic() - start
        if time.monotonic() - start >= grace:
            break
        lab.sleep(0.2)
    res.orphans += len(left)
    for pid, run_id, command in left[:5]:
        res.note("%sorphan: pid %d of run %s still alive %.0f s after the run ended: %s"
                 % (label, pid, run_id[:8], grace, command))
    kill_pids(pid for pid, _, _ in left)
    return None


def wait_started(lab, markers, run_ids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(markers.started(run_ids)) == len(run_ids):
            return True
        lab.sleep(0.2)
    return False


def wait_gone(lab, pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        lab.sleep(0.2)
    return False


def agent_trouble(agent):
    """Last lines of an agent's stderr, for a note."""
    return " | ".join(line.strip() for line in agent.tail(4))


# -- scenario 1: kill -9 at every durable step ------------------------------------------------

def scenario_kill9(lab, p, res):
    recoveries, rounds, fired, clean_exits = [], 0, 0, 0
    for late in p.kill_restart_late:
        for step, nth in p.kill_points:
            killed, code = kill9_round(lab, p, res, step, nth, late, recoveries)
            rounds, fired, clean_exits = rounds + 1, fired + killed, clean_exits + (code == 0)
    res.check(True, "%d rounds, the agent SIGKILLed at its kill point in %d" % (rounds, fired))
    res.check(clean_exits == rounds, "restarted agents that exited 0 on SIGTERM: %d of %d"
              % (clean_exits, rounds))
    res.timing = "restart to all final %s s" % spread(recoveries)


def kill9_round(lab, p, res, step, nth, late, recoveries):
    """Runs A (reports RUNNING and COMPLETED itself, exits 0) and B (exits 3, silent) under an
    agent killed at the Nth `step`; restart at once, or (late) once their children ended."""
    label = "%s#%d%s: " % (step, nth, " (restart after the children ended)" if late else "")
    workdir = lab.scenario_dir("kill9-%s%d%s" % (step, nth, "-late" if late else ""))
    markers = Markers(os.path.join(workdir, "markers"))
    pool, deployment = lab.new_pool("k9-%s%d" % (step, nth))
    child = [sys.executable, lab.child_py, markers.path, "%g" % p.kill_run_seconds]
    ids = lab.create_runs(deployment, [" ".join(map(shlex.quote, child + ["0", "report"])),
                                       " ".join(map(shlex.quote, child + ["3", "silent"]))])
    expected = {ids[0]: "COMPLETED", ids[1]: "CRASHED"}

    first = lab.agent(workdir, pool, kill_at=(step, nth)).start()
    fired = wait_for_kill(lab, p, first, ids)
    code = first.proc.poll()
    if code == INJECTOR_NO_HOOK:
        res.check(False, label + "the injector could not hook agent.py: " + agent_trouble(first))
    elif not fired and code is not None:
        res.check(False, "%sthe agent exited %s on its own before the kill: %s"
                  % (label, code, agent_trouble(first)))
    elif not fired:
        res.note(label + "kill point not reached (runs ended first); stopped with SIGTERM")
        first.stop(15)
    res.zombies += first.zombies()
    if late:  # the children run on without the agent; wait for them to end
        started = [markers.first(r, "start") for r in ids]
        wait_gone(lab, [s[1] for s in started if s], p.kill_run_seconds + 15)

    second = lab.agent(workdir, pool).start()
    restarted = time.monotonic()
    runs = lab.wait_final(ids, p.final_timeout)
    if all((runs.get(r, {}).get("state") or {}).get("type") in FINAL for r in ids):
        recoveries.append(time.monotonic() - restarted)
    code, _ = second.stop(30)
    if code != 0:
        res.note("%srestarted agent exit code %s after SIGTERM: %s"
                 % (label, code, agent_trouble(second)))
    res.zombies += second.zombies()
    before = (res.right, res.twice, res.stuck)
    judge(lab, res, expected, markers, label, runs, allow_ambiguous=ids)
    count_orphans(lab, res, ids, 3.0, label)
    log("kill9 %s %s; right %d/2, twice %d, stuck %d" % (
        label, "killed" if fired else "not reached", res.right - before[0],
        res.twice - before[1], res.stuck - before[2]))
    return fired, code


def wait_for_kill(lab, p, agent, run_ids):
    """Until the injector killed the agent (True), the agent exited otherwise or the runs
    all ended without the kill point being reached (False)."""
    deadline = time.monotonic() + p.kill_wait
    final_since = None
    while time.monotonic() < deadline:
        code = agent.wait_exit(0.5)
        if code is not None:
            return code == -signal.SIGKILL and any(
                "chaos-injector: SIGKILL" in line for line in agent.stderr_lines())
        if all(s in FINAL for s in lab.states(run_ids).values()):
            final_since = final_since or time.monotonic()
            if time.monotonic() - final_since > 3.0:  # a last journal write may still come
                return False
    return False


# -- scenario 2: a chatty run among many short ones -------------------------------------------

MIN_FREE_BYTES = 5000 * MB
#: A run printing as fast as `yes` writes tens of MB between two looks of the agent, on top of
#: the 16 MB it may leave unread: the output directory stays in the low hundreds of MB.
OUTPUT_TARGET_BYTES = 200 * MB


class DirSampler(threading.Thread):
    """Samples the size of a directory every 0.2 s. A guard too: past `hard_cap` bytes, or
    with under MIN_FREE_BYTES left on the disk, it SIGKILLs the `culprit` process group, so
    a missing output cap cannot fill the disk."""

    def __init__(self, path, hard_cap):
        threading.Thread.__init__(self, name="dir-sampler", daemon=True)
        self.path, self.hard_cap = path, hard_cap
        self.culprit = None
        self.max_bytes = 0
        self.samples = self.over_target = 0
        self.capped = False
        self.stopping = threading.Event()

    def size(self):
        total = 0
        try:
            for entry in os.scandir(self.path):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
        except OSError:
            pass
        return total

    def disk_low(self):
        """Under MIN_FREE_BYTES free where the output goes (wherever the agent puts it)."""
        try:
            stat = os.statvfs(os.path.dirname(self.path))
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < MIN_FREE_BYTES

    def run(self):
        while not self.stopping.wait(0.2):
            size = self.size()
            self.max_bytes = max(self.max_bytes, size)
            self.samples += 1
            self.over_target += size >= OUTPUT_TARGET_BYTES
            over = size > self.hard_cap or self.disk_low()
            if over and self.culprit and not self.capped:
                self.capped = True
                try:
                    os.killpg(self.culprit, signal.SIGKILL)
                except OSError:
                    pass

    def stop(self):
        self.stopping.set()
        self.join(5)


def chatty_commands(lab, p, markers):
    m = markers.path
    chatty = bash("%s; timeout %d yes | head -c 40000000000; %s"
                  % (mark(m, "start"), p.chatty_seconds, mark(m, "exit")))
    # The trap runs once `wait` is interrupted by the SIGTERM, so its time is the signal's.
    long_run = bash("%s; trap '%s; exit 143' TERM; sleep 600 & wait $!; %s"
                    % (mark(m, "start"), mark(m, "term"), mark(m, "exit")))
    shorts = [bash("%s; sleep %g; %s; exit 0" % (mark(m, "start"), 1 + (i % 5) * 0.5,
                                                 mark(m, "exit")))
              for i in range(p.chatty_shorts)]
    return chatty, long_run, shorts


def scenario_chatty(lab, p, res):
    workdir = lab.scenario_dir("chatty")
    markers = Markers(os.path.join(workdir, "markers"))
    pool, deployment = lab.new_pool("chatty")
    chatty_cmd, long_cmd, short_cmds = chatty_commands(lab, p, markers)
    # Flow output streams to the agent's stdout by default: /dev/null, or `yes` fills a file.
    agent = lab.agent(workdir, pool, quiet_stdout=True).start()
    sampler = DirSampler(os.path.join(workdir, "state", "output"), hard_cap=2000 * MB)
    sampler.start()
    try:
        chatty_id, long_id = lab.create_runs(deployment, [chatty_cmd, long_cmd])
        if not wait_started(lab, markers, [chatty_id, long_id], 30):
            res.check(False, "the chatty and long runs did not start within 30 s")
        chatty_start = markers.first(chatty_id, "start")
        sampler.culprit = chatty_start[1] if chatty_start else None
        cpu_before, t_before = cpu_seconds(agent.pid) or 0.0, time.monotonic()
        short_ids = lab.create_runs(deployment, short_cmds)
        lab.sleep(max(0.0, p.chatty_cancel_after - (time.monotonic() - t_before)))
        cancelled_at = lab.cancel(long_id)
        ids = [chatty_id, long_id] + short_ids
        runs = lab.wait_final(ids, p.chatty_timeout)
        cpu = (cpu_seconds(agent.pid) or 0.0) - cpu_before
        busy = time.monotonic() - t_before
    finally:
        sampler.stop()
    code, _ = agent.stop(30)
    res.zombies += agent.zombies()
    expected = dict((r, "CRASHED") for r in [chatty_id] + short_ids)
    expected[long_id] = "CANCELLED"
    judge(lab, res, expected, markers, runs=runs)
    count_orphans(lab, res, ids, 3.0)
    chatty_report(lab, p, res, markers, runs, short_ids, long_id, cancelled_at, sampler)
    res.note("agent CPU %.1f s over %.0f s (%.0f%% of a core)" % (cpu, busy,
                                                                  100 * cpu / max(busy, 1)))
    res.check(code == 0, "agent exit code %s after SIGTERM (want 0)" % code)


def chatty_report(lab, p, res, markers, runs, short_ids, long_id, cancelled_at, sampler):
    lags = []
    for run_id in short_ids:
        exited = markers.first(run_id, "exit")
        state = (runs.get(run_id) or {}).get("state") or {}
        final_at = parse_iso(state.get("timestamp"))
        if exited and final_at and state.get("type") in FINAL:
            lags.append(final_at - exited[0])
    res.timing = "exit->final %s s" % spread(lags)
    res.check(lags and statistics.median(lags) <= 2.0 and max(lags) <= 5.0,
              "target: short runs final within a few s of exit (median <= 2, max <= 5): %s s "
              "over %d runs" % (spread(lags), len(lags)))
    termed = markers.first(long_id, "term")
    latency = termed[0] - cancelled_at if termed else None
    limit = POLL_INTERVAL + 1.0
    res.check(latency is not None and latency <= limit,
              "target: CANCELLING to SIGTERM within one poll + 1 s (%.0f s): %s"
              % (limit, "%.2f s" % latency if latency is not None else "never signalled"))
    if latency is not None:
        res.timing += ", cancel %.1f s" % latency
    res.check(sampler.max_bytes < OUTPUT_TARGET_BYTES and not sampler.capped,
              "target: STATE_DIR/output under 200 MB: max %.1f MB seen, over 200 MB in %d "
              "of %d samples (every 0.2 s)%s" % (
                  sampler.max_bytes / MB, sampler.over_target, sampler.samples,
                  "; chaos.py killed the chatty run (2 GB, or the disk nearly full)"
                  if sampler.capped else ""))


# -- scenario 3: the state directory's disk fills up ------------------------------------------

STATE_DIR_WORDS = re.compile(r"journal|state[ -]?dir|no space|disk|ENOSPC", re.I)


class Filler(threading.Thread):
    """Keeps a filesystem full: appends zeros to a file until ENOSPC, and again every 20 ms,
    so space the agent frees (a truncated output file, a compacted journal) is taken back
    at once. The only room left is the slack in the last page of the agent's own files."""

    def __init__(self, path):
        threading.Thread.__init__(self, name="filler", daemon=True)
        self.path = path
        self.written = 0
        self.stopping = threading.Event()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.top_up()

    def top_up(self):
        for size in (65536, 512):  # big blocks, then the last scraps of a page
            while True:
                try:
                    self.written += os.write(self.fd, b"\0" * size)
                except OSError:
                    break

    def run(self):
        while not self.stopping.wait(0.02):
            self.top_up()

    def remove(self):
        """Stop filling and delete the file: the space is back."""
        self.stopping.set()
        if self.is_alive():
            self.join(5)
        os.close(self.fd)
        os.unlink(self.path)


def scenario_full_disk(lab, p, res):
    workdir = lab.scenario_dir("full-disk")
    mnt = os.path.join(workdir, "mnt")
    if not mount_tmpfs(lab, mnt, "2m"):
        res.skipped = "skipped: needs root to mount a small tmpfs"
        return
    markers = Markers(os.path.join(workdir, "markers"))
    pool, deployment = lab.new_pool("disk")
    m = markers.path
    disk = argparse.Namespace(  # what the two phases share
        deployment=deployment, markers=markers, filler=None, health=[],
        early_cmd=bash("%s; sleep %g; %s; exit 0" % (mark(m, "start"), p.disk_early_sleep,
                                                     mark(m, "exit"))),
        late_cmd=bash("%s; sleep 1; %s; exit 0" % (mark(m, "start"), mark(m, "exit"))))
    agent = lab.agent(workdir, pool, state_dir=os.path.join(mnt, "state"), health=True).start()
    try:
        while_full(lab, p, res, agent, disk, os.path.join(mnt, "filler"))
        after_freeing(lab, res, agent, disk)
    finally:
        if disk.filler is not None and not disk.filler.stopping.is_set():
            disk.filler.remove()
        code, _ = agent.stop(30)
        res.check(code == 0, "(g) SIGTERM ends the agent with exit 0: %s" % code)
        res.zombies += agent.zombies()
        unmount(mnt)
        lab.mounts.remove(mnt)
    read_only_state_dir(lab, res, workdir)


def while_full(lab, p, res, agent, disk, filler_path):
    """Early runs start; the disk fills; trigger runs until the agent says 503; late runs
    are created and must stay SCHEDULED; the early runs exit while full. Checks (a)-(d)."""
    disk.early = lab.create_runs(disk.deployment, [disk.early_cmd] * p.disk_early_runs)
    if not (wait_started(lab, disk.markers, disk.early, 30) and agent.wait_healthy(20)):
        res.check(False, "agent up and the early runs started before the disk fills: no (%s)"
                  % agent_trouble(agent))
    disk.filler = Filler(filler_path)
    disk.filler.start()
    log("full-disk: tmpfs full (%d KB filler)" % (disk.filler.written // 1024))
    # The late runs come once the agent has found out (health 503): until a write fails,
    # its journal may still append into the slack of its file's last page.
    disk.triggers = provoke_unhealthy(lab, agent, disk.deployment, disk.late_cmd, disk.health)
    unhealthy_since = next((h[0] for h in disk.health if h[1] == 503), None)
    disk.late = lab.create_runs(disk.deployment, [disk.late_cmd] * 2)
    runs = watch_while_full(lab, agent, disk.early, p.disk_early_sleep + 15, disk.health)
    final = [r for r in disk.early if (runs[r].get("state") or {}).get("type") in FINAL]
    offset = time.time() - time.monotonic()
    exited_unhealthy = [r for r in disk.early if unhealthy_since is not None and (
        disk.markers.first(r, "exit") or (0,))[0] - offset > unhealthy_since]
    hold_until = time.monotonic() + p.disk_hold
    while time.monotonic() < hold_until:
        disk.health.append((time.monotonic(),) + agent.health())
        lab.sleep(0.5)
    late_states = lab.states(disk.late)
    res.check(agent.alive(), "(a) the agent stays alive while the disk is full")
    sad = [h for h in disk.health if h[1] == 503 and STATE_DIR_WORDS.search(h[2] or "")]
    last = disk.health[-1] if disk.health else (0, None, "")
    res.check(sad and last[1] == 503, "(b) health 503 naming the journal/state dir while "
              "full: %d of %d samples; last %s %.100r" % (len(sad), len(disk.health), last[1],
                                                          last[2]))
    claimed = [r for r in disk.late
               if late_states.get(r) != "SCHEDULED" or disk.markers.first(r, "start")]
    when = ("once health said 503" if unhealthy_since is not None else
            "though health never said 503")
    res.check(not claimed, "(c) no run claimed while full (2 created %s, after %d trigger "
              "run(s); held %.0f s): %d of 2 left SCHEDULED (states %s)" % (
                  when, len(disk.triggers), p.disk_hold, 2 - len(claimed),
                  sorted(set(late_states.values()))))
    res.check(len(final) == len(disk.early), "(d) runs that exited while full are final "
              "anyway: %d of %d (%d exited after health said 503)" % (
                  len(final), len(disk.early), len(exited_unhealthy)))


def after_freeing(lab, res, agent, disk):
    """The filler goes: health 200 again, the waiting runs run; then (e), (f), the runs."""
    freed = time.monotonic()
    disk.filler.remove()
    healthy = agent.wait_healthy(10)
    back = time.monotonic() - freed
    runs = lab.wait_final(disk.late + disk.triggers, 30)
    done = time.monotonic() - freed
    late_final = all((runs[r].get("state") or {}).get("type") in FINAL for r in disk.late)
    res.check(healthy, "(e) health 200 within 10 s of freeing space: %s"
              % ("%.1f s" % back if healthy else "no (%s %.80r)" % agent.health()))
    res.check(late_final, "(e) the waiting runs are claimed and finish after: %s"
              % ("%.1f s" % done if late_final else "no"))
    res.timing = "free->healthy %s, free->runs final %s" % (
        "%.1f s" % back if healthy else "never", "%.1f s" % done if late_final else "never")
    journal_lines = [line for line in agent.stderr_lines() if "journal" in line.lower()]
    res.check(len(journal_lines) < 10, "(f) journal failures logged a bounded number of "
              "times: %d lines" % len(journal_lines))
    if journal_lines:
        res.note("first journal line: %.200s" % journal_lines[0])
    everything = disk.early + disk.triggers + disk.late
    runs = lab.wait_final(everything, 5)  # the early ones had their chance while full
    judge(lab, res, dict((r, "CRASHED") for r in everything), disk.markers, runs=runs)
    count_orphans(lab, res, everything, 3.0)


def watch_while_full(lab, agent, run_ids, timeout, health):
    """Sample health every 0.5 s until the runs are final (or timeout); the last runs read."""
    deadline = time.monotonic() + timeout
    while True:
        health.append((time.monotonic(),) + agent.health())
        runs = lab.runs(run_ids)
        if all((runs[r].get("state") or {}).get("type") in FINAL for r in run_ids):
            return runs
        if time.monotonic() > deadline or not agent.alive():
            return runs
        lab.sleep(0.5)


def provoke_unhealthy(lab, agent, deployment, command, health, most=4):
    """Until health answers 503: one more run at a time (at most `most`), so the agent has
    to write its journal. The runs created (they end CRASHED: run, or handed back and run
    once space is back)."""
    triggers = []
    while True:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            health.append((time.monotonic(),) + agent.health())
            if health[-1][1] == 503:
                return triggers
            lab.sleep(0.3)
        if len(triggers) >= most or not agent.alive():
            return triggers
        triggers += lab.create_runs(deployment, [command])


def read_only_state_dir(lab, res, workdir):
    """A --state-dir on a read-only mount, existing or not: exit 2, one line on stderr."""
    ro = os.path.join(workdir, "ro")
    if not mount_tmpfs(lab, ro, "1m"):
        res.check(False, "could not mount the read-only tmpfs")
        return
    try:
        os.makedirs(os.path.join(ro, "state"))
        if not remount_ro(ro):
            res.check(False, "could not remount the tmpfs read-only")
            return
        for sub in ("state", "missing"):
            agent = lab.agent(workdir, "chaos-ro", state_dir=os.path.join(ro, sub)).start()
            code = agent.wait_exit(20)
            if code is None:
                agent.stop(5)
            lines = [line for line in agent.stderr_lines() if line.strip()]
            res.check(code == 2 and len(lines) == 1, "read-only --state-dir (%s dir): exit %s "
                      "(want 2), %d stderr line(s) (want 1)%s" % (
                          "existing" if sub == "state" else "missing", code, len(lines),
                          ": %.150s" % lines[-1] if lines else ""))
    finally:
        unmount(ro)
        lab.mounts.remove(ro)


# -- scenario 4: signal floods ------------------------------------------------------------------

def flood(pid, count, mixed, rng):
    """Send `count` signals as fast as os.kill goes; (sent, seconds)."""
    choices = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2) if mixed else (signal.SIGHUP,)
    start, sent = time.monotonic(), 0
    for _ in range(count):
        try:
            os.kill(pid, rng.choice(choices))
            sent += 1
        except ProcessLookupError:
            break
    return sent, time.monotonic() - start


def scenario_signal_flood(lab, p, res):
    drains = collections.defaultdict(list)  # "idle"/"busy" -> SIGTERM to exit (s)
    rng = random.Random(1)
    for busy, mixed in p.flood_rounds:
        flood_round(lab, p, res, busy, mixed, rng, drains["busy" if busy else "idle"])
    res.timing = "SIGTERM->exit " + ", ".join(
        "%s %s s" % (kind, "/".join("%.1f" % d for d in values))
        for kind, values in sorted(drains.items(), reverse=True))


def flood_round(lab, p, res, busy, mixed, rng, drains):
    label = "%s agent, %s: " % ("busy" if busy else "idle", "mixed signals" if mixed else "SIGHUP")
    workdir = lab.scenario_dir("flood")
    markers = Markers(os.path.join(workdir, "markers"))
    pool, deployment = lab.new_pool("flood")
    agent = lab.agent(workdir, pool, health=True).start()
    ids = []
    if not agent.wait_healthy(30):
        res.check(False, label + "agent not healthy before the flood: " + agent_trouble(agent))
    if busy:
        child = [sys.executable, lab.child_py, markers.path, "%g" % p.flood_sleep, "0", "report"]
        ids = lab.create_runs(deployment, [" ".join(map(shlex.quote, child))] * p.flood_runs)
        if not wait_started(lab, markers, ids, 30):
            res.check(False, label + "runs did not all start within 30 s")
    sent, took = flood(agent.pid, p.flood_signals, mixed, rng)
    lab.sleep(1.0)
    alive = agent.alive()
    answered = agent.health()[0] is not None if alive else False
    res.check(alive and answered, "%salive and answering after %d signals in %.2f s: %s"
              % (label, sent, took, "yes" if alive and answered else
                 "alive but health does not answer" if alive else
                 "NO, exit %s" % agent.proc.poll()))
    termed = time.monotonic()
    if alive:
        agent.proc.send_signal(signal.SIGTERM)
    code = agent.wait_exit(p.flood_sleep + 40)
    if code is None:
        agent.stop(0)
    else:
        drains.append(time.monotonic() - termed)
    res.check(code == 0, "%sone SIGTERM drains and exits 0: exit %s%s" % (
        label, code, " (killed: no exit in time)" if code is None else ""))
    res.zombies += agent.zombies()
    ignored = sum(1 for line in agent.stderr_lines() if "ignored" in line)
    res.note("%s%d 'ignored' lines in the agent log" % (label, ignored))
    if ids:
        judge(lab, res, dict((r, "COMPLETED") for r in ids), markers, label,
              lab.wait_final(ids, 20))
        count_orphans(lab, res, ids, 3.0, label)


# -- scenario 5: runs cancelled while the agent is down --------------------------------------

def scenario_cancel_while_down(lab, p, res):
    recoveries = []  # (round, restart to all CANCELLED in s)
    for still_running in (False, True):
        down_round(lab, p, res, still_running, recoveries)
    res.timing = "restart->final: " + ", ".join("%s %.1f s" % r for r in recoveries)


def agent_temp_dirs(workdir):
    tmp = os.path.join(workdir, "tmp")
    return set(os.path.join(tmp, n) for n in os.listdir(tmp) if n.startswith("agentpy-"))


def down_round(lab, p, res, still_running, recoveries):
    """Kill -9 the agent, set its runs CANCELLING, then restart it: after the runs' processes
    ended on their own, or (still_running) while they still run."""
    label = "%s: " % ("still running at restart" if still_running else "exited while down")
    workdir = lab.scenario_dir("down")
    markers = Markers(os.path.join(workdir, "markers"))
    pool, deployment = lab.new_pool("down")
    seconds = 120 if still_running else p.down_sleep
    cmd = bash("%s; sleep %g; %s; exit 0" % (mark(markers.path, "start"), seconds,
                                             mark(markers.path, "exit")))
    first = lab.agent(workdir, pool).start()
    ids = lab.create_runs(deployment, [cmd] * p.down_runs)
    if not wait_started(lab, markers, ids, 30):
        res.check(False, label + "runs did not start within 30 s")
    lab.sleep(0.5)  # let the agent journal the starts
    temp_dirs = agent_temp_dirs(workdir) | set(
        (markers.first(r, "start") or (0, 0, ""))[2].strip() for r in ids) - {""}
    first.kill9()
    res.zombies += first.zombies()
    for run_id in ids:
        lab.cancel(run_id)
    pids = [markers.first(r, "start")[1] for r in ids if markers.first(r, "start")]
    if not still_running and not wait_gone(lab, pids, seconds + 10):
        res.check(False, label + "the runs' processes did not end")
    second = lab.agent(workdir, pool).start()
    restarted = time.monotonic()
    runs = lab.wait_final(ids, 30 + (10 if still_running else 0))
    if all((runs[r].get("state") or {}).get("type") in FINAL for r in ids):
        recoveries.append(("still running" if still_running else "exited",
                           time.monotonic() - restarted))
    judge(lab, res, dict((r, "CANCELLED") for r in ids), markers, label, runs)
    count_orphans(lab, res, ids, 5.0, label)
    lab.sleep(1.0)
    left = sorted(d for d in temp_dirs if os.path.exists(d))
    res.check(not left, "%stemporary working dirs removed after recovery: %d of %d left%s"
              % (label, len(left), len(temp_dirs), " (%s)" % left[0] if left else ""))
    code, _ = second.stop(30)
    res.check(code == 0, "%srestarted agent exit code %s after SIGTERM (want 0)" % (label, code))
    res.zombies += second.zombies()


# -- scenario 6: runs that leave descendants behind ------------------------------------------

def descendant_commands(lab, markers):
    """(name, command): each leaves a `sleep 300` (or a python daemon) behind and exits 0.
    The descendant's pid goes to the marker file as a 'child' event (nohup and setsid exec
    the sleep, so $! is its pid)."""
    m = shlex.quote(markers.path)
    start = mark(markers.path, "start")
    child = 'echo "$PREFECT__FLOW_RUN_ID child 0 $! -" >> %s' % m
    return [
        ("sh &", bash("%s; sh -c %s; exit 0" % (start, shlex.quote("sleep 300 & " + child)))),
        ("nohup", bash("%s; nohup sleep 300 >/dev/null 2>&1 & %s; exit 0" % (start, child))),
        ("setsid", bash("%s; setsid sleep 300 >/dev/null 2>&1 & %s; exit 0" % (start, child))),
        ("double fork", bash("%s; %s %s %s; exit 0" % (
            start, shlex.quote(sys.executable), shlex.quote(lab.daemon_py), m))),
    ]


def stop_logged(lab, run_id, pids):
    """The run's first log line (in the API) that names one of its descendants' pids, other
    than the line that reports the run's own start."""
    for line in lab.logs(run_id):
        if "submitted to infrastructure" in line:
            continue
        if any(re.search(r"\b%d\b" % pid, line) for pid in pids):
            return line
    return None


def scenario_descendants(lab, p, res):
    workdir = lab.scenario_dir("descendants")
    markers = Markers(os.path.join(workdir, "markers"))
    pool, deployment = lab.new_pool("desc")
    variants = descendant_commands(lab, markers)
    agent = lab.agent(workdir, pool).start()
    ids = lab.create_runs(deployment, [cmd for _, cmd in variants])
    names = dict(zip(ids, [name for name, _ in variants]))
    runs = lab.wait_final(ids, 40)
    judge(lab, res, dict((r, "CRASHED") for r in ids), markers, runs=runs)
    gone = []
    for run_id in ids:
        took = count_orphans(lab, res, [run_id], p.leftover_grace, names[run_id] + ": ")
        if took is not None:
            gone.append(took)
    lab.sleep(2.0)  # the agent's log lines reach the API in batches
    children = markers.events()
    for run_id in ids:
        pids = [e[2] for e in children.get(run_id, ()) if e[0] == "child"]
        line = stop_logged(lab, run_id, pids) if pids else None
        res.check(line, "%s: the run's logs name the descendant stopped (pid %s): %s" % (
            names[run_id], ", ".join(map(str, pids)) or "not recorded",
            "%.150r" % line if line else "no such line"))
    code, _ = agent.stop(30)
    res.check(code == 0, "agent exit code %s after SIGTERM (want 0)" % code)
    res.zombies += agent.zombies()
    res.timing = "final->descendants gone %s s" % spread(gone)
    keep_round(lab, p, res, pool, deployment, workdir, markers)


def keep_round(lab, p, res, pool, deployment, workdir, markers):
    """With --keep-leftover-processes the descendants survive the run (killed here after)."""
    agent = lab.agent(workdir, pool, state_dir=os.path.join(workdir, "state-keep"),
                      extra=["--keep-leftover-processes"]).start()
    code = agent.wait_exit(2.0)
    if code is not None:
        res.check(False, "--keep-leftover-processes: the agent exited %s: %s"
                  % (code, agent_trouble(agent)))
        return
    label = "--keep-leftover-processes: "
    run_id = lab.create_runs(deployment, [descendant_commands(lab, markers)[0][1]])[0]
    runs = lab.wait_final([run_id], 30)
    judge(lab, res, {run_id: "CRASHED"}, markers, label, runs)
    lab.sleep(p.leftover_grace)
    kept = run_processes([run_id])
    res.check(kept, "%sthe run's descendant is still alive %.0f s after the run ended: %s"
              % (label, p.leftover_grace, "yes" if kept else "no"))
    kill_pids(pid for pid, _, _ in kept)
    code, _ = agent.stop(30)
    res.check(code == 0, "%sagent exit code %s after SIGTERM (want 0)" % (label, code))
    res.zombies += agent.zombies()


# -- the report ------------------------------------------------------------------------------

RUNNERS = {
    "kill9-steps": scenario_kill9,
    "chatty": scenario_chatty,
    "full-disk": scenario_full_disk,
    "signal-flood": scenario_signal_flood,
    "cancel-while-down": scenario_cancel_while_down,
    "descendants": scenario_descendants,
}


def run_scenario(lab, p, name):
    res = Result(name)
    start = time.monotonic()
    log("scenario %s" % name)
    try:
        RUNNERS[name](lab, p, res)
    except Exception as exc:  # noqa: BLE001 - one scenario's trouble must not stop the rest
        res.error = "%s: %s" % (type(exc).__name__, exc)
        log("scenario %s could not complete:\n%s" % (name, traceback.format_exc()))
    finally:
        # Whatever the scenario left running: stop its agents and its runs' processes.
        for agent in lab.agents:
            if agent.alive():
                stop_group(agent.proc, 0)
        left = run_processes(lab.run_ids)
        kill_pids(pid for pid, _, _ in left)
    res.seconds = time.monotonic() - start
    log("scenario %s: %s in %.0f s" % (name, "skipped" if res.skipped else
                                      "FAIL" if res.failed(False) else "pass", res.seconds))
    return res


def print_report(results, require_all):
    header = ("scenario", "runs", "right state", "run twice", "stuck", "zombies", "orphans",
              "key timing", "result")
    rows = []
    for res in results:
        verdict = ("skipped" if res.skipped and not require_all else
                   "FAIL" if res.failed(require_all) else "pass")
        if res.skipped:
            rows.append((res.name, "-", "-", "-", "-", "-", "-", res.skipped, verdict))
            continue
        rows.append((res.name, res.scheduled, res.right, res.twice, res.stuck, res.zombies,
                     res.orphans, res.timing or "-", verdict))
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |"
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    for res in results:
        print("\n%s (%.0f s):" % (res.name, res.seconds))
        if res.skipped:
            print("  %s" % res.skipped)
        if res.error:
            print("  ERROR  could not complete: %s" % res.error)
        for ok, text in res.checks:
            print("  %-5s  %s" % ("ok" if ok else "FAIL", text))
        for text in res.notes[:25]:
            print("  note   %s" % text)
        if len(res.notes) > 25:
            print("  note   ... %d more" % (len(res.notes) - 25))
    failed = [r.name for r in results if r.failed(require_all)]
    print()
    print("chaos: all scenarios passed" if not failed else
          "chaos: FAILED: %s" % ", ".join(failed))
    return 1 if failed else 0


def interrupted(signum, frame):
    """A SIGTERM to chaos.py unwinds like Ctrl-C, so the cleanup runs."""
    raise KeyboardInterrupt()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short version of every scenario (about 4 minutes)")
    parser.add_argument("--only", choices=SCENARIOS, action="append",
                        help="run only this scenario (repeatable)")
    parser.add_argument("--require-all", action="store_true",
                        help="a skipped scenario (full-disk when not root) counts as a failure")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (agent logs)")
    parser.add_argument("--agent", default=AGENT_PY, help="agent.py to test (default: the repo's)")
    parser.add_argument("--prefect-venv", default=default_venv(),
                        help="venv with prefect 3.9.1 (created like .ci/run does if missing)")
    args = parser.parse_args(argv)
    p = params(args.quick)
    signal.signal(signal.SIGTERM, interrupted)
    if not become_subreaper():
        log("note: could not become a child subreaper; orphans go to PID 1")
    lab = Lab(args)
    results = []
    started = time.monotonic()
    try:
        lab.start()
        for name in args.only or SCENARIOS:
            results.append(run_scenario(lab, p, name))
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except BenchError as exc:
        log("cannot run: %s" % exc)
        return 1
    finally:
        lab.cleanup()
    log("done in %.0f s" % (time.monotonic() - started))
    return print_report(results, args.require_all)


if __name__ == "__main__":
    sys.exit(main())
