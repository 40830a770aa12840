#!/usr/bin/env python3
"""The version matrix: agent.py's conformance cases against a real Prefect server of each line
users still run, the oldest and the newest included, one after another.

    python bench/versions.py [--only 3.0.11,2.10.21] [--short] [--write]

Per version: a virtual environment with that prefect and the pins its server needs to start
with today's package registry (kept in $AGENTPY_CI_CACHE/versions, default
/tmp/agentpy-ci/versions, and reused), a server on a free loopback port (SQLite, a PREFECT_HOME
of its own, removed afterwards), and test_agent.py's conformance tests of each case run against
it, with that environment's Python as the flow's (a flow runs with the server's prefect). Prints
a table, version by case; --write puts it in the README between its versions markers. --short
runs the first four cases (.ci/run's form). Exit 0 only when every cell passed.

Stdlib only. The first run installs eleven versions of prefect (a few minutes each).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

from compare import BenchError, ensure_venv, start_server, stop_group  # noqa: E402

REPO = os.path.dirname(BENCH)
README = os.path.join(REPO, "README.md")
START, END = "<!-- versions:start -->", "<!-- versions:end -->"

#: version -> what its server needs, installed after prefect (FastAPI 0.139 and newer reject
#: 3.0-3.8's Body(min_items=...); asked for with prefect at once, pip finds a conflict).
VERSIONS = {
    "3.9.1": [],
    "3.8.8": ["fastapi==0.128.0"],
    "3.6.29": ["fastapi==0.128.0"],
    "3.4.25": ["fastapi==0.128.0", "importlib_metadata"],
    "3.2.15": ["fastapi==0.128.0", "importlib_metadata"],
    "3.0.11": ["fastapi==0.128.0", "pydantic<2.10"],
    "2.20.27": [],
    "2.19.9": ["pydantic<2.10"],
    "2.16.9": ["pydantic<2.10", "griffe<1"],
    "2.14.16": ["griffe<1"],
    "2.10.21": ["griffe<1", "anyio<4", "cachetools"],
}
#: (column, test of RealServerConformance, or of Prefect2ServerConformance only)
CASES = [
    ("real flow", "test_real_flow_completes"),
    ("crash, exit 3", "test_nonzero_exit_reports_crashed"),
    ("cancel", "test_cancelling_a_real_flow_run_ends_it_cancelled"),
    ("kill -9, restart", "test_kill_9_and_restart_every_run_ends_final_and_none_runs_twice"),
    ("2 agents, 50 runs", "test_two_agents_fifty_runs_each_started_once"),
    ("worker online", "test_worker_heartbeat_online"),
    ("-q, Process block", "test_block_process_runs_its_command_as_argv_with_its_env_working_dir_and_overrides"),
]
SHORT_CASES = 4
#: (version prefix, column) -> what a cell says instead of pass, and why
LIMITS = {
    ("2.10.", "worker online"): "n/a: 2.10's worker rows have no status",
    ("3.", "-q, Process block"): "n/a: Prefect 2 only",
}


def log(text):
    print("[versions %s] %s" % (time.strftime("%H:%M:%S"), text), flush=True)


def run_cases(version, python, api, cases):
    """{column: "pass" or "FAIL"} of test_agent.py's tests of `cases` against the server."""
    major = version.split(".")[0]
    cls = "Prefect2ServerConformance" if major == "2" else "RealServerConformance"
    suffix = "2" if major == "2" else ""
    env = dict(os.environ, AGENT_TEST_REQUIRE_REAL="1", **{
        "AGENT_TEST_PREFECT%s_API" % suffix: api, "AGENT_TEST_FLOW_PYTHON%s" % suffix: python})
    wanted = {test: column for column, test in cases if limit(version, column) is None}
    done = subprocess.run([sys.executable, os.path.join(REPO, "test_agent.py"), "-v", "-j", "2"] +
                          ["test_agent.%s.%s" % (cls, test) for test in wanted],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    text = done.stdout.decode("utf-8", "replace")
    cells = {}
    for line in text.splitlines():
        found = re.match(r"(test_\w+) \(.*\) \.\.\. (.*)$", line)
        if found and found.group(1) in wanted:
            cells[wanted[found.group(1)]] = "pass" if found.group(2) == "ok" else "FAIL"
    if any(cell != "pass" for cell in cells.values()) or len(cells) < len(wanted):
        print(text[-6000:])
    return cells


def limit(version, column):
    for (prefix, limited_column), text in LIMITS.items():
        if version.startswith(prefix) and column == limited_column:
            return text
    return None


def table(rows, cases):
    lines = ["| Prefect server | " + " | ".join(column for column, _ in cases) + " |",
             "|---" * (len(cases) + 1) + "|"]
    for version, cells in rows:
        lines.append("| %s | %s |" % (version, " | ".join(
            limit(version, column) or cells.get(column, "not run") for column, _ in cases)))
    return "\n".join(lines)


def write_readme(text):
    with open(README) as handle:
        readme = handle.read()
    before, start, rest = readme.partition(START)
    _, end, after = rest.partition(END)
    if not (start and end):
        raise SystemExit("README.md has no %s ... %s markers" % (START, END))
    with open(README, "w") as handle:
        handle.write(before + START + "\n" + text + "\n" + END + after)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated versions (default: all of VERSIONS)")
    parser.add_argument("--short", action="store_true", help="the first %d cases" % SHORT_CASES)
    parser.add_argument("--write", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    versions = args.only.split(",") if args.only else list(VERSIONS)
    unknown = [v for v in versions if v not in VERSIONS]
    if unknown:
        parser.error("no recipe for %s (known: %s)" % (", ".join(unknown), ", ".join(VERSIONS)))
    cases = CASES[:SHORT_CASES] if args.short else CASES
    cache = os.path.join(os.environ.get("AGENTPY_CI_CACHE") or os.path.join(
        os.environ.get("TMPDIR") or "/tmp", "agentpy-ci"), "versions")
    rows = []
    started = time.monotonic()
    for version in versions:
        began = time.monotonic()
        venv = os.path.join(cache, "venv-prefect-" + version)
        tmp = tempfile.mkdtemp(prefix="agentpy-versions-")
        server = None
        try:
            ensure_venv(venv, sys.executable, version, VERSIONS[version])
            server, api = start_server(venv, tmp)
            log("prefect %s at %s: running %d cases" % (version, api, len(cases)))
            cells = run_cases(version, os.path.join(venv, "bin", "python"), api, cases)
        except BenchError as exc:
            log("prefect %s: %s" % (version, exc))
            cells = {}
        finally:
            stop_group(server, 30)
            shutil.rmtree(tmp, ignore_errors=True)
        log("prefect %s: %s (%.1f min)" % (version, cells, (time.monotonic() - began) / 60))
        rows.append((version, cells))
    text = table(rows, cases)
    print(text)
    print("%d servers in %.1f minutes" % (len(rows), (time.monotonic() - started) / 60))
    if args.write:
        write_readme(text)
    passed = all(limit(v, c) or cells.get(c) == "pass" for v, cells in rows for c, _ in cases)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
