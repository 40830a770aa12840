#!/usr/bin/env python3
"""Soak benchmark: agent.py against the fake Prefect API for a few minutes.

    python bench/soak.py [--seconds 180] [--rate 2] [--seed N] [--fault-rate 0.05]

Runs agent.py as a subprocess against test_agent.FakePrefect, with every API request
(the agent's and the flow processes') independently answered 503 (with or without
Retry-After) or dropped (before or after the server applied it) at --fault-rate.
Runs are scheduled at --rate per second; each one's command is a small Python child that
follows a plan:

    a  report RUNNING, work a little, report COMPLETED, exit 0      -> COMPLETED
    b  report RUNNING, exit with a random non-zero code             -> CRASHED
    c  report RUNNING, sleep 60 s (half of them ignoring SIGTERM); the
       soak sets CANCELLING 1-5 s after it is RUNNING               -> CANCELLED
    d  exit 0 without reporting anything                            -> CRASHED
    e  start a background `sleep` grandchild, exit non-zero         -> CRASHED

With --hostile RATE, that share of the runs is hostile and that share of the agent's polls
is answered with a shape a broken or hostile server could send (HOSTILE_ANSWERS):

    i  a run name carrying a terminal escape and a forged log line;
       otherwise plan a                                           -> COMPLETED
    n  job variables nested 600 levels deep                       -> CRASHED

and the report adds the agent's peak RSS, its log lines right after each hostile answer,
raw escapes or forged lines in its log, and requests whose path carried a non-UUID id.

At the end it waits (bounded) for every run to be final, stops the agent with SIGTERM and
prints what it saw. Exit status 1 if a run ended in the wrong state, was started twice or
was left not final, if a run's reports arrived out of order, if the median from Cancelling
to Cancelled was 5 s or more, or if the agent had zombie children at the end; in hostile
mode also if a hostile answer cost more than HOSTILE_LINES_LIMIT log lines, the agent's peak
RSS passed HOSTILE_PEAK_RSS_MIB, its log held a raw escape or a forged line, or a non-UUID id
reached a request path; else 0.
Stdlib only, CPython 3.8+, traffic only to 127.0.0.1.
"""

import argparse
import bisect
import collections
import copy
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from test_agent import (FakePrefect, PROCESS_POOL_TEMPLATE, TERMINAL, _response,  # noqa: E402
                        parse_time)
from procfs import proc_cmdline, proc_stat, proc_status_kib, zombie_children  # noqa: E402

AGENT_PY = os.path.join(REPO, "agent.py")
POOL = "soak-pool"
PLANS = "abcde"
PLAN_WEIGHTS = (40, 15, 15, 15, 15)
EXPECTED = {"a": "COMPLETED", "b": "CRASHED", "c": "CANCELLED", "d": "CRASHED", "e": "CRASHED"}
PLAN_TEXT = {"a": "RUNNING, COMPLETED, exit 0", "b": "RUNNING, exit non-zero",
             "c": "RUNNING, sleep, cancelled", "d": "silent exit 0",
             "e": "grandchild sleep, exit non-zero"}
AGENT_STOP_SECONDS = 30.0
#: Issue 11: the median from Cancelling to Cancelled stays under this, at 25% faults too.
CANCEL_MEDIAN_TARGET = 5.0
STARTUP_SECONDS = 30.0

EXPECTED.update({"i": "COMPLETED", "n": "CRASHED"})
PLAN_TEXT.update({"i": "hostile: escapes in the name", "n": "hostile: nested 600 deep"})
HOSTILE_PLANS = "in"
#: A name that, printed raw, clears the operator's screen and forges a line of the agent's log.
HOSTILE_NAME = "soak-%04d-%s\x1b[2J\x1b[31m\n12:00:00.000 | ERROR   | agent | forged by a run name"
NON_UUID_ID = "../../../../hostile-x"
HOSTILE_ANSWERS = ("nested 900 deep", "100,000 bad entries", "non-UUID run id",
                   "chunk size -1", "Content-Length 1 GiB", "32 MiB of {}")
#: Log lines the agent may write in the half second after one hostile answer (it had written
#: 100,000 for one answer of bad entries); lines of normal faults in that window count too.
HOSTILE_LINES_LIMIT = 5
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: A 32 MiB answer of `[{},{},...]` once took the agent to 853 MiB.
HOSTILE_PEAK_RSS_MIB = 200
MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # agent.py's cap on an answer

# The flow-run process (written to soak_child.py in the temp dir and started as
# `python soak_child.py LAUNCHES PLAN ARG`); env from the agent. It reports its
# start with one O_APPEND write (so concurrent starts cannot interleave), then runs its plan.
CHILD_CODE = r'''
import json, os, random, subprocess, sys, time, uuid, urllib.error, urllib.request
launches, plan, arg = sys.argv[1], sys.argv[2], sys.argv[3]
run_id = os.environ["PREFECT__FLOW_RUN_ID"]
api = os.environ["PREFECT_API_URL"].rstrip("/")
fd = os.open(launches, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, ("%s %d\n" % (run_id, os.getpid())).encode())
os.close(fd)
print("soak child: plan %s %s" % (plan, arg), flush=True)

def propose(kind):
    # One transition id per proposal, reused on retries: a retry of a request whose answer
    # was lost is then REJECTed as a repeat instead of applied twice.
    body = json.dumps({"state": {"type": kind, "state_details": {
        "transition_id": str(uuid.uuid4())}}}).encode()
    deadline = time.monotonic() + 120
    while True:
        wait = 0.3
        req = urllib.request.Request(api + "/flow_runs/%s/set_state" % run_id, data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                result = json.loads(resp.read().decode())
            if result.get("status") != "ACCEPT":
                print("soak child: %s -> %s (%s)" % (kind, result.get("status"),
                      (result.get("details") or {}).get("reason")), flush=True)
            return result.get("status")
        except urllib.error.HTTPError as e:
            if e.code < 500:
                print("soak child: %s answered %s: %s" % (kind, e.code, e.read()[:200]), flush=True)
                sys.exit(98)
            if e.headers.get("Retry-After"):
                wait = float(e.headers["Retry-After"])
        except Exception:
            pass  # dropped connection, reset, timeout: try again
        if time.monotonic() > deadline:
            print("soak child: giving up on reporting %s" % kind, flush=True)
            sys.exit(99)
        time.sleep(min(wait, 5) + random.random() * 0.2)

if plan == "a":
    propose("RUNNING"); time.sleep(float(arg)); propose("COMPLETED"); sys.exit(0)
if plan == "b":
    pause, code = arg.split(":")
    propose("RUNNING"); time.sleep(float(pause)); sys.exit(int(code))
if plan == "c":
    if arg == "ignore-term":  # only the SIGKILL after the grace period ends it
        import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)
    propose("RUNNING"); time.sleep(60); sys.exit(0)
if plan == "d":
    time.sleep(float(arg)); sys.exit(0)
if plan == "e":
    seconds, code = arg.split(":")
    kid = subprocess.Popen(["sleep", seconds])  # inherits stdout: the agent's pipe stays open
    fd = os.open(launches + ".grandchildren", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("%s %d %d\n" % (run_id, os.getpid(), kid.pid)).encode())
    os.close(fd)
    sys.exit(int(code))
sys.exit(97)
'''


class FaultyFake(FakePrefect):
    """FakePrefect where every HTTP request independently fails with probability
    `fault_rate`: 503 (with or without Retry-After) or a dropped connection (before or after
    the request is applied). Requests are counted, not stored, so memory stays flat.
    The soak's own bookkeeping uses the Python methods, which never fault."""

    KINDS = ("503", "503+Retry-After", "drop-before", "drop-after")

    def __init__(self, fault_rate, seed):
        FakePrefect.__init__(self)
        self.fault_rate = fault_rate
        self.faults = collections.Counter()
        self.request_count = 0
        self.report_requests = []  # the agent's pid records and state proposals, in order
        self.first_poll = threading.Event()
        self._fault_random = random.Random(seed)
        self._count_lock = threading.Lock()

    def _record(self, method, path, headers, body):
        with self._count_lock:
            self.request_count += 1
            if headers.get("user-agent", "").startswith("agent.py") and (
                    (method == "PATCH" and isinstance(body, dict) and "infrastructure_pid" in body)
                    or path.endswith("/set_state")):
                self.report_requests.append((method, path, body))
            if self._fault_random.random() >= self.fault_rate:
                return None
            kind = self._fault_random.choice(self.KINDS)
            self.faults[kind] += 1
            retry_after = str(self._fault_random.choice((0, 1, 2)))
        if kind.startswith("503"):
            extra = {"Retry-After": retry_after} if kind == "503+Retry-After" else {}
            return {"kind": "fail", "process": False,
                    "response": _response(503, {"exception_message": "Service Unavailable"},
                                          extra)}
        return {"kind": "drop", "process": kind == "drop-after", "response": None}

    def _dispatch(self, method, target, headers, body):
        answer = FakePrefect._dispatch(self, method, target, headers, body)
        if "/get_scheduled_flow_runs" in target and answer[0] == 200:
            self.first_poll.set()
        return answer


def nested(depth, leaf):
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


class HostileFake(FaultyFake):
    """FaultyFake that also answers a `hostile_rate` share of the agent's polls with one of
    HOSTILE_ANSWERS, served in turn. Phantom runs in those answers are copies of `template`."""

    def __init__(self, fault_rate, seed, hostile_rate):
        FaultyFake.__init__(self, fault_rate, seed)
        self.hostile_rate = hostile_rate
        self.template = None  # a scheduled run's answer entry, set by the soak
        self.hostile_served = []  # (time.time(), kind)
        self.non_uuid_paths = 0
        self._hostile_random = random.Random(seed + 7)
        self._brace_flood = b"[" + b"{}," * ((MAX_RESPONSE_BYTES - 3) // 3) + b"{}]"

    def _record(self, method, path, headers, body):
        if NON_UUID_ID.rsplit("/", 1)[-1] in path:
            self.non_uuid_paths += 1
        if (self.template is None or "/get_scheduled_flow_runs" not in path
                or not headers.get("user-agent", "").startswith("agent.py")
                or self._hostile_random.random() >= self.hostile_rate):
            return FaultyFake._record(self, method, path, headers, body)
        with self._count_lock:
            self.request_count += 1
            kind = HOSTILE_ANSWERS[len(self.hostile_served) % len(HOSTILE_ANSWERS)]
            self.hostile_served.append((time.time(), kind))
        if kind in ("nested 900 deep", "non-UUID run id"):
            status, data, _, _ = self._dispatch(method, path, headers, body)
            answer = json.loads(data) if status == 200 else []
            phantom = copy.deepcopy(self.template)
            if kind == "non-UUID run id":
                phantom["flow_run"]["id"] = NON_UUID_ID
            else:
                phantom["flow_run"]["id"] = str(uuid.uuid4())
                phantom["flow_run"]["job_variables"] = {"x": nested(900, 1)}
            return {"kind": "raw", "process": False,
                    "response": _response(200, answer + [phantom])}
        if kind == "100,000 bad entries":
            return {"kind": "raw", "process": False, "response": _response(200, [{}] * 100000)}
        if kind == "32 MiB of {}":
            return {"kind": "raw", "process": False,
                    "response": (200, self._brace_flood, "application/json", {})}
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if kind == "chunk size -1":
            head += b"Transfer-Encoding: chunked\r\n\r\n-1\r\n"
        else:
            head += b"Content-Length: %d\r\n\r\n" % (1 << 30)
        return {"kind": "bytes", "response": [head] + [b"[" * (1 << 20)] * 64}


def read_lines(path):
    try:
        with open(path) as handle:
            return [line.split() for line in handle if line.strip()]
    except FileNotFoundError:
        return []


# -- the soak --------------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.args = args
        self.random = random.Random(args.seed)
        self.tmp = tempfile.mkdtemp(prefix="agentpy-soak-")
        self.launches = os.path.join(self.tmp, "launches")
        self.grandchildren = self.launches + ".grandchildren"
        self.agent_log = os.path.join(self.tmp, "agent.log")
        self.child_script = os.path.join(self.tmp, "soak_child.py")
        with open(self.child_script, "w") as handle:  # a file, so the agent log stays readable
            handle.write(CHILD_CODE.lstrip())
        self.fake = (HostileFake(args.fault_rate, args.seed + 1, args.hostile) if args.hostile
                     else FaultyFake(args.fault_rate, args.seed + 1))
        self.agent = None
        self.runs = collections.OrderedDict()  # run id -> {"plan", "name", "cancel_at", ...}
        self.zombie_max = 0
        self.zombie_first_seen = {}  # pid -> monotonic time first seen as a zombie
        self.zombie_longest = 0.0
        self.zombie_end = None
        self.rss_start = self.rss_end = self.rss_peak = None
        self.agent_exit = None
        self.agent_stop_note = ""
        self.notes = []
        self.drain_seconds = None

    # -- setup ---------------------------------------------------------------------------
    def agent_argv(self):
        argv = [sys.executable, self.args.agent, "start", "--api", self.fake.url, "--pool", POOL,
                "--name", "soak-agent", "--poll-interval", "1", "--prefetch-seconds", "0",
                "--hide-welcome", "--cancel-grace-seconds", "2",
                "--state-dir", os.path.join(self.tmp, "state")]
        return argv

    def start(self):
        self.fake.start()
        self.fake.add_pool(POOL, base_job_template=PROCESS_POOL_TEMPLATE)
        flow_id = self.fake.add_flow("soak-flow")
        self.deployment = self.fake.add_deployment(flow_id, "soak", work_pool_name=POOL,
                                                   work_queue_name="default")
        if self.args.hostile:  # phantom runs in hostile answers are copies of a real entry
            run_id = self.fake.add_run(self.deployment, pool=POOL, name="template")
            self.fake.template = {"work_pool_id": self.fake.pool(POOL)["id"],
                                  "work_queue_id": self.fake.run(run_id)["work_queue_id"],
                                  "flow_run": dict(self.fake.run(run_id), state=None)}
            self.fake.delete_run(run_id)
        env = dict(os.environ)
        for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
            env.pop(key, None)
        env["PYTHONUNBUFFERED"] = "1"
        env["TMPDIR"] = os.path.join(self.tmp, "agent-tmp")  # the runs' working dirs
        env["XDG_STATE_HOME"] = os.path.join(self.tmp, "xdg-state")
        os.makedirs(env["TMPDIR"])
        with open(self.agent_log, "wb") as log:
            self.agent = subprocess.Popen(self.agent_argv(), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                          env=env, start_new_session=True)
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.fake.first_poll.wait(0.2):
            if self.agent.poll() is not None:
                raise SystemExit("agent.py exited with %s before its first poll; log:\n%s"
                                 % (self.agent.returncode, self.log_tail(20)))
            if time.monotonic() > deadline:
                raise SystemExit("agent.py did not poll within %.0f s; log:\n%s"
                                 % (STARTUP_SECONDS, self.log_tail(20)))
        time.sleep(0.5)
        self.rss_start = proc_status_kib(self.agent.pid, "VmRSS")

    def log_tail(self, n):
        try:
            with open(self.agent_log, errors="replace") as handle:
                return "".join(handle.readlines()[-n:])
        except OSError:
            return "(no log)"

    # -- scheduling --------------------------------------------------------------------------
    def child_command(self, plan):
        r = self.random
        if plan in "ain":
            arg = "%.2f" % r.uniform(0, 3)
        elif plan == "b":
            arg = "%.2f:%d" % (r.uniform(0, 2), r.choice((1, 2, 3, 42, 113, 127)))
        elif plan == "c":
            arg = r.choice(("term", "ignore-term"))
        elif plan == "d":
            arg = "%.2f" % r.uniform(0, 2)
        else:
            arg = "%d:%d" % (r.randint(2, 10), r.choice((1, 5, 70)))
        argv = [sys.executable, self.child_script, self.launches,
                "a" if plan in HOSTILE_PLANS else plan, arg]
        return " ".join(shlex.quote(part) for part in argv), arg

    def schedule_one(self):
        plan = self.random.choices(PLANS, PLAN_WEIGHTS)[0]
        if self.random.random() < self.args.hostile:
            plan = self.random.choice(HOSTILE_PLANS)
        command, arg = self.child_command(plan)
        name = (HOSTILE_NAME if plan == "i" else "soak-%04d-%s") % (len(self.runs) + 1, plan)
        job_variables = {"command": command}
        if plan == "n":  # if the agent ran it anyway, it would end COMPLETED
            job_variables["x"] = nested(600, 1)
        run_id = self.fake.add_run(self.deployment, pool=POOL, name=name,
                                   job_variables=job_variables)
        self.runs[run_id] = {"plan": plan, "name": name, "arg": arg, "cancel_at": None,
                             "cancelled_at": None}

    def handle_cancellations(self, now):
        for run_id, info in self.runs.items():
            if info["plan"] != "c" or info["cancelled_at"] is not None:
                continue
            state = self.fake.run(run_id)["state_type"]
            if info["cancel_at"] is None:
                if state == "RUNNING":
                    info["cancel_at"] = now + self.random.uniform(1, 5)
            elif now >= info["cancel_at"]:
                if state == "RUNNING":
                    self.fake.set_run_state(run_id, "CANCELLING")
                else:
                    self.notes.append("%s (%s) was %s when due to be cancelled"
                                      % (info["name"], run_id, state))
                info["cancelled_at"] = now

    def sample_zombies(self, now):
        found = [pid for pid, _ in zombie_children(self.agent.pid)]
        self.zombie_max = max(self.zombie_max, len(found))
        for pid in found:
            first = self.zombie_first_seen.setdefault(pid, now)
            self.zombie_longest = max(self.zombie_longest, now - first)
        for pid in list(self.zombie_first_seen):
            if pid not in found:
                del self.zombie_first_seen[pid]
        return found

    def not_final(self):
        return [r for r in self.runs if self.fake.run(r)["state_type"] not in TERMINAL]

    def check_agent(self):
        if self.agent.poll() is not None:
            raise SystemExit("agent.py exited with %s during the soak; log tail:\n%s"
                             % (self.agent.returncode, self.log_tail(30)))

    def soak(self):
        start = time.monotonic()
        end = start + self.args.seconds
        next_run = start
        next_sample = start
        interval = 1.0 / self.args.rate
        last_report = start
        while True:
            now = time.monotonic()
            if now >= end:
                break
            while next_run <= now and next_run < end:
                self.schedule_one()
                next_run += interval
            self.handle_cancellations(now)
            if now >= next_sample:
                self.sample_zombies(now)
                next_sample += 1.0
                self.check_agent()
            if now - last_report >= 30:
                last_report = now
                self.progress(now - start)
            time.sleep(max(0.0, min(next_run, next_sample, end) - time.monotonic()))
        # Drain: no more runs; wait (bounded) for every run to be final.
        drain_start = time.monotonic()
        deadline = time.monotonic() + self.args.final_wait + 2 * 2  # + cancel grace, twice
        while time.monotonic() < deadline:
            now = time.monotonic()
            self.handle_cancellations(now)
            self.sample_zombies(now)
            self.check_agent()
            if not self.not_final():
                self.drain_seconds = time.monotonic() - drain_start
                break
            time.sleep(0.5)
        time.sleep(2.0)  # let the last exits be reaped before counting zombies at the end
        now = time.monotonic()
        self.zombie_end = len(self.sample_zombies(now))
        self.rss_end = proc_status_kib(self.agent.pid, "VmRSS")
        self.rss_peak = proc_status_kib(self.agent.pid, "VmHWM")

    def progress(self, elapsed):
        final = len(self.runs) - len(self.not_final())
        sys.stderr.write("[soak %4.0fs] scheduled %d, final %d, requests %d, faults %d\n" % (
            elapsed, len(self.runs), final, self.fake.request_count,
            sum(self.fake.faults.values())))

    def stop_agent(self):
        if self.agent is None or self.agent.poll() is not None:
            return
        self.agent.send_signal(signal.SIGTERM)
        try:
            self.agent_exit = self.agent.wait(AGENT_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.agent_stop_note = " (did not exit %.0f s after SIGTERM; killed)" % AGENT_STOP_SECONDS
            self.agent.kill()
            self.agent.wait(5)

    def cleanup(self):
        """Kill the agent and whatever is left of the runs' process groups."""
        if self.agent is not None and self.agent.poll() is None:
            try:
                os.killpg(self.agent.pid, signal.SIGKILL)
            except OSError:
                pass
            self.agent.wait(5)
        groups = set(int(fields[1]) for fields in read_lines(self.launches) if len(fields) == 2)
        for fields in read_lines(self.grandchildren):
            if len(fields) == 3:
                groups.add(int(fields[1]))
        by_group = collections.defaultdict(list)
        for entry in os.listdir("/proc"):
            stat = proc_stat(int(entry)) if entry.isdigit() else None
            if stat:
                by_group[stat[2]].append(int(entry))
        for pgid in groups:  # each flow process leads its own session (start_new_session)
            members = by_group.get(pgid, [])
            if any(self.launches in proc_cmdline(p) or proc_cmdline(p)[:1] == ["sleep"]
                   for p in members):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass
        self.fake.stop()

    # -- report --------------------------------------------------------------------------
    def leftover_flow_processes(self):
        alive = []
        for fields in read_lines(self.launches):
            if len(fields) == 2:
                pid = int(fields[1])
                stat = proc_stat(pid)
                if stat and stat[0] != "Z" and self.launches in proc_cmdline(pid):
                    alive.append((fields[0], pid))
        return alive

    def reports_out_of_order(self):
        """Runs for which the agent proposed a final state before its last attempt to record
        the infrastructure pid: the reporter must deliver each run's calls in order."""
        pid_last, final_first = {}, {}
        for index, (method, path, body) in enumerate(self.fake.report_requests):
            parts = path.split("?")[0].rstrip("/").split("/")
            if len(parts) < 2 or "flow_runs" not in parts:
                continue
            run_id = parts[parts.index("flow_runs") + 1] if parts.index("flow_runs") + 1 < len(parts) else None
            if method == "PATCH" and isinstance(body, dict) and "infrastructure_pid" in body:
                pid_last[run_id] = index
            elif path.endswith("/set_state") and isinstance(body, dict) and \
                    (body.get("state") or {}).get("type") in ("CRASHED", "CANCELLED"):
                final_first.setdefault(run_id, index)
        return [r for r, at in final_first.items() if pid_last.get(r, -1) > at]

    def report(self):
        launches = collections.Counter(f[0] for f in read_lines(self.launches) if len(f) == 2)
        twice = [r for r, n in launches.items() if n > 1]
        wrong, not_final, per_plan = [], [], collections.defaultdict(lambda: [0, 0])
        for run_id, info in self.runs.items():
            run = self.fake.run(run_id)
            actual = run["state_type"]
            per_plan[info["plan"]][0] += 1
            if actual not in TERMINAL:
                not_final.append((run_id, info, actual))
            elif actual != EXPECTED[info["plan"]]:
                wrong.append((run_id, info, actual, run["state"].get("message")))
            else:
                per_plan[info["plan"]][1] += 1
        right = len(self.runs) - len(wrong) - len(not_final)
        claim_waits, cancel_waits = [], []
        for run_id in self.runs:
            when = {}
            for state in self.fake.states(run_id):
                when.setdefault(state["type"], parse_time(state["timestamp"]))
            if "PENDING" in when:
                claim_waits.append((when["PENDING"] - when["SCHEDULED"]).total_seconds())
            if "CANCELLING" in when and "CANCELLED" in when:
                cancel_waits.append((when["CANCELLED"] - when["CANCELLING"]).total_seconds())
        spread = lambda xs: ("%.1f / %.1f" % (sorted(xs)[len(xs) // 2], max(xs))) if xs else "-"
        cancel_met = not cancel_waits or sorted(cancel_waits)[len(cancel_waits) // 2] < CANCEL_MEDIAN_TARGET
        never_started = [r for r in self.runs if r not in launches]
        # Every started run should end up with the agent's "exited with status code" line.
        no_exit_log = [r for r in launches if r in self.runs and not any(
            "exited with status code" in line for line in self.fake.logs(r))]
        leftovers = self.leftover_flow_processes()
        out_of_order = self.reports_out_of_order()
        faults = self.fake.faults
        exit_text = ("%s%s" % (self.agent_exit, self.agent_stop_note)
                     if self.agent_exit is not None else "not stopped" + self.agent_stop_note)
        rows = [
            ("seconds / rate / seed / fault rate", "%s / %s / %s / %s" % (
                self.args.seconds, self.args.rate, self.args.seed, self.args.fault_rate)),
            ("runs scheduled", len(self.runs)),
            ("runs finished in the right final state", right),
            ("runs finished in a wrong final state", len(wrong)),
            ("runs not final", len(not_final)),
            ("runs started twice", len(twice)),
            ("runs never started", len(never_started)),
            ("seconds from last scheduled to all final", "%.1f" % self.drain_seconds
             if self.drain_seconds is not None else "not reached"),
            ("s SCHEDULED -> PENDING (median / max)", spread(claim_waits)),
            ("s CANCELLING -> CANCELLED (median / max)", spread(cancel_waits)),
            ("  target: median under %g s, even at 25%% faults" % CANCEL_MEDIAN_TARGET,
             "met" if cancel_met else "MISSED"),
            ("zombies seen (max at once)", self.zombie_max),
            ("zombies at the end", self.zombie_end),
            ("longest-lived zombie (s)", "%.0f" % self.zombie_longest),
            ("flow processes alive at the end", len(leftovers)),
            ("started runs without the exit log line in the API", len(no_exit_log)),
            ("runs whose reports arrived out of order", len(out_of_order)),
            ("agent RSS at start (KiB)", self.rss_start),
            ("agent RSS at end (KiB)", self.rss_end),
            ("agent peak RSS (KiB)", self.rss_peak),
            ("agent exit code", exit_text),
            ("API requests", self.fake.request_count),
            ("faults injected: 503 / 503+Retry-After", "%d / %d" % (
                faults["503"], faults["503+Retry-After"])),
            ("faults injected: drop before / after", "%d / %d" % (
                faults["drop-before"], faults["drop-after"])),
            ("fake-side errors", len(self.fake.errors)),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        for key, value in rows:
            print("%-*s  %s" % (width, key, value))
        print()
        print("per plan (right / scheduled):")
        for plan in PLANS + (HOSTILE_PLANS if self.args.hostile else ""):
            print("  %s  %-32s expected %-9s  %d / %d" % (
                plan, PLAN_TEXT[plan], EXPECTED[plan], per_plan[plan][1], per_plan[plan][0]))
        if wrong:
            print("\nwrong final state (first 10 of %d):" % len(wrong))
            for run_id, info, actual, message in wrong[:10]:
                print("  %s [%s] %s: expected %s, got %s; history %s; message %.150r" % (
                    info["name"], info["arg"], run_id, EXPECTED[info["plan"]], actual,
                    "-".join(self.fake.history(run_id)), message))
        if not_final:
            print("\nnot final (first 10 of %d):" % len(not_final))
            for run_id, info, actual in not_final[:10]:
                print("  %s [%s] %s: expected %s, still %s; history %s; started %d time(s)" % (
                    info["name"], info["arg"], run_id, EXPECTED[info["plan"]], actual,
                    "-".join(self.fake.history(run_id)), launches.get(run_id, 0)))
        if twice:
            print("\nstarted twice (first 10 of %d):" % len(twice))
            for run_id in twice[:10]:
                pids = [f[1] for f in read_lines(self.launches) if f[:1] == [run_id]]
                print("  %s %s: pids %s; history %s" % (
                    self.runs.get(run_id, {}).get("name"), run_id, ", ".join(pids),
                    "-".join(self.fake.history(run_id))))
        if leftovers:
            print("\nflow processes alive at the end (first 10 of %d):" % len(leftovers))
            for run_id, pid in leftovers[:10]:
                print("  %s %s: pid %d, run %s" % (self.runs.get(run_id, {}).get("name"), run_id,
                                                   pid, self.fake.run(run_id)["state_type"]))
        for note in self.notes[:10]:
            print("note: " + note)
        if self.fake.errors:
            print("\nfirst fake-side error:\n" + self.fake.errors[0])
        failed = bool(wrong or twice or not_final or self.zombie_end or out_of_order
                      or not cancel_met)
        if self.args.hostile:
            failed = self.report_hostile() or failed
        print("\nagent log: %s%s" % (self.agent_log, "" if failed or self.args.keep
                                     else " (removed; pass --keep to keep it)"))
        return 1 if failed else 0


    def report_hostile(self):
        """Print what the hostile answers cost; True if any cost too much. The log is read a
        line at a time: an agent that logs every bad entry writes a gigabyte."""
        forged_start = HOSTILE_NAME.split("\n", 1)[1].encode()
        forged = escapes = 0
        warnings = []  # seconds of day of the WARNING+ lines not about the soak's own runs
        own_runs = set(self.runs)
        with open(self.agent_log, "rb") as handle:
            for line in handle:
                escapes += line.count(b"\x1b")
                forged += line.startswith(forged_start)
                if line[12:25] not in (b" | WARNING | ", b" | ERROR   | "):
                    continue
                parts = line[:300].decode("utf-8", "replace").split(" | ", 3)
                if len(parts) == 4 and parts[2] == "agent" and \
                        not set(UUID_TEXT.findall(parts[3])) & own_runs:
                    warnings.append(seconds_of_day(parts[0]))
        warnings = sorted(t for t in warnings if t is not None)
        served = self.fake.hostile_served
        per_answer = collections.defaultdict(list)
        for when, kind in served:
            start = seconds_of_day_at(when)
            per_answer[kind].append(bisect.bisect_left(warnings, start + 0.5)
                                    - bisect.bisect_left(warnings, start))
        print("\nhostile answers (served / most WARNING+ lines within 0.5 s of one):")
        for kind in HOSTILE_ANSWERS:
            counts = per_answer.get(kind, [])
            print("  %-22s %4d / %s" % (kind, len(counts), max(counts) if counts else "-"))
        worst = max((max(c) for c in per_answer.values() if c), default=0)
        peak_mib = (self.rss_peak or 0) / 1024.0
        rows = [("hostile answers served", len(served)),
                ("most log lines after one hostile answer (limit %d)" % HOSTILE_LINES_LIMIT, worst),
                ("agent peak RSS MiB (limit %d)" % HOSTILE_PEAK_RSS_MIB, "%.0f" % peak_mib),
                ("raw ESC bytes in the agent's log", escapes),
                ("forged lines in the agent's log", forged),
                ("requests whose path carried the non-UUID id", self.fake.non_uuid_paths)]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print("%-*s  %s" % (width, key, value))
        return bool(worst > HOSTILE_LINES_LIMIT or peak_mib > HOSTILE_PEAK_RSS_MIB or forged
                    or escapes or self.fake.non_uuid_paths or not served)


def seconds_of_day(stamp):
    """Seconds since local midnight of an agent log line's HH:MM:SS.mmm stamp, or None."""
    try:
        hours, minutes, seconds = stamp.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def seconds_of_day_at(moment):
    local = time.localtime(moment)
    return local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec + moment % 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to schedule runs")
    parser.add_argument("--rate", type=float, default=2.0, help="runs scheduled per second")
    parser.add_argument("--seed", type=int, default=None, help="seed for plans and faults")
    parser.add_argument("--fault-rate", type=float, default=0.05,
                        help="chance that any one API request is answered 503 or dropped")
    parser.add_argument("--final-wait", type=float, default=60.0,
                        help="seconds to wait after the last run for every run to be final")
    parser.add_argument("--hostile", type=float, default=0.0,
                        help="share of runs and of the agent's polls made hostile (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (agent log)")
    parser.add_argument("--agent", default=AGENT_PY, help="agent.py to run (default: the repo's)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if args.seconds <= 0 or args.rate <= 0 or not 0 <= args.fault_rate < 1 \
            or not 0 <= args.hostile < 1:
        parser.error("--seconds and --rate must be positive, --fault-rate and --hostile in [0, 1)")
    sys.setrecursionlimit(10000)  # the fake serialises the nested job variables
    soak = Soak(args)
    code = 1
    try:
        soak.start()
        sys.stderr.write("soak: agent pid %d, log %s, seed %d\n"
                         % (soak.agent.pid, soak.agent_log, args.seed))
        soak.soak()
        soak.stop_agent()
        code = soak.report()
    finally:
        soak.cleanup()
        if code == 0 and not args.keep:
            shutil.rmtree(soak.tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
