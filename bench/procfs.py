"""What the benchmarks read about processes from /proc (Linux), shared by compare.py, quick.py
and soak.py. Every reader answers None (or an empty value) for a process that is gone."""

import os
import threading
import time

#: A child is Z for a moment between its exit and its reaping (the agent's reaper ticks every
#: 0.25 s); it counts as a zombie once seen Z in samples at least ZOMBIE_MIN_AGE apart.
ZOMBIE_SAMPLE_SECONDS = 0.2
ZOMBIE_MIN_AGE = 1.0


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_stat(pid):
    """(state, ppid, pgid) of a process."""
    fields = stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[1]), int(fields[2]))


def proc_status_kib(pid, key):
    """A 'kB' field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def all_pids():
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def zombie_children(parent):
    """{(pid, start time in ticks)} of `parent`'s children in state Z. The start time tells
    a reused pid from the zombie that had it before."""
    found = set()
    for pid in all_pids():
        fields = stat_fields(pid)  # None: gone between listing and reading
        if fields and fields[0] == "Z" and int(fields[1]) == parent:
            found.add((pid, int(fields[19])))
    return found


class ZombieWatch(threading.Thread):
    """Samples a process's zombie children every ZOMBIE_SAMPLE_SECONDS. A child is counted
    once it has been seen Z in two samples at least ZOMBIE_MIN_AGE apart: a child that
    exited a moment ago and waits for the agent's next reap is not a leak."""

    def __init__(self, pid):
        threading.Thread.__init__(self, name="zombie-watch", daemon=True)
        self.pid = pid
        self.first_seen = {}  # (pid, start) -> monotonic of the first sample that saw it Z
        self.counted = set()
        self.max_at_once = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(ZOMBIE_SAMPLE_SECONDS):
            self.sample()

    def sample(self):
        now = time.monotonic()
        found = zombie_children(self.pid)
        self.samples += 1
        self.max_at_once = max(self.max_at_once, len(found))
        for key in found:
            if now - self.first_seen.setdefault(key, now) >= ZOMBIE_MIN_AGE:
                self.counted.add(key)
        for key in list(self.first_seen):
            if key not in found:
                del self.first_seen[key]

    def stop(self):
        self._stop_event.set()
        self.join(5)
