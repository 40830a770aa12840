#!/usr/bin/env python3
"""Side by side: bench/quick.py's figures for agent.py at a git revision and for the working
tree's agent.py, measured in alternation in one run, so that a change can be said to cost
nothing (or what it costs) in start-up, memory and dispatch.

    python bench/quick_compare.py [--base REV] [--pairs N]

Runs quick.py N times for each agent.py (default 5), alternating, and prints each figure's
median for both with the change in percent. Alternation spreads the machine's own drift
(other jobs, a warming disk cache) over both. A figure is flagged when the working tree's
median is more than 10 % worse than the base's: quick.py's single runs differ by about
that much. Exit status 1 if a quick.py run fails or a figure is flagged, else 0.
Stdlib only, CPython 3.8+; the working tree's test_agent.py provides the fake API for both.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "bench", "quick.py")
#: (quick.py's figure, what it is, unit, whether more is worse)
FIGURES = (
    ("startup_s", "start-up to first poll", "s", True),
    ("idle_rss_kib", "idle RSS", "KiB", True),
    ("peak_rss_kib", "peak RSS", "KiB", True),
    ("dispatch_s", "dispatch of 200 runs", "s", True),
    ("latency_claims_s", "200 claims at 50 ms a request", "s", True),
    ("punctual_p95_s", "punctuality p95", "s", True),
)
WORSE_BY = 0.10


def quick(agent_path, json_path):
    result = subprocess.run([sys.executable, QUICK, "--agent", agent_path, "--json", json_path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:])
        raise SystemExit("quick.py failed for %s" % agent_path)
    with open(json_path) as handle:
        return json.load(handle)


def main():
    flags = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flags.add_argument("--base", default="HEAD", help="git revision to compare with")
    flags.add_argument("--pairs", type=int, default=5, help="runs of each (default 5)")
    args = flags.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentpy-quick-compare-") as tmp:
        base = os.path.join(tmp, "agent-base.py")
        with open(base, "wb") as handle:
            handle.write(subprocess.check_output(["git", "show", "%s:agent.py" % args.base],
                                                 cwd=REPO))
        runs = {"base": [], "tree": []}
        for number in range(args.pairs):
            for name, path in (("base", base), ("tree", os.path.join(REPO, "agent.py"))):
                runs[name].append(quick(path, os.path.join(tmp, "%s-%d.json" % (name, number))))
            print("pair %d of %d measured" % (number + 1, args.pairs), flush=True)
    print("\n%-32s %12s %12s %8s" % ("median of %d runs" % args.pairs, args.base[:12],
                                     "working tree", "change"))
    flagged = []
    for key, what, unit, more_is_worse in FIGURES:
        base_median = statistics.median(run[key] for run in runs["base"])
        tree_median = statistics.median(run[key] for run in runs["tree"])
        change = (tree_median - base_median) / base_median if base_median else 0.0
        worse = change > WORSE_BY if more_is_worse else change < -WORSE_BY
        number = "%9.0f %-3s" if unit == "KiB" else "%9.3f %-3s"
        print(("%-32s " + number + " " + number + " %+7.1f%%%s") % (
            what, base_median, unit, tree_median, unit, 100 * change, "  WORSE" if worse else ""))
        if worse:
            flagged.append(what)
    print("\n%s" % ("no figure is more than %d %% worse" % (100 * WORSE_BY) if not flagged
                    else "worse by more than %d %%: %s" % (100 * WORSE_BY, ", ".join(flagged))))
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
