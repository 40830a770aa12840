#!/usr/bin/env python3
"""Quick benchmark: one short run of agent.py against the fake Prefect API, for CI.

    python bench/quick.py [--agent PATH] [--json PATH] [--keep]

Starts agent.py (poll interval 1 s, prefetch 5 s, fresh --state-dir) against
test_agent.FakePrefect and measures, in this order:

    start-up     Popen until the fake sees the first get_scheduled_flow_runs request
    idle RSS     VmRSS of the agent 5 s after that first poll
    dispatch     200 runs scheduled now, all made visible at one instant: from the answer
                 to the first poll that returns them until the 200th child has started
    punctuality  20 runs scheduled at now + 3 s + i * 0.2 s: child start minus scheduled
                 time (signed; negative = started early): median, p95, minimum
    zombies      children of the agent seen in state Z in samples >= 1 s apart
    peak RSS     VmHWM at the end, and its growth over the idle RSS
    stop         SIGTERM; the agent must exit 0 within 15 s
    latency      a second agent against a fake that takes 50 ms to answer each request (a
                 WAN round trip) with 200 runs waiting: from the answer to the first poll that
                 returns them until the fake has answered the 200th claim. One run at a time
                 that is 200 round trips (10 s and more); the limit (5 s) needs claims in
                 flight together
    journal      the agent's Journal class (imported from --agent): ms to journal one exit
                 (fsync included) holding 10 runs and holding 1000; the cost must not grow
                 with the runs held
    fake errors  requests the fake itself failed on (a bug in the fake or a request it
                 could not handle)

Each run's command is `bash -c 'echo "$PREFECT__FLOW_RUN_ID $EPOCHREALTIME" >> FILE'`:
bash 5's EPOCHREALTIME stamps the start without a fork, so the marker costs next to nothing.

Prints a table (figure, value, gross limit, ok?). The limits are gross on purpose: the check
exists to catch a regression of several times, not a noisy 10 %. Exit status 1 if any
check failed (one line per failed check on stderr), else 0. About 20 s; stdlib only,
CPython 3.8+, traffic only to 127.0.0.1.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from test_agent import FakePrefect, PROCESS_POOL_TEMPLATE, UTC  # noqa: E402
from procfs import (ZOMBIE_MIN_AGE, ZOMBIE_SAMPLE_SECONDS, ZombieWatch,  # noqa: E402
                    proc_status_kib)

AGENT_PY = os.path.join(REPO, "agent.py")
POOL = "quick-pool"
POLL_SECONDS = 1
PREFETCH_SECONDS = 5
IDLE_SECONDS = 5.0
DISPATCH_RUNS = 200          # the fake answers at most 200 runs per poll (MAX_LIMIT): one poll
PUNCTUAL_RUNS = 20
PUNCTUAL_LEAD = 3.0          # first punctual run is due this far ahead (< PREFETCH_SECONDS)
PUNCTUAL_STEP = 0.2

# Bounds on waiting, so a broken agent fails the run in well under 2 minutes instead of hanging.
STARTUP_WAIT = 15.0
DISPATCH_WAIT = 30.0
PUNCTUAL_WAIT = 10.0         # after the last punctual run is due
STOP_WAIT = 15.0

# Gross limits (value must be <= limit).
LIMIT_STARTUP_S = 1.0
LIMIT_IDLE_RSS_MB = 40.0
LIMIT_DISPATCH_S = 10.0
LIMIT_PUNCTUAL_P95_S = 1.0
LIMIT_ZOMBIES = 0
LIMIT_RSS_GROWTH_MB = 30.0
LIMIT_JOURNAL_GROWTH = 3.0   # ms per exit holding 1000 runs / holding 10
LIMIT_LATENCY_CLAIMS_S = 5.0
LATENCY_S = 0.05
LATENCY_RUNS = 200
LATENCY_WAIT = 60.0
JOURNAL_HELD = (10, 1000)
JOURNAL_EXITS = 50


class TimedFake(FakePrefect):
    """FakePrefect that notes when each poll arrives and when its answer is ready, with how
    many runs it carried: the agent's own clock is not visible from here, these are."""

    def __init__(self):
        FakePrefect.__init__(self)
        self.polls = []  # (monotonic at arrival, monotonic at answer, epoch at answer, runs)
        self.first_poll = threading.Event()
        self._polls_lock = threading.Lock()

    def _dispatch(self, method, target, headers, body):
        if "/get_scheduled_flow_runs" not in target:
            return FakePrefect._dispatch(self, method, target, headers, body)
        arrived = time.monotonic()
        answer = FakePrefect._dispatch(self, method, target, headers, body)
        answered, answered_epoch = time.monotonic(), time.time()
        # json.dumps writes '"flow_run": {' once per item; counting bytes is cheaper than
        # parsing 200 runs on the path the agent is waiting on.
        runs = answer[1].count(b'"flow_run": {') if answer[0] == 200 else -1
        with self._polls_lock:
            self.polls.append((arrived, answered, answered_epoch, runs))
        self.first_poll.set()
        return answer

    def polls_copy(self):
        with self._polls_lock:
            return list(self.polls)


class LatencyFake(TimedFake):
    """TimedFake that answers each request LATENCY_S late and notes when each claim (a
    PENDING proposal) was answered."""

    def __init__(self):
        TimedFake.__init__(self)
        self.latency = LATENCY_S
        self.claims = []  # monotonic at each accepted claim's answer

    def _dispatch(self, method, target, headers, body):
        answer = TimedFake._dispatch(self, method, target, headers, body)
        if (target.endswith("/set_state") and answer[0] < 300 and isinstance(body, dict)
                and (body.get("state") or {}).get("type") == "PENDING"):
            with self._polls_lock:
                self.claims.append(time.monotonic())
        return answer


def read_markers(path):
    """{run id: epoch seconds the run's child started} from the marker file."""
    started = {}
    try:
        with open(path) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) == 2:
                    started.setdefault(fields[0], float(fields[1]))
    except FileNotFoundError:
        pass
    return started


def p95(values):
    """Nearest-rank 95th percentile (no interpolation: with 20 values, the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, int(math.ceil(0.95 * len(ordered))) - 1)]


# -- the benchmark ---------------------------------------------------------------------------

class Quick:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="agentpy-quick-")
        self.markers = os.path.join(self.tmp, "started")
        self.agent_log = os.path.join(self.tmp, "agent.log")
        self.fake = TimedFake()
        self.agent = None
        self.watch = None
        self.figures = {}   # raw numbers, for --json
        self.checks = []    # (name, value text, limit text, ok: True / False / None = info)
        self.aborted = None  # why the measurements stopped early, if they did

    def check(self, name, value, limit, fmt="%.3f", unit="", at_least=False):
        """Append a (name, value, limit, ok) row: value <= limit (>= with at_least). value
        None means it could not be measured, which fails; limit None means information only
        (ok None). E.g. never starting early: check(..., f["punctual_min_s"], 0, at_least=True)."""
        if limit is None or (value is None and self.aborted):
            ok = None  # after an abort, only the abort itself fails: one line, not a cascade
        else:
            ok = value is not None and (value >= limit if at_least else value <= limit)
        text = ("not reached" if self.aborted else "not measured") if value is None else (
            fmt % value) + unit
        bound = "-" if limit is None else (">= " if at_least else "<= ") + (fmt % limit) + unit
        self.checks.append((name, text, bound, ok))

    # -- setup ---------------------------------------------------------------------------
    def start_fake(self):
        self.fake.start()
        self.fake.add_pool(POOL, base_job_template=PROCESS_POOL_TEMPLATE)
        flow_id = self.fake.add_flow("quick-flow")
        self.deployment = self.fake.add_deployment(flow_id, "quick", work_pool_name=POOL,
                                                   work_queue_name="default")

    def spawn_agent(self, fake, name, log_path):
        """agent.py in its own session against `fake`, with state and temp dirs named `name`."""
        argv = [sys.executable, self.args.agent, "start", "--api", fake.url, "--pool", POOL,
                "--name", "quick-agent", "--poll-interval", str(POLL_SECONDS),
                "--prefetch-seconds", str(PREFETCH_SECONDS), "--hide-welcome",
                "--state-dir", os.path.join(self.tmp, name + "-state")]
        env = dict(os.environ)
        for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
            env.pop(key, None)
        env["PYTHONUNBUFFERED"] = "1"
        env["TMPDIR"] = os.path.join(self.tmp, name + "-tmp")  # the runs' working dirs
        env["XDG_STATE_HOME"] = os.path.join(self.tmp, name + "-xdg-state")
        os.makedirs(env["TMPDIR"])
        with open(log_path, "wb") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=self.tmp, env=env,
                                    start_new_session=True)

    def start_agent(self):
        started = time.monotonic()
        self.agent = self.spawn_agent(self.fake, "agent", self.agent_log)
        # Watch from the start: zombies of the first runs count too.
        self.watch = ZombieWatch(self.agent.pid)
        self.watch.start()
        deadline = started + STARTUP_WAIT
        while not self.fake.first_poll.wait(0.05):
            if self.agent.poll() is not None:
                raise Abort("agent.py exited with %s before its first poll"
                            % self.agent.returncode)
            if time.monotonic() > deadline:
                raise Abort("agent.py did not poll within %.0f s" % STARTUP_WAIT)
        self.first_poll = self.fake.polls_copy()[0][0]
        self.figures["startup_s"] = self.first_poll - started

    def command(self):
        script = 'echo "$PREFECT__FLOW_RUN_ID $EPOCHREALTIME" >> %s' % shlex.quote(self.markers)
        return "bash -c %s" % shlex.quote(script)

    def add_runs(self, whens):
        """Add one run per scheduled time (None = now); all under the fake's lock, so a poll
        sees either none of them or all of them. Returns (run ids, monotonic, epoch) of the
        moment they became visible."""
        job_variables = {"command": self.command()}
        with self.fake._lock:  # an RLock: add_run takes it again inside
            ids = [self.fake.add_run(self.deployment, pool=POOL, when=when,
                                     job_variables=job_variables) for when in whens]
            visible, visible_epoch = time.monotonic(), time.time()
        return ids, visible, visible_epoch

    # -- measurements ------------------------------------------------------------------------
    def idle(self):
        time.sleep(max(0.0, self.first_poll + IDLE_SECONDS - time.monotonic()))
        self.alive("the idle wait")
        self.figures["idle_rss_kib"] = proc_status_kib(self.agent.pid, "VmRSS")

    def dispatch(self):
        ids, visible, _ = self.add_runs([None] * DISPATCH_RUNS)
        wanted = set(ids)
        deadline = time.monotonic() + DISPATCH_WAIT
        started = {}
        while time.monotonic() < deadline:
            started = dict((k, v) for k, v in read_markers(self.markers).items() if k in wanted)
            if len(started) == len(wanted):
                break
            self.alive("dispatch")
            time.sleep(0.05)
        self.figures["dispatch_runs"] = len(wanted)
        self.figures["dispatch_started"] = len(started)
        # The clock starts at the answer to the first poll that carried the runs: the wait for
        # the next poll (up to --poll-interval) is the interval's doing, not dispatch speed.
        carried = [p for p in self.fake.polls_copy() if p[1] >= visible and p[3] > 0]
        if not carried:
            self.figures["dispatch_s"] = None
            return
        poll = carried[0]
        self.figures["dispatch_poll_runs"] = poll[3]
        self.figures["dispatch_poll_wait_s"] = poll[1] - visible
        self.figures["dispatch_s"] = (max(started.values()) - poll[2]
                                      if len(started) == len(wanted) else None)

    def punctuality(self):
        now = datetime.datetime.now(UTC)
        offsets = [PUNCTUAL_LEAD + i * PUNCTUAL_STEP for i in range(PUNCTUAL_RUNS)]
        whens = [now + datetime.timedelta(seconds=s) for s in offsets]
        ids, _, _ = self.add_runs(whens)
        due = dict((run_id, when.timestamp()) for run_id, when in zip(ids, whens))
        deadline = time.monotonic() + offsets[-1] + PUNCTUAL_WAIT
        started = {}
        while time.monotonic() < deadline:
            started = dict((k, v) for k, v in read_markers(self.markers).items() if k in due)
            if len(started) == len(due):
                break
            self.alive("the punctuality runs")
            time.sleep(0.05)
        late = sorted(started[k] - due[k] for k in started)
        self.figures["punctual_runs"] = len(due)
        self.figures["punctual_started"] = len(started)
        self.figures["punctual_offsets_s"] = late
        complete = len(started) == len(due)
        self.figures["punctual_median_s"] = statistics.median(late) if complete else None
        self.figures["punctual_p95_s"] = p95(late) if complete else None
        self.figures["punctual_min_s"] = late[0] if complete else None

    def settle(self):
        # The last children exited moments ago: give the reaper (0.25 s tick) and the zombie
        # watch (two samples >= 1 s apart) time to see them, then read the peak.
        time.sleep(ZOMBIE_MIN_AGE + 2 * ZOMBIE_SAMPLE_SECONDS + 0.3)
        self.alive("the final wait")
        self.watch.stop()
        self.figures["zombies"] = len(self.watch.counted)
        self.figures["zombies_max_at_once"] = self.watch.max_at_once
        self.figures["zombie_samples"] = self.watch.samples
        self.figures["peak_rss_kib"] = proc_status_kib(self.agent.pid, "VmHWM")

    def journal(self):
        """ms per journaled exit with JOURNAL_HELD runs in the journal, written in the format
        every agent.py reads (one JSON object)."""
        spec = importlib.util.spec_from_file_location("agent_under_test", self.args.agent)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        summary = {"id": "x" * 36, "name": "quick-run", "deployment_id": "y" * 36,
                   "flow_id": "z" * 36, "job_variables": {}, "scheduled_time": "2026-01-01"}
        for held in JOURNAL_HELD:
            directory = tempfile.mkdtemp(dir=self.tmp)
            runs = {"run-%d" % n: {"phase": "running", "pid": n, "run": summary}
                    for n in range(held)}
            with open(os.path.join(directory, "journal-%s-0.json" % POOL), "w") as handle:
                json.dump({"runs": runs, "logs": []}, handle)
            journal = module.Journal(directory, POOL)
            began = time.perf_counter()
            for n in range(JOURNAL_EXITS):
                journal.update("run-%d" % n, phase="exited",
                               owed={"kind": "crash", "message": "m" * 300})
            self.figures["journal_ms_%d" % held] = (time.perf_counter() - began) * 1000 / JOURNAL_EXITS
            journal.close()

    def stop_agent(self):
        self.agent.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            self.figures["exit_code"] = self.agent.wait(STOP_WAIT)
            self.figures["stop_s"] = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            self.figures["exit_code"] = None
            self.figures["stop_s"] = None

    def claims_over_latency(self):
        """A second agent and fake: LATENCY_RUNS runs waiting behind LATENCY_S a request."""
        fake = LatencyFake()
        fake.start()
        agent = None
        try:
            fake.add_pool(POOL, base_job_template=PROCESS_POOL_TEMPLATE)
            deployment = fake.add_deployment(fake.add_flow("latency-flow"), "latency",
                                             work_pool_name=POOL, work_queue_name="default")
            for _ in range(LATENCY_RUNS):
                fake.add_run(deployment, pool=POOL, job_variables={"command": self.command()})
            agent = self.spawn_agent(fake, "latency", self.agent_log + ".latency")
            deadline = time.monotonic() + LATENCY_WAIT
            while len(fake.claims) < LATENCY_RUNS and time.monotonic() < deadline:
                if agent.poll() is not None:
                    raise Abort("agent.py exited with %s during the latency case"
                                % agent.returncode)
                time.sleep(0.05)
            carried = [p for p in fake.polls_copy() if p[3] > 0]
            self.figures["latency_claimed"] = len(fake.claims)
            self.figures["latency_claims_s"] = (
                fake.claims[-1] - carried[0][1]
                if carried and len(fake.claims) >= LATENCY_RUNS else None)
        finally:
            if agent is not None and agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(5)
            fake.stop()
        self.fake.errors.extend(fake.errors)

    def alive(self, during):
        if self.agent.poll() is not None:
            raise Abort("agent.py exited with %s during %s" % (self.agent.returncode, during))

    # -- report ----------------------------------------------------------------------------
    def build_checks(self):
        f = self.figures
        mib = lambda kib: None if kib is None else kib / 1024.0
        self.check("start-up to first poll", f.get("startup_s"), LIMIT_STARTUP_S, unit=" s")
        self.check("idle RSS", mib(f.get("idle_rss_kib")), LIMIT_IDLE_RSS_MB, "%.1f", " MB")
        self.check("dispatch %d runs (to %d started)" % (DISPATCH_RUNS, f.get(
            "dispatch_started", 0)), f.get("dispatch_s"), LIMIT_DISPATCH_S, unit=" s")
        self.check("punctuality median", f.get("punctual_median_s"), None, "%+.3f", " s")
        self.check("punctuality p95 (of %d started)" % f.get("punctual_started", 0),
                   f.get("punctual_p95_s"), LIMIT_PUNCTUAL_P95_S, "%+.3f", " s")
        # agent.py holds a prefetched run until its scheduled time: none may start early.
        self.check("punctuality minimum (negative = early)", f.get("punctual_min_s"), 0.0,
                   "%+.3f", " s", at_least=True)
        if "zombies" not in f and self.watch is not None:  # aborted: what it saw until then
            f["zombies"] = len(self.watch.counted)
        self.check("zombies (Z for >= %g s)" % ZOMBIE_MIN_AGE, f.get("zombies"), LIMIT_ZOMBIES,
                   "%d")
        peak, idle = f.get("peak_rss_kib"), f.get("idle_rss_kib")
        self.check("peak RSS (VmHWM)", mib(peak), None, "%.1f", " MB")
        growth = None if peak is None or idle is None else peak - idle
        f["rss_growth_kib"] = growth
        self.check("RSS growth idle -> peak", mib(growth), LIMIT_RSS_GROWTH_MB, "%.1f", " MB")
        if "exit_code" in f:
            code = f["exit_code"]
            self.checks.append(("exit code after SIGTERM", "none within %g s" % STOP_WAIT
                                if code is None else "%d (%.2f s)" % (code, f["stop_s"]),
                                "0 within %g s" % STOP_WAIT, code == 0))
        else:
            self.checks.append(("exit code after SIGTERM", "not reached",
                                "0 within %g s" % STOP_WAIT, None))
        self.check("claim %d runs at %d ms a request (%d claimed)" % (
            LATENCY_RUNS, LATENCY_S * 1000, f.get("latency_claimed", 0)),
            f.get("latency_claims_s"), LIMIT_LATENCY_CLAIMS_S, unit=" s")
        self.check("fake-side errors", len(self.fake.errors), 0, "%d")
        few, many = (f.get("journal_ms_%d" % held) for held in JOURNAL_HELD)
        for held, value in zip(JOURNAL_HELD, (few, many)):
            self.check("journal: ms per exit, holding %d runs" % held, value, None, "%.2f", " ms")
        self.check("journal: cost holding %d / holding %d" % (JOURNAL_HELD[1], JOURNAL_HELD[0]),
                   many / few if few and many else None, LIMIT_JOURNAL_GROWTH, "%.1f", "x")
        if self.aborted:
            self.checks.append(("benchmark completed", self.aborted, "yes", False))

    def report(self):
        width = max(len(c[0]) for c in self.checks)
        vwidth = max(len(c[1]) for c in self.checks)
        lwidth = max(len(c[2]) for c in self.checks)
        print("%-*s  %*s  %-*s  %s" % (width, "figure", vwidth, "value", lwidth, "gross limit",
                                        "ok?"))
        for name, value, limit, ok in self.checks:
            print("%-*s  %*s  %-*s  %s" % (width, name, vwidth, value, lwidth, limit,
                                            "ok" if ok else "FAIL" if ok is False else
                                            "skip" if value == "not reached" else "info"))
        failed = [c for c in self.checks if c[3] is False]
        for name, value, limit, _ in failed:
            sys.stderr.write("quick.py: FAIL %s: %s, limit %s\n" % (name, value, limit))
        if self.fake.errors:
            sys.stderr.write("first fake-side error:\n%s\n" % self.fake.errors[0])
        return failed

    def log_tail(self, n):
        try:
            with open(self.agent_log, errors="replace") as handle:
                return "".join(handle.readlines()[-n:])
        except OSError:
            return "(no log)\n"

    def cleanup(self):
        """Nothing outlives the benchmark: SIGKILL the agent's process group (it leads its own
        session) if it still runs. The runs' children are trivial and exit by themselves."""
        if self.watch is not None:
            self.watch.stop()
        if self.agent is not None and self.agent.poll() is None:
            try:
                os.killpg(self.agent.pid, signal.SIGKILL)
            except OSError:
                pass
            self.agent.wait(5)
        self.fake.stop()


class Abort(Exception):
    """The agent cannot be measured any further (it died or never polled)."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", default=AGENT_PY, help="agent.py to run (default: the repo's)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (agent log, markers) even when every check passes")
    args = parser.parse_args(argv)
    began = time.monotonic()
    quick = Quick(args)
    try:
        quick.start_fake()
        quick.start_agent()
        quick.idle()
        quick.dispatch()
        quick.punctuality()
        quick.settle()
        quick.stop_agent()
        quick.journal()
        quick.claims_over_latency()
    except Abort as exc:
        quick.aborted = str(exc)
    finally:
        quick.cleanup()
    quick.build_checks()
    failed = quick.report()
    quick.figures["seconds"] = time.monotonic() - began
    quick.figures["checks"] = [{"name": c[0], "value": c[1], "limit": c[2], "ok": c[3]}
                               for c in quick.checks]
    print("%d check(s) failed; %.1f s; agent %s" % (len(failed), quick.figures["seconds"],
                                                   args.agent))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(quick.figures, handle, indent=1, sort_keys=True)
            handle.write("\n")
    if failed or args.keep:
        if failed:
            sys.stderr.write("agent log tail (%s):\n%s" % (quick.agent_log, quick.log_tail(15)))
        print("kept %s" % quick.tmp)
    else:
        shutil.rmtree(quick.tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
