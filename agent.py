#!/usr/bin/env python3
"""agent.py: run Prefect flow runs from a work pool, with nothing but the standard library.

A drop-in for `prefect worker start` with a `process` or a `docker` work pool, on hosts where
Prefect itself cannot be installed next to the agent: copy this one file, run
`python agent.py --pool NAME`. It polls the Prefect API for scheduled runs, claims each one
(the server lets exactly one claimant win), starts it as a local process or, in a docker
pool, as a container through the docker CLI, streams and watches it, and reports how it ended.

Requires CPython 3.8 or newer on a POSIX host. Flow runs themselves need `prefect` installed in
the Python (or the image) that runs them (see --python), not in the one that runs this file.

Map. After the log and small helpers that every part uses, the sections in the order data
flows:
  Configuration         flags, environment and settings files, checked once: FLAGS,
                        parse_flags, read_settings, Config
  API client            the only code that knows the API's paths: HTTPConnection, PrefectAPI
  Job configuration     pure functions: job variables and base job template -> Job
  Launchers             Job -> a watched Child: ProcessLauncher, DockerLauncher (LAUNCHERS)
  Supervision           Supervisor: output, exits, signals, the cancellation notice
  Ledger and reporting  Journal (on disk), RunLedger (each run's story), Reporter (delivery)
  The agent loop        Agent: poll, claim (Dispatcher), make jobs (JobBuilder), start them
                        on time (Timetable), recover after a restart
  Health server         GET /api/health, and GET /health and GET /metrics where asked for
  Command line          main, start_agent, install
Threads: "main" parses and starts, then waits for the others; "agent" runs Agent.run;
"dispatch-N" claim a poll's runs together; "timetable" starts runs; "supervisor" watches
them and passes on signals, and "console" prints their output; "reporter-N" deliver reports; "health" answers
probes; "docker-recovery_N" ask the docker daemon about the runs a restart finds. Each class
says which of them call it.

Start-up time is measured against Prefect's worker, so modules that only some paths need
(subprocess, tempfile, shutil, copy, ssl, textwrap, traceback, email) are imported where
they are used, and a few stdlib modules are replaced by a few lines here (each says which).
"""

import binascii
import collections
import datetime
import errno
import fcntl
import heapq
import json
import os
import re
import select
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.parse

__version__ = "0.1.0"
__license__ = "Apache-2.0"

###############################################################################
# Log and helpers #############################################################
###############################################################################

#: Log levels: the logging module's numbers, which Prefect's run logs take too.
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40


class Log:
    """The agent's own log: one line per event on stderr, `HH:MM:SS.mmm | LEVEL | agent | text`.

    Not the logging module: it and the traceback module it imports are 4 ms of start-up,
    and a script's log needs none of its configuration. Until start_agent() lowers the level
    to INFO, only warnings and errors are written, as logging's last-resort handler did.
    Every thread logs; `_lock` keeps each line whole. Signal handlers do not log (they only
    note the signal: install_signal_handlers), so it need not be reentrant."""

    NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}

    def __init__(self):
        self.level = WARNING
        self._lock = threading.Lock()

    def debug(self, message, *args):
        self.log(DEBUG, message, *args)

    def info(self, message, *args):
        self.log(INFO, message, *args)

    def warning(self, message, *args):
        self.log(WARNING, message, *args)

    def error(self, message, *args):
        self.log(ERROR, message, *args)

    def exception(self, message, *args):
        """An error, with the traceback of the exception being handled."""
        self.log(ERROR, message, *args, with_traceback=True)

    def log(self, level, message, *args, with_traceback=False):
        if level < self.level:
            return
        try:
            text = message % args if args else message
        except (TypeError, ValueError):  # a bad format must not cost the line
            text = "%s %r" % (message, args)
        text = escape_controls(text)
        if with_traceback:
            handled = sys.exc_info()[1]
            try:
                import traceback
                # Indented: an exception's message may hold newlines (from a server, say),
                # and no line after the first may start the way a log line of its own does.
                text += "".join("\n  " + escape_controls(line)
                                for line in traceback.format_exc().rstrip().split("\n"))
            except Exception:  # out of descriptors, say: the import fails, the line must not
                text += escape_controls(": %r (no traceback: the traceback module cannot be "
                                        "loaded)" % (handled,))
        self.emit(level, text)

    def emit(self, level, text):
        now = time.time()
        line = "%s.%03d | %-7s | agent | %s\n" % (
            time.strftime("%H:%M:%S", time.localtime(now)), now % 1 * 1000,
            self.NAMES.get(level, level), text)
        with self._lock:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):  # stderr closed or None: carry on
                pass


log = Log()

#: What escape_controls shows as escapes: C0 and DEL, C1 (some terminals act on U+009B as
#: on ESC [), the line and paragraph separators that some log viewers break lines at, and
#: the bidirectional controls that make a line display other than it reads.
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text):
    """`text` safe to write on a line of the operator's log or terminal: every one of the
    CONTROL_CHARACTERS shown as an escape (\\n, \\x1b, \\u202e), so that text from a server
    or a deployment can neither forge a log line nor drive the terminal. A backslash stays
    as it is: it can do neither, and doubling it would garble every path and pattern."""
    if text.isprintable():  # the usual case, decided in C
        return text
    return re.sub(CONTROL_CHARACTERS, _escape_control, text)


def _escape_control(match):
    char = match.group()
    return NAMED_ESCAPES.get(char) or (
        "\\x%02x" % ord(char) if ord(char) < 0x100 else "\\u%04x" % ord(char))


#: errno values that mean no file descriptor is left: for the agent (EMFILE), the host (ENFILE).
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class DescriptorShortage:
    """Says once that the agent has run out of file descriptors, however many opens, accepts,
    pipes and sockets fail meanwhile: one line per episode, which ends once QUIET_SECONDS
    pass without such a failure. Whoever fails carries on and tries again later. Every
    thread calls it."""

    QUIET_SECONDS = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._last_failure = None

    def noted(self, what, exc):
        """Whether `exc` is a shortage of descriptors; the first of an episode is logged."""
        if getattr(exc, "errno", None) not in OUT_OF_DESCRIPTORS:
            return False
        with self._lock:
            now, last = time.monotonic(), self._last_failure
            self._last_failure = now
        if last is None or now - last >= self.QUIET_SECONDS:
            log.error("out of file descriptors: %s failed (%s); the agent carries on, tries "
                      "again, and says no more of it until %.0f s pass without such a failure "
                      "(raise the limit, ulimit -n, if it recurs)", what, exc.strerror or exc,
                      self.QUIET_SECONDS)
        return True


descriptor_shortage = DescriptorShortage()


class Metrics:
    """What GET /metrics counts (Prometheus text format), since the agent started. Every
    thread counts; `_lock` guards the counts."""

    #: name -> help text, in the order served. Counters end in _total.
    COUNTERS = {
        "agentpy_runs_claimed_total": "Flow runs this agent claimed.",
        "agentpy_claims_lost_total": "Claims the server gave to another agent, or that did "
                                     "not land.",
        "agentpy_runs_started_total": "Flow runs whose process or container was started.",
        "agentpy_runs_finished_total": "Flow runs whose end the agent reported or saw, by the "
                                       "state they ended in.",
        "agentpy_cancellations_total": "Cancellations the agent acted on.",
        "agentpy_api_requests_total": "Requests to the Prefect API, by outcome: ok, retried "
                                      "(a failed attempt tried again), refused (4xx, or an "
                                      "answer not used), unreachable (given up).",
        "agentpy_journal_write_failures_total": "Journal writes that failed (a full disk, say).",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}  # (name, label text) -> count

    def count(self, name, label=""):
        """Count one of `name`; `label` is its label set as text, '{state="COMPLETED"}'."""
        with self._lock:
            self._counts[name, label] = self._counts.get((name, label), 0) + 1

    def text(self, gauges):
        """The counters, then `gauges` ((name, help, value) each), as Prometheus reads them."""
        with self._lock:
            counts = dict(self._counts)
        lines = []
        for name, text in self.COUNTERS.items():
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s counter" % name]
            mine = sorted((label, value) for (counted, label), value in counts.items()
                          if counted == name)
            lines += ["%s%s %d" % (name, label, value) for label, value in mine or [("", 0)]]
        for name, text, value in gauges:
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s gauge" % name,
                      "%s %s" % (name, "NaN" if value is None else repr(float(value)))]
        return "\n".join(lines) + "\n"


metrics = Metrics()


def state_label(state_type):
    """A run's state type as a Prometheus label set (escaped: the server names it)."""
    text = str(state_type).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '{state="%s"}' % text

def _wait_readable(items, timeout):
    """The items (fds or sockets) that are readable, closed or failed, waiting up to `timeout`
    seconds (None: until one is). poll, not select: with hundreds of runs, descriptors pass
    select's limit of 1024."""
    poller = select.poll()
    for item in items:
        poller.register(item, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
    return [item for item in items if (item if isinstance(item, int) else item.fileno()) in ready]


def jitter(low, high):
    """A random number between low and high, for spreading retries and polls. The random
    module would do, but seeding its generator at import is 1 ms of start-up."""
    return low + (high - low) * int.from_bytes(os.urandom(7), "big") / 2.0 ** 56


def random_uuid():
    """A random (version 4) UUID as text. The uuid module would do, but it imports platform:
    3 ms of start-up."""
    value = bytearray(os.urandom(16))
    value[6] = value[6] & 0x0F | 0x40
    value[8] = value[8] & 0x3F | 0x80
    text = value.hex()
    return "%s-%s-%s-%s-%s" % (text[:8], text[8:12], text[12:16], text[16:20], text[20:])


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


_TIMESTAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                        r"(Z|[+-]\d\d:?\d\d)?$")


def parse_timestamp(text):
    """An API timestamp (ISO 8601, UTC when it names no zone) as a time.time() value, or None.
    Python 3.8's fromisoformat takes neither "Z" nor every length of fraction."""
    match = _TIMESTAMP.match(text.strip()) if isinstance(text, str) else None
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute),
                                   int(second), tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None
    if zone and zone != "Z":
        digits = zone[1:].replace(":", "")
        moment -= (-1 if zone[0] == "-" else 1) * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return moment + (float("0." + fraction) if fraction else 0.0)


def isoformat(moment):
    return moment.isoformat()


def _one_line(value, limit):
    """`value` as text on one line (a log line is one line, whatever a server sent)."""
    return " ".join(str(value).split())[:limit]


def _obj(value):
    """`value` when it is a JSON object, else an empty one: server data is never trusted to
    have the shape the protocol promises."""
    return value if isinstance(value, dict) else {}


def open_private(path, flags):
    """os.open for a file only its owner may read: made 0600 whatever the umask, and made
    0600 again if an earlier agent left it looser. Never through a symlink: in a directory
    others can write, one could point the agent (often root) at any file."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o7777 != 0o600:
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def make_private_dir(path):
    """Make the directory `path`, and any parent missing, 0700 whatever the umask (as XDG
    asks of a state directory); True if it was made, False if it was there already."""
    path = os.path.abspath(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    except FileNotFoundError:
        if os.path.dirname(path) == path:
            raise
        make_private_dir(os.path.dirname(path))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # another agent made it meanwhile
            return False
    os.chmod(path, 0o700)  # mkdir's mode went through the umask
    return True


def _remove(path):
    if path:
        import shutil
        shutil.rmtree(path, ignore_errors=True)


###############################################################################
# Configuration ###############################################################
###############################################################################

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
#: Where Prefect's worker serves its health check (PREFECT_WORKER_WEBSERVER_HOST/PORT; 3.8.8).
DEFAULT_WORKER_WEBSERVER = ("0.0.0.0", 8080)
#: The pool of `prefect agent start -q QUEUE` without a pool (Prefect 2.20: its agent's queues
#: live in this pool, of type prefect-agent).
DEFAULT_AGENT_POOL = "default-agent-pool"
#: Seconds between polls and of prefetch: Prefect's agent defaults (PREFECT_AGENT_*).
DEFAULT_POLL_SECONDS = 15.0
DEFAULT_PREFETCH_SECONDS = 15.0
#: How often the worker heartbeat, pool re-read and --match re-resolution run, unless
#: PREFECT_WORKER_HEARTBEAT_SECONDS says (Prefect 3.8.8's default is the same); and how long
#: a deployment or block read stays cached.
SYNC_SECONDS = 30.0
#: A sync that falls due between polls waits up to this (and one heartbeat interval at most)
#: for the next poll, to share its wake-up and connection: an idle agent's cost is mostly its
#: wake-ups. A heartbeat then comes within two intervals, inside the three after which the
#: server marks a worker offline.
SYNC_WAITS_FOR_POLL_SECONDS = 15.0
#: Missed polls after which the health check reports the agent unhealthy.
UNHEALTHY_AFTER_POLLS = 3
#: Default seconds between SIGTERM and SIGKILL for a cancelled run (Prefect's too).
DEFAULT_CANCEL_GRACE_SECONDS = 30.0
#: Seconds between SIGTERM and SIGKILL when the agent itself is told to stop now.
STOP_GRACE_SECONDS = 5.0
#: How long an exiting agent keeps trying to deliver owed reports (the journal keeps the rest).
REPORT_FLUSH_SECONDS = 10.0
#: How long an exiting agent waits for the supervisor to finish the tick it is in: the exits
#: it handles there are journaled, and the journal closes after it.
SUPERVISOR_JOIN_SECONDS = 10.0
#: Seconds before a start that found no file descriptor free is tried again.
START_RETRY_SECONDS = 1.0
#: The Prefect server versions (major, minor) agent.py is tested against, oldest and newest
#: of each line: the README's compatibility table, which bench/versions.py measures.
TESTED_SERVERS = (((2, 10), (2, 20)), ((3, 0), (3, 9)))


class UsageError(Exception):
    """A flag, environment variable or value the agent cannot start with."""


class Flags:
    """The command line as given (parse_flags): per flag, its text, the list of a repeatable
    flag's texts, or whether a switch was given; named after the long flag, "-" as "_"."""

    def __init__(self, **values):
        self.__dict__.update(values)


class Config:
    """What the agent runs with: the flags and the environment, checked once (parse_config)
    and read-only after, by every thread."""

    __slots__ = (
        "api_url",  # str: http(s) URL, no trailing slash
        "api_url_source",  # str: where it came from: "flag", "env", ..., "profile 'x'", "default"
        "api_key", "auth_string",  # str or None: secrets, sent as Bearer / Basic
        "api_ssl_cert_file",  # str (absolute path) or None: the CA bundle for an https API
        "tls_insecure_skip_verify",  # bool: an https API's certificate is not checked at all
        "pool",  # str
        "queues", "match",  # [str]: queue names and name prefixes, no repeats
        "limit",  # int >= 1, or None: no limit
        "prefetch_seconds", "poll_seconds", "cancel_grace_seconds",  # float
        "heartbeat_seconds", "request_timeout",  # float
        "drain_timeout",  # float, or None: wait for running flows without limit
        "run_once", "hide_welcome", "show_flow_logs", "keep_leftover_processes",  # bool
        "extra_env",  # {str: str}: set on every run
        "name",  # str: the worker name, without "/" or "%"
        "python",  # str: path of the Python that runs flows
        "health_address",  # (host, port) of GET /api/health, or None
        "worker_health_address",  # (host, port) of Prefect's worker GET /health, or None
        "pool_type",  # str (a key of LAUNCHERS), or None: --type, for a pool the agent creates
        "base_job_template",  # dict, or None: the type's, for a pool created by the agent
        "create_pool",  # bool: create the pool when it does not exist
        "install_policy",  # str, or None: accepted, and nothing installed
        "state_dir",  # str: where the journal lives
    )

    def __init__(self, **fields):
        missing = set(self.__slots__) - set(fields)
        if missing:
            raise TypeError("Config lacks %s" % ", ".join(sorted(missing)))
        for name, value in fields.items():
            setattr(self, name, value)  # an unknown name fails here: AttributeError


def _number(text, what, allow_zero=False):
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError("%s must be a number, got %r" % (what, text))
    low_ok = value >= 0 if allow_zero else value > 0  # also False for NaN
    if not low_ok or value == float("inf"):
        raise UsageError("%s must be %s, got %r"
                         % (what, "zero or more" if allow_zero else "a positive number", text))
    return value


def _number_setting(text, flag, settings, names, default, allow_zero=False):
    """The flag's number, else the first of the setting `names` that settings hold, else
    the default; a message that names where a wrong one came from."""
    what = flag
    if text is None:
        text, name, source = settings.find(*names)
        what = "%s (from %s)" % (name, source) if source else flag
        text = default if source is None else text
    return _number(text, what, allow_zero)


def _env_pair(text, environ):
    """--env KEY=VALUE, or KEY alone for the value KEY has in `environ` (as docker's -e
    KEY): a secret passed that way stays out of ps and of `install`'s command line."""
    key, sep, value = text.partition("=")
    if not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
        raise UsageError("--env expects KEY=VALUE or KEY, with KEY a variable name, got %r"
                         % text)
    if not sep:
        if key not in environ:
            raise UsageError("--env %s takes the value of %s from the environment, where it "
                             "is not set" % (key, key))
        value = environ[key]
    return key, value


def _http_address(text, what):
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
        raise UsageError("%s must look like http://HOST:PORT, got %r" % (what, text))
    return parsed.hostname, parsed.port


def _base_job_template(path):
    """The JSON object in the --base-job-template file, or None without the flag."""
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            template = json.loads(handle.read().decode("utf-8"))
    except OSError as exc:
        raise UsageError("cannot read --base-job-template %r: %s" % (path, exc.strerror or exc))
    except (ValueError, RecursionError) as exc:
        raise UsageError("--base-job-template %r is not JSON: %s" % (path, exc))
    if not isinstance(template, dict) or not isinstance(template.get("job_configuration"), dict):
        raise UsageError("--base-job-template %r is not a base job template: an object with a "
                         "job_configuration object" % path)
    return template


def _worker_webserver(settings):
    host = settings.get("PREFECT_WORKER_WEBSERVER_HOST") or DEFAULT_WORKER_WEBSERVER[0]
    port = settings.get("PREFECT_WORKER_WEBSERVER_PORT") or str(DEFAULT_WORKER_WEBSERVER[1])
    if not port.strip().isdigit() or not 0 < int(port) < 65536:
        raise UsageError("PREFECT_WORKER_WEBSERVER_PORT must be a port number, got %r" % port)
    return host.strip(), int(port)


def _api_url(text):
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError("--api / PREFECT_API_URL must be an http(s) URL, got %r" % redact_url(text))
    return text.rstrip("/")


def redact_url(url):
    """The URL with any user:password part removed, safe to log."""
    parsed = urllib.parse.urlsplit(url)
    if "@" not in parsed.netloc:
        return url
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))


#: The command-line flags: (names, metavar, repeatable, help); a flag without a metavar is a
#: switch. Its field in parse_flags' answer is its long name with "-" as "_".
FLAGS = (
    (("--api",), "URL", False,
     "Prefect API URL (default: $PREFECT_API_URL or %s)" % DEFAULT_API_URL),
    (("--key",), "KEY", False, "Prefect API key, sent as a Bearer token (default: "
     "$PREFECT_API_KEY); prefer --key-file or the variable, which ps cannot show"),
    (("--key-file",), "PATH", False, "read the API key from this file"),
    (("-p", "--pool"), "POOL", False, "work pool to take runs from (required, unless -q or -m "
     "name queues of Prefect 2's %s)" % DEFAULT_AGENT_POOL),
    (("-q", "--work-queue"), "QUEUE", True,
     "only this queue of the pool (repeatable; created when missing)"),
    (("-m", "--match"), "PREFIX", True,
     "queues whose name starts with PREFIX (repeatable; re-resolved while running)"),
    (("-l", "--limit"), "N", False, "most flow runs in flight at once (default: no limit)"),
    (("--prefetch-seconds",), "SECONDS", False, "claim runs scheduled up to this far ahead "
     "(default: PREFECT_WORKER_PREFETCH_SECONDS or %g)" % DEFAULT_PREFETCH_SECONDS),
    (("--poll-interval",), "SECONDS", False, "seconds between polls "
     "(default: PREFECT_WORKER_QUERY_SECONDS or %g)" % DEFAULT_POLL_SECONDS),
    (("--run-once",), None, False, "poll once, wait for those runs, exit"),
    (("--hide-welcome",), None, False, "do not print the start-up banner"),
    (("-e", "--env"), "KEY[=VALUE]", True, "environment variable set on every flow run "
     "(repeatable); KEY alone passes on the agent's own KEY, keeping its value out of ps"),
    (("-n", "--name"), "NAME", False,
     "worker name shown in the Prefect UI (default: unique per process)"),
    (("--python",), "PATH", False,
     "Python that runs flows with the default command (default: this one)"),
    (("--show-flow-logs",), None, False,
     "stream every run's output here, even where the job says stream_output: false"),
    (("--agent-address",), "http://HOST:PORT", False,
     "serve GET /api/health here (default: $PREFECT__CLOUD__AGENT__AGENT_ADDRESS)"),
    (("--with-healthcheck",), None, False, "serve GET /health as Prefect's worker does, at "
     "the host and port that PREFECT_WORKER_WEBSERVER_HOST and _PORT name (default %s:%d)"
     % DEFAULT_WORKER_WEBSERVER),
    (("--cancel-grace-seconds",), "SECONDS", False, "after SIGTERM, seconds a cancelled run "
     "gets before SIGKILL (default: %g)" % DEFAULT_CANCEL_GRACE_SECONDS),
    (("--drain-timeout",), "SECONDS", False, "on SIGTERM/SIGINT, seconds to wait for running "
     "flows before terminating them (default: no limit)"),
    (("-t", "--type"), "TYPE", False, "type of the work pool to create when it does not exist: "
     "process (the default; prefect-agent for %s, as Prefect makes it) or docker, whose runs "
     "start as containers through the docker CLI" % DEFAULT_AGENT_POOL),
    (("--base-job-template",), "PATH", False, "JSON file of the base job template of the pool "
     "to create when it does not exist (default: Prefect's for the type)"),
    (("--create-pool-if-not-found",), None, False, "create the pool when it does not exist "
     "(the default)"),
    (("--no-create-pool-if-not-found",), None, False, "do not: wait for the pool to be made "
     "(by Terraform, say), saying so once"),
    (("--install-policy",), "POLICY", False, "accepted for prefect worker start's sake "
     "(always, if-not-present, never, prompt): agent.py installs nothing"),
    (("--state-dir",), "PATH", False, "where the agent keeps its journal of runs, for restart "
     "recovery (default: $XDG_STATE_HOME/agent.py or ~/.local/state/agent.py)"),
    (("--keep-leftover-processes",), None, False, "when a run ends, leave running the "
     "processes it started in the background (default: stop them)"),
    (("-h", "--help"), None, False, "show this help and exit"),
)
USAGE = "usage: agent.py [start | install] --pool POOL [flags]"
HELP_INTRO = """Run Prefect flow runs from a work pool: as local processes, or, in a docker
pool, as containers through the docker CLI on this host. Settings such as
PREFECT_API_URL come, after the flags, from the environment, .env, prefect.toml,
pyproject.toml and the active Prefect profile, as for Prefect 3.

Commands: 'start' (the default) runs the agent; 'install' prints a supervisord
program section for the same flags, 'install --systemd' a systemd unit."""


#: Prefect 1 agent flags that have no meaning on a Prefect 2 or 3 server: the one line each
#: gets instead of "unknown flag".
PREFECT_1_FLAGS = {
    "--label": "Prefect 2 and 3 servers hand out runs by work queue, not label: use -q QUEUE "
               "or -m PREFIX (-l is --limit, as in Prefect 2 and 3)",
    "--no-hostname-label": "Prefect 2 and 3 servers hand out runs by work queue, not label: "
                           "use -q QUEUE or -m PREFIX",
}
INSTALL_POLICIES = ("always", "if-not-present", "never", "prompt")


def parse_flags(argv):
    """The flags in argv (the command word taken off) as Flags, or UsageError naming the one
    that is wrong. Not argparse: its import, and the gettext, locale and copy modules it
    brings, are 5 ms of start-up. Long flags take `--flag VALUE` or `--flag=VALUE`, short ones
    `-f VALUE` or `-fVALUE`; a flag given twice keeps its last value, unless it is repeatable."""
    values = {_flag_field(flag): [] if flag[2] else (None if flag[1] else False)
              for flag in FLAGS}
    for flag, _, value in _flag_items(argv):
        field = _flag_field(flag)
        if flag[1] is None:
            values[field] = True
        elif flag[2]:
            values[field].append(value)
        else:
            values[field] = value
    return Flags(**values)


def _flag_items(argv):
    """(flag, name as given, value or None) of each flag in argv, in order."""
    by_name = {name: flag for flag in FLAGS for name in flag[0]}
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        name, value = arg, None
        if arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name, value = arg[:2], arg[2:]
        flag = by_name.get(name)
        if flag is None and name in PREFECT_1_FLAGS:
            raise UsageError("%s is a Prefect 1 agent flag: %s" % (name, PREFECT_1_FLAGS[name]))
        if flag is None:
            if arg.startswith("-"):
                raise UsageError("unknown flag %s (agent.py --help lists them)" % name)
            raise UsageError("unexpected argument %r: the command (start, install) comes first "
                             "and every other value follows its flag" % arg)
        metavar = flag[1]
        if metavar is None and value is not None:
            raise UsageError("%s takes no value" % name)
        if metavar is not None and value is None:
            if not rest:
                raise UsageError("%s needs a value (%s)" % (name, metavar))
            value = rest.pop(0)
        yield flag, name, value


def _flag_field(flag):
    return flag[0][-1].lstrip("-").replace("-", "_")


def help_text():
    import textwrap
    lines = [USAGE, "", HELP_INTRO, "", "flags:"]
    for names, metavar, _, text in FLAGS:
        head = "  " + ", ".join(names) + (" " + metavar if metavar else "")
        body = textwrap.wrap(text, 80 - 26, break_on_hyphens=False)
        if len(head) > 24:
            lines.append(head)
            head = ""
        lines.append(head.ljust(26) + body[0])
        lines.extend(" " * 26 + more for more in body[1:])
    return "\n".join(lines) + "\n"


def parse_config(args, environ, settings=None):
    """Turn parsed flags plus the settings (read_settings; by default `environ` alone) into a
    Config, or raise UsageError. `environ` is the agent's own environment, for --env KEY."""
    if settings is None:
        settings = Settings([("env", environ)])
    pool = args.pool
    if not pool and not (args.work_queue or args.match):
        raise UsageError("--pool is required (or -q/-m, which serve queues of the pool %s, as "
                         "Prefect 2's `prefect agent start -q` does)" % DEFAULT_AGENT_POOL)
    if args.key and args.key_file:
        raise UsageError("give either --key or --key-file, not both")
    key = args.key or settings.get("PREFECT_API_KEY") or None
    if args.key_file:
        try:
            with open(args.key_file) as handle:
                key = handle.read().strip()
        except OSError as exc:
            raise UsageError("cannot read --key-file %r: %s" % (args.key_file, exc.strerror))
        if not key:
            raise UsageError("--key-file %r is empty" % args.key_file)
    limit = None
    if args.limit is not None:
        if not re.match(r"^\d+$", args.limit.strip()) or int(args.limit) < 1:
            raise UsageError("--limit must be a whole number of 1 or more, got %r" % args.limit)
        limit = int(args.limit)
    prefetch = _number_setting(args.prefetch_seconds, "--prefetch-seconds", settings,
                               ("PREFECT_WORKER_PREFETCH_SECONDS", "PREFECT_AGENT_PREFETCH_SECONDS"),
                               DEFAULT_PREFETCH_SECONDS, allow_zero=True)
    poll = _number_setting(args.poll_interval, "--poll-interval", settings,
                           ("PREFECT_WORKER_QUERY_SECONDS", "PREFECT_AGENT_QUERY_INTERVAL"),
                           DEFAULT_POLL_SECONDS)
    heartbeat = _number_setting(None, "PREFECT_WORKER_HEARTBEAT_SECONDS", settings,
                                ("PREFECT_WORKER_HEARTBEAT_SECONDS",), SYNC_SECONDS)
    request_timeout = _number_setting(None, "PREFECT_API_REQUEST_TIMEOUT", settings,
                                      ("PREFECT_API_REQUEST_TIMEOUT",), REQUEST_TIMEOUT_SECONDS)
    address = args.agent_address or settings.get("PREFECT__CLOUD__AGENT__AGENT_ADDRESS") or None
    health = _http_address(address, "--agent-address") if address else None
    worker_health = _worker_webserver(settings) if args.with_healthcheck else None
    name = args.name or "agent.py %s %s" % (socket.gethostname(), random_uuid()[:8])
    if "/" in name or "%" in name:
        raise UsageError("--name may not contain '/' or '%%', got %r" % name)
    for queue in args.work_queue + args.match:
        if not queue.strip():
            raise UsageError("--work-queue / --match may not be empty")
    grace = _number(args.cancel_grace_seconds if args.cancel_grace_seconds is not None
                    else DEFAULT_CANCEL_GRACE_SECONDS, "--cancel-grace-seconds", allow_zero=True)
    drain = None if args.drain_timeout is None else _number(args.drain_timeout, "--drain-timeout",
                                                           allow_zero=True)
    state_dir = args.state_dir or os.path.join(
        environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"),
        "agent.py")
    python = args.python or sys.executable
    if args.create_pool_if_not_found and args.no_create_pool_if_not_found:
        raise UsageError("give --create-pool-if-not-found or --no-create-pool-if-not-found, "
                         "not both")
    if args.install_policy is not None and args.install_policy not in INSTALL_POLICIES:
        raise UsageError("--install-policy must be one of %s, got %r"
                         % (", ".join(INSTALL_POLICIES), args.install_policy))
    ssl_cert_file, skip_verify = tls_settings(settings)
    pool_type = args.type
    if pool_type is not None and pool_type not in LAUNCHERS:
        raise UsageError("--type must be one of %s, got %r"
                         % (", ".join(sorted(LAUNCHERS)), pool_type))
    if args.python and not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise UsageError("--python %r is not an executable file" % python)
    api_url, _, api_url_source = (args.api, None, "flag") if args.api else settings.find(
        "PREFECT_API_URL")
    if not api_url:
        api_url, api_url_source = DEFAULT_API_URL, "default"
    return Config(
        api_url=_api_url(api_url),
        api_url_source=api_url_source,
        api_key=key,
        auth_string=settings.get("PREFECT_API_AUTH_STRING") or None,
        api_ssl_cert_file=ssl_cert_file,
        tls_insecure_skip_verify=skip_verify,
        pool=pool or DEFAULT_AGENT_POOL,
        queues=list(dict.fromkeys(args.work_queue)),
        match=list(dict.fromkeys(args.match)),
        limit=limit,
        prefetch_seconds=prefetch,
        poll_seconds=poll,
        heartbeat_seconds=heartbeat,
        request_timeout=request_timeout,
        run_once=args.run_once,
        hide_welcome=args.hide_welcome,
        extra_env=dict(_env_pair(item, environ) for item in args.env),
        name=name,
        python=python,
        show_flow_logs=args.show_flow_logs,
        base_job_template=_base_job_template(args.base_job_template),
        create_pool=not args.no_create_pool_if_not_found,
        install_policy=args.install_policy,
        health_address=health,
        worker_health_address=worker_health,
        cancel_grace_seconds=grace,
        pool_type=pool_type,
        drain_timeout=drain,
        state_dir=state_dir,
        keep_leftover_processes=args.keep_leftover_processes,
    )


# -- Settings sources -----------------------------------------------------------
# Prefect 3 (checked on 3.8.8, prefect/settings/base.py and sources.py) reads a setting from,
# highest first: its init arguments (here: the flags), environment variables, `.env` in the
# working directory, `prefect.toml`, pyproject.toml's [tool.prefect], the active profile. In
# the TOML files a table path is the setting's name: [api] url = ... is PREFECT_API_URL.


class Settings:
    """PREFECT_* settings from the sources Prefect 3 reads (read_settings): a name's value
    comes from the highest source that has it. Values are text, as in the environment."""

    def __init__(self, sources):
        self.sources = sources  # [(label for the banner, {NAME: text})], highest first

    def find(self, *names):
        """(value, name, source label) of the first of `names` in the highest source holding
        any of them, or (None, None, None). Within a source the first name wins: a Prefect 3
        name before its Prefect 1/2 one."""
        for label, values in self.sources:
            for name in names:
                if name in values:
                    return values[name], name, label
        return None, None, None

    def get(self, name, default=None):
        value, _, label = self.find(name)
        return default if label is None else value


def read_settings(environ):
    """Settings from `environ` and the files Prefect 3 reads, or UsageError naming the file
    and line that cannot be parsed. A file that is not there costs a stat, and no import."""
    sources = [("env", environ)]
    settings = Settings(sources)
    dotenv = _read_settings_file(".env", parse_dotenv)
    if dotenv is not None:
        sources.append((".env", dotenv))
    for path, table in (("prefect.toml", ()), ("pyproject.toml", ("tool", "prefect"))):
        data = _read_settings_file(path, lambda text: parse_toml(text, only=table))
        for key in table:
            data = data.get(key) if isinstance(data, dict) else None
        if isinstance(data, dict):
            sources.append((path, _setting_names(data, "PREFECT_")))
    # The profiles file is found the way Prefect's _get_profiles_path finds it.
    path = settings.get("PREFECT_PROFILES_PATH") or os.path.join(
        environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect"),
        "profiles.toml")
    profiles = _read_settings_file(path, parse_toml) or {}
    name = environ.get("PREFECT_PROFILE") or profiles.get("active")
    profile = profiles.get("profiles")
    profile = profile.get(name) if isinstance(profile, dict) and isinstance(name, str) else None
    if isinstance(profile, dict):
        sources.append(("profile '%s'" % escape_controls(name), _setting_names(profile, "")))
    return settings


def _read_settings_file(path, parse):
    """parse(text of the file), or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    where = os.path.abspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        return parse(data.decode("utf-8"))
    except OSError as exc:
        raise UsageError("cannot read the settings file %s: %s" % (where, exc.strerror or exc))
    except UnicodeDecodeError as exc:
        raise UsageError("the settings file %s is not UTF-8 text: line %d"
                         % (where, data.count(b"\n", 0, exc.start) + 1))
    except SettingsSyntaxError as exc:
        raise UsageError("the settings file %s cannot be parsed: %s" % (where, exc))


def _setting_names(table, prefix):
    """{NAME: text} of a settings table: nested tables join their keys into the name, as
    Prefect's nested settings do ([worker.webserver] port is PREFECT_WORKER_WEBSERVER_PORT).
    Values other than strings, numbers and booleans are no setting agent.py reads."""
    names = {}
    for key, value in table.items():
        name = prefix + key.upper()
        if isinstance(value, dict):
            names.update(_setting_names(value, name + "_"))
        elif isinstance(value, bool):
            names[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            names[name] = str(value)
    return names


class SettingsSyntaxError(ValueError):
    """A settings file that cannot be parsed; the message names the line, never its text
    (a profile may hold an API key)."""


def parse_dotenv(text):
    """{KEY: value} of a .env file, as python-dotenv reads the usual lines: `KEY=value`,
    `export KEY=value`, 'single' or "double" quotes (with \\n \\t \\" \\\\ escapes), a
    comment after whitespace. No ${VAR} expansion, no value spanning lines."""
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = re.compile(_DOTENV_LINE).match(line)
        if match is None:
            raise SettingsSyntaxError("line %d is not KEY=VALUE" % number)
        key, single, double, bare = match.groups()
        if key is None:
            continue  # blank or a comment
        if single is not None:
            values[key] = single
        elif double is not None:
            values[key] = re.compile(_DOTENV_ESCAPE).sub(
                lambda escape: _DOTENV_ESCAPES.get(escape.group(1), escape.group(0)), double)
        else:
            values[key] = re.sub(r"\s+#.*", "", bare).strip()
    return values


# The patterns of the settings readers stay strings, compiled (and cached by re) at first
# use, as IMAGE_REFERENCE's do: compiling them at import would cost every start 2 ms.
_DOTENV_LINE = r"""(?x)\s*(?:\#.*)?$|\s*(?:export\s+)?([^=\#\s'"]+)\s*=\s*(?:
    '([^']*)'|"((?:[^"\\]|\\.)*)"|(?![\s'"])([^\r\n]*))\s*(?:\#.*)?$"""
_DOTENV_ESCAPE = r"\\(.)"
_DOTENV_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def parse_toml(text, only=()):
    """The TOML document `text` as a dict, by tomllib where this Python has it (3.11+), else
    by read_small_toml. `only` names the table wanted (("tool", "prefect") of a
    pyproject.toml), which the small reader confines itself to."""
    try:
        import tomllib  # novermin (guarded: 3.11+, else the small reader)
    except ImportError:
        return read_small_toml(text, only)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsSyntaxError(str(exc))


def read_small_toml(text, only=()):
    """The subset of TOML that settings files use, for Pythons without tomllib: [table]
    headers, `key = value` with a string ("basic" or 'literal'), integer, float or boolean
    value, comments. Anything else is refused (SettingsSyntaxError naming the line), never
    read differently from tomllib. Tables outside `only` are skipped unread: a
    pyproject.toml holds arrays and more that are no business of agent.py."""
    root, headers = {}, set()
    table = None if only else root  # None while in a table outside `only`
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if number < len(lines) and line.endswith("\r"):
            line = line[:-1]  # a CRLF line end; a lone CR is an error, as in tomllib
        try:
            if table is None:
                header = _toml_header(line, lenient=True)
            else:
                header = _toml_line(line, table)
            if header is not None:
                inside = tuple(header[:len(only)]) == tuple(only)
                table = _toml_table(root, header, headers) if inside else None
        except SettingsSyntaxError as exc:
            raise SettingsSyntaxError("line %d: %s" % (number, exc))
    return root


_TOML_SPACE = r"[ \t]*"
_TOML_BARE_KEY = r"[A-Za-z0-9_-]+"
_TOML_END = r"[ \t]*(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?$"
_TOML_NUMBER = r"""(?x)
    (?P<based>0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|0o[0-7](?:_?[0-7])*|0b[01](?:_?[01])*)
  | (?P<float>[+-]?(?:0|[1-9](?:_?[0-9])*)
        (?:\.[0-9](?:_?[0-9])*(?:[eE][+-]?[0-9](?:_?[0-9])*)?|[eE][+-]?[0-9](?:_?[0-9])*))
  | [+-]?(?:inf|nan)
  | (?P<int>[+-]?(?:0|[1-9](?:_?[0-9])*))"""
_TOML_STRING_CHARS = {"'": r"[^'\x00-\x08\x0a-\x1f\x7f]*",
                      '"': r'(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\.)*'}
_TOML_ESCAPE = r"(?s)\\(?:([btnfr\"\\])|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))"
_TOML_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _toml_line(line, table):
    """Adds a `key = value` line to table; the key path of a [header] line; None for a
    blank or a comment."""
    at = re.compile(_TOML_SPACE).match(line).end()
    if re.compile(_TOML_END).match(line, at):
        return None
    if line.startswith("[", at):
        return _toml_header(line)
    key, at = _toml_key(line, at)
    at = re.compile(_TOML_SPACE).match(line, at).end()
    if line.startswith(".", at):
        raise SettingsSyntaxError("dotted keys need Python 3.11's tomllib; use a [table]")
    if not line.startswith("=", at):
        raise SettingsSyntaxError("expected '=' after the key")
    value, at = _toml_value(line, re.compile(_TOML_SPACE).match(line, at + 1).end())
    if not re.compile(_TOML_END).match(line, at):
        raise SettingsSyntaxError("unexpected text after the value")
    if key in table:
        raise SettingsSyntaxError("a key defined twice")
    table[key] = value
    return None


def _toml_header(line, lenient=False):
    """The key path of a [table] header line; None for any other line when lenient."""
    at = re.compile(_TOML_SPACE).match(line).end()
    try:
        if not line.startswith("[", at) or line.startswith("[[", at):
            if lenient:
                return None
            raise SettingsSyntaxError("arrays of tables need Python 3.11's tomllib")
        path, at = [], at + 1
        while True:
            key, at = _toml_key(line, re.compile(_TOML_SPACE).match(line, at).end())
            path.append(key)
            at = re.compile(_TOML_SPACE).match(line, at).end()
            if not line.startswith(".", at):
                break
            at += 1
        if not line.startswith("]", at) or not re.compile(_TOML_END).match(line, at + 1):
            raise SettingsSyntaxError("a [table] header must end with ']'")
    except SettingsSyntaxError:
        if lenient:
            return None
        raise
    return path


def _toml_key(line, at):
    bare = re.compile(_TOML_BARE_KEY).match(line, at)
    if bare:
        return bare.group(), bare.end()
    if line.startswith(("'", '"'), at) and not line.startswith(("'''", '"""'), at):
        return _toml_string(line, at)
    raise SettingsSyntaxError("expected a key")


def _toml_value(line, at):
    if line.startswith(("'", '"'), at):
        if line.startswith(("'''", '"""'), at):
            raise SettingsSyntaxError("multi-line strings need Python 3.11's tomllib")
        return _toml_string(line, at)
    for word, value in (("true", True), ("false", False)):
        if line.startswith(word, at) and re.compile(_TOML_END).match(line, at + len(word)):
            return value, at + len(word)
    number = re.compile(_TOML_NUMBER).match(line, at)
    if number and re.compile(_TOML_END).match(line, number.end()):
        text = number.group().replace("_", "")
        if number.group("int") or number.group("based"):
            return int(text, 0), number.end()
        return float(text), number.end()
    raise SettingsSyntaxError("expected a string, a number, true or false (arrays, inline "
                              "tables and dates need Python 3.11's tomllib)")


def _toml_string(line, at):
    quote = line[at]
    body = re.compile(_TOML_STRING_CHARS[quote]).match(line, at + 1)
    if not line.startswith(quote, body.end()):
        raise SettingsSyntaxError("a string without its closing quote")
    text = body.group()
    if quote == '"':
        text = re.compile(_TOML_ESCAPE).sub(_toml_unescape, text)
    return text, body.end() + 1


def _toml_unescape(match):
    simple, short, long, other = match.groups()
    if simple:
        return _TOML_ESCAPES[simple]
    code = int(short or long or "-1", 16)
    if other is not None or not (0 <= code < 0xD800 or 0xDFFF < code <= 0x10FFFF):
        raise SettingsSyntaxError("an escape that TOML does not have")
    return chr(code)


def _toml_table(root, path, headers):
    """The table a [header] opens, created with any missing parents; SettingsSyntaxError for
    a header given twice or through a value."""
    if tuple(path) in headers:
        raise SettingsSyntaxError("a [table] defined twice")
    headers.add(tuple(path))
    table = root
    for key in path:
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            raise SettingsSyntaxError("a [table] whose name is already a value")
    return table


###############################################################################
# API client ##################################################################
###############################################################################

#: Statuses Prefect's own client retries (plus 504, which proxies in front of it answer).
RETRY_STATUSES = (408, 429, 502, 503, 504)
#: A response larger than this is refused rather than parsed.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: Lists and objects nested deeper than this in an answer (or one run of a poll's answer) are
#: refused: a Prefect 3.8 server refuses job variables nested deeper than about 250 levels, and
#: half that keeps copy.deepcopy and the journal (2 Python frames a level) far from the
#: recursion limit of 1000.
MAX_JSON_DEPTH = 128
#: An answer with more commas, "{" and "[" than this (a bound on the values json.loads would
#: make) is refused unparsed: a poll of 200 runs holds tens of thousands, and a million values
#: cost under 100 MB, where 32 MiB of [{},{},...] (ten million) cost 850 MB.
MAX_JSON_VALUES = 1000000
REQUEST_TIMEOUT_SECONDS = 60
#: Once the agent is stopping, a request waits this long at most (and a claim in flight is
#: cut after this long): a server that stops answering must not hold a stop for a minute.
STOPPING_REQUEST_SECONDS = 5.0
#: A connection idle longer than this is reopened rather than reused: Prefect Cloud's load
#: balancer drops connections idle for 30 s, and may not say so. Before that, a connection is
#: reused unless the server has closed it (uvicorn does at 5 s), which costs one poll().
KEEPALIVE_IDLE_SECONDS = 25.0
#: A server's Retry-After is honoured up to this; beyond it is a broken or hostile answer.
MAX_RETRY_AFTER_SECONDS = 300.0


class APIError(Exception):
    """The API answered, but not with what was asked for."""

    def __init__(self, method, path, status, detail):
        self.method, self.path, self.status, self.detail = method, path, status, detail
        super().__init__("%s %s answered %s: %s" % (method, path, status, detail))


class APIUnreachable(Exception):
    """The API could not be reached, or kept failing after the retries."""


class Stopped(APIUnreachable):
    """The agent's own stop cut the request short, or its retries: no failure of the API,
    and nothing to log. Whether a request cut in flight took effect is unknown."""


class AuthRefused(Exception):
    """The server refused our credentials: running on would only fail again."""


class CertificateRefused(AuthRefused):
    """The server's TLS certificate did not pass our checks before the API was ever reached:
    a CA we do not trust, or a name it does not hold. Running on would only fail again."""


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as we can read it."""


class ServerClosed(ConnectionError):
    """The server closed the connection before it answered."""


class AnswerRefused(APIError):
    """A 2xx answer whose JSON the agent will not use (nested too deeply, too many values):
    asking again would get the same. `unparsable` holds the answer when json.loads itself
    could not go as deep as it nests, so that a caller can still take what it can."""

    def __init__(self, method, path, status, detail, unparsable=None):
        super().__init__(method, path, status, detail)
        self.unparsable = unparsable


class DeploymentGone(APIError):
    """The run's deployment has been deleted."""


class AnswerTooLarge(ProtocolError):
    def __init__(self, status):
        super().__init__("answer larger than %d bytes, refused" % MAX_RESPONSE_BYTES)
        self.status = status


class HTTPConnection:
    """One kept-alive HTTP/1.1 connection: the little of the protocol a Prefect API needs.
    http.client would do, but it imports the email package for its header parser, which
    costs the agent 30 ms of start-up and 4 MB of memory; TLS (ssl, another 4 MB) is loaded
    only for an https API. One thread uses it at a time (PrefectAPI keeps one per thread)."""

    MAX_HEADER_LINES = 200
    #: Hex digits only: int(text, 16) also takes "-1" (which read() takes as "to the end",
    #: past MAX_RESPONSE_BYTES), "+a", "0x1f" and "1_0".
    CHUNK_SIZE = rb"[0-9a-fA-F]+"
    CONTENT_LENGTH = r"[0-9]+"

    def __init__(self, host, port, tls_host=None, tls_context=None, tunnel=None, timeout=None):
        self.host, self.port = host, port  # where the socket goes: the API, or its proxy
        self.tls_host = tls_host  # wrap in TLS for this server name, with:
        self.tls_context = tls_context  # an ssl.SSLContext
        self.tunnel = tunnel  # (host, port, Proxy-Authorization) for an https API via proxy
        self.timeout = timeout
        self.sock = self._file = None

    def request(self, method, target, headers, body=None):
        """(status, {lower-case header: value}, body bytes) of one exchange."""
        if self.sock is None:
            self._connect()
        lines = ["%s %s HTTP/1.1" % (method, target)]
        lines += ["%s: %s" % item for item in headers.items()]
        lines.append("Content-Length: %d" % len(body or b""))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        status, answer_headers = self._read_head()
        while 100 <= status < 200:  # interim answers; the real one follows
            status, answer_headers = self._read_head()
        data, reusable = self._read_body(method, status, answer_headers)
        if not reusable:
            self.close()
        return status, answer_headers, data

    def set_timeout(self, seconds):
        """Seconds that connecting, and each wait for the server, may take from now on."""
        self.timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def dropped(self):
        """Whether the server closed this idle connection (or sent on it unasked, which
        leaves it as unusable)."""
        return self.sock is not None and bool(_wait_readable([self.sock], 0))

    def close(self):
        for closable in (self._file, self.sock):
            if closable is not None:
                try:
                    closable.close()
                except OSError:
                    pass
        self.sock = self._file = None

    def _connect(self):
        # A str host makes socket look it up through the idna codec, whose import is 1.5 ms
        # of start-up; an ASCII name as bytes resolves the same without it.
        host = self.host.encode("ascii") if self.host.isascii() else self.host
        sock = socket.create_connection((host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock, self._file = sock, sock.makefile("rb")
            if self.tunnel:
                self._open_tunnel()
            if self.tls_host:
                self._file.close()
                self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.tls_host)
                self._file = self.sock.makefile("rb")
        except BaseException:
            sock.close()
            self.sock = self._file = None
            raise

    def _open_tunnel(self):
        host, port, auth = self.tunnel
        authority = _authority(host, port)
        lines = ["CONNECT %s HTTP/1.1" % authority, "Host: " + authority]
        if auth:
            lines.append("Proxy-Authorization: " + auth)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status, _ = self._read_head()
        if status != 200:
            raise ProtocolError("the proxy refused to open a tunnel to %s (%d)" % (authority, status))

    def _read_line(self, limit=65536):
        line = self._file.readline(limit + 1)
        if len(line) > limit:
            raise ProtocolError("a line longer than %d bytes in the answer" % limit)
        return line

    def _read_head(self):
        line = self._read_line()
        if not line:
            raise ServerClosed("the server closed the connection before answering")
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError("not an HTTP answer: %r" % line[:100])
        self._version = parts[0]
        headers = {}
        for _ in range(self.MAX_HEADER_LINES):
            line = self._read_line()
            if line in (b"\r\n", b"\n", b""):
                return int(parts[1]), headers
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        raise ProtocolError("more than %d header lines in the answer" % self.MAX_HEADER_LINES)

    def _read_body(self, method, status, headers):
        """(body, whether the connection can carry another request)."""
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (
            self._version != "HTTP/1.0" or connection == "keep-alive")
        if method == "HEAD" or status in (204, 304):
            return b"", keep_alive
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked(status), keep_alive
        length = headers.get("content-length")
        if length is not None:
            if not re.fullmatch(self.CONTENT_LENGTH, length):
                raise ProtocolError("bad Content-Length %r" % length[:50])
            if int(length) > MAX_RESPONSE_BYTES:
                raise AnswerTooLarge(status)
            data = self._file.read(int(length))
            if len(data) < int(length):
                raise ServerClosed("the server closed the connection mid-answer")
            return data, keep_alive
        data = self._file.read(MAX_RESPONSE_BYTES + 1)  # the answer ends where the connection does
        if len(data) > MAX_RESPONSE_BYTES:
            raise AnswerTooLarge(status)
        return data, False

    def _read_chunked(self, status):
        body = bytearray()  # not a list of chunks: 1-byte chunks would cost 40 times their size
        while True:
            text = self._read_line().split(b";")[0].rstrip(b" \t\r\n")
            if not re.fullmatch(self.CHUNK_SIZE, text):
                raise ProtocolError("bad chunk size %r" % text[:50])
            length = int(text, 16)
            if length == 0:
                for _ in range(self.MAX_HEADER_LINES):
                    if self._read_line() in (b"\r\n", b"\n", b""):  # the trailers' end
                        return bytes(body)
                raise ProtocolError("more than %d trailer lines in the answer"
                                    % self.MAX_HEADER_LINES)
            if len(body) + length > MAX_RESPONSE_BYTES:
                raise AnswerTooLarge(status)
            chunk = self._file.read(length)
            if len(chunk) < length:
                raise ServerClosed("the server closed the connection mid-answer")
            body += chunk
            self._read_line()  # the CRLF after each chunk


#: pydantic's words for a bool, which Prefect 3.8.8's settings take: case-insensitive,
#: unstripped; anything else (an empty value too) stops Prefect at start-up.
TRUE_WORDS = ("true", "1", "yes", "y", "on", "t")
FALSE_WORDS = ("false", "0", "no", "n", "off", "f")


def tls_settings(settings):
    """(CA bundle path or None, whether to skip verification) from Prefect's settings
    PREFECT_API_SSL_CERT_FILE and PREFECT_API_TLS_INSECURE_SKIP_VERIFY. The path is made
    absolute: runs get it too, and they start in other directories."""
    cert_file = settings.get("PREFECT_API_SSL_CERT_FILE") or None
    skip = settings.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "false")
    if skip.lower() not in TRUE_WORDS + FALSE_WORDS:
        raise UsageError("PREFECT_API_TLS_INSECURE_SKIP_VERIFY must be one of %s (or %s), got %r"
                         % (", ".join(TRUE_WORDS), ", ".join(FALSE_WORDS), skip))
    return (os.path.abspath(cert_file) if cert_file else None), skip.lower() in TRUE_WORDS


def tls_context(url, cert_file, skip_verify):
    """The ssl.SSLContext for an https API, made as Prefect 3.8.8's client makes it: no
    verification at all when skip_verify; else trusting only the CA bundle `cert_file`;
    else the system's CAs, where ssl's default context also reads SSL_CERT_FILE and
    SSL_CERT_DIR (Prefect's client uses certifi's bundle, or SSL_CERT_FILE, there).
    UsageError when there is no ssl module or the bundle cannot be read."""
    try:
        import ssl
    except ImportError:
        raise UsageError("this Python has no ssl module, so it cannot reach %s" % redact_url(url))
    if skip_verify:
        log.warning("PREFECT_API_TLS_INSECURE_SKIP_VERIFY is on: the certificate of %s is not "
                    "checked, so whoever can pose as it gets the API key and the runs",
                    redact_url(url))
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=cert_file)
    except OSError as exc:  # ssl.SSLError too: a file that holds no certificate
        raise UsageError("PREFECT_API_SSL_CERT_FILE %r is not a CA bundle agent.py can read: %s"
                         % (cert_file, exc.strerror or _one_line(exc, 200)))


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
NAME_MISMATCH_CODES = (62, 64)


def certificate_refusal(url, exc):
    """A CertificateRefused saying what was wrong and what to do, if `exc` is our refusal of
    the server's certificate; else None."""
    ssl = sys.modules.get("ssl")  # not imported unless the API is https
    if ssl is None or not isinstance(exc, ssl.SSLCertVerificationError):
        return None
    if exc.verify_code in NAME_MISMATCH_CODES:
        advice = "use the name the certificate holds in --api / PREFECT_API_URL"
    else:
        advice = "trust its CA with PREFECT_API_SSL_CERT_FILE or SSL_CERT_FILE"
    problem = (exc.verify_message or str(exc)).rstrip(".")
    return CertificateRefused("the TLS certificate of %s was refused: %s; %s"
                              % (redact_url(url), problem, advice))


def _authority(host, port):
    """host:port as a request line or Host header names it: an IPv6 address in brackets."""
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def proxy_for(url, environ):
    """(host, port, Proxy-Authorization or None) of the proxy `environ` names for `url`, the way
    curl and urllib read it ({scheme}_proxy, NO_PROXY), or None for a direct connection.
    UsageError for a proxy that is not an http:// one."""
    parts = urllib.parse.urlsplit(url)
    variable = parts.scheme + "_proxy"
    if not environ.get(variable):
        variable = variable.upper()
    proxy = environ.get(variable)
    if not proxy:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    host = (parts.hostname or "").lower()
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    for entry in (e.strip().lower().lstrip(".") for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry)
                                       or "%s:%s" % (host, port) == entry)):
            return None
    try:
        found = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        port = found.port or 8080
    except ValueError:  # the value is not shown: it may hold a password
        raise UsageError("%s is not a proxy address agent.py can read (http://HOST:PORT)"
                         % variable)
    # Refused rather than spoken to in the clear: TLS to the proxy, with the API's TLS inside
    # it, needs a second (memory BIO) transport; an https API stays encrypted end to end
    # through an http:// proxy anyway, and only the proxy's own password would gain.
    if found.scheme != "http" or not found.hostname:
        raise UsageError("%s is %s: agent.py reaches a proxy only at an http://HOST:PORT address"
                         % (variable, redact_url(proxy)))
    auth = None
    if found.username is not None:
        userinfo = "%s:%s" % (urllib.parse.unquote(found.username),
                              urllib.parse.unquote(found.password or ""))
        auth = basic_auth(userinfo)
    return found.hostname, port, auth


def basic_auth(userinfo):
    """The Authorization value for "user:password" (binascii: base64's imports cost start-up)."""
    return "Basic " + binascii.b2a_base64(userinfo.encode(), newline=False).decode("ascii")


def error_detail(body):
    """The human part of a Prefect error body, or the start of whatever came back."""
    try:
        parsed = _load_json(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for field in ("detail", "exception_message"):
            if parsed.get(field):
                return _one_line(parsed[field], 300)
    text = " ".join(body[:4096].decode("utf-8", "replace").split())
    return (text[:200] + "...") if len(text) > 200 else (text or "(empty body)")


def retry_after_seconds(value):
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS) if seconds == seconds else None
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return min(max(0.0, (when - utcnow()).total_seconds()), MAX_RETRY_AFTER_SECONDS)


def backoff_seconds(attempt, retry_after=None, cap=30.0):
    """Delay before retry number `attempt` (1-based): Retry-After if given, else doubling from
    half a second; jittered so agents that failed together do not retry together."""
    if retry_after is not None:
        return retry_after * jitter(1.0, 1.2)
    return min(cap, 0.5 * 2 ** (attempt - 1)) * jitter(0.8, 1.2)


class PrefectAPI:
    """JSON over HTTP to one Prefect API, with retries, CSRF and auth. Every thread calls it:
    each keeps its own connection (`_local`), and `_connections_lock` guards the list of
    connections that close() closes; no lock is held across a request."""

    USER_AGENT = "agent.py/%s (stdlib Prefect agent; Python %d.%d)" % (
        (__version__,) + tuple(sys.version_info[:2]))

    def __init__(self, url, api_key=None, auth_string=None, max_retries=5, ssl_cert_file=None,
                 tls_insecure_skip_verify=False, request_timeout=REQUEST_TIMEOUT_SECONDS):
        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self.request_timeout = request_timeout  # seconds a connect, or a wait for an answer, takes
        self._auth = None
        if auth_string:  # Prefect's client prefers the auth string when both are set
            self._auth = basic_auth(auth_string)
        elif api_key:
            self._auth = "Bearer " + api_key
        self._csrf_client = random_uuid()
        self._csrf_token = None
        self._tls_context = None
        if self.url.startswith("https:"):  # made once: loading the CAs costs milliseconds
            self._tls_context = tls_context(self.url, ssl_cert_file, tls_insecure_skip_verify)
        self._proxy = proxy_for(self.url, os.environ)
        self._local = threading.local()  # each thread keeps its own connection alive
        self._connections = []
        self._connections_lock = threading.Lock()
        self._reached = False
        self.last_success = None
        self.failing_since = None  # the first failed attempt since the last success
        self._stoppable = {}  # thread id -> (its connection, its stopping() if interruptible)
        self._finishing = set()  # ids of threads whose request interrupt() lets finish
        self._skipped_note = None  # what the last poll's answer had that was skipped

    # -- transport ------------------------------------------------------------

    def request(self, method, path, body=None, retries=None, max_depth=MAX_JSON_DEPTH):
        """Send one request; return the parsed JSON answer (None for an empty one).

        Retries transport errors and RETRY_STATUSES with backoff. Raises AuthRefused, APIError
        (any other non-2xx answer, or a 2xx that is not JSON), AnswerRefused (JSON nested deeper
        than `max_depth` or too large to parse; None: the caller checks its parts) or
        APIUnreachable. Each outcome is counted for GET /metrics."""
        try:
            answer = self._request(method, path, body, retries, max_depth)
        except Stopped:
            raise  # not a request the API failed: not counted
        except APIUnreachable:
            metrics.count("agentpy_api_requests_total", '{outcome="unreachable"}')
            raise
        except (APIError, AuthRefused):
            metrics.count("agentpy_api_requests_total", '{outcome="refused"}')
            raise
        metrics.count("agentpy_api_requests_total", '{outcome="ok"}')
        return answer

    def _request(self, method, path, body, retries, max_depth):
        retries = self.max_retries if retries is None else retries
        attempt = 0
        csrf_retried = False
        while True:
            attempt += 1
            try:
                status, headers, raw = self._send(method, path, body)
            except (OSError, ProtocolError, ValueError) as exc:
                # A refused connection or certificate before we ever reached the server means
                # a wrong URL or TLS setting: fail fast rather than spend a minute retrying it.
                refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
                refusal = certificate_refusal(self.url, exc)
                if refusal and not self._reached:
                    raise refusal
                if self._stopping_now():  # cut by interrupt(), most likely: not an outage
                    raise Stopped("%s %s was cut short: the agent is stopping" % (method, path))
                descriptor_shortage.noted("a connection to the Prefect API", exc)
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                if attempt > retries or (refused and not self._reached and attempt > 1):
                    raise APIUnreachable("%s %s failed: %s" % (method, path, _describe(exc)))
                self._pause(backoff_seconds(attempt), method, path)
                continue
            if status in RETRY_STATUSES and self.failing_since is None:
                self.failing_since = time.monotonic()
            if status in RETRY_STATUSES and attempt <= retries:
                self._pause(backoff_seconds(attempt, retry_after_seconds(headers.get("retry-after"))),
                            method, path)
                continue
            if status in RETRY_STATUSES:
                raise APIUnreachable("%s %s answered %s after %d tries: %s"
                                     % (method, path, status, attempt, error_detail(raw)))
            self._reached = True
            self.failing_since = None
            if status == 403 and method != "GET" and b"CSRF" in raw and not csrf_retried:
                csrf_retried = True  # once: a refusal that persists is an APIError like any
                self._refresh_csrf_token()
                continue
            if status == 401 or (status == 403 and method == "GET"):
                raise AuthRefused(
                    "the Prefect API at %s refused our credentials (%s %s answered %s: %s); "
                    "check --key / PREFECT_API_KEY or PREFECT_API_AUTH_STRING"
                    % (redact_url(self.url), method, path, status, error_detail(raw)))
            if not 200 <= status < 300:
                raise APIError(method, path, status, error_detail(raw))
            self.last_success = time.monotonic()
            self.failing_since = None
            if not raw.strip():
                return None
            try:
                return _load_json(raw, max_depth)
            except _Refused as exc:
                raise AnswerRefused(method, path, status, str(exc),
                                    raw if exc.unparsable else None)
            except ValueError:
                raise APIError(method, path, status, "answer is not JSON: %s" % error_detail(raw))

    def give_up_retries_when(self, stopping, wakeup, interruptible=True):
        """From now on, this thread's requests end as Stopped once stopping() is true: `wakeup`
        (a Wakeup) is woken when it turns true, and cuts the wait before a retry short;
        if `interruptible`, interrupt() cuts the request it waits on short."""
        self._local.stopping, self._local.wakeup = stopping, wakeup
        self._local.interruptible = interruptible
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            self._stoppable[threading.get_ident()] = (connection, interruptible and stopping)

    def _stopping_now(self):
        stopping = getattr(self._local, "stopping", None)
        return stopping is not None and stopping()

    def interrupt(self, thread_ids=None):
        """End the requests that the interruptible threads of give_up_retries_when wait on
        while their stopping() is true (or those of the threads `thread_ids`), if any: a
        silent server would hold a stop for the whole request timeout. It never blocks:
        list() of a dict is one step for other threads, and a shutdown() takes no lock; a
        connection is opened anew for its thread's next request."""
        for thread_id, (connection, stopping) in list(self._stoppable.items()):
            sock = connection.sock
            if sock is not None and (thread_id in thread_ids if thread_ids else (
                    stopping and thread_id not in self._finishing and stopping())):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed meanwhile

    def let_finish(self, finishing):
        """While `finishing`, interrupt() leaves the calling thread's request be, unless it
        names the thread: a claim cut in flight could land after the run was read to settle
        it. A set's add and discard are single steps for interrupt()'s thread."""
        if finishing:
            self._finishing.add(threading.get_ident())
        else:
            self._finishing.discard(threading.get_ident())

    def finishing(self, thread_id):
        return thread_id in self._finishing

    def end_thread(self):
        """Close the calling thread's connection and forget its stop settings, for a thread
        that is about to end (or to sit idle): the server need not keep it open for nobody."""
        connection = getattr(self._local, "connection", None)
        self._stoppable.pop(threading.get_ident(), None)
        self._local.__dict__.clear()
        if connection is not None:
            connection.close()
            with self._connections_lock:
                if connection in self._connections:
                    self._connections.remove(connection)

    def _pause(self, seconds, method, path):
        stopping = getattr(self._local, "stopping", None)
        if stopping is None:
            metrics.count("agentpy_api_requests_total", '{outcome="retried"}')
            time.sleep(seconds)
            return
        if not stopping():
            metrics.count("agentpy_api_requests_total", '{outcome="retried"}')
            self._local.wakeup.sleep(seconds)
        if stopping():
            raise Stopped("%s %s is not retried: the agent is stopping" % (method, path))

    def _send(self, method, path, body, redirects=1):
        headers = {"Accept": "application/json", "User-Agent": self.USER_AGENT}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._auth:
            headers["Authorization"] = self._auth
        if method != "GET" and self._csrf_token:
            headers["Prefect-Csrf-Token"] = self._csrf_token
            headers["Prefect-Csrf-Client"] = self._csrf_client
        url = path if path.startswith(("http://", "https://")) else self.url + path
        status, answer_headers, raw = self._exchange(method, url, data, headers, path)
        location = answer_headers.get("location")
        if status in (307, 308) and location and redirects:
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target)[:2] == urllib.parse.urlsplit(url)[:2]:
                return self._send(method, target, body, redirects - 1)
        return status, answer_headers, raw

    def _exchange(self, method, url, data, headers, path):
        """One request and its whole answer on this thread's kept-alive connection.
        A connection the server closed while it sat idle is reopened and the request sent
        again: the server never saw it."""
        connection = self._connection()
        parts = urllib.parse.urlsplit(url)
        target = redact_url(url) if self._proxy and parts.scheme == "http" else (
            (parts.path or "/") + ("?" + parts.query if parts.query else ""))
        headers = dict(headers, Host=parts.netloc.rpartition("@")[2])
        if self._proxy and self._proxy[2] and parts.scheme == "http":
            headers["Proxy-Authorization"] = self._proxy[2]
        reused = connection.sock is not None
        stopping = getattr(self._local, "stopping", None)
        connection.set_timeout(STOPPING_REQUEST_SECONDS if stopping is not None and stopping()
                               else self.request_timeout)
        try:
            try:
                answer = connection.request(method, target, headers, data)
            except (ServerClosed, BrokenPipeError, ConnectionResetError):
                if not reused or (stopping is not None and stopping()):  # or interrupted
                    raise
                connection.close()
                answer = connection.request(method, target, headers, data)
        except AnswerTooLarge as exc:
            connection.close()
            raise APIError(method, path, exc.status, str(exc))
        except BaseException:
            connection.close()  # whatever state it is in, the next request starts afresh
            raise
        self._local.used = time.monotonic()
        return answer

    def _connection(self):
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None:
            parts = urllib.parse.urlsplit(self.url)
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            # Through a proxy, plain http goes to the proxy as is; https tunnels through it.
            address = self._proxy[:2] if self._proxy else (parts.hostname, port)
            tunnel = (parts.hostname, port, self._proxy[2]) if self._proxy and tls else None
            connection = HTTPConnection(*address, tls_host=parts.hostname if tls else None,
                                        tls_context=self._tls_context, tunnel=tunnel,
                                        timeout=self.request_timeout)
            local.connection, local.used = connection, time.monotonic()
            with self._connections_lock:
                self._connections.append(connection)
            if getattr(local, "stopping", None) is not None:
                self._stoppable[threading.get_ident()] = (
                    connection, local.interruptible and local.stopping)
        elif time.monotonic() - local.used > KEEPALIVE_IDLE_SECONDS or connection.dropped():
            # Reopened now rather than found dead mid-request. A server may still close it in
            # the instant before our request lands: _exchange then sends it again, once.
            connection.close()
        return connection

    def close(self):
        """Close every thread's kept-alive connection (a later request opens a new one)."""
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    def _refresh_csrf_token(self):
        """Ask for a new token. No lock is held across the request: two threads that refresh
        at once each get a token, and one that is already replaced costs one more refresh."""
        try:
            answer = self.request("GET", "/csrf-token?client=" + self._csrf_client, retries=2)
        except (APIError, AuthRefused):
            answer = None  # CSRF is off, the server predates it, or it refuses us one
        self._csrf_token = answer.get("token") if isinstance(answer, dict) else None

    # -- the calls Prefect's own workers make (checked on a 3.8.8 server) ------

    def server_version(self):
        """The server's own version, asked once and not retried. GET /admin/version answers
        it ("3.9.1", "2.10.21": checked on both); GET /version answers the API schema's
        ("0.8.4" on 3.8.8)."""
        return self.request("GET", "/admin/version", retries=0)

    def _get_or_none(self, path):
        """GET path; None when the server answers that it does not exist (404)."""
        try:
            return self.request("GET", path)
        except APIError as exc:
            if exc.status == 404:
                return None
            raise

    def read_pool(self, pool):
        """The work pool, or None when it does not exist."""
        answer = self._get_or_none("/work_pools/" + _quote(pool))
        return None if answer is None else _expect_dict(answer, "work pool")

    def create_pool(self, pool, pool_type, base_job_template):
        body = {"name": pool, "type": pool_type, "base_job_template": base_job_template}
        return _expect_dict(self.request("POST", "/work_pools/", body), "work pool")

    def heartbeat(self, pool, worker_name, interval):
        self.request("POST", "/work_pools/%s/workers/heartbeat" % _quote(pool),
                     {"name": worker_name, "heartbeat_interval_seconds": int(interval)})

    def queues_with_prefixes(self, pool, prefixes):
        found, offset = [], 0
        while True:
            page = self.request("POST", "/work_pools/%s/queues/filter" % _quote(pool), {
                "work_queues": {"name": {"startswith_": prefixes}}, "limit": 200, "offset": offset})
            page = _expect_list(page, "queue filter")
            new = [q["name"] for q in page if isinstance(q, dict) and isinstance(q.get("name"), str)
                   and q["name"] not in found]
            found.extend(new)
            if len(page) < 200 or not new:  # a server that ignores offset must not loop us
                return found
            offset += len(page)

    def ensure_queue(self, pool, queue):
        """Create the queue if missing; True when we created it."""
        try:
            self.request("GET", "/work_pools/%s/queues/%s" % (_quote(pool), _quote(queue)))
            return False
        except APIError as exc:
            if exc.status != 404:
                raise
        try:
            self.request("POST", "/work_pools/%s/queues" % _quote(pool), {"name": queue})
        except APIError as exc:
            if exc.status != 409:  # another agent created it first
                raise
        return True

    def scheduled_runs(self, pool, queues, scheduled_before):
        """The runs to claim, each with a UUID "id". A run the agent cannot start comes back as
        {"id": ..., "name": ..., REFUSED: why}, to be claimed and crashed with the reason
        rather than polled for ever; an entry without a UUID id is skipped. One log line per
        answer tells what was skipped."""
        body = {"scheduled_before": isoformat(scheduled_before)}
        if queues:
            body["work_queue_names"] = queues
        path = "/work_pools/%s/get_scheduled_flow_runs" % _quote(pool)
        # Depth is checked run by run: one deep run must not keep the others from being claimed.
        try:
            answer = self.request("POST", path, body, max_depth=None)
        except AnswerRefused as exc:
            if exc.unparsable is None:
                raise
            answer = _array_items(exc.unparsable)
        runs, skipped, first_problem = [], 0, None
        for item in _expect_list(answer, "scheduled runs"):
            run, problem = _poll_entry(item)
            if problem and not (isinstance(run, dict) and _is_uuid(run.get("id"))):
                skipped += 1
                first_problem = first_problem or problem
            elif problem:
                name = run.get("name") if isinstance(run.get("name"), str) else None
                runs.append({"id": run["id"], "name": name, REFUSED: problem})
            else:
                run.pop(REFUSED, None)
                runs.append(run)
        note = skipped and "skipped %s of %s runs in the answer to POST %s: first problem: %s" % (
            format(skipped, ","), format(len(answer), ","), path, first_problem)
        if note and note != self._skipped_note:  # a server that keeps sending it: said once
            log.warning("%s", note)
        self._skipped_note = note
        return runs

    def set_state(self, run_id, state_type, message=None, name=None, force=False,
                  transition_id=None, details=None, data=None):
        """Propose a state; `details` carries over state_details (a lease, a scheduled time)
        from a state being restored or replaced."""
        state_details = dict(details or {}, flow_run_id=run_id,
                             transition_id=transition_id or random_uuid())
        state = {"type": state_type, "name": name, "message": message, "data": data,
                 "state_details": state_details}
        path = "/flow_runs/%s/set_state" % _quote(run_id)
        answer = self.request("POST", path, {"state": state, "force": force})
        if not isinstance(answer, dict) or answer.get("status") not in (
                "ACCEPT", "REJECT", "ABORT", "WAIT"):
            raise APIError("POST", path, 200, "not an orchestration result: %.200r" % (answer,))
        return answer

    def read_run(self, run_id):
        """The run as the API has it, at any depth json.loads can parse: most callers want
        only its state; one that uses more checks it with run_problem."""
        return _expect_dict(self.request("GET", "/flow_runs/" + _quote(run_id), max_depth=None),
                            "flow run")

    def set_infrastructure_pid(self, run_id, pid):
        self.request("PATCH", "/flow_runs/" + _quote(run_id), {"infrastructure_pid": pid})

    def read_deployment(self, deployment_id):
        """The deployment; DeploymentGone when the server says it does not exist."""
        answer = self._get_or_none("/deployments/" + _quote(deployment_id))
        if answer is None:
            raise DeploymentGone("GET", "/deployments/" + _quote(deployment_id), 404,
                                 "the deployment does not exist")
        return _expect_dict(answer, "deployment")

    def read_flow(self, flow_id):
        return _expect_dict(self.request("GET", "/flows/" + _quote(flow_id)), "flow")

    def read_block_document(self, document_id):
        """A block document with its secrets, as Prefect 2's agent reads an infrastructure
        block (checked on a 2.20 server: `data` holds the fields, `block_type.slug` the kind)."""
        return _expect_dict(self.request(
            "GET", "/block_documents/%s?include_secrets=true" % _quote(document_id)),
            "block document")

    def read_run_states(self, run_id):
        """Every state the run has been in, oldest first."""
        return _expect_list(self.request("GET", "/flow_run_states/?flow_run_id=" + _quote(run_id)),
                            "flow run states")

    def runs_in_state(self, run_ids, state_types):
        """Those of `run_ids` (200 at most) whose state is of one of `state_types`."""
        answer = self.request("POST", "/flow_runs/filter", {
            "flow_runs": {"id": {"any_": run_ids}, "state": {"type": {"any_": state_types}}},
            "limit": 200, "offset": 0})
        return [run for run in _expect_list(answer, "flow run filter")
                if isinstance(run, dict) and isinstance(run.get("id"), str)]

    def read_variable(self, name):
        answer = self._get_or_none("/variables/name/" + _quote(name))
        return answer.get("value") if isinstance(answer, dict) else None

    def write_logs(self, entries):
        self.request("POST", "/logs/", entries)


def _describe(exc):
    reason = getattr(exc, "reason", None)
    if reason is not None and not isinstance(reason, str):
        exc = reason
    text = _one_line(exc, 300) or exc.__class__.__name__
    return "%s: %s" % (exc.__class__.__name__, text) if exc.__class__.__name__ not in text else text


def _quote(name):
    """`name` as one URL path segment: every path segment built from server data goes
    through here, so no "/" or ".." in it can change the path."""
    return urllib.parse.quote(name, safe="")


def _expect_list(answer, what):
    if not isinstance(answer, list):
        raise APIError("", what, 200, "expected a JSON list, got %.200r" % (answer,))
    return answer


def _expect_id(value, what):
    if not _is_uuid(value):
        raise APIError("", "flow run", 200, "its %s is not a UUID: %s" % (what, _id_text(value)))


def _expect_dict(answer, what):
    if not isinstance(answer, dict):
        raise APIError("", what, 200, "expected a JSON object, got %.200r" % (answer,))
    return answer


class _Refused(ValueError):
    """JSON the agent will not parse or keep (see MAX_JSON_DEPTH, MAX_JSON_VALUES)."""

    def __init__(self, reason, unparsable=False):
        super().__init__(reason)
        self.unparsable = unparsable  # nested deeper than json.loads can go


def _load_json(raw, max_depth=MAX_JSON_DEPTH):
    """The JSON value `raw` (bytes) holds. ValueError if it is not JSON; _Refused if it holds
    more than MAX_JSON_VALUES values or nests deeper than `max_depth` (None: any depth that
    json.loads can parse)."""
    if raw.count(b",") + raw.count(b"{") + raw.count(b"[") > MAX_JSON_VALUES:
        raise _Refused("more than %s JSON values, refused" % format(MAX_JSON_VALUES, ","))
    try:
        value = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _Refused("nested too deeply to parse, refused", unparsable=True)
    if max_depth is not None and nested_deeper(value, max_depth):
        raise _Refused("nested deeper than %d levels, refused" % max_depth)
    return value


def nested_deeper(value, limit):
    """Whether lists and objects nest more than `limit` deep in `value`; level by level, not
    recursively, so that any depth json.loads returns is measured safely."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return bool(level)


#: A JSON string (and the colon that makes it a key), or a bracket: all _array_items looks at.
_JSON_TOKEN = rb'("(?:[^"\\]|\\.)*")(\s*:)?|[][{}]'


class _Unparsable:
    """An item of a JSON array nested too deeply to parse, and its flow_run's id if seen."""

    def __init__(self, run_id):
        self.run_id = run_id


def _array_items(raw):
    """The items of the JSON array `raw`, one json.loads each: an item nested deeper than
    json.loads can go (about 1,000 levels on Python 3.8, 1,500 on 3.12) becomes _Unparsable
    with its "flow_run" "id", so that one such run does not hide the others for ever.
    Only called after json.loads failed on the whole; the tokens are bounded by
    MAX_JSON_VALUES, which the answer passed."""
    items, depth, keys, start, run_id, id_next = [], 0, {}, None, None, False
    for token in re.finditer(_JSON_TOKEN, raw):
        text = token.group(1) or token.group()
        if text in (b"[", b"{"):
            depth += 1
            if depth == 2:
                start, run_id, keys = token.start(), None, {}
        elif text in (b"]", b"}"):
            if depth == 2:
                items.append(_array_item(raw[start:token.end()], run_id))
            depth -= 1
        elif token.group(2):  # a key
            keys[depth] = text
            id_next = depth == 3 and keys.get(2) == b'"flow_run"' and text == b'"id"'
            continue
        elif id_next and run_id is None:
            run_id = text[1:-1].decode("utf-8", "replace")
        id_next = False
    return items


def _array_item(raw, run_id):
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        return _Unparsable(run_id)
    except ValueError:
        return None


_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


def _id_text(value):
    """An id from the API, for a log line (a nested list could not even be printed)."""
    return ("%.100r" % value) if isinstance(value, str) else "(a JSON %s)" % type(value).__name__


def _is_uuid(value):
    """Whether `value` is a UUID as Prefect writes its ids: only such ids go into URL paths."""
    return isinstance(value, str) and re.fullmatch(_UUID, value) is not None


def _scheduled_text(run):
    """The run's scheduled time as the API wrote it: a poll's answer leaves the state out
    (seen on a 3.8.8 server), so the run's own next start is read when the state says
    nothing."""
    details = _obj(_obj(run.get("state")).get("state_details"))
    for value in (details.get("scheduled_time"), run.get("next_scheduled_start_time"),
                  run.get("expected_start_time"), run.get("scheduled_time")):
        if parse_timestamp(value) is not None:
            return value
    return None


def _scheduled_time(run):
    """When the run is due, as a time.time() value, or None if it does not say."""
    return parse_timestamp(_scheduled_text(run))


#: The key of the reason in a run that scheduled_runs hands over only to be crashed.
REFUSED = "agent.py: refused"


def _poll_entry(item):
    """(the flow run, why it cannot be started or None) of one item of a poll's answer."""
    if isinstance(item, _Unparsable):
        return {"id": item.run_id}, ("the flow run from the API nests lists and objects too "
                                     "deeply to parse")
    run = item.get("flow_run") if isinstance(item, dict) else None
    return run, run_problem(run)


def run_problem(run):
    """Why a run from a poll's answer cannot be started (None when it can)."""
    if not isinstance(run, dict):
        return "an entry is not {\"flow_run\": {...}}"
    for key in ("id", "deployment_id", "flow_id"):
        value = run.get(key)
        if (value is not None or key == "id") and not _is_uuid(value):
            return "its %s %s is not a UUID" % (key, _id_text(value))
    if nested_deeper(run, MAX_JSON_DEPTH):
        return ("the flow run from the API nests lists and objects deeper than %d levels"
                % MAX_JSON_DEPTH)
    return None


###############################################################################
# Job configuration ###########################################################
###############################################################################


def _optional(kind, **extra):
    return dict(extra, anyOf=[{"type": kind}, {"type": "null"}], default=None)


_ENV_VARIABLE = {"title": "Environment Variables", "type": "object",
                 "description": "Environment variables to set when starting a flow run.",
                 "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "null"}]}}
_LABELS_VARIABLE = {"title": "Labels", "type": "object",
                    "description": "Labels applied to infrastructure created by a worker.",
                    "additionalProperties": {"type": "string"}}
_STREAM_OUTPUT_VARIABLE = {"title": "Stream Output", "type": "boolean", "default": True,
                           "description": "If enabled, workers will stream output from flow "
                                          "run processes to local standard output."}

#: The base job template Prefect 3 gives a `process` pool (as generated by Prefect 3.8.8).
PROCESS_BASE_JOB_TEMPLATE = {
    "job_configuration": {key: "{{ %s }}" % key for key in (
        "command", "env", "labels", "name", "stream_output", "working_dir")},
    "variables": {"type": "object", "properties": {
        "name": _optional("string", title="Name",
                          description="Name given to infrastructure created by a worker."),
        "env": _ENV_VARIABLE,
        "labels": _LABELS_VARIABLE,
        "command": _optional("string", title="Command", description=(
            "The command to use when starting a flow run. In most cases, this should be left "
            "blank and the command will be automatically generated by the worker.")),
        "stream_output": _STREAM_OUTPUT_VARIABLE,
        "working_dir": dict(_optional("string", title="Working Directory", description=(
            "If provided, workers will open flow run processes within the specified path as "
            "the working directory. Otherwise, a temporary directory will be created.")),
            anyOf=[{"type": "string", "format": "path"}, {"type": "null"}]),
    }},
}

#: The base job template of a `docker` pool: the variables of Prefect's docker worker
#: (prefect-docker), with registry credentials as a plain object instead of a block.
DOCKER_BASE_JOB_TEMPLATE = {
    "job_configuration": {key: "{{ %s }}" % key for key in (
        "command", "env", "labels", "name", "image", "registry_credentials",
        "image_pull_policy", "networks", "network_mode", "auto_remove", "volumes",
        "stream_output", "mem_limit", "memswap_limit", "privileged", "container_create_kwargs")},
    "variables": {"type": "object", "required": ["image"], "properties": {
        "command": _optional("string", title="Command"),
        "env": _ENV_VARIABLE,
        "labels": _LABELS_VARIABLE,
        "name": _optional("string", title="Name"),
        "image": {"title": "Image", "type": "string",
                  "examples": ["docker.io/prefecthq/prefect:3-latest"]},
        "registry_credentials": _optional("object", title="Registry Credentials"),
        "image_pull_policy": {"anyOf": [{"type": "string", "enum": [
            "IfNotPresent", "Always", "IfPossible", "Never"]}, {"type": "null"}],
            "default": None, "title": "Image Pull Policy"},
        "networks": {"title": "Networks", "type": "array", "items": {"type": "string"}},
        "network_mode": _optional("string", title="Network Mode"),
        "auto_remove": {"title": "Auto Remove", "type": "boolean", "default": False},
        "volumes": {"title": "Volumes", "type": "array", "items": {"type": "string"},
                    "examples": ["/my/local/path:/path/in/container"]},
        "stream_output": _STREAM_OUTPUT_VARIABLE,
        "mem_limit": _optional("string", title="Memory Limit"),
        "memswap_limit": _optional("string", title="Memory Swap Limit"),
        "privileged": {"title": "Privileged", "type": "boolean", "default": False},
        "container_create_kwargs": _optional("object", title="Container Configuration"),
    }},
}

PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")
_MISSING = object()


class JobConfigError(Exception):
    """The run's job configuration cannot be turned into something to start."""


class BlockUnusable(Exception):
    """The deployment's infrastructure block cannot be read, or is not a block document."""


def block_type_of(block):
    """An infrastructure block document's type slug ("process", "docker-container", ...)."""
    slug = _obj(block.get("block_type")).get("slug")
    return slug if isinstance(slug, str) else _obj(block.get("data")).get("type")


def block_problem(block):
    """Why a block document from the API cannot be used, or None."""
    if not isinstance(block.get("data"), dict):
        return "its data is not an object"
    if not isinstance(block_type_of(block), str):
        return "it names no block type"
    return None


def _set_dotted(data, path, value):
    """Set `value` at the dot-path `path` ("env.FOO") in `data`, making objects on the way,
    as Prefect 2's agent applies a deployment's infra_overrides to its block."""
    if not isinstance(path, str) or not path:
        raise JobConfigError("the deployment's infra_overrides has a key that is not a "
                             "dot-path: %.100r" % (path,))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def block_command(data):
    """The block's command (a list, used as argv without splitting; None: the default) as
    the one string the job configuration's command is, each word quoted."""
    command = data.get("command")
    if command is None:
        return None
    if not isinstance(command, list) or not command or not all(
            isinstance(word, str) for word in command):
        raise JobConfigError("the infrastructure block's command must be a list of strings "
                             "or null, got %.100r" % (command,))
    return " ".join(shlex.quote(word) for word in command)


def block_env(flow_run_env, data):
    """What the agent sets for every run, with the block's env on top (Prefect 2's agent
    order: the block wins; a null removes), except the run's id, by which a restarted agent
    finds the run's processes."""
    env = dict(flow_run_env)
    env.update(_as_env(data.get("env")))
    env["PREFECT__FLOW_RUN_ID"] = flow_run_env["PREFECT__FLOW_RUN_ID"]
    return env


class Job:
    """What to start for one run, as job configuration resolved it: argv, environment,
    directory, output handling, bytes for its stdin, what its launcher keeps of it
    (`infrastructure`) and the files it writes beside its output (`files`), both journaled
    with its start. `launcher` is set by the launcher that built it, which starts it."""

    def __init__(self, argv, env, working_dir, stream_output, stdin_data=None,
                 infrastructure=None, files=()):
        self.argv, self.env, self.working_dir = argv, env, working_dir
        self.stream_output = stream_output
        self.stdin_data = stdin_data
        self.infrastructure = infrastructure or {}
        self.files = list(files)  # removed with the run's output when its story is told
        self.launcher = None


def merge_job_variables(deployment_vars, run_vars):
    """Deployment job_variables overlaid by the run's own: `env` merged per key, the rest
    replaced (Prefect 3's order, as in BaseJobConfiguration.from_template_and_values)."""
    values = dict(deployment_vars) if isinstance(deployment_vars, dict) else {}
    run_vars = dict(run_vars) if isinstance(run_vars, dict) else {}
    if isinstance(values.get("env"), dict) and isinstance(run_vars.get("env"), dict):
        env = dict(values["env"])
        env.update(run_vars.pop("env"))
        values["env"] = env
    values.update(run_vars)
    return values


def _nest_dotted_keys(values):
    nested = {}
    for key, value in values.items():
        if "." in key:
            head, _, rest = key.partition(".")
            target = nested.setdefault(head, {})
            if isinstance(target, dict):
                target.update(_nest_dotted_keys({rest: value}))
    for key, value in values.items():
        if "." not in key:
            if isinstance(value, dict) and isinstance(nested.get(key), dict):
                merged = dict(nested[key])
                merged.update(value)
                nested[key] = merged
            else:
                nested[key] = value
    return nested


def resolve_job_configuration(base_job_template, values, lookup_prefect=None, environ=None):
    try:
        return _resolve_job_configuration(base_job_template, values, lookup_prefect, environ)
    except RecursionError:
        raise JobConfigError("the job configuration or job variables are nested too deeply")


def _resolve_job_configuration(base_job_template, values, lookup_prefect, environ):
    """The pool's job_configuration with every {{ placeholder }} filled from the template's
    defaults overlaid by `values`, as Prefect 3's worker resolves it. Keys whose sole
    placeholder has no value are dropped. `lookup_prefect(name)` answers `prefect.variables.*` / `prefect.blocks.*`."""
    template = base_job_template or PROCESS_BASE_JOB_TEMPLATE
    if not isinstance(template, dict) or not isinstance(template.get("job_configuration"), dict):
        raise JobConfigError("the pool's base job template has no job_configuration object")
    properties = _obj(template.get("variables")).get("properties") or {}
    if not isinstance(properties, dict):
        raise JobConfigError("the pool's base job template variables.properties is not an object")
    import copy
    config = copy.deepcopy(template["job_configuration"])
    defaults = {key: spec["default"] for key, spec in properties.items()
                if isinstance(spec, dict) and spec.get("default") is not None}
    if isinstance(defaults.get("env"), dict):
        if isinstance(config.get("env"), dict):
            config["env"] = dict(config["env"], **defaults["env"])
        else:
            config["env"] = defaults["env"]
    variables = dict(defaults)
    variables.update(_nest_dotted_keys(values or {}))
    if isinstance(config.get("env"), dict) and isinstance(variables.get("env"), dict):
        config["env"] = dict(config["env"], **variables["env"])
    environ = os.environ if environ is None else environ
    return _substitute(config, variables, lookup_prefect, environ)


def _substitute(node, variables, lookup_prefect, environ):
    if isinstance(node, dict):
        resolved = {}
        for key, value in node.items():
            value = _substitute(value, variables, lookup_prefect, environ)
            if value is not _MISSING:
                resolved[key] = value
        return resolved
    if isinstance(node, list):
        return [item for item in (_substitute(v, variables, lookup_prefect, environ)
                                  for v in node) if item is not _MISSING]
    if not isinstance(node, str):
        return node
    whole = PLACEHOLDER.fullmatch(node.strip())
    if whole:
        value = _lookup(whole.group(1), variables, lookup_prefect, environ)
        return _MISSING if value is None or value is _MISSING else value

    def text_of(match):
        value = _lookup(match.group(1), variables, lookup_prefect, environ)
        if value is None or value is _MISSING:
            return ""
        return value if isinstance(value, str) else json.dumps(value)

    return PLACEHOLDER.sub(text_of, node)


def _lookup(name, variables, lookup_prefect, environ):
    if name.startswith("$"):
        return environ.get(name[1:], _MISSING)
    if name.startswith("prefect."):
        if lookup_prefect is None:
            return _MISSING
        return lookup_prefect(name)
    value = variables
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", name):
        if part.startswith("[") and isinstance(value, list):
            index = int(part[1:-1])
            value = value[index] if index < len(value) else _MISSING
        elif isinstance(value, dict):
            value = value.get(part, _MISSING)
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _as_bool(value, field):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise JobConfigError("job variable %r must be true or false, got %r" % (field, value))


def _as_env(value):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobConfigError("job variable 'env' must be an object of strings, got %s %.100r"
                             % (type(value).__name__, value))
    for key, item in value.items():
        if item is not None and not isinstance(item, str):
            raise JobConfigError("job variable env.%.100r must be a string or null, got %s %.100r"
                                 % (key, type(item).__name__, item))
        if not key or "=" in key or "\0" in key or (item and "\0" in item):
            raise JobConfigError("job variable env has an invalid entry %.100r" % key)
    return value


def build_job(config, flow_run_env, default_argv, show_flow_logs):
    """The Job for a resolved process job configuration.

    `flow_run_env` holds what the agent always sets (run id, API URL, credentials); it wins
    over the job's own env so a run always reports to the server that handed it out."""
    argv = _command_argv(config, default_argv)
    working_dir = config.get("working_dir")
    if working_dir is not None and (not isinstance(working_dir, str) or not working_dir.strip()):
        raise JobConfigError("job variable 'working_dir' must be a path, got %.100r" % (working_dir,))
    env = dict(os.environ)
    env.update(_as_env(config.get("env")))
    env.update(flow_run_env)
    env = {key: value for key, value in env.items() if value is not None}
    stream = show_flow_logs or _as_bool(config.get("stream_output", True), "stream_output")
    return Job(argv, env, working_dir, stream)


def _command_argv(config, default_argv):
    """The job's `command` split with shell rules (never run through a shell), or the default."""
    command = config.get("command")
    if command is None or command == "":
        return list(default_argv)
    if not isinstance(command, str):
        raise JobConfigError("job variable 'command' must be a string, got %s %.100r"
                             % (type(command).__name__, command))
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise JobConfigError("job variable 'command' %.200r cannot be split: %s" % (command, exc))
    if not argv:
        raise JobConfigError("job variable 'command' %.200r is blank" % command)
    return argv


#: Prefect's image_pull_policy values as `docker run --pull` values.
DOCKER_PULL = {"IfNotPresent": "missing", "Always": "always", "Never": "never"}
#: The command a docker run starts when the job names none (Prefect's docker worker's too).
DOCKER_DEFAULT_COMMAND = ["prefect", "flow-run", "execute"]
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_DOMAIN_PART = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
#: Docker's image reference grammar (distribution/reference): [host[:port]/]path[:tag][@digest].
#: Patterns here stay strings, compiled (and cached by re) at first use: compiling them all
#: at import would add a millisecond to every start-up.
IMAGE_REFERENCE = (
    r"(?:(?:{d}(?:\.{d})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?/)?{p}(?:/{p})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{{32,}})?"
    .format(d=_DOMAIN_PART, p=_PATH_PART))
#: Docker's container name grammar (the daemon refuses any other).
CONTAINER_NAME = r"[a-zA-Z0-9][a-zA-Z0-9_.-]+"
#: Sizes as docker reads them (go-units RAMInBytes): 512m, 1.5g, 1024...
MEMORY_SIZE = r"\d+(?:\.\d+)* ?[kKmMgGtTpP]?[iI]?[bB]?"
#: docker's --env-file reader (a Go bufio.Scanner) refuses longer lines (docker 28 and 20.10 CLIs).
ENV_FILE_LINE_LIMIT = 65535


def build_docker_job(config, flow_run_env, labels, container_name, cidfile, show_flow_logs,
                     docker):
    """The Job for a resolved docker job configuration: an attached `docker run` whose exit
    code is the container's. No job variable can add an option: each value is checked and
    travels in one `--flag=value` word, the image after `--`. The container's environment
    travels as an --env-file on the CLI's stdin (start_process): never in its argv, where
    `ps` would show the API key, nor in its own environment, which is the agent's."""
    for field in ("registry_credentials", "container_create_kwargs"):
        if config.get(field):
            raise JobConfigError("job variable %r is not supported by agent.py, which drives the "
                                 "docker CLI: remove it (log in with `docker login` on the host "
                                 "for private registries)" % field)
    if not docker.path:
        raise JobConfigError("command 'docker' not found on agent.py's PATH at start-up: "
                             "install the docker CLI and restart agent.py")
    image = _image_reference(config.get("image"))
    env = dict(_as_env(config.get("env")))
    env.update(flow_run_env)
    env = {key: value for key, value in env.items() if value is not None}
    clashing = sorted(key for key in env if key.startswith("DOCKER_"))
    if clashing:
        raise JobConfigError("job variable env.%s cannot be passed to a container: DOCKER_* "
                             "variables configure the docker CLI itself" % clashing[0])
    networks = [_docker_value(network, "networks")
                for network in _as_strings(config.get("networks"), "networks")]
    network_mode = config.get("network_mode")
    if network_mode is not None:
        network_mode = _docker_value(network_mode, "network_mode")
    api_host = urllib.parse.urlsplit(env.get("PREFECT_API_URL", "")).hostname
    if network_mode is None and not networks and api_host in LOOPBACK_HOSTS:
        network_mode = "host"  # the server listens on this host's loopback (Prefect does this)
    name = config.get("name") or container_name
    if not isinstance(name, str) or not re.fullmatch(CONTAINER_NAME, name):
        raise JobConfigError("job variable 'name' %.100r is not a docker container name "
                             "([a-zA-Z0-9][a-zA-Z0-9_.-]+)" % (name,))
    argv = docker.argv("run", "--name=" + name, "--cidfile=" + cidfile,
                       "--pull=" + _pull_policy(config.get("image_pull_policy"), image),
                       "--env-file=/dev/stdin")
    if network_mode != "host" and api_host in LOOPBACK_HOSTS:
        env["PREFECT_API_URL"] = env["PREFECT_API_URL"].replace(api_host, "host.docker.internal", 1)
        argv.append("--add-host=host.docker.internal:host-gateway")
    argv += _label_words(labels, config.get("labels"))
    argv += ["--network=" + network for network in [network_mode] + networks[:1] if network]
    argv += ["--volume=" + _docker_value(volume, "volumes")
             for volume in _as_strings(config.get("volumes"), "volumes")]
    if _as_bool(config.get("auto_remove", False), "auto_remove"):
        argv.append("--rm")
    for field, flag in (("mem_limit", "--memory"), ("memswap_limit", "--memory-swap")):
        if config.get(field) is not None:
            argv.append("%s=%s" % (flag, _memory_size(config[field], field)))
    if _as_bool(config.get("privileged", False), "privileged"):
        argv.append("--privileged")
    # The CLI reads no option after the image (its parser stops at the first argument; docker
    # 28 and 20.10 CLIs), so the command's words are the container's argv; `--` ends the
    # options before the image, which both CLIs accept.
    argv += ["--", image] + _command_argv(config, DOCKER_DEFAULT_COMMAND)
    if len(networks) > 1:
        argv = _create_connect_start(argv, name, networks[1:])
    stream = show_flow_logs or _as_bool(config.get("stream_output", True), "stream_output")
    return Job(argv, docker.env_for(flow_run_env["PREFECT__FLOW_RUN_ID"]), None, stream,
               stdin_data=_env_file(env), infrastructure={"container": name, "cidfile": cidfile},
               files=[cidfile])


def _image_reference(image):
    if not isinstance(image, str) or not image.strip():
        raise JobConfigError("job variable 'image' must name the image to run, got %.100r" % (image,))
    if not re.fullmatch(IMAGE_REFERENCE, image):
        raise JobConfigError("job variable 'image' %.100r is not a docker image reference "
                             "([host[:port]/]path[:tag][@digest], the path in lower case)" % image)
    return image


def _docker_value(value, field):
    """`value` as the value of a docker CLI option, refused when it makes no sense as one."""
    if not isinstance(value, str) or not value or value.startswith("-") or \
            re.search(CONTROL_CHARACTERS, value):
        raise JobConfigError("job variable %r has an invalid value %.100r: it must be a "
                             "non-empty string that does not start with '-' and holds no "
                             "control character" % (field, value))
    return value


def _memory_size(value, field):
    text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    unlimited = field == "memswap_limit" and text == "-1"
    if not isinstance(text, str) or not (unlimited or re.fullmatch(MEMORY_SIZE, text)):
        raise JobConfigError("job variable %r must be a size such as 512m%s, got %.100r"
                             % (field, " (or -1)" if field == "memswap_limit" else "", value))
    return text


def _label_words(labels, custom_labels):
    """`--label=KEY=VALUE` words: one word each, so a value never reads as an option; a key
    that could end early (=) or read as one (-) is refused."""
    custom_labels = custom_labels or {}
    if not isinstance(custom_labels, dict) or not all(
            isinstance(v, str) for v in custom_labels.values()):
        raise JobConfigError("job variable 'labels' must be an object of strings, got %.100r"
                             % (custom_labels,))
    merged = dict(labels)
    merged.update(custom_labels)
    for key, value in merged.items():
        if not key or key.startswith("-") or "=" in key or _has_space_or_control(key):
            raise JobConfigError("job variable 'labels' has an invalid key %.100r: it must not "
                                 "be empty, start with '-', or hold '=', spaces or control "
                                 "characters" % key)
        if "\0" in value:
            raise JobConfigError("job variable labels.%.100s holds a NUL character" % key)
    return ["--label=%s=%s" % item for item in sorted(merged.items())]


def _has_space_or_control(text):
    return re.search(r"\s", text) or re.search(CONTROL_CHARACTERS, text)


def _env_file(env):
    """The container's variables as docker's --env-file reads them, which the CLI does on the
    client side: one NAME=VALUE per line, UTF-8, no quoting, so no line breaks in values."""
    lines = []
    for key, value in sorted(env.items()):
        if key.startswith("#") or _has_space_or_control(key):
            raise JobConfigError("job variable env has an invalid name %.100r for a container: "
                                 "no spaces, control characters or leading '#'" % key)
        if "\n" in value or "\r" in value:
            raise JobConfigError("job variable env.%.100s holds a line break, which docker's "
                                 "--env-file cannot carry (one NAME=VALUE a line, no quoting)" % key)
        try:
            line = ("%s=%s" % (key, value)).encode("utf-8")
        except UnicodeEncodeError:
            raise JobConfigError("job variable env.%.100s is not valid Unicode text" % key)
        if len(line) > ENV_FILE_LINE_LIMIT:
            raise JobConfigError("job variable env.%.100s is longer than docker's --env-file "
                                 "takes (64 KiB a variable)" % key)
        lines.append(line + b"\n")
    return b"".join(lines)


def _create_connect_start(run_argv, name, more_networks):
    """`docker run` for a container on several networks, in steps: daemons before Docker 25
    (API 1.44) refuse more than one --network at creation, so the rest are connected before
    start, as Prefect's docker worker does. Every word is quoted: no user text reaches sh,
    and `docker create` reads the env file from the stdin sh passes on."""
    docker = run_argv[0]
    steps = [_shell_words(docker, "create", *run_argv[2:]) + " >/dev/null"]
    steps += [_shell_words(docker, "network", "connect", network, name) for network in more_networks]
    steps.append("exec " + _shell_words(docker, "start", "--attach", name))
    return [DockerCLI.SH, "-c", " && ".join(steps)]


def _shell_words(*words):
    return " ".join(shlex.quote(word) for word in words)


def _pull_policy(policy, image):
    if policy is None:  # Prefect's rule: always pull a floating tag, else only when missing
        tag = image.rsplit("/", 1)[-1].partition("@")[0]
        policy = "IfNotPresent" if ":" in tag and not tag.endswith(":latest") else "Always"
    if not isinstance(policy, str) or policy not in DOCKER_PULL:
        raise JobConfigError("job variable 'image_pull_policy' %.100r is not supported by "
                             "agent.py: use IfNotPresent, Always or Never" % (policy,))
    return DOCKER_PULL[policy]


def _as_strings(value, field):
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise JobConfigError("job variable %r must be a list of strings, got %.100r" % (field, value))
    return value


def container_name(run_name, run_id):
    """A docker container name for the run: its name made safe, plus part of its id."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or "").strip("_.-")[:200]
    return "%s-%s" % (slug or "flow-run", run_id[:8])


###############################################################################
# Launchers ###################################################################
###############################################################################


class LaunchError(Exception):
    """The run's process could not be started at all."""


class OutOfDescriptors(LaunchError):
    """The run's process could not be started only because no file descriptor was free: it
    never began, and nothing of the attempt is left (no output file, no temporary directory)."""


class Child:
    """One run's process that the supervisor watches: started by a launcher, or found again
    by one after a restart. Made on the thread that starts or recovers it; from then on the
    supervisor thread reads and updates it, and other threads only ask it to stop
    (Supervisor.terminate)."""

    TAIL_LINES = 20

    def __init__(self, run_id, run_name, pid, output_path, stream_output, launcher,
                 process=None, start_time=None, temp_dir=None, argv_text="",
                 infrastructure=None):
        self.run_id, self.run_name, self.pid = run_id, run_name, pid
        self.launcher = launcher
        self.infrastructure = infrastructure or {}  # what the launcher keeps (a container name)
        self.named = False  # the API was told its infrastructure_pid (or was, before a restart)
        self.recovered = None  # how a restart found it again, for the run's log
        self.helpers = []  # processes the launcher ran to signal it, reaped by the supervisor
        self.process = process  # None when adopted: not our child, so no exit status
        self.start_time = start_time if start_time is not None else process_start_time(pid)
        self.output_path, self.stream_output = output_path, stream_output
        # The server names the run: its name must not drive the terminal the output goes to.
        self.prefix = "[%s] " % escape_controls(str(run_name))
        self.temp_dir, self.argv_text = temp_dir, argv_text
        self.output = None
        self.reopen_from_end = None  # how to open the output again, when it could not be
        self.tail = collections.deque(maxlen=self.TAIL_LINES)
        self.partial = b""
        self.behind = False  # output is waiting that the last look left for the next
        self.returncode = None
        self.stop_reason = None  # "cancelled" or "stopped" once the agent signals it
        self.grace = None  # seconds from SIGTERM to SIGKILL
        self.term_at = None  # when the supervisor sends SIGTERM (an engine may ack sooner)
        self.notified = False  # the engine was told of the cancellation (ControlChannel)
        self.kill_at = None

    def open_output(self, from_end=False):
        """Open the output file to follow it; from_end (an adopted child): skip what an
        earlier agent passed on, keeping only its last lines for a crash message."""
        try:
            # Unbuffered: the supervisor reads in big chunks anyway, and a buffer per child
            # would cost 8 KB of memory for each of hundreds of running flows.
            self.output = open(self.output_path, "rb", buffering=0)
        except OSError as exc:
            self.output = None
            if descriptor_shortage.noted("opening the output of run %s" % self.run_id, exc):
                self.reopen_from_end = from_end  # the supervisor tries again next tick
            return
        self.reopen_from_end = None
        if from_end:
            size = os.fstat(self.output.fileno()).st_size
            self.output.seek(max(0, size - 8192))
            lines = self.output.read(8192).decode("utf-8", "replace").splitlines()
            self.tail.extend(line[:500] for line in lines[1:])  # the first may be cut

    def signal(self, signum):
        """Signal what the run runs as (its launcher knows how); False when it is gone."""
        return self.launcher.signal(self, signum)


def _proc_stat(pid):
    """(start time, session id) of a live process, or None (gone, or a zombie)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else (int(fields[19]), int(fields[3]))


def process_start_time(pid):
    """When the process started (clock ticks since boot, from /proc), so a reused pid is never
    mistaken for our child; None where /proc is not available."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[0]


def process_is(pid, start_time):
    """Whether `pid` is still the process that started at `start_time` (and not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else: the start time decides
    current = process_start_time(pid)
    if start_time is None or current is None:
        return current is not None or not os.path.isdir("/proc")
    return current == start_time


def temp_dir_for(run_id):
    """A fresh path for a run's temporary working directory, named before it is made, so
    that the journal can hold it first and a restart can remove it."""
    import tempfile
    return os.path.join(tempfile.gettempdir(), "agentpy-%s-%s" % (run_id[:8], os.urandom(6).hex()))


def start_process(launcher, run_id, run_name, job, output_path, temp_dir=None):
    """Start `job` in its own session (so its whole tree can be signalled) with its output
    appended to `output_path`, a file, so the run outlives the agent without a broken pipe.
    Without a working directory it runs in `temp_dir`, made here (0700 whatever the umask;
    mkdir fails rather than follow anything planted at that path). Raises LaunchError with a
    reason a user can act on."""
    cwd = job.working_dir
    if cwd is None:
        try:
            os.mkdir(temp_dir, 0o700)
            os.chmod(temp_dir, 0o700)
        except OSError as exc:
            raise LaunchError("cannot make a temporary working directory %r: %s"
                              % (temp_dir, exc.strerror or exc))
        cwd = temp_dir
    elif not os.path.isdir(cwd):
        raise LaunchError("working directory %r does not exist" % cwd)
    else:
        temp_dir = None
    stdin = None
    try:
        import subprocess
        if job.stdin_data is not None:
            stdin = _memory_file(job.stdin_data)
        # The output file exists before anything starts: a restart that finds none knows
        # that the run never began (Agent._recover_start).
        output = open_private(output_path, os.O_WRONLY | os.O_APPEND)
        try:
            process = subprocess.Popen(
                job.argv, cwd=cwd, env=job.env, stdout=output,
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        finally:
            os.close(output)
    except FileNotFoundError:
        reason = "command %r not found (argv: %s)" % (job.argv[0], _argv_text(job.argv))
    except PermissionError:
        reason = "command %r is not executable (argv: %s)" % (job.argv[0], _argv_text(job.argv))
    except (OSError, ValueError) as exc:
        if descriptor_shortage.noted("starting run %s" % run_id, exc):
            _remove_unstarted(output_path, temp_dir)
            raise OutOfDescriptors(exc)
        reason = "cannot start %s: %s" % (_argv_text(job.argv), exc)
    else:
        child = Child(run_id, run_name, process.pid, output_path, job.stream_output, launcher,
                      process=process, temp_dir=temp_dir, argv_text=_argv_text(job.argv),
                      infrastructure=job.infrastructure)
        child.open_output()
        return child
    finally:
        if stdin is not None:
            stdin.close()
    _remove(temp_dir)
    raise LaunchError(reason)


def _memory_file(data):
    """A file holding `data`, read from the start, that no other user can open and that
    leaves nothing on disk, even after a kill -9: a memfd, else an unnamed 0600 temporary
    file where the system has no memfd (not Linux)."""
    try:
        handle = open(os.memfd_create("agentpy-env"), "w+b")
    except (AttributeError, OSError):
        import tempfile
        handle = tempfile.TemporaryFile()
    handle.write(data)
    handle.seek(0)
    return handle


def _remove_unstarted(output_path, temp_dir):
    """Undo a start that failed before its process began: with no output file, a restart
    knows that it never began. The temporary directory is still empty, and rmdir needs no
    descriptor (shutil.rmtree does)."""
    for remove, path in ((os.unlink, output_path), (os.rmdir, temp_dir)):
        try:
            if path:
                remove(path)
        except OSError:
            pass


def run_processes(sessions):
    """{run id: [(pid, start time, session id)]} of the live processes of runs: those whose
    environment carries the run's PREFECT__FLOW_RUN_ID (every process a run starts inherits
    it, daemons included, as GitHub's runner finds a job's processes by a variable of its
    own), and those still in the session its process led. `sessions` maps run ids to that
    session, or to None where a pid may since have been reused. Linux (/proc) only."""
    by_env = {("PREFECT__FLOW_RUN_ID=%s" % run_id).encode(): run_id for run_id in sessions}
    by_session = {sid: run_id for run_id, sid in sessions.items() if sid}
    found = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    me = os.getpid()
    for name in names:
        if not name.isdigit() or int(name) in (me, 1):
            continue
        pid = int(name)
        stat = _proc_stat(pid)
        if stat is None:
            continue
        start_time, sid = stat
        run_id = by_session.get(sid) or by_env.get(_run_id_variable(pid))
        if run_id is not None:
            found.setdefault(run_id, []).append((pid, start_time, sid))
    return found


def _run_id_variable(pid):
    """The PREFECT__FLOW_RUN_ID=... entry of a process's environment, or None."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as handle:
            environ = handle.read()
    except OSError:
        return None
    environ = b"\0" + environ
    at = environ.find(b"\0PREFECT__FLOW_RUN_ID=")
    if at < 0:
        return None
    end = environ.find(b"\0", at + 1)
    return environ[at + 1:] if end < 0 else environ[at + 1:end]


def _argv_text(argv, limit=300):
    text = " ".join(shlex.quote(part) for part in argv)
    return text if len(text) <= limit else text[:limit] + "..."


#: What an exit code most likely means, for the CRASHED message (shell and Prefect conventions).
EXIT_MEANINGS = {
    1: "the process exited with a general error",
    2: "the command was misused (bad arguments)",
    125: "docker could not create or start the container (see its message below)",
    126: "the command was found but could not be executed",
    127: "the command was not found",
    137: "the process was killed with SIGKILL (often the out-of-memory killer)",
    143: "the process was terminated with SIGTERM",
    247: "the process ran out of memory",
}


def explain_exit(code):
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal %d" % -code
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return "the process was killed by %s%s" % (name, hint)
    return EXIT_MEANINGS.get(code, "the process reported failure")


def crash_message(child):
    code = child.returncode
    message = "Flow run process exited with non-zero status code %d: %s." % (code, explain_exit(code))
    return message + _tail_text(child)


def _tail_text(child):
    tail = [line for line in child.tail if line.strip()]
    text = (" Last lines of output:\n" + "\n".join(tail[-10:])) if tail else ""
    return text[:3500]


def _exit_code(status):
    """os.waitstatus_to_exitcode, which Python 3.8 lacks."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Launcher:
    """How one kind of infrastructure runs a job: build it from the resolved job
    configuration, start it as a Child, signal it, name it to the API, find it again after a
    restart. A subclass serves one pool type (LAUNCHERS picks it); its base job template is
    the one a pool of that type is created with. Made with the Agent, never changed after:
    the timetable thread builds and starts jobs, the supervisor thread signals and names
    them, the agent loop thread recovers them."""

    name = None
    base_job_template = None
    #: The Prefect 2 infrastructure block type it runs, or None.
    block_type = None
    #: The run's engine can connect to the agent's loopback (the cancellation notice).
    engine_on_host = True

    def __init__(self, config, environ):
        self.config = config

    def job(self, job_configuration, run, flow_run_env, output_path):
        """The Job for a resolved job configuration; JobConfigError when it cannot be run."""
        job = self._build(job_configuration, run, flow_run_env, output_path)
        job.launcher = self
        return job

    def _build(self, job_configuration, run, flow_run_env, output_path):
        raise NotImplementedError

    def job_from_block(self, data, run, flow_run_env, output_path):
        """The Job for a Prefect 2 infrastructure block's data (its infra_overrides set):
        the block's fields as the job configuration this launcher reads, its env over
        flow_run_env. JobConfigError for a field it cannot honour."""
        job = self._build(self._job_configuration_of_block(data), run,
                          block_env(flow_run_env, data), output_path)
        job.launcher = self
        return job

    def _job_configuration_of_block(self, data):
        raise NotImplementedError

    def start(self, run_id, run_name, job, output_path, temp_dir):
        """The started Child; LaunchError (OutOfDescriptors: try again later) when it is not."""
        return start_process(self, run_id, run_name, job, output_path, temp_dir)

    def signal(self, child, signum):
        raise NotImplementedError

    def infrastructure_pid(self, child):
        """(infrastructure_pid for the API, a line for the run's log or None) once the run's
        infrastructure can be named, else None: the supervisor asks each tick until then."""
        raise NotImplementedError

    def session(self, child):
        """The session that the run's process leads, whose leftovers are stopped with it."""
        return child.pid

    def where(self, child):
        """Where the run runs, for its log."""
        return "process %d" % child.pid

    def prepare_recovery(self, entries):
        """Before recover() is called for the journal's runs one by one: a chance to ask
        about all of them at once (`entries`: every run's journal entry, by run id)."""

    def recover(self, run_id, entry, output_path):
        """After a restart, what became of a run the journal says was started: its Child
        (adopted or re-attached: child.recovered says which), a crash report's message, or
        None when nothing of it is left."""
        return self.adopt(run_id, entry, output_path)

    def adopt(self, run_id, entry, output_path):
        """A Child for the journal's process, if it still runs on this host."""
        if not journaled_process_runs(entry):
            return None
        pid = entry["pid"]
        child = Child(run_id, entry.get("run_name") or run_id, pid,
                      entry.get("output") or output_path, bool(entry.get("stream_output")),
                      self, start_time=entry.get("start_time"), temp_dir=entry.get("temp_dir"),
                      argv_text=entry.get("argv") or "",
                      infrastructure=_obj(entry.get("infrastructure")))
        child.named = True
        child.recovered = "adopted process %d" % pid
        child.open_output(from_end=True)
        return child

    def pool_note(self, pool_name):
        """(level, line) to log when a pool turns out to be of this type, or None."""
        return None

    def banner_line(self):
        """A line for the start-up banner when --type names this launcher, or None."""
        return None


def journaled_process_runs(entry):
    """Whether the process a run's journal entry names still runs, on this host."""
    pid = entry.get("pid")
    return (entry.get("host") == socket.gethostname() and isinstance(pid, int)
            and process_is(pid, entry.get("start_time")))


class ProcessLauncher(Launcher):
    """Runs a job as a local process leading a session of its own, so that its whole tree
    can be signalled."""

    name = "process"
    base_job_template = PROCESS_BASE_JOB_TEMPLATE
    block_type = "process"

    def _build(self, job_configuration, run, flow_run_env, output_path):
        return build_job(job_configuration, flow_run_env,
                         [self.config.python, "-m", "prefect.engine"], self.config.show_flow_logs)

    def _job_configuration_of_block(self, data):
        return {"command": block_command(data), "working_dir": data.get("working_dir"),
                "stream_output": data.get("stream_output", True)}

    def signal(self, child, signum):
        try:
            os.killpg(child.pid, signum)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            log.warning("run %s: not allowed to signal process group %d", child.run_id, child.pid)
            return False

    def infrastructure_pid(self, child):
        return "%s:%d" % (socket.gethostname(), child.pid), None


def find_command(name, environ):
    """The absolute path of the executable `name` on environ's PATH, or None."""
    for directory in environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(os.path.abspath(directory or os.curdir), name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class ReaperHold:
    """Keeps the reaper of PID 1 (the supervisor thread's waitpid(-1)) from exit statuses it
    must leave to others: a subprocess call's, which subprocess would read as 0, a success,
    and a run's whose process the supervisor does not watch yet, which would be lost. Each
    such stretch runs inside `with reaper_hold:` (any thread); the reaper takes statuses only
    while none is under way."""

    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight = 0

    def __enter__(self):
        with self._lock:
            self._in_flight += 1

    def __exit__(self, *exc):
        with self._lock:
            self._in_flight -= 1

    def unless_waiting(self, reap):
        """reap()'s answer, under the lock so that no call starts meanwhile; None, without
        calling it, while a call is in flight."""
        with self._lock:
            return None if self._in_flight else reap()


reaper_hold = ReaperHold()


class DockerCLI:
    """The host's docker CLI, found once at start-up on the agent's own PATH, and the
    environment it runs with: the agent's own at start-up, never a job's, whose PATH would
    pick the program run as root and whose LD_PRELOAD would load a library into it. Made
    with the Agent; read by every thread, never changed."""

    SH = "/bin/sh"  # POSIX's shell, at the path subprocess's shell=True assumes too
    TIMEOUT_SECONDS = 60  # a query's, after which the daemon is taken to be unable to answer

    def __init__(self, environ):
        self.env = dict(environ)
        self.path = find_command("docker", self.env)

    def argv(self, *args):
        return [self.path or "docker"] + list(args)

    def env_for(self, run_id):
        """The CLI's environment for one run's docker process: the run id marks it as the
        run's, as it marks a process run's (run_processes)."""
        return dict(self.env, PREFECT__FLOW_RUN_ID=run_id)

    def answer(self, *args, deadline=None):
        """The stdout words of a docker CLI query, or None when it fails or docker cannot
        answer within TIMEOUT_SECONDS, or by `deadline` (a time.monotonic())."""
        import subprocess
        timeout = self.TIMEOUT_SECONDS
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                return None
        try:
            with reaper_hold:
                answer = subprocess.run(self.argv(*args), env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return answer.stdout.decode("utf-8", "replace").split() if answer.returncode == 0 else None

    def container_for_run(self, run_id, deadline=None):
        """The container labelled io.prefect.flow-run-id=run_id, or None."""
        names = self.answer("ps", "-a", "--filter", "label=io.prefect.flow-run-id=%s" % run_id,
                            "--format", "{{.Names}}", deadline=deadline)
        return names[0] if names else None

    def container_state(self, name, deadline=None):
        """(status, exit code) of a container per the docker daemon, or (None, None) when it
        does not exist or docker cannot tell."""
        fields = self.answer("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name,
                             deadline=deadline)
        if not fields or len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            return None, None
        return fields[0], int(fields[1])


class DockerLauncher(Launcher):
    """Runs a job as a container through the host's docker CLI: the child is an attached
    `docker run`, whose exit code is the container's, and after a restart the daemon is
    asked for the container by the run's label: on docker-recovery threads, for all the
    journal's runs at once (prepare_recovery), while the agent loop thread recovers them."""

    name = "docker"
    base_job_template = DOCKER_BASE_JOB_TEMPLATE
    block_type = "docker-container"
    #: A DockerContainer block's fields that become the same job variables of a docker pool.
    BLOCK_FIELDS = ("image", "networks", "network_mode", "labels", "auto_remove", "volumes",
                    "stream_output", "mem_limit", "memswap_limit", "privileged")
    #: The block's image_pull_policy values (Prefect 2.20) as the job variable's.
    BLOCK_PULL_POLICIES = {"IF_NOT_PRESENT": "IfNotPresent", "ALWAYS": "Always", "NEVER": "Never"}
    #: What a DockerContainer block runs when it names no command (Prefect 2.20's).
    BLOCK_DEFAULT_COMMAND = "python -m prefect.engine"
    engine_on_host = False  # an engine in a container cannot reach the host's loopback
    #: Daemon queries at once while recovering (a docker CLI process each).
    RECOVERY_THREADS = 16

    def __init__(self, config, environ):
        super().__init__(config, environ)
        self.cli = DockerCLI(environ)
        self._asked = {}  # run id -> Future of _ask_daemon's answer, while recovering
        self._answers_due = 0.0  # the time.monotonic() by which the daemon answers them all

    def _build(self, job_configuration, run, flow_run_env, output_path):
        return build_docker_job(job_configuration, flow_run_env,
                                self._labels(run, flow_run_env),
                                container_name(run.get("name"), run["id"]), output_path + ".cid",
                                self.config.show_flow_logs, self.cli)

    def _job_configuration_of_block(self, data):
        if data.get("image_registry"):
            raise JobConfigError("the DockerContainer block's field 'image_registry' is not "
                                 "supported by agent.py, which drives the docker CLI: remove "
                                 "it (log in with `docker login` on the host instead)")
        config = {field: data[field] for field in self.BLOCK_FIELDS if field in data}
        policy = data.get("image_pull_policy")
        config["image_pull_policy"] = self.BLOCK_PULL_POLICIES.get(policy, policy)
        config["command"] = block_command(data) or self.BLOCK_DEFAULT_COMMAND
        return config

    def _labels(self, run, flow_run_env):
        """Prefect's labels for a flow run's container (its docker worker's names)."""
        labels = {"io.prefect.flow-run-id": run["id"],
                  "io.prefect.version": "agent.py-" + __version__,
                  "io.prefect.work-pool-name": self.config.pool,
                  "io.prefect.worker-name": self.config.name}
        for label, key in (("io.prefect.flow-run-name", "name"), ("io.prefect.flow-id", "flow_id"),
                           ("io.prefect.deployment-id", "deployment_id")):
            if isinstance(run.get(key), str):
                labels[label] = run[key]
        for label, key in (("io.prefect.flow-name", "PREFECT__FLOW_NAME"),
                           ("io.prefect.deployment-name", "PREFECT__DEPLOYMENT_NAME")):
            if flow_run_env.get(key):
                labels[label] = flow_run_env[key]
        return labels

    def signal(self, child, signum):
        # The attached `docker run` would only forward SIGTERM, not SIGKILL: ask the daemon.
        name = "KILL" if signum == signal.SIGKILL else signal.Signals(signum).name[3:]
        container = child.infrastructure.get("container")
        import subprocess
        try:
            child.helpers.append(subprocess.Popen(
                self.cli.argv("kill", "--signal", name, container), env=self.cli.env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
            return True
        except OSError as exc:
            log.warning("run %s: cannot run docker kill on container %s: %s",
                        child.run_id, container, exc)
            return False

    def infrastructure_pid(self, child):
        """Named once `docker run` has written the container's id to its --cidfile (an image
        may be pulling until then)."""
        cidfile = child.infrastructure.get("cidfile")
        try:
            with open(cidfile) as handle:
                container_id = handle.read().strip()
        except (OSError, TypeError):
            return None
        try:  # the docker CLI made it under the agent's umask (in the 0700 output directory)
            os.chmod(cidfile, 0o600)
        except OSError:
            pass
        if not container_id:
            return None
        return ("docker://%s:%s" % (socket.gethostname(), container_id),
                "Container %s created: %s" % (child.infrastructure.get("container"), container_id))

    def session(self, child):
        return None  # the container's processes are the daemon's, not in the CLI's session

    def where(self, child):
        return "container %s" % child.infrastructure.get("container")

    def prepare_recovery(self, entries):
        """Ask the daemon about every run recover() may have to ask about, together and
        within one query's timeout: one after another, a hung daemon would hold the agent
        loop for a timeout per run."""
        asking = {run_id: entry for run_id, entry in entries.items()
                  if entry.get("launcher") == self.name and entry.get("phase") in
                  ("starting", "running") and not journaled_process_runs(entry)}
        self._answers_due = time.monotonic() + self.cli.TIMEOUT_SECONDS
        self._asked = {}
        if not asking:
            return
        import concurrent.futures  # here: every start recovers, few have docker runs to
        threads = concurrent.futures.ThreadPoolExecutor(
            min(len(asking), self.RECOVERY_THREADS), thread_name_prefix="docker-recovery")
        for run_id, entry in asking.items():
            self._asked[run_id] = threads.submit(self._ask_daemon, run_id, entry,
                                                 self._answers_due)
        threads.shutdown(wait=False)  # the threads end once every query is answered

    def recover(self, run_id, entry, output_path):
        """The attached `docker run` if it still runs; else the container, asked of the
        daemon by the run's label (or by the name the journal holds): re-attached while it
        runs, reported by its exit code once it has ended."""
        child = self.adopt(run_id, entry, output_path)
        if child is not None:
            return child
        name, state, code = self._daemon_answer(run_id, entry)
        if name is None:
            return None
        if state in ("running", "created", "paused", "restarting"):
            return self._attach(run_id, entry, name, output_path)
        if state is not None and code:
            return ("Container %s exited with status code %d while agent.py was restarting: %s."
                    % (name, code, explain_exit(code)))
        return ("Container %s %s when agent.py restarted, and the run never reported a final "
                "state." % (name, "had exited with status code 0" if state else "was gone"))

    def _daemon_answer(self, run_id, entry):
        """_ask_daemon's answer, taken from prepare_recovery when it asked ahead."""
        import concurrent.futures
        asked = self._asked.pop(run_id, None)
        if asked is None:
            return self._ask_daemon(run_id, entry)
        try:
            return asked.result(max(0.0, self._answers_due - time.monotonic()))
        except concurrent.futures.TimeoutError:
            # Not answered in time: past the deadline no query is made, so this is the
            # answer of a daemon that cannot answer.
            return self._ask_daemon(run_id, entry, self._answers_due)

    def _ask_daemon(self, run_id, entry, deadline=None):
        """(container, status, exit code): the container labelled with the run's id, else
        the one the journal names, and what the daemon says of it; the status is None when
        the daemon does not know it or cannot answer, the name None when nothing names one."""
        name = (self.cli.container_for_run(run_id, deadline)
                or _obj(entry.get("infrastructure")).get("container"))
        if not isinstance(name, str):
            return None, None, None
        return (name,) + self.cli.container_state(name, deadline)

    def _attach(self, run_id, entry, name, output_path):
        job = Job(self.cli.argv("start", "--attach", name), self.cli.env_for(run_id),
                  os.path.dirname(output_path), bool(entry.get("stream_output")),
                  infrastructure={"container": name})
        try:
            child = self.start(run_id, entry.get("run_name") or run_id, job, output_path, None)
        except LaunchError as exc:
            return "Could not re-attach to container %s after a restart: %s" % (name, exc)
        child.named = True
        child.recovered = "re-attached to container %s" % name
        return child

    def pool_note(self, pool_name):
        if self.cli.path:
            return INFO, ("Work pool '%s' is a docker pool: its runs start through the docker "
                          "CLI %s, with agent.py's own environment" % (pool_name, self.cli.path))
        return WARNING, ("Work pool '%s' is a docker pool, but no docker CLI was on agent.py's "
                         "PATH at start-up: its runs crash until one is installed and agent.py "
                         "restarted" % pool_name)

    def banner_line(self):
        return " docker CLI %s" % (self.cli.path or "not found on PATH: docker runs will crash")


#: The launcher for each pool type. A pool of any other type runs its flows as processes
#: (Agent._note_pool_changes says so once).
LAUNCHERS = {launcher.name: launcher for launcher in (ProcessLauncher, DockerLauncher)}



###############################################################################
# Supervision #################################################################
###############################################################################


class ControlChannel:
    """The loopback channel a Prefect 3.7+ engine connects back to (PREFECT__CONTROL_PORT and
    PREFECT__CONTROL_TOKEN in its env), so that a cancellation can be announced before the
    SIGTERM: told "c" first, the engine runs the flow's on_cancellation hooks and reports the
    run Cancelled itself. Without it the engine takes SIGTERM for a crash, runs on_crashed
    hooks and reports Crashed. Engines that do not know the channel ignore the env.

    The agent speaks protocol version one: the engine sends its token and a line, a 5-byte
    hello that is answered with "version one, no capabilities", and acknowledges an intent
    byte with "a". Only the supervisor thread touches the sockets.

    An engine sends its token as soon as it connects, so a connection that has not logged
    in within LOGIN_SECONDS is dropped, and beyond MAX_LOGINS waiting the oldest is: a flood
    of idle connections holds at most MAX_LOGINS descriptors and never the supervisor."""

    HELLO = b"\x00PF"
    HELLO_SIZE = 5
    VERSION_ONE = b"\x00PF\x01\x00"
    CANCEL, ACK = b"c", b"a"
    ACK_SECONDS = 1.0  # Prefect's runner waits as long for the acknowledgement
    LOGIN_SECONDS = 5.0
    #: With the health server's 64, a flood to both holds 128 descriptors: a limit of 1,024
    #: leaves the rest to runs (an output file and an engine connection each), the journal
    #: and the API. A burst of starts fits: each engine logs in as soon as it is accepted.
    MAX_LOGINS = 64
    ACCEPT_PAUSE_SECONDS = 1.0

    def __init__(self):
        self._lock = threading.Lock()
        self._listener = None
        self._accept_paused_until = 0.0
        self._tokens = {}  # token -> run id, until the engine logs in with it
        self._logins = {}  # socket -> (bytes so far, deadline) of connections not yet logged in
        self._engines = {}  # run id -> [socket, bytes not yet parsed]

    def register(self, run_id):
        """The env that lets run_id's engine connect; {} if the channel cannot listen."""
        with self._lock:
            if self._listener is None and not self._listen():
                return {}
            token = os.urandom(16).hex()
            self._tokens[token] = run_id
            port = self._listener.getsockname()[1]
        return {"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token}

    def _listen(self):
        listener = None
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            if listener is not None:
                listener.close()
            if descriptor_shortage.noted("listening for flow-run engines", exc):
                return False
            log.warning("cannot listen on loopback for flow-run engines (%s): cancelled runs "
                        "will get SIGTERM without notice, and may report Crashed first", exc)
            return False
        self._listener = listener
        return True

    def sockets(self):
        with self._lock:
            accepting = self._listener is not None and time.monotonic() >= self._accept_paused_until
            listening = [self._listener] if accepting else []
            return listening + list(self._logins) + [entry[0] for entry in self._engines.values()]

    def seconds_to_look(self):
        """Seconds until the channel needs a look though nothing arrives (the oldest login's
        deadline, the end of a pause in accepting), or None."""
        with self._lock:
            due = [deadline for _, deadline in list(self._logins.values())[:1]]
            if self._listener is not None and self._accept_paused_until > time.monotonic():
                due.append(self._accept_paused_until)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def tell_cancel(self, run_id):
        """Announce the cancellation to run_id's engine; False if it is not connected."""
        entry = self._engines.get(run_id)
        if entry is None:
            return False
        try:
            entry[0].send(self.CANCEL)
            return True
        except OSError:
            self.forget(run_id)
            return False

    def service(self, readable):
        """Handle what the readable sockets brought; the run ids whose engine acknowledged."""
        acknowledged = set()
        for sock in readable:
            if sock is self._listener:
                self._accept()
            elif sock in self._logins:
                self._login(sock)
            else:
                run_id = next((r for r, e in self._engines.items() if e[0] is sock), None)
                if run_id is not None and self._read_engine(run_id):
                    acknowledged.add(run_id)
        now = time.monotonic()
        for sock, (_, deadline) in list(self._logins.items()):
            if now >= deadline:
                self._drop_login(sock)
        return acknowledged

    def close(self):
        with self._lock:
            sockets = ([self._listener] if self._listener is not None else []) + list(self._logins)
            sockets += [entry[0] for entry in self._engines.values()]
            self._listener, self._tokens, self._logins, self._engines = None, {}, {}, {}
        for sock in sockets:
            sock.close()

    def forget(self, run_id):
        with self._lock:
            for token in [t for t, r in self._tokens.items() if r == run_id]:
                del self._tokens[token]
            entry = self._engines.pop(run_id, None)
        if entry is not None:
            entry[0].close()

    def _accept(self):
        for _ in range(self.MAX_LOGINS):  # then the supervisor's tick: no flood holds it here
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of descriptors, say: the engine waits in the backlog and, failing
                # that, gets SIGTERM without notice. Listening on would spin the supervisor.
                if not descriptor_shortage.noted("accepting a flow-run engine's connection", exc):
                    log.warning("cannot accept a flow-run engine's connection: %s; not "
                                "accepting for %g s", exc, self.ACCEPT_PAUSE_SECONDS)
                self._accept_paused_until = time.monotonic() + self.ACCEPT_PAUSE_SECONDS
                return
            if len(self._logins) >= self.MAX_LOGINS:
                self._drop_login(next(iter(self._logins)))  # the oldest: an engine sends at once
            sock.setblocking(False)
            with self._lock:
                self._logins[sock] = (b"", time.monotonic() + self.LOGIN_SECONDS)
            self._login(sock)  # an engine's token is usually there already

    def _drop_login(self, sock):
        with self._lock:
            self._logins.pop(sock, None)
        sock.close()

    def _login(self, sock):
        data = _recv(sock)
        if data is None:
            return
        got = self._logins[sock][0] + data
        if not data or (b"\n" not in got and len(got) > 200):
            self._drop_login(sock)
            return
        if b"\n" not in got:
            with self._lock:
                self._logins[sock] = (got, self._logins[sock][1])
            return
        token, rest = got.split(b"\n", 1)
        with self._lock:
            del self._logins[sock]
            run_id = self._tokens.pop(token.decode("ascii", "replace").strip(), None)
            if run_id is not None:
                self._engines[run_id] = [sock, rest]
        if run_id is None:
            log.warning("refused a connection to the flow-run control channel: unknown token")
            sock.close()
        elif rest:
            self._parse(run_id)

    def _read_engine(self, run_id):
        entry = self._engines[run_id]
        data = _recv(entry[0])
        if data is None:
            return False
        if not data:
            self.forget(run_id)
            return False
        entry[1] += data
        return self._parse(run_id)

    def _parse(self, run_id):
        """Answer hellos, drop what is not understood; True on an acknowledgement."""
        entry = self._engines[run_id]
        while entry[1]:
            if entry[1].startswith(self.ACK):
                self.forget(run_id)  # the engine closes its end after acknowledging
                return True
            if self.HELLO.startswith(entry[1][:3]):
                if len(entry[1]) < self.HELLO_SIZE:
                    return False
                entry[1] = entry[1][self.HELLO_SIZE:]
                try:
                    entry[0].send(self.VERSION_ONE)
                except OSError:
                    self.forget(run_id)
                    return False
                continue
            entry[1] = entry[1][1:]
        return False


def _recv(sock):
    """What the socket has: None if nothing yet, b"" at its end or on an error."""
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Supervisor(threading.Thread):
    """Streams every child's output and reaps every child promptly, from one thread.

    A child is reaped on the tick after it exits (SIGCHLD makes that tick come at once), so
    hundreds of runs never leave zombies. As PID 1 it also reaps orphaned grandchildren, which
    a container without an init would otherwise accumulate. A tick reads at most
    READ_BYTES_PER_TICK of each child's output, so a child that prints without pause cannot
    hold up the reaping, cancellation or output of the others. When a run ends, the
    processes it left behind are stopped (unless the agent was told to leave them).

    Its callbacks (on_exit, on_infrastructure, on_leftovers) run on its thread. Other
    threads add children, ask for them and terminate them, under `_lock`; wake() never
    blocks (a byte on a pipe), nor does watching()."""

    TICK_SECONDS = 0.25
    QUIET_TICK_SECONDS = 1.0
    #: The tick after one that left output unread comes this soon.
    BEHIND_TICK_SECONDS = 0.05
    #: While a tick handles exits, it reaps again at least this often: each exit is journaled
    #: and reported, and in a burst of hundreds the children that exit meanwhile would
    #: otherwise stay zombies for seconds.
    REAP_SECONDS = 0.1
    READ_BYTES_PER_TICK = 256 * 1024
    #: Unread output beyond this is skipped: the child prints faster than it can be shown.
    MAX_BACKLOG_BYTES = 16 * 1024 * 1024
    #: Once this much of an output file has been read, the file is cut back to nothing (the
    #: child appends, so it writes on from the start): a run's output never fills the disk.
    CUT_OUTPUT_BYTES = 16 * 1024 * 1024
    #: SIGTERM to SIGKILL for the processes a run left behind.
    LEFTOVER_GRACE_SECONDS = 5.0

    def __init__(self, on_exit, on_exits_handled=None, console=None, reap_orphans=False,
                 on_infrastructure=None, on_leftovers=None):
        super().__init__(name="supervisor", daemon=True)
        self._on_exit = on_exit
        self._on_exits_handled = on_exits_handled  # after a tick's last on_exit
        self._on_infrastructure = on_infrastructure  # (child, infrastructure_pid, log line)
        self._on_leftovers = on_leftovers  # None: leave what a run leaves behind alone
        self.printer = ConsolePrinter(console or sys.stdout)
        self._reap_orphans = reap_orphans
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._signals_r = self._on_signal = None  # see take_signals
        self._lock = threading.Lock()
        self._children = {}
        self._helpers = []  # helper processes of children that have ended
        self._leftovers = []  # (pid, start time, when to SIGKILL) of what ended runs left
        self._stopping = False
        self.channel = ControlChannel()

    def add(self, child):
        with self._lock:
            self._children[child.run_id] = child
        self.wake()

    def take_signals(self, read_fd, on_signal):
        """Read the numbers of the signals that come (the read end of signal.set_wakeup_fd's
        pipe) and pass each to on_signal on this thread; SIGCHLD only wakes it."""
        self._signals_r, self._on_signal = read_fd, on_signal
        self.wake()

    def wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # a wake-up is already pending

    def children(self):
        with self._lock:
            return list(self._children.values())

    def watching(self):
        """Whether any child is being watched; no lock, so that a stop never waits."""
        return bool(self._children)

    def child(self, run_id):
        with self._lock:
            return self._children.get(run_id)

    def terminate(self, run_id, reason, grace):
        """SIGTERM the run's process group at once, or, for a cancellation, as soon as its
        engine has acknowledged the notice (ControlChannel); SIGKILL it `grace` seconds later."""
        child = self.child(run_id)
        if child is None or child.stop_reason is not None:
            return False
        child.grace = grace
        child.stop_reason = reason
        child.term_at = time.monotonic()  # set last: the supervisor thread acts on it
        self.wake()
        return True

    def stop(self):
        self._stopping = True
        self.wake()

    def run(self):
        interval = self.TICK_SECONDS
        while not self._stopping:
            # With nothing to watch, sleep until woken (a child added, SIGCHLD): an idle agent
            # should cost no CPU between polls. Children that are quiet are looked at less
            # often, down to once a second, so hundreds of sleeping runs cost next to nothing;
            # output, an exit, a wake-up or a pending SIGKILL restores the pace.
            with self._lock:
                idle = not (self._children or self._helpers or self._leftovers
                            or self._reap_orphans)
            woken, acknowledged = self._wait(None if idle else interval)
            busy, behind = self.tick(acknowledged)
            if behind:
                interval = self.BEHIND_TICK_SECONDS
            elif busy or woken:
                interval = self.TICK_SECONDS
            else:
                interval = min(interval * 2, self.QUIET_TICK_SECONDS)
        self.channel.close()

    def _wait(self, timeout):
        """Wait for a wake-up, an engine on the control channel, or the timeout; returns
        (woken, runs whose engine acknowledged a cancellation notice)."""
        look = self.channel.seconds_to_look()
        if look is not None and (timeout is None or look < timeout):
            timeout = look
        wakers = [self._wake_r] + ([self._signals_r] if self._signals_r is not None else [])
        try:
            readable = _wait_readable(wakers + self.channel.sockets(), timeout)
            acknowledged = self.channel.service([r for r in readable if r not in wakers])
        except Exception:  # a bug in the channel must not stop supervision
            log.exception("the flow-run control channel failed; it is closed, and cancelled "
                          "runs get SIGTERM without notice until the next run starts")
            self.channel.close()
            time.sleep(self.TICK_SECONDS)  # should the failure not be the channel's: no spin
            return True, set()
        woken = self._wake_r in readable
        if woken:
            _drain_fd(self._wake_r)
        if self._signals_r in readable:
            woken = True
            self._pass_on_signals()
        return woken, acknowledged

    def _pass_on_signals(self):
        try:
            numbers = os.read(self._signals_r, 4096)
        except OSError:
            return
        for signum in numbers:
            if signum != signal.SIGCHLD:
                try:
                    self._on_signal(signum)
                except Exception:  # a bug of ours must not stop supervision
                    log.exception("handling signal %d failed", signum)

    def tick(self, acknowledged=()):
        """One look at every child: (anything happened or is about to, output was left
        unread). `acknowledged`: runs whose engine has just acknowledged a cancellation."""
        children = self.children()
        busy = False
        for child in children:
            self._adopt_helpers(child)
            if child.reopen_from_end is not None:
                child.open_output(child.reopen_from_end)
            busy = self._read(child) or busy
            if not child.named:
                self._name_infrastructure(child)
            busy = busy or child.kill_at is not None or child.term_at is not None
        behind = any(child.behind for child in children)
        self._helpers = [helper for helper in self._helpers if helper.poll() is None]
        exited = self._collect_exits(children)
        gone = set(exited)
        running = [child for child in children if child not in gone]
        now = time.monotonic()
        for child in running:
            if child.term_at is not None:
                self._send_sigterm_when_due(child, now, child.run_id in acknowledged)
            if child.kill_at is not None and now >= child.kill_at:
                log.warning("run %s: still running after SIGTERM and the %s grace period; "
                            "sending SIGKILL", child.run_id,
                            "cancellation" if child.stop_reason == "cancelled" else "stop")
                child.kill_at = None
                child.signal(signal.SIGKILL)
        self._kill_leftovers_when_due(now)
        self._finish_all(exited, running)
        return busy or bool(exited) or bool(self._leftovers), behind

    def _finish_all(self, exited, running):
        """Handle every exit, reaping the children that exit meanwhile as it goes; then stop
        what the ended runs left behind (one look through /proc for all of them)."""
        if not exited:
            return
        reap_at = time.monotonic() + self.REAP_SECONDS
        index = 0
        try:
            while index < len(exited):  # grows as children exit meanwhile
                self._finish(exited[index])
                index += 1
                if running and time.monotonic() >= reap_at:
                    more = self._collect_exits(running)
                    exited += more
                    gone = set(more)
                    running = [child for child in running if child not in gone]
                    reap_at = time.monotonic() + self.REAP_SECONDS
        finally:
            if self._on_exits_handled is not None:
                self._on_exits_handled()
        if self._on_leftovers is not None:
            self._stop_leftovers(exited)

    def _send_sigterm_when_due(self, child, now, acknowledged):
        if child.stop_reason == "cancelled" and not child.notified:
            child.notified = True  # the notice goes once
            if self.channel.tell_cancel(child.run_id):
                child.term_at = now + ControlChannel.ACK_SECONDS
        if acknowledged:
            log.info("run %s: its engine acknowledged the cancellation; sending SIGTERM",
                     child.run_id)
        elif now < child.term_at:
            return
        child.term_at = None
        child.kill_at = now + child.grace
        child.signal(signal.SIGTERM)

    def _name_infrastructure(self, child):
        named = child.launcher.infrastructure_pid(child)
        if named is not None:
            child.named = True
            if self._on_infrastructure is not None:
                self._on_infrastructure(child, *named)

    def _adopt_helpers(self, child):
        self._helpers += child.helpers  # both on this thread: DockerLauncher.signal
        child.helpers = []

    def _collect_exits(self, children):
        if self._reap_orphans:
            # While a subprocess call waits, the orphans wait a tick or so longer; the
            # children are looked at one by one below.
            exited = reaper_hold.unless_waiting(lambda: self._reap_everything(children))
            if exited is not None:
                return exited
        exited = []
        for child in children:
            if child.process is not None:
                child.returncode = child.process.poll()
                if child.returncode is not None:
                    exited.append(child)
            elif not process_is(child.pid, child.start_time):
                exited.append(child)  # adopted: exit status unknowable
        return exited

    def _reap_everything(self, children):
        by_pid = {child.pid: child for child in children}
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = by_pid.get(pid)
            if child is not None and child.process is not None:
                child.returncode = child.process.returncode = _exit_code(status)
                exited.append(child)
        exited += [c for c in children if c.process is None and not process_is(c.pid, c.start_time)]
        return exited

    # -- output -----------------------------------------------------------------------

    def _read(self, child, limit=None):
        """Pass on up to `limit` bytes the child wrote since the last look; True if it wrote
        anything. Sets child.behind when more is waiting."""
        if child.output is None:
            return False
        limit = self.READ_BYTES_PER_TICK if limit is None else limit
        got = 0
        try:
            while got < limit:
                chunk = child.output.read(min(65536, limit - got))
                if not chunk:
                    break
                got += len(chunk)
                self._take(child, chunk)
            child.behind = got >= limit
            if child.behind:
                self._skip_if_far_behind(child)
            elif child.output.tell() >= self.CUT_OUTPUT_BYTES:
                self._cut(child)
        except OSError as exc:
            log.warning("run %s: cannot read its output file %s: %s", child.run_id,
                        child.output_path, exc)
            child.output.close()
            child.output, child.behind = None, False
        return got > 0

    def _take(self, child, chunk):
        """Split what the child wrote into lines: the last ones kept for a crash message,
        all of them passed to the console when the run streams its output."""
        data = child.partial + chunk
        cut = data.rfind(b"\n")
        if cut < 0 and len(data) <= 65536:
            child.partial = data
            return
        if cut < 0:  # a runaway line without newline: show it in pieces
            data, child.partial = data + b"\n", b""
        else:
            data, child.partial = data[:cut + 1], data[cut + 1:]
        text = data.decode("utf-8", "replace").replace("\r\n", "\n")[:-1]
        child.tail.extend(line[:500] for line in text.rsplit("\n", Child.TAIL_LINES)[-Child.TAIL_LINES:])
        if child.stream_output:
            self.printer.put(child.prefix + text.replace("\n", "\n" + child.prefix) + "\n")

    def _skip_if_far_behind(self, child):
        size = os.fstat(child.output.fileno()).st_size
        skipped = size - child.output.tell()
        if skipped <= self.MAX_BACKLOG_BYTES:
            return
        self._cut(child)
        child.partial = b""
        note = "[agent.py skipped %d bytes of this run's output: it prints faster than " \
               "they can be shown]" % skipped
        child.tail.append(note)
        if child.stream_output:
            self.printer.put(child.prefix + note + "\n")

    def _skip_to_last_lines(self, child):
        """An ended child left more output than one look reads: the last lines are what a
        crash message needs."""
        size = os.fstat(child.output.fileno()).st_size
        skipped = size - 8192 - child.output.tell()
        if skipped > 0:
            child.output.seek(size - 8192)
            child.partial = b""
            note = "[agent.py skipped %d bytes of this run's output]" % skipped
            if child.stream_output:
                self.printer.put(child.prefix + note + "\n")
        self._read(child)

    def _cut(self, child):
        """Empty the output file and follow it from its new start. What the child writes
        in the instant between the last read and the cut is lost."""
        os.truncate(child.output_path, 0)
        child.output.seek(0)

    # -- exits --------------------------------------------------------------------------

    def _finish(self, child):
        self._read(child)  # what it wrote just before exiting
        if child.behind:
            self._skip_to_last_lines(child)
        if child.partial:
            partial, child.partial = child.partial, b""
            self._take(child, partial + b"\n")
        if child.output is not None:
            child.output.close()
        with self._lock:
            self._children.pop(child.run_id, None)
        self._adopt_helpers(child)
        _remove(child.temp_dir)
        self.channel.forget(child.run_id)
        try:
            self._on_exit(child)
        except Exception:  # a reporting bug must never stop supervision of the rest
            log.exception("run %s: handling the exit of pid %d failed", child.run_id, child.pid)

    def _stop_leftovers(self, children):
        """SIGTERM what the ended runs left running (SIGKILL follows), and say so on each run."""
        sessions = {c.run_id: c.launcher.session(c) for c in children}
        for run_id, found in run_processes(sessions).items():
            self._on_leftovers(run_id, found)
            self.kill_leftovers_later(
                stop_leftovers(found, time.monotonic() + self.LEFTOVER_GRACE_SECONDS))

    def kill_leftovers_later(self, leftovers):
        """(pid, start time, when) to SIGKILL, from another thread."""
        with self._lock:
            self._leftovers += leftovers
        self.wake()

    def _kill_leftovers_when_due(self, now):
        if not self._leftovers:
            return
        with self._lock:
            due = [item for item in self._leftovers if now >= item[2]]
            self._leftovers = [item for item in self._leftovers if now < item[2]]
        for pid, start_time, _ in due:
            if process_is(pid, start_time):
                _signal_quietly(pid, signal.SIGKILL)


def stop_leftovers(found, kill_at):
    """SIGTERM each of `found` (pid, start time, session) and its process group; the
    (pid, start time, kill_at) to SIGKILL later if still there."""
    own_group = os.getpgrp()
    for pid, _, _ in found:
        _signal_quietly(pid, signal.SIGTERM)
        try:
            group = os.getpgid(pid)
        except OSError:
            continue
        if group not in (own_group, 0, 1):
            try:
                os.killpg(group, signal.SIGTERM)
            except OSError:
                pass
    return [(pid, start_time, kill_at) for pid, start_time, _ in found]


def _process_text(pid):
    """`pid (command name)` for a log line, the name escaped."""
    try:
        with open("/proc/%d/comm" % pid, "rb") as handle:
            name = handle.read().strip().decode("utf-8", "replace")
    except OSError:
        return str(pid)
    return "%d (%s)" % (pid, name.encode("unicode_escape").decode("ascii"))


def _signal_quietly(pid, signum):
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # gone already, or not ours to signal


class ConsolePrinter(threading.Thread):
    """Writes flow output to the console from its own thread, so that a console that blocks
    (a full pipe, a paused terminal) never holds up supervision. Past MAX_WAITING_BYTES
    waiting, output is dropped and the drop is said. The supervisor thread puts; the thread
    starts with the first output."""

    MAX_WAITING_BYTES = 4 * 1024 * 1024

    def __init__(self, console):
        super().__init__(name="console", daemon=True)
        self._console = console
        self._ready = threading.Condition()
        self._waiting = []
        self._waiting_bytes = 0
        self.dropped = 0  # characters dropped since the console last took any
        self._writing = self._launched = self._closing = False

    def put(self, text):
        with self._ready:
            if not self._launched:
                self._launched = True
                self.start()
            if self._waiting_bytes + len(text) > self.MAX_WAITING_BYTES:
                self.dropped += len(text)
                return
            self._waiting.append(text)
            self._waiting_bytes += len(text)
            self._ready.notify()

    def close(self, timeout):
        """Write what is waiting (for up to timeout), then end the thread."""
        deadline = time.monotonic() + timeout
        with self._ready:
            self._closing = True
            self._ready.notify()
            while (self._waiting or self._writing) and time.monotonic() < deadline:
                self._ready.wait(0.05)

    def run(self):
        while True:
            with self._ready:
                while not self._waiting and not self.dropped:
                    if self._closing:
                        return
                    self._ready.wait()
                text = "".join(self._waiting)
                if self.dropped:
                    text += "[agent.py dropped %d characters of flow output: the console " \
                            "could not take them as fast]\n" % self.dropped
                self._waiting, self._waiting_bytes, self.dropped = [], 0, 0
                self._writing = True
            try:
                self._console.write(text)
                self._console.flush()
            except (OSError, ValueError):
                pass  # a closed console must not stop anything
            with self._ready:
                self._writing = False
                self._ready.notify_all()


def _drain_fd(fd):
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


###############################################################################
# Ledger and reporting ########################################################
###############################################################################


class JournalError(Exception):
    """The journal could not be written, so a step that must be on disk first cannot be taken."""


class Journal:
    """What this agent has claimed and started, kept on disk so that a restart, even after
    kill -9, finishes every run's story. Every thread calls it; one mutex orders the writes.

    The file is a snapshot line followed by one line per change, each appended and fsynced,
    so a write costs the same however many runs the journal holds; it is compacted into a
    new snapshot when the changes outnumber twice the runs. A kill mid-append leaves at most
    a torn last line, which is ignored: the step it recorded was never taken.

    When a write fails (a full disk, say) the journal keeps going in memory, says so in
    `failure`, and rewrites itself every RETRY_SECONDS until it works again. Steps that must
    be on disk before they are taken (a claim, a start) raise JournalError meanwhile.

    Several agents on one host share a state directory: each holds an exclusive lock on one
    journal slot, and a restarted agent takes over the slot a dead one left."""

    SLOTS = 64
    COMPACT_MIN_CHANGES = 1000
    RETRY_SECONDS = 5.0

    def __init__(self, directory, pool):
        try:
            made = make_private_dir(directory)
            self.output_dir = os.path.join(directory, "output")
            make_private_dir(self.output_dir)
            self._lock = self._take_slot(directory, pool)
        except OSError as exc:
            raise UsageError("cannot use --state-dir %r: %s" % (directory, exc.strerror or exc))
        if not made:  # only once the directory is usable: else the error is the one line
            self._warn_if_open(directory)
        self.directory = directory
        self._mutex = threading.Lock()
        self._entries, self._logs, self._changes, whole = self._load()
        self._fd = None
        self._size = 0
        self._batching = self._unsynced = self._closed = False
        self.failure = None  # why the journal cannot be written, while it cannot
        self._retry_at = 0.0
        try:
            if whole and not self._too_long():  # the usual start: no write, no fsync
                self._fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
                self._size = os.fstat(self._fd).st_size
            else:  # new, torn by a kill, damaged, in the old format, or long: write it anew
                self._snapshot()
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                self._lock.close()
                raise UsageError("cannot write the journal in --state-dir %r: %s"
                                 % (directory, exc.strerror or exc))
            self._failed(exc)  # a full disk may pass: run on, claiming nothing until it does

    @staticmethod
    def _warn_if_open(directory):
        # Warned, not tightened: the operator made it, and others may need what else is in
        # it; the agent's own files there are 0600 and its directories 0700 anyway.
        mode = os.stat(directory).st_mode & 0o777
        if mode & 0o077:
            log.warning("state directory %s is mode %04o: other users can look into it; the "
                        "agent's files in it are private, but chmod 700 it unless others need "
                        "it", directory, mode)

    def _take_slot(self, directory, pool):
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", pool)[:100]
        for slot in range(self.SLOTS):
            self.path = os.path.join(directory, "journal-%s-%d.json" % (slug, slot))
            lock = open(self.path + ".lock", "a", opener=open_private)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock
            except BlockingIOError:
                lock.close()
        raise UsageError("all %d journal slots in %r are held by running agents"
                         % (self.SLOTS, directory))

    # -- reading --------------------------------------------------------------------

    def _load(self):
        """(runs by id, run log lines still owed to the API, change lines read, whether the
        file can be appended to as it is: every line read, the last one ended)."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return {}, [], 0, False
        except OSError as exc:
            raise UsageError("cannot read the journal %r: %s" % (self.path, exc.strerror or exc))
        lines = data.split(b"\n")
        try:
            snapshot = json.loads(lines[0].decode("utf-8"))
            if not isinstance(snapshot, dict) or not isinstance(snapshot.get("runs"), dict):
                raise ValueError("not a journal")
        except (ValueError, RecursionError) as exc:
            aside = "%s.unreadable-%d" % (self.path, time.time())
            log.error("journal %s is unreadable (%s); moved it to %s and starting empty",
                      self.path, exc, aside)
            os.replace(self.path, aside)
            return {}, [], 0, False
        runs = {k: v for k, v in snapshot["runs"].items() if isinstance(v, dict)}
        logs = [e for e in snapshot.get("logs") or [] if isinstance(e, dict)]
        changes, whole = 0, data.endswith(b"\n")
        for number, line in enumerate(lines[1:], 2):
            if not line:
                continue
            try:
                self._apply(runs, logs, json.loads(line.decode("utf-8")))
                changes += 1
            except (ValueError, RecursionError, TypeError, AttributeError):
                whole = False
                if number < len(lines):  # not the torn tail of a kill mid-append
                    log.error("journal %s: line %d is damaged; it and what follows are "
                              "ignored", self.path, number)
                break
        # Deeper than any run the API client lets through (a run, in an entry): copying it
        # would fail at every start. Such an entry is dropped, and the journal rewritten.
        for run_id in [r for r, entry in runs.items() if nested_deeper(entry, MAX_JSON_DEPTH + 1)]:
            log.error("journal %s: run %s: skipped and dropped its entry, which nests deeper "
                      "than %d levels", self.path, _id_text(run_id), MAX_JSON_DEPTH + 1)
            del runs[run_id]
            whole = False
        return runs, logs, changes, whole

    @staticmethod
    def _apply(runs, logs, change):
        if "forget" in change:
            runs.pop(change["forget"], None)
        elif "run" in change:
            runs.setdefault(change["run"], {}).update(change["set"])
        elif "logs" in change:
            logs[:] = change["logs"]
        else:
            raise ValueError("unknown change")

    def entries(self):
        import copy
        with self._mutex:
            return copy.deepcopy(self._entries)

    def get(self, run_id):
        import copy
        with self._mutex:
            return copy.deepcopy(self._entries.get(run_id) or {})

    def output_path(self, run_id):
        return os.path.join(self.output_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", run_id) + ".log")

    # -- writing --------------------------------------------------------------------

    def update(self, run_id, durable=False, **fields):
        """Record fields of run_id's entry. With durable=True, raise JournalError unless they
        are on disk: the caller must not take the step they record."""
        with self._mutex:
            self._entries.setdefault(run_id, {}).update(fields)
            written = self._record({"run": run_id, "set": fields}, durable)
        if durable and not written:
            raise JournalError(self.failure or "the journal is closed")

    def forget(self, run_id):
        with self._mutex:
            if self._entries.pop(run_id, None) is not None:
                self._record({"forget": run_id})

    def keep_logs(self, entries):
        """Run log lines the API could not take before the agent exits, for the next start;
        False if they could not be written."""
        with self._mutex:
            self._logs.extend(entries)
            return self._record({"logs": self._logs})

    def take_logs(self):
        with self._mutex:
            logs, self._logs = self._logs, []
            if logs:
                self._record({"logs": []})
            return logs

    def begin_batch(self):
        """Changes until end_batch() share one fsync (a burst of exits, say)."""
        with self._mutex:
            self._batching = True

    def end_batch(self):
        with self._mutex:
            self._batching = False
            if self._unsynced and self.failure is None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self._failed(exc)
            self._unsynced = False

    def retry(self):
        """While writes fail, try to write the whole journal again (at most every
        RETRY_SECONDS); True once the journal is writable."""
        with self._mutex:
            if self.failure is not None and time.monotonic() >= self._retry_at:
                self._rewrite()
            return self.failure is None

    def close(self):
        """Release this journal's slot (whatever is still in it waits for the next start).
        A change after this is kept in memory only: the slot may be another agent's now."""
        with self._mutex:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._lock.close()

    def _record(self, change, durable=False):
        """Append one change (the mutex held); False if it is not written. It is fsynced
        too unless a batch defers that, which a durable change never does."""
        if self._closed:
            return False
        if self.failure is not None:
            if time.monotonic() >= self._retry_at:
                self._rewrite()  # the rewrite holds this change too
            return self.failure is None
        line = (json.dumps(change, separators=(",", ":")) + "\n").encode()
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            if self._batching and not durable:
                self._unsynced = True
            else:
                os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)  # no torn line before the next change
            except OSError:
                pass
            self._failed(exc)
            return False
        self._size += len(line)
        self._changes += 1
        if self._too_long():
            self._rewrite()
        return True

    def _too_long(self):
        return self._changes > max(self.COMPACT_MIN_CHANGES, 2 * len(self._entries))

    def _rewrite(self):
        try:
            self._snapshot()
        except OSError as exc:
            self._failed(exc)
            return
        if self.failure is not None:
            log.info("journal %s can be written again; claiming runs again", self.path)
            self.failure = None

    def _snapshot(self):
        """Write the whole journal aside, fsync it, rename it over: a crash leaves the old
        file or the new one. Then append to the new one. An empty journal has nothing to
        lose, so a first start pays no fsync."""
        durable = bool(self._entries or self._logs)
        temporary = self.path + ".tmp"
        line = (json.dumps({"runs": self._entries, "logs": self._logs},
                           separators=(",", ":")) + "\n").encode()
        try:
            fd = open_private(temporary, os.O_WRONLY | os.O_TRUNC)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        if durable:
            _fsync_directory(self.directory)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        self._size, self._changes, self._unsynced = len(line), 0, False

    def _failed(self, exc):
        metrics.count("agentpy_journal_write_failures_total")
        text = "cannot write the journal %s: %s" % (self.path, exc.strerror or exc)
        if self.failure is None and not descriptor_shortage.noted("writing the journal", exc):
            log.error("%s; claiming no new runs until it can be written (retrying every %g s); "
                      "running runs are still watched and reported", text, self.RETRY_SECONDS)
        self.failure = text
        self._retry_at = time.monotonic() + self.RETRY_SECONDS


def _fsync_directory(path):
    """Make a rename in `path` survive a power cut, where the system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Reporter:
    """Delivers what the agent owes the API about runs (logs, pids, final states) off the
    poll loop, so a slow API never stalls claiming or supervision. Each run's calls go in
    the order they were queued; different runs' calls do not wait for each other, so a call
    that keeps failing holds up its own run only. WORKERS threads deliver; log lines of all
    runs go in batches. While the API is unreachable a call is retried until it goes
    through; what is still queued when the agent exits is in the journal and is delivered
    by the next start. Any thread queues; the delivery threads are its own."""

    LOGGER_NAME = "prefect.flow_runs.worker"
    BATCH = 200
    #: Delivery threads: enough that a few runs' failing calls do not hold up the rest,
    #: few enough that a burst of reports does not crowd the server out for the claims.
    WORKERS = 4
    #: Log lines wait up to this for more to share their request (the UI orders by time).
    LOG_BATCH_SECONDS = 0.2
    #: A delivery thread idle this long closes its connection: its next request would open a
    #: new one anyway (KEEPALIVE_IDLE_SECONDS), and an idle agent keeps only the loop's.
    IDLE_CLOSE_SECONDS = KEEPALIVE_IDLE_SECONDS

    def __init__(self, api):
        self.api = api
        self._ready = threading.Condition()
        self._calls = {}  # run id -> deque of (what, action), head first
        self._runs_waiting = collections.deque()  # run ids whose head call no thread has
        self._logs = collections.deque()
        self._logs_since = None  # when the oldest waiting log line was queued
        self._logs_taken = False  # a thread is delivering a batch of log lines
        self._flushing = False
        self._sending_logs = []
        self._busy = 0
        self._stopping = threading.Event()
        self._paused = False
        self._threads = [threading.Thread(target=self._deliver_forever, daemon=True,
                                          name="reporter-%d" % number)
                         for number in range(self.WORKERS)]

    def start(self):
        for thread in self._threads:
            thread.start()

    def pause(self):
        """Leave the API to the agent loop while it claims a poll's runs: a server that takes
        one write at a time (SQLite) would otherwise interleave reports with the claims, and a
        run started late costs more than a report delivered a few seconds later."""
        with self._ready:
            self._paused = True

    def resume(self):
        with self._ready:
            self._paused = False
            self._ready.notify_all()

    def log(self, run_id, message, level=INFO):
        """A line for the run's logs in the Prefect UI (and the agent's own log)."""
        log.log(level, "run %s: %s", run_id, message)
        with self._ready:
            self._logs.append({"name": self.LOGGER_NAME, "level": level, "message": message,
                               "timestamp": isoformat(utcnow()), "flow_run_id": run_id,
                               "task_run_id": None})
            if self._logs_since is None:
                self._logs_since = time.monotonic()
            self._ready.notify()

    def resend_logs(self, entries):
        """Log lines a previous agent could not deliver, queued ahead of everything else."""
        with self._ready:
            self._logs.extendleft(reversed(entries))
            self._logs_since = self._logs_since or time.monotonic()
            self._ready.notify()

    def call(self, run_id, what, action):
        """Run `action()` (an API call about run_id) after every call queued for run_id."""
        with self._ready:
            calls = self._calls.get(run_id)
            if calls is None:
                calls = self._calls[run_id] = collections.deque()
                self._runs_waiting.append(run_id)
            calls.append((what, action))
            self._ready.notify()

    def stop(self, timeout):
        """Stop delivering: a call in flight is abandoned (and kept) at its next retry.
        Returns the log lines that were not delivered, for the journal."""
        self._stopping.set()
        with self._ready:
            self._ready.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._ready:
            # A batch still in flight after the timeout may yet land: keep it anyway, since a
            # line twice in the run's log is better than a line lost.
            return list(self._sending_logs) + list(self._logs)

    def flush(self, timeout):
        """Wait until everything queued so far was delivered or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._ready:
            self._flushing = True
            self._ready.notify_all()
            try:
                while self._calls or self._logs or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._ready.wait(min(left, 0.1))
            finally:
                self._flushing = False
        return True

    def _deliver_forever(self):
        while True:
            with self._ready:
                work = self._wait_for_work()
                if work is None:
                    return
                self._busy += 1
            try:
                self._deliver(*work)
            except Exception:  # a bug of ours must not stop the delivery of everything else
                log.exception("delivering %s failed unexpectedly", work[0])
            finally:
                with self._ready:
                    self._busy -= 1
                    self._ready.notify_all()

    def _wait_for_work(self):
        """The next work (the lock held), once there is some; None when stopping."""
        idle_since = time.monotonic()
        while True:
            work = self._take()
            if work is not None or self._stopping.is_set():
                return work
            if self._logs:
                self._ready.wait(self.LOG_BATCH_SECONDS)
            elif idle_since is None:
                self._ready.wait()
            elif not self._ready.wait(idle_since + self.IDLE_CLOSE_SECONDS - time.monotonic()):
                self.api.end_thread()
                idle_since = None

    def _take(self):
        """The next work (the lock held): a batch of log lines, or the head call of the run
        that has waited longest; None if there is none, or delivery is paused or stopped."""
        if self._paused or self._stopping.is_set():
            return None
        if self._logs and not self._logs_taken and (
                self._flushing or len(self._logs) >= self.BATCH
                or time.monotonic() - self._logs_since >= self.LOG_BATCH_SECONDS):
            self._logs_taken = True
            count = min(self.BATCH, len(self._logs))
            self._sending_logs = [self._logs.popleft() for _ in range(count)]
            self._logs_since = time.monotonic() if self._logs else None
            return ("logs", self._sending_logs)
        if self._runs_waiting:
            run_id = self._runs_waiting.popleft()
            return ("call", run_id)
        return None

    def _deliver(self, kind, payload):
        if kind == "logs":
            delivered = self._attempt("writing %d log line(s)" % len(payload),
                                      payload[0].get("flow_run_id"),
                                      lambda: self.api.write_logs(payload))
            with self._ready:
                if not delivered:
                    self._logs.extendleft(reversed(payload))
                    self._logs_since = self._logs_since or time.monotonic()
                self._sending_logs, self._logs_taken = [], False
            return
        run_id = payload
        with self._ready:
            what, action = self._calls[run_id][0]
        delivered = self._attempt(what, run_id, action)
        with self._ready:
            calls = self._calls[run_id]
            if delivered:
                calls.popleft()
            if calls:
                self._runs_waiting.append(run_id)
            else:
                del self._calls[run_id]

    def _attempt(self, what, run_id, action):
        """Retry while the API is unreachable (the run's story must reach it); give up only
        when the API answers that it will not take this (a 4xx such as a deleted run).
        True once done with; False if abandoned because the reporter is stopping."""
        failures = 0
        while True:
            try:
                action()
                return True
            except APIUnreachable as exc:
                failures += 1
                if failures == 1:
                    log.warning("run %s: %s failed; retrying until the API answers: %s",
                                run_id, what, exc)
                if self._stopping.wait(backoff_seconds(failures, cap=30)):
                    return False
            except (APIError, AuthRefused) as exc:
                log.warning("run %s: %s was refused and dropped: %s", run_id, what, exc)
                return True
            except Exception:
                log.exception("run %s: %s failed unexpectedly", run_id, what)
                return True


class RunLedger:
    """Each run's story from claim to report, and its one owner: the runs in flight (each
    holds a slot of --limit), the journal entry of the step each has reached, and what the
    API is still owed about each, which the Reporter's threads deliver.

    A run's entry moves claiming -> starting -> running -> exited; an entry in phase
    "exited" holds `owed`, one of the reports below, until it is delivered and the entry
    forgotten, so that a restart delivers what a killed agent owed. The claim's transition
    id stays in the entry: a report of a crash applies only while the run is still ours.

    Every thread calls it: the agent loop and dispatch threads claim and reserve, the
    timetable thread starts, the supervisor thread ends runs, the reporter threads deliver.
    `_slots_lock` guards the runs in flight; the journal orders its own writes."""

    #: The reports that can be owed: the journal's `owed.kind` -> the method delivering it.
    #: ("check", which journals of agent.py 0.1 hold, is delivered as a crash, as it was.)
    REPORTS = {"crash": "_report_crash", "check": "_report_crash",
               "cancelled": "_report_cancelled", "release": "_report_hand_back",
               "restore": "_report_restore"}

    def __init__(self, journal, reporter, api, on_release=None):
        self.journal, self.reporter, self.api = journal, reporter, api
        self._on_release = on_release  # after a slot is freed (wakes the agent loop)
        self._in_flight = set()
        self._slots_lock = threading.Lock()

    # -- runs in flight -------------------------------------------------------------

    def reserve(self, run_id, limit=None):
        """Take a slot for run_id: False if it holds one already, or `limit` are taken."""
        with self._slots_lock:
            if run_id in self._in_flight or (limit and len(self._in_flight) >= limit):
                return False
            self._in_flight.add(run_id)
            return True

    def release(self, run_id):
        with self._slots_lock:
            self._in_flight.discard(run_id)
        if self._on_release is not None:
            self._on_release()

    def holds(self, run_id):
        return run_id in self._in_flight

    def in_flight_count(self):
        return len(self._in_flight)  # no lock: len() is atomic, and the health check asks

    # -- the journal entry ----------------------------------------------------------

    def claiming(self, run_id, transition_id, run):
        """On disk before the claim is proposed: an agent that dies right after the server
        accepts it finds it on restart and starts the run instead of leaving it Pending.
        JournalError (and nothing kept) when it cannot be written."""
        try:
            self.journal.update(run_id, durable=True, phase="claiming",
                                transition_id=transition_id, run=run_summary(run))
        except JournalError:
            self.journal.forget(run_id)
            raise

    def claim_lost(self, run_id):
        """The claim did not land (or another agent's did): nothing to remember."""
        self.journal.forget(run_id)

    def claimed_as(self, run_id, state_id):
        """The server answered our claim without its transition id (Prefect 2.10 to 2.14.16):
        the id of the Pending state it made tells our claim from another agent's instead."""
        self.journal.update(run_id, claim_state=state_id)

    def claim_of(self, run_id):
        """How to know our claim of run_id (_is_our_claim), as journaled: its transition id,
        and the claim_state of claimed_as where the server dropped that id."""
        entry = self.journal.get(run_id)
        claim = {"claim": entry.get("transition_id")}
        if entry.get("claim_state") is not None:
            claim["claim_state"] = entry["claim_state"]
        return claim

    def starting(self, run_id, run_name, job, output_path, temp_dir):
        """On disk before the process exists, so that a restart that finds the start
        unfinished looks for the process instead of starting another (at most once)."""
        self.journal.update(run_id, durable=True, phase="starting", host=socket.gethostname(),
                            output=output_path, temp_dir=temp_dir, run_name=run_name,
                            stream_output=job.stream_output, argv=_argv_text(job.argv),
                            launcher=job.launcher.name, infrastructure=job.infrastructure,
                            files=job.files)

    def running(self, run_id, child):
        self.journal.update(run_id, phase="running", pid=child.pid, start_time=child.start_time,
                            host=socket.gethostname())

    def entries(self):
        """Every run's entry, as a restart finds them. An entry of agent.py 0.1 names its
        container at the top and no launcher: read as a docker run."""
        entries = self.journal.entries()
        for entry in entries.values():
            if "launcher" not in entry and isinstance(entry.get("container"), str):
                entry.update(launcher="docker", infrastructure={"container": entry["container"]})
        return entries

    def output_path(self, run_id):
        return self.journal.output_path(run_id)

    # -- what the API is owed ---------------------------------------------------------

    def crash_unstarted(self, run_id, reason):
        """The run was claimed but cannot be started: report it Crashed with the reason."""
        message = "Failed to start flow run: %s" % reason
        self.reporter.log(run_id, message, ERROR)
        self._owe(run_id, {"kind": "crash", "message": message})
        self.release(run_id)

    def hand_back(self, run_id, reason):
        """Give a claimed run that was not started back to the pool, as Scheduled at its
        original time."""
        log.info("run %s: handing it back to the work pool: %s", run_id, reason)
        scheduled_time = _obj(self.journal.get(run_id).get("run")).get("scheduled_time")
        self._owe(run_id, {"kind": "release", "scheduled_time": scheduled_time,
                           "message": "Handed back to the work pool: %s." % reason})
        self.release(run_id)

    def cancelled_unstarted(self, run_id, run_name):
        self.reporter.log(run_id, "Cancellation requested before the run was due: it will "
                                  "not be started")
        self._owe(run_id, {"kind": "cancelled", "name": run_name, "message": (
            "Flow run was cancelled before it was due; agent.py never started it.")})
        self.release(run_id)

    def restore(self, run_id, transition_id):
        """Our claim landed on a run that had already ended (a stale poll answer): put its
        final state back."""
        self._owe(run_id, {"kind": "restore", "transition_id": transition_id})

    def crashed(self, run_id, message):
        """Report the run Crashed, unless it has moved on without us meanwhile."""
        self._owe(run_id, {"kind": "crash", "message": message})

    def owed_again(self, run_id, owed):
        """What the journal says a previous agent owed, delivered now."""
        self._owe(run_id, owed)

    def ended(self, child):
        """The supervisor thread's report of an exit: its log line and what it owes. The
        exits of one supervisor tick share an fsync (journal.end_batch follows them): a kill
        cannot lose what was written without it, only a power cut can, and then the restart
        reports the run as ended while it was down."""
        self.journal.begin_batch()
        code = child.returncode
        if code is None:
            self.reporter.log(child.run_id, "Process %d (adopted after a restart) has ended; its "
                              "exit code is unknown" % child.pid)
        else:
            self.reporter.log(child.run_id, "Process %d exited with status code: %d"
                              % (child.pid, code), INFO if code == 0 else WARNING)
        if child.stop_reason == "cancelled":
            self._owe(child.run_id, {"kind": "cancelled", "name": child.run_name})
        else:
            self.crashed(child.run_id, _exit_report(child))
        self.release(child.run_id)

    def note_infrastructure(self, child, infrastructure_pid, line):
        """The supervisor thread found what the run runs as: tell the API (and the log)."""
        self.reporter.call(child.run_id, "recording infrastructure_pid",
                           lambda: self.api.set_infrastructure_pid(child.run_id, infrastructure_pid))
        if line:
            self.reporter.log(child.run_id, line)

    def note_leftovers(self, run_id, found):
        self.reporter.log(run_id, "Stopped %d process(es) the flow run left running: %s "
                          "(SIGTERM, SIGKILL after %g s; --keep-leftover-processes leaves them)"
                          % (len(found), ", ".join(_process_text(pid) for pid, _, _ in found[:10]),
                             Supervisor.LEFTOVER_GRACE_SECONDS), WARNING)

    def cancel_orphan(self, run):
        """Cancel a run whose deployment was deleted (as Prefect's worker does)."""
        message = "Deployment %s no longer exists, cancelled run." % run.get("deployment_id")
        log.warning("run %s: %s", run["id"], message)
        self.reporter.call(run["id"], "cancelling a run of a deleted deployment",
                           lambda: self.api.set_state(run["id"], "CANCELLED", message=message,
                                                      force=True))

    def cancel_never_started(self, run_id, state, run_name):
        """A claimed run that was cancelled before any process started: finish it."""
        self.reporter.call(run_id, "cancelling a run that was never started",
                           lambda: self.finish_cancellation(run_id, state, run_name))
        self.forget(run_id)

    def _owe(self, run_id, owed):
        """Journal what the API must be told about run_id, then have the reporter tell it
        (in order, retried); the journal keeps it until then, across restarts."""
        if "claim" not in owed:
            owed = dict(owed, **self.claim_of(run_id))
        self.journal.update(run_id, phase="exited", owed=owed)
        self.reporter.call(run_id, "reporting how the run ended", lambda: self.deliver(run_id, owed))
        self.reporter.call(run_id, "forgetting the run", lambda: self.forget(run_id))

    # -- delivery: the reporter threads ---------------------------------------------

    def deliver(self, run_id, owed):
        """Tell the API what `owed` says (APIUnreachable: the reporter tries again)."""
        kind = owed.get("kind")
        report = getattr(self, self.REPORTS.get(kind if isinstance(kind, str) else "crash",
                                                "_report_crash"))
        if kind == "restore":
            report(run_id, owed, None)
            return
        try:
            state = _obj(self.api.read_run(run_id).get("state"))
        except AnswerRefused:
            if report != self._report_crash:
                raise
            # A run the API cannot even serve readably can run nowhere: report it anyway.
            self._propose_crashed(run_id, owed.get("message") or "Flow run crashed.")
            return
        if being_cancelled(state) and report == self._report_crash:
            report = self._report_cancelled  # cancelled while its process was ending
            owed = dict(owed, message="Flow run was cancelled; its process had already ended.")
        report(run_id, owed, state)

    def forget(self, run_id):
        """The run's story is told: drop its entry and the files it kept."""
        entry = self.journal.get(run_id)
        _remove(entry.get("temp_dir"))
        self.journal.forget(run_id)
        files = entry.get("files") if isinstance(entry.get("files"), list) else []
        files = [f for f in files if isinstance(f, str)  # never a file elsewhere
                 and os.path.dirname(f) == self.journal.output_dir]
        for path in [self.output_path(run_id)] + files:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _report_crash(self, run_id, owed, state):
        if _still_ours(state, owed):
            self._propose_crashed(run_id, owed.get("message") or "Flow run crashed.")
        else:
            metrics.count("agentpy_runs_finished_total", state_label(state.get("type")))
            log.info("run %s: not reporting it crashed, it is %s now", run_id, state.get("type"))

    def _report_cancelled(self, run_id, owed, state):
        self.finish_cancellation(run_id, state, owed.get("name") or run_id, owed.get("message"))

    def _report_hand_back(self, run_id, owed, state):
        if state.get("type") != "PENDING" or not _still_ours(state, owed):
            log.info("run %s: not handing it back, it is %s now", run_id, state.get("type"))
            return
        details = dict(_obj(state.get("state_details")), transition_id=None)
        if owed.get("scheduled_time"):
            details["scheduled_time"] = owed["scheduled_time"]
        self.api.set_state(run_id, "SCHEDULED", name="Scheduled", force=True, details=details,
                           message=owed.get("message") or "Handed back to the work pool.")

    def _report_restore(self, run_id, owed, state):
        our_transition_id, our_state = owed.get("transition_id"), owed.get("claim_state")
        earlier = [s for s in self.api.read_run_states(run_id) if isinstance(s, dict) and
                   _obj(s.get("state_details")).get("transition_id") != our_transition_id
                   and (our_state is None or s.get("id") != our_state)]
        if not earlier:
            return
        # Timestamps are taken when a request arrives, not when it commits, so ours may sort
        # before the final state it replaced: pick the newest state that is not ours.
        previous = max(earlier, key=lambda s: str(s.get("timestamp")))
        log.warning("run %s: already %s when our claim landed (stale poll answer); restoring "
                    "that state instead of starting it", run_id, previous.get("type"))
        self.api.set_state(run_id, previous.get("type"), message=previous.get("message"),
                           name=previous.get("name"), force=True, data=previous.get("data"),
                           details=_obj(previous.get("state_details")))

    def finish_cancellation(self, run_id, state, run_name, message=None):
        if state.get("type") == "CANCELLED" and not being_cancelled(state):
            # The engine was told in time (ControlChannel) and reported it.
            metrics.count("agentpy_runs_finished_total", state_label("CANCELLED"))
            self.reporter.log(run_id, "Cancelled flow run '%s'!" % run_name)
            return
        if state.get("type") in ("COMPLETED", "FAILED"):
            metrics.count("agentpy_runs_finished_total", state_label(state.get("type")))
            log.info("run %s: ended %s before the cancellation took effect; left as it is",
                     run_id, state.get("type"))
            return
        # Forced, because the engine may have proposed CRASHED on SIGTERM meanwhile; the
        # current state's details (and its concurrency lease) carry over.
        self.api.set_state(run_id, "CANCELLED", name="Cancelled", force=True,
                           details=_obj(state.get("state_details")),
                           message=message or "Flow run was cancelled: agent.py terminated "
                                              "its processes.")
        metrics.count("agentpy_runs_finished_total", state_label("CANCELLED"))
        self.reporter.log(run_id, "Cancelled flow run '%s'!" % run_name)

    def _propose_crashed(self, run_id, message):
        result = self.api.set_state(run_id, "CRASHED", message=message)
        state = _obj(result.get("state"))
        metrics.count("agentpy_runs_finished_total", state_label(state.get("type")))
        if result["status"] == "ACCEPT":
            log.info("run %s: reported as crashed", run_id)
        else:
            log.info("run %s: crash report not applied (%s, run is %s): %s", run_id,
                     result["status"], state.get("type"), _obj(result.get("details")).get("reason"))


def _exit_report(child):
    """The crash report's message for a child that ended without being cancelled: the API
    takes it only while the run is still ours (an engine that reported a final state has
    moved it on)."""
    if child.stop_reason == "stopped":
        return ("agent.py was stopped while this flow run was running, so it terminated the "
                "run's processes (exit code %s)." % child.returncode) + _tail_text(child)
    if child.returncode is None:
        return ("Flow run process %d ended while agent.py was restarting, so its exit code is "
                "unknown, and the run never reported a final state." % child.pid)
    if child.returncode != 0:
        return crash_message(child)
    return ("Flow run process exited with status code 0 without reporting a final state to "
            "Prefect: the command may not run a Prefect engine, or the engine was stopped "
            "before it could report. Command: %s." % child.argv_text) + _tail_text(child)


def being_cancelled(state):
    """Whether someone asked for the run to be cancelled and it has not ended yet: state
    CANCELLING, or, as Prefect 2 clients cancelled before CANCELLING existed, CANCELLED with
    the name "Cancelling" (Prefect 2.20's agent and worker still look for both)."""
    return state.get("type") == "CANCELLING" or (
        state.get("type") == "CANCELLED" and state.get("name") == "Cancelling")


def _still_ours(state, owed):
    """Whether a run is still where our process left it: Running, or Pending by our own claim
    (as `owed` names it: RunLedger.claim_of). Anything else means it moved on without us: the
    engine finished it, or it is Pending by another agent's stale claim of a run that had
    already ended, which that agent undoes."""
    if state.get("type") == "RUNNING":
        return True
    return state.get("type") == "PENDING" and (
        owed.get("claim") is None or _is_our_claim(state, owed["claim"], owed.get("claim_state")))


def _is_our_claim(state, transition_id, claim_state=None):
    """Whether the run is Pending by our claim: by the transition id we proposed, or on a
    server that drops it from what it stores (Prefect 2.10 to 2.14.16; checked on 2.14.16,
    whose read of the run names the claim's state by the id the claim's answer gave) by that
    state's id. A claim whose answer was lost cannot be told on such a server: not ours."""
    if state.get("type") != "PENDING":
        return False
    transition = _obj(state.get("state_details")).get("transition_id")
    if transition is not None:
        return transition == transition_id
    return claim_state is not None and state.get("id") == claim_state


def run_summary(run):
    """What the journal keeps of a run to start it after a restart."""
    summary = {key: run.get(key) for key in ("id", "name", "deployment_id", "flow_id", "job_variables")}
    summary["scheduled_time"] = _scheduled_text(run)
    return summary


###############################################################################
# The agent loop ##############################################################
###############################################################################


class Wakeup:
    """A sleep that another thread can cut short.

    threading.Event would do, but its wait runs Python code on every wake-up (a seventh of an
    idle agent's CPU), and its set() waits for a lock. Here a wake is one lock release, which
    never blocks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()

    def wake(self):
        try:
            self._lock.release()
        except RuntimeError:
            pass  # a wake is already pending

    def sleep(self, seconds):
        """Sleep until woken or `seconds` pass; a wake since the last sleep ends it at once."""
        self._lock.acquire(timeout=min(max(0.0, seconds), threading.TIMEOUT_MAX))


class Timetable(threading.Thread):
    """Starts claimed runs at their scheduled time, on its own thread, so that neither an API
    call of the agent loop nor its poll interval can make a start late. A claim made ahead of
    time (--prefetch-seconds) waits here; a claim that is already due starts at once. The agent loop,
    dispatch and timetable threads add, take and list runs, under `_cond`."""

    def __init__(self):
        super().__init__(name="timetable", daemon=True)
        self._cond = threading.Condition()
        self._due = []  # heap of (monotonic due time, sequence, run id)
        self._actions = {}  # run id -> what to call when due
        self._sequence = 0
        self._stopping = False

    def add(self, run_id, due, action):
        with self._cond:
            self._sequence += 1
            heapq.heappush(self._due, (due, self._sequence, run_id))
            self._actions[run_id] = action
            self._cond.notify()

    def held(self):
        """Run ids waiting for their time."""
        with self._cond:
            return list(self._actions)

    def holds_any(self):
        """Whether any run waits for its time; no lock, so that a stop never waits."""
        return bool(self._actions)

    def take(self, run_id):
        """Withdraw a waiting run: its start action if it was waiting (it will not start now),
        else None."""
        with self._cond:
            return self._actions.pop(run_id, None)

    def stop(self):
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self):
        while True:
            with self._cond:
                while not self._stopping and not self._ready():
                    self._cond.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._stopping:
                    return
                run_id = heapq.heappop(self._due)[2]
                action = self._actions.pop(run_id, None)
            if action is not None:
                try:
                    action()
                except Exception:  # a bug of ours must not stop every later start
                    log.exception("run %s: starting it failed unexpectedly", run_id)

    def _ready(self):
        while self._due and self._due[0][2] not in self._actions:
            heapq.heappop(self._due)  # withdrawn
        return bool(self._due) and self._due[0][0] <= time.monotonic()


#: A poll's claims, and the reads they need, go out on at most this many connections at
#: once, each held by a thread that ends with the burst (a burst of one goes on the agent
#: loop's own). A claim costs a round trip plus the server's time for it; eight in flight
#: keep busy a server that needs 30 ms a claim behind a 200 ms round trip, and stay inside
#: what Prefect's server runs at once (a database pool of 5 plus 10 overflow on 3.8.8):
#: past that, requests only queue at the server.
DISPATCH_CONNECTIONS = 8
#: Prefect's server answers a poll with at most this many runs (its default limit, which is
#: also its largest, on 3.8.8): after a full page that it claimed from, the agent polls again
#: at once instead of a poll interval later.
POLL_PAGE = 200


class Dispatcher:
    """Calls work(item) for a burst of items, in their order, on up to DISPATCH_CONNECTIONS
    threads at once. The agent loop thread calls run(); a single item runs on it, with its
    warm connection. Otherwise the threads are the dispatcher's own, each closes its
    connection as it ends with the burst (an idle agent keeps one), and the loop thread
    watches them: it calls `between`, and on a stop lets the requests in flight finish, for
    a claim cut short could land unseen, but cuts them after STOPPING_REQUEST_SECONDS.
    stop() never blocks: it only wakes the threads' retry waits."""

    def __init__(self, api, stopping):
        self.api = api
        self._stopping = stopping
        self._wakeups = []  # one per dispatch thread: stop() cuts their retry waits short

    def run(self, items, work, between=None, every=None):
        """work(item) returns False to take no more items (those not taken are left).
        `between()` runs on this thread every `every` seconds while the burst lasts. The
        first exception that work or between raises ends the burst, and is raised here once
        every thread has ended."""
        burst = _Burst(items)
        if len(burst.items) > 1:
            self._run_on_threads(burst, work, between, every)
        else:
            self._work(burst, work)
        if burst.failure is not None:
            raise burst.failure

    def stop(self):
        for wakeup in list(self._wakeups):
            wakeup.wake()

    def _run_on_threads(self, burst, work, between, every):
        threads = [threading.Thread(target=self._work_on_thread, args=(burst, work),
                                    name="dispatch-%d" % number, daemon=True)
                   for number in range(min(DISPATCH_CONNECTIONS, len(burst.items)))]
        for thread in threads:
            thread.start()
        between_at = time.monotonic() + every if between else float("inf")
        cut_at = None
        while threads:
            now = time.monotonic()
            if now >= between_at and burst.failure is None:
                burst.guard(between)
                between_at = time.monotonic() + every
            if cut_at is None and self._stopping():
                cut_at = now + STOPPING_REQUEST_SECONDS
            elif cut_at is not None and now >= cut_at:  # and again for any request sent since
                self.api.interrupt([thread.ident for thread in threads])
                cut_at = now + STOPPING_REQUEST_SECONDS
            threads[0].join(0.1)
            threads = [thread for thread in threads if thread.is_alive()]

    def _work_on_thread(self, burst, work):
        wakeup = Wakeup()
        self._wakeups.append(wakeup)
        self.api.give_up_retries_when(self._stopping, wakeup, interruptible=False)
        try:
            self._work(burst, work)
        finally:
            self.api.end_thread()
            self._wakeups.remove(wakeup)

    @staticmethod
    def _work(burst, work):
        while burst.failure is None:
            item = burst.take()
            if item is _Burst.EMPTY or not burst.guard(work, item):
                return


class _Burst:
    """The items of one Dispatcher.run() and its outcome, shared by its threads."""

    EMPTY = object()

    def __init__(self, items):
        self.items = collections.deque(items)
        self.failure = None  # the first exception raised by work or between

    def take(self):
        try:
            return self.items.popleft()  # atomic: no lock needed between the threads
        except IndexError:
            return self.EMPTY

    def guard(self, call, *args):
        """call(*args); False (and the burst ends) when it says so or raises."""
        try:
            if call(*args) is not False:
                return True
        except BaseException as exc:
            self.failure = self.failure or exc
        self.items.clear()
        return False


class JobBuilder:
    """Makes each claimed run's Job: reads what the run needs (its deployment, again after
    SYNC_SECONDS; its flow's name, once), overlays the deployment's job variables with the
    run's, fills them into the pool's base job template, and has the launcher of the pool's
    type build the Job. The agent loop and the dispatch threads of a burst call it, and
    share its caches only through single dict operations, which CPython makes atomic: two
    threads may read one deployment twice, no worse."""

    def __init__(self, config, api, launchers):
        self.config, self.api, self.launchers = config, api, launchers
        self._deployments = {}  # id -> (when it expires, the deployment)
        self._blocks = {}  # infrastructure block document id -> (when it expires, the document)
        self._flow_names = {}  # id -> name
        self._failed_reads = None  # during a burst: id -> the error its read met

    def begin_burst(self):
        """Until end_burst(), while a poll's runs are claimed, a read that fails is not tried
        again: each run that needs it meets the same error, and the next poll asks again."""
        self._failed_reads = {}

    def end_burst(self):
        self._failed_reads = None

    def reads_for(self, runs):
        """A read for each deployment and flow that the runs need and no cache holds, to be
        done together before the claims."""
        reads = {}
        for run in runs:
            if run.get(REFUSED) is not None:
                continue
            deployment_id, flow_id = run.get("deployment_id"), run.get("flow_id")
            if deployment_id and self._cached_deployment(deployment_id) is None:
                reads["deployment", deployment_id] = (
                    lambda i=deployment_id: self._read_quietly(self._deployment_and_block, i))
            if flow_id and flow_id not in self._flow_names:
                reads["flow", flow_id] = lambda i=flow_id: self._read_quietly(self._flow_name, i)
        return list(reads.values())

    def needs(self, run):
        """What the run needs read before it is claimed: (its deployment or {}, its flow's
        name or None, its deployment's infrastructure block document or None). APIError,
        APIUnreachable; BlockUnusable when the block cannot be read or used."""
        deployment = self._deployment(run["deployment_id"]) if run.get("deployment_id") else {}
        return deployment, self._flow_name(run.get("flow_id")), self._block_of(deployment)

    def job(self, run, needs, pool, output_path):
        """The run's Job; JobConfigError (or an API error reading a variable) when it has
        none that can run. A Prefect 2 deployment with an infrastructure block runs as the
        block says; any other as the pool's type and base job template say."""
        deployment, flow_name, block = needs
        flow_run_env = self._flow_run_env(run, deployment, flow_name)
        if block is not None:
            return self._block_job(run, deployment, block, flow_run_env, output_path)
        values = merge_job_variables(
            deployment.get("job_variables", deployment.get("infra_overrides")),
            run.get("job_variables"))
        launcher = self.launchers.get(pool.get("type")) or self.launchers["process"]
        template = pool.get("base_job_template") or launcher.base_job_template
        config = resolve_job_configuration(template, values, self._lookup_prefect)
        return launcher.job(config, run, flow_run_env, output_path)

    def _block_job(self, run, deployment, block, flow_run_env, output_path):
        """Prefect 2.20's agent: the block's data with each of the deployment's
        infra_overrides (a dot-path, "env.FOO") set on it, run by the launcher of the
        block's type, the block's env over what the agent sets."""
        block_type = block_type_of(block)
        launcher = next((launcher for launcher in self.launchers.values()
                         if launcher.block_type == block_type), None)
        if launcher is None:
            raise JobConfigError(
                "the deployment's infrastructure block is of type %r, which agent.py does not "
                "run: it runs %s blocks" % (block_type, " and ".join(
                    sorted(repr(l.block_type) for l in self.launchers.values() if l.block_type))))
        import copy
        data = copy.deepcopy(block["data"])
        overrides = deployment.get("infra_overrides") or {}
        if not isinstance(overrides, dict):
            raise JobConfigError("the deployment's infra_overrides is not an object: %.100r"
                                 % (overrides,))
        for path, value in overrides.items():
            _set_dotted(data, path, value)
        return launcher.job_from_block(data, run, flow_run_env, output_path)

    @staticmethod
    def _read_quietly(read, key):
        try:
            read(key)
        except (APIError, APIUnreachable):
            pass  # kept in _failed_reads; each run that needs it says so

    def _cached_deployment(self, deployment_id):
        # Deployments change rarely but are read for every run: cached per sync period.
        cached = self._deployments.get(deployment_id)
        return cached[1] if cached and cached[0] > time.monotonic() else None

    def _deployment_and_block(self, deployment_id):
        try:
            self._block_of(self._deployment(deployment_id))
        except BlockUnusable:
            pass  # each run of it says so

    def _block_of(self, deployment):
        """The deployment's infrastructure block document (Prefect 2), or None."""
        document_id = deployment.get("infrastructure_document_id")
        if document_id is None:
            return None
        if not _is_uuid(document_id):
            raise BlockUnusable("its infrastructure_document_id %s is not a UUID"
                                % _id_text(document_id))
        cached = self._blocks.get(document_id)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            block = self._read_once(self.api.read_block_document, document_id)
        except APIError as exc:
            raise BlockUnusable("its infrastructure block %s cannot be read: %s"
                                % (document_id, exc))
        problem = block_problem(block)
        if problem:
            raise BlockUnusable("its infrastructure block %s cannot be used: %s"
                                % (document_id, problem))
        self._blocks[document_id] = (time.monotonic() + SYNC_SECONDS, block)
        return block

    def _deployment(self, deployment_id):
        _expect_id(deployment_id, "deployment_id")
        deployment = self._cached_deployment(deployment_id)
        if deployment is None:
            deployment = self._read_once(self.api.read_deployment, deployment_id)
            self._deployments[deployment_id] = (time.monotonic() + SYNC_SECONDS, deployment)
        return deployment

    def _flow_name(self, flow_id):
        if not flow_id:
            return None
        _expect_id(flow_id, "flow_id")
        if flow_id not in self._flow_names:
            self._flow_names[flow_id] = self._read_once(self.api.read_flow, flow_id).get("name")
        return self._flow_names[flow_id]

    def _read_once(self, read, object_id):
        """read(object_id), unless it failed already during this burst: that error again
        (its traceback dropped, for each raise adds to it)."""
        failed_reads = self._failed_reads
        failed = failed_reads.get(object_id) if failed_reads is not None else None
        if failed is not None:
            raise failed.with_traceback(None)
        try:
            return read(object_id)
        except (APIError, APIUnreachable) as exc:
            if failed_reads is not None:
                failed_reads[object_id] = exc
            raise

    def _lookup_prefect(self, name):
        if name.startswith("prefect.variables."):
            value = self.api.read_variable(name[len("prefect.variables."):])
            return "" if value is None else value
        raise JobConfigError("placeholder {{ %s }} is not supported by agent.py (only "
                             "prefect.variables.* are)" % name)

    def _flow_run_env(self, run, deployment, flow_name):
        """What every run's environment holds, whatever its job says: where to report, as
        whom, and which run it is."""
        env = dict(self.config.extra_env)
        env.update({
            "PREFECT__FLOW_RUN_ID": run["id"],
            "PREFECT_API_URL": self.config.api_url,
            "PREFECT__WORKER_NAME": self.config.name,
        })
        for key, value in (("PREFECT__FLOW_ID", run.get("flow_id")),
                           ("PREFECT__FLOW_NAME", flow_name),
                           ("PREFECT__DEPLOYMENT_ID", run.get("deployment_id")),
                           ("PREFECT__DEPLOYMENT_NAME", deployment.get("name"))):
            if isinstance(value, str):
                env[key] = value
        if self.config.api_key:
            env["PREFECT_API_KEY"] = self.config.api_key
        if self.config.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.config.auth_string
        # The engine reaches the same API, so it trusts what the agent trusts (as Prefect's
        # worker passes its settings on to its runs).
        if self.config.api_ssl_cert_file:
            env["PREFECT_API_SSL_CERT_FILE"] = self.config.api_ssl_cert_file
        if self.config.tls_insecure_skip_verify:
            env["PREFECT_API_TLS_INSECURE_SKIP_VERIFY"] = "true"
        return env


class Agent:
    """Polls the pool, claims runs and hands them on: to the timetable to start, to the
    supervisor to watch, to the ledger to report. The agent loop thread runs it (run());
    dispatch threads claim during a burst (submit and what it calls: they share _claimed and
    _unsettled only through single list and dict operations, which CPython makes atomic,
    and take the ledger's and the journal's locks); the timetable thread calls _start;
    the supervisor thread passes on signals (on_signal); stop, force_stop and on_signal
    only set flags, wake and cut requests short, and may be called from any thread."""

    def __init__(self, config, api=None, console=None):
        self.config = config
        self.api = api or PrefectAPI(config.api_url, config.api_key, config.auth_string,
                                     ssl_cert_file=config.api_ssl_cert_file,
                                     tls_insecure_skip_verify=config.tls_insecure_skip_verify,
                                     request_timeout=config.request_timeout)
        self.journal = Journal(config.state_dir, config.pool)
        self.launchers = {name: launcher(config, os.environ) for name, launcher in LAUNCHERS.items()}
        self.jobs = JobBuilder(config, self.api, self.launchers)
        self.reporter = Reporter(self.api)
        self._wakeup = Wakeup()
        self.ledger = RunLedger(self.journal, self.reporter, self.api, self._run_released)
        self.timetable = Timetable()
        self.dispatcher = Dispatcher(self.api, lambda: self._stopping)
        self.supervisor = Supervisor(
            self.ledger.ended, self.journal.end_batch, console=console,
            reap_orphans=os.getpid() == 1,
            on_infrastructure=self.ledger.note_infrastructure,
            on_leftovers=None if config.keep_leftover_processes else self.ledger.note_leftovers)
        self.pool = None
        self.queues = list(config.queues)
        self._queues_to_create = list(config.queues)
        # Plain flags, not Events: set by stop() from any thread, which must never block.
        self._stopping = False  # stop claiming; wait for running flows
        self._forced = False  # stop now: terminate running flows
        self._retry_wakeup = Wakeup()  # cuts the agent loop's API retries short on a stop
        self._stop_signals = self._stop_signals_logged = 0
        self._last_stop_signal = None
        # Signal number -> how many came: written by the supervisor thread only, and the
        # count the agent loop has logged, by the loop only, so that no count is lost.
        self._ignored_signals, self._ignored_signals_logged = {}, {}
        self._recovered = False
        self._said_pool_missing = False
        self._named_server = False
        self._processes_of_runs = {}  # run id -> its processes, found at recovery
        self._next_sync = 0.0
        self._outage_since = None
        self._outage_failures = 0
        self.started = time.monotonic()
        self.last_poll = None
        self.last_contact = None  # last loop pass that reached the API (polls, heartbeats)
        self._claimed = []  # run ids the last poll's claims won (appended on several threads)
        self._loop_thread = None  # the agent loop's thread id, once run() runs
        # run id -> (run, transition id, claim state) of claims not started: an answer lost,
        # or a restart that found --limit full (_settle_unanswered_claims starts them)
        self._unsettled = {}

    # -- life cycle -----------------------------------------------------------

    def run(self):
        """Run until stopped, then drain; returns the exit code (0 clean, 1 runs were killed)."""
        self._loop_thread = threading.get_ident()
        self.reporter.start()
        self.supervisor.start()
        self.timetable.start()
        self.api.give_up_retries_when(self._nothing_to_wait_for, self._retry_wakeup)
        next_poll = 0.0
        drain_until = None
        while True:
            self._log_signals()
            self.journal.retry()
            if self._stopping:
                if self._forced or not self.config.run_once:
                    self._hand_back_held_runs()
                if drain_until is None:
                    drain = self.config.drain_timeout
                    drain_until = time.monotonic() + (float("inf") if drain is None else drain)
                if not self.in_flight_count():
                    break
                if self._forced or time.monotonic() >= drain_until:
                    self._terminate_all()
                    break
            syncing = time.monotonic() >= self._next_sync
            try:
                polled = self._first_poll() if self.last_poll is None else None
                if syncing:
                    self._sync()
                if not self._recovered and self.pool is not None:
                    self.recover()
                # The server records a poll after answering it, and on SQLite a write right
                # behind it meets the lock (503): the heartbeat goes first, except on the first
                # pass, where the runs waiting come first.
                beat_first = syncing and self.last_poll is not None
                if beat_first:
                    self._heartbeat()
                if time.monotonic() >= next_poll:
                    more_waiting = not self._stopping and self._poll(polled)
                    self._check_cancellations()
                    next_poll = time.monotonic() + (
                        0.0 if more_waiting else self.config.poll_seconds * jitter(0.9, 1.1))
                if syncing and not beat_first:
                    self._heartbeat()
                self.last_contact = time.monotonic()
                self._api_recovered()
                if not self._named_server:
                    self._name_server()
            except (AuthRefused, UsageError):
                raise
            except Exception as exc:
                if not isinstance(exc, (APIError, APIUnreachable)):
                    # A bug of ours must not stop supervision of every running flow.
                    log.exception("unexpected error in the agent loop; carrying on")
                if not isinstance(exc, Stopped):
                    self._api_failed(exc)
                retry_at = time.monotonic() + min(
                    self.config.poll_seconds, backoff_seconds(self._outage_failures, cap=60))
                next_poll = retry_at
                if syncing or self.pool is None:
                    self._next_sync = retry_at
            if self.config.run_once and self.last_poll is not None and not self._stopping:
                self._stopping = True
                continue  # to the drain at the top: with no run taken, that is the exit
            sync_at = self._next_sync + (min(SYNC_WAITS_FOR_POLL_SECONDS,
                                             self.config.heartbeat_seconds)
                                         if self.pool else 0.0)
            wake_at = min(next_poll, sync_at)
            if self.journal.failure:
                wake_at = min(wake_at, time.monotonic() + Journal.RETRY_SECONDS)
            self._wakeup.sleep(wake_at - time.monotonic())
        delivered = self.reporter.flush(timeout=REPORT_FLUSH_SECONDS)
        undelivered = self.reporter.stop(timeout=5)
        if not delivered and self.journal.keep_logs(undelivered):
            log.warning("some reports could not reach the API before exit; they are kept in %s "
                        "and will be delivered by the next start", self.journal.path)
        elif not delivered:
            log.error("some reports could not reach the API before exit, and the journal "
                      "cannot keep them: %d run log line(s) are lost (%s)", len(undelivered),
                      self.journal.failure)
        self.timetable.stop()
        self.supervisor.stop()
        self.supervisor.join(SUPERVISOR_JOIN_SECONDS)  # before the journal closes under it
        self.supervisor.printer.close(timeout=2)
        self.journal.close()
        self.api.close()
        return 1 if self._forced else 0

    def stop(self):
        """Stop claiming; keep supervising until running flows finish (or the drain timeout).
        Any thread may call it: it never blocks (no lock is waited for, nothing is written;
        at most a timer thread is started, to cut a claim the loop has on its way)."""
        self._stopping = True
        self._wakeup.wake()
        self._retry_wakeup.wake()
        self.dispatcher.stop()
        self.api.interrupt()
        if self.api.finishing(self._loop_thread):  # a claim: cut it later, as Dispatcher does
            cut = threading.Timer(STOPPING_REQUEST_SECONDS, self.api.interrupt, [[self._loop_thread]])
            cut.daemon = True
            cut.start()

    def _nothing_to_wait_for(self):
        """Whether the agent loop may end now: stopped, with no running flow (nor, with
        --run-once, a claimed one) to wait for. Until then its requests, a drain's among
        them, are retried as at any other time; from then on a request that fails, or that
        the stop cuts short, ends as Stopped, and the loop exits without logging it."""
        return self._forced or (self._stopping and not self.supervisor.watching()
                                and not self.timetable.holds_any())

    def _run_released(self):
        """A run freed its slot (any thread): the loop wakes, for a poll with room or the
        end of a drain, and a request of a drain that has just ended is cut short."""
        self._wakeup.wake()
        if self._stopping:
            self._retry_wakeup.wake()
            self.api.interrupt()

    def force_stop(self):
        """Stop now: terminate running flows and report them crashed (never blocks either)."""
        self._forced = True
        self.stop()

    def on_signal(self, signum):
        """What a signal does, on the supervisor thread (install_signal_handlers): count and
        wake, nothing that can block. The agent loop logs what came (_log_signals). TERM and
        INT stop the agent, the second one now; others are ignored."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop_signals += 1
            self._last_stop_signal = signum
            if self._stop_signals > 1:
                self.force_stop()
            else:
                self.stop()
        else:  # logged on the loop's next pass: waking it for each would flood the log
            self._ignored_signals[signum] = self._ignored_signals.get(signum, 0) + 1

    def _log_signals(self):
        seen, self._stop_signals_logged = self._stop_signals_logged, self._stop_signals
        if self._stop_signals and not seen:
            log.info("Received %s: no new runs will be claimed; waiting for %d running flow "
                     "run(s) to finish (send it again to stop them now)",
                     _signal_name(self._last_stop_signal), self.in_flight_count())
        if self._stop_signals > max(seen, 1):
            log.warning("Received %s again: terminating running flow runs now",
                        _signal_name(self._last_stop_signal))
        for signum, total in list(self._ignored_signals.items()):
            count = total - self._ignored_signals_logged.get(signum, 0)
            self._ignored_signals_logged[signum] = total
            if count:
                log.warning("Received %s%s: ignored (SIGTERM or SIGINT stop the agent)",
                            _signal_name(signum), " %d times" % count if count > 1 else "")

    def _terminate_all(self):
        self._forced = True
        children = self.supervisor.children()
        log.warning("stopping now: terminating %d running flow run(s)", len(children))
        for child in children:
            self.supervisor.terminate(child.run_id, "stopped", STOP_GRACE_SECONDS)
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 5
        while self.in_flight_count() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _api_failed(self, exc):
        self._outage_failures += 1
        if self._outage_since is None:
            self._outage_since = self.api.failing_since or time.monotonic()
            log.error("Prefect API at %s is failing, will keep retrying: %s",
                      redact_url(self.config.api_url), exc)
        else:
            log.debug("Prefect API still failing: %s", exc)

    def _api_recovered(self):
        if self._outage_since is not None:
            log.info("Prefect API reachable again after %.0f s (%d failed attempts)",
                     time.monotonic() - self._outage_since, self._outage_failures)
        self._outage_since = None
        self._outage_failures = 0

    def _name_server(self):
        """One line naming the server's version, once the first pass has reached it (its
        runs are claimed by then); a warning if no release of that line was tested."""
        self._named_server = True
        try:
            version = self.api.server_version()
        except (APIError, APIUnreachable, AuthRefused) as exc:
            if isinstance(exc, AuthRefused):  # the version only, as polls pass: not the key
                exc = "GET /admin/version was refused"
            if not isinstance(exc, Stopped):
                log.info("The Prefect server did not say its version: %s", exc)
            return
        release = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
        tested = ", ".join("%d.%d to %d.%d" % (low + high) for low, high in TESTED_SERVERS)
        if release and any(low <= (int(release[1]), int(release[2])) <= high
                           for low, high in TESTED_SERVERS):
            log.info("Prefect server %.60s", version)
        else:
            log.warning("Prefect server %s is not a version agent.py is tested with (%s): "
                        "runs may fail to start or to end in the right state; the README's "
                        "compatibility table lists what is tested", _id_text(version)[:60], tested)

    # -- pool, queues, heartbeat ------------------------------------------------

    def _sync(self):
        """Read (or create) the pool and make sure our queues exist (the heartbeat follows
        the poll)."""
        pool = self.api.read_pool(self.config.pool)
        if pool is None and not self.config.create_pool:
            if not self._said_pool_missing:
                log.warning("Work pool '%s' not found; not creating it "
                            "(--no-create-pool-if-not-found): looking again every %g s",
                            self.config.pool, self.config.heartbeat_seconds)
            self._said_pool_missing = True
            return
        if pool is None:
            pool = self._create_pool()
        elif self.pool is None and self.config.base_job_template is not None:
            log.warning("Work pool '%s' exists: --base-job-template is for a pool agent.py "
                        "creates, and is ignored", self.config.pool)
        self._note_pool_changes(pool)
        self.pool = pool
        self._resolve_queues()

    def _heartbeat(self):
        if self.pool is None:  # not there (--no-create-pool-if-not-found): nothing to beat for
            self._next_sync = time.monotonic() + self.config.heartbeat_seconds * jitter(0.9, 1.1)
            return
        try:
            self.api.heartbeat(self.config.pool, self.config.name, self.config.heartbeat_seconds)
        except APIError as exc:  # answered, but refused: the poll that follows must still go
            log.warning("the worker heartbeat was refused (the pool may show this agent "
                        "offline); polling goes on: %s", exc)
        self._next_sync = time.monotonic() + self.config.heartbeat_seconds * jitter(0.9, 1.1)

    def _create_pool(self):
        pool_type, template = self.config.pool_type, self.config.base_job_template
        if pool_type is None and template is None and self.config.pool == DEFAULT_AGENT_POOL:
            # As Prefect's servers make it for a queue without a pool (2.20 and 3.8.8), so
            # Prefect 2's own agent can serve it too.
            pool_type, template = "prefect-agent", {}
        pool_type = pool_type or ProcessLauncher.name
        if template is None:
            template = LAUNCHERS[pool_type].base_job_template
        log.info("Work pool '%s' does not exist; creating it as a %s pool", self.config.pool, pool_type)
        try:
            return self.api.create_pool(self.config.pool, pool_type, template)
        except APIError as exc:
            if exc.status == 409:  # another agent created it a moment ago
                pool = self.api.read_pool(self.config.pool)
                if pool is None:
                    raise APIError("", "work pool", 404, "work pool %r was created by another "
                                   "agent, and deleted again" % self.config.pool)
                return pool
            if exc.status == 403:
                raise UsageError("the server refused to create work pool %r: %s"
                                 % (self.config.pool, exc.detail))
            raise

    def _note_pool_changes(self, pool):
        old = self.pool or {}
        if pool.get("is_paused") and not old.get("is_paused"):
            log.info("Work pool '%s' is paused; no runs will be claimed until it is resumed",
                     self.config.pool)
        elif old.get("is_paused") and not pool.get("is_paused"):
            log.info("Work pool '%s' was resumed", self.config.pool)
        note = self._pool_type_note(pool.get("type"))
        if note and pool.get("type") != old.get("type"):
            log.log(*note)

    def _pool_type_note(self, pool_type):
        """(level, line) to log when the pool's type is first seen, or changes; or None."""
        launcher = self.launchers.get(pool_type)
        if launcher is not None:
            return launcher.pool_note(self.config.pool)
        blocks = " and ".join(sorted("'%s'" % l.block_type for l in self.launchers.values()
                                     if l.block_type))
        if pool_type == "prefect-agent":  # Prefect 2's agent pool
            return INFO, ("Work pool '%s' is a Prefect 2 agent pool: a deployment's "
                          "infrastructure block decides how its runs start (agent.py runs %s "
                          "blocks); a deployment without one runs as local processes"
                          % (self.config.pool, blocks))
        return WARNING, ("Work pool '%s' has type %r; agent.py runs its flows as local "
                         "processes (or as their deployment's %s infrastructure block says)"
                         % (self.config.pool, pool_type, blocks))

    def _resolve_queues(self):
        for queue in self._queues_to_create:
            if self.api.ensure_queue(self.config.pool, queue):
                log.info("Created work queue '%s' in pool '%s'", queue, self.config.pool)
        self._queues_to_create = []
        if self.config.match:
            matched = self.api.queues_with_prefixes(self.config.pool, self.config.match)
            found = sorted(set(self.config.queues) | set(matched))
            if found != sorted(self.queues):
                log.info("Polling work queues: %s", ", ".join(found) or "(none match yet)")
            self.queues = found

    # -- poll, claim, launch ----------------------------------------------------

    def _first_poll(self):
        """Start-up asks for the waiting runs before it reads the pool: they are acted on
        after the pool read and the recovery of the journal, as any poll's answer would be,
        but they are asked for one round trip sooner. None when the pool does not exist yet,
        or queues must be created or matched first: the usual poll follows the sync."""
        if self._stopping or self.config.queues or self.config.match:
            return None
        try:
            return self.api.scheduled_runs(self.config.pool, [], self._horizon())
        except APIError as exc:
            if exc.status == 404:
                return None
            raise

    def _horizon(self):
        return utcnow() + datetime.timedelta(seconds=self.config.prefetch_seconds)

    def _poll(self, polled=None):
        """Poll (or take the answer `polled` already holds) and claim what it returns. True
        when more runs may be waiting: the answer was a full page, and runs were claimed
        from it, with room for more."""
        if self.pool is None:
            return False
        if self.config.match and not self.queues:
            self._resolve_queues()  # pick up a matching queue as soon as it appears
            if not self.queues:
                self.last_poll = time.monotonic()  # polling [] would mean "every queue"
                return False
        self._settle_unanswered_claims()
        runs = polled
        if runs is None:
            runs = self.api.scheduled_runs(self.config.pool, self.queues, self._horizon())
        self.last_poll = time.monotonic()
        if not runs:
            return False
        self.reporter.pause()
        try:
            claimed = self._claim_all(runs)
        finally:
            self.reporter.resume()
        room = not self.config.limit or self.in_flight_count() < self.config.limit
        return len(runs) >= POLL_PAGE and claimed > 0 and room

    def _claim_all(self, runs):
        """Claim a poll's runs, up to DISPATCH_CONNECTIONS at once, in the poll's order. The
        deployments and flows they need are read first, each once; cancellations are checked
        once a poll interval while a long burst lasts. Returns how many it claimed."""
        self._claimed = []
        self.jobs.begin_burst()
        try:
            self.dispatcher.run(self.jobs.reads_for(runs), lambda read: read())
            self.dispatcher.run(runs, self.submit, between=self._check_cancellations,
                                every=self.config.poll_seconds)
        finally:
            self.jobs.end_burst()
        return len(self._claimed)

    def submit(self, run):
        """Claim and launch one run of a poll's answer (on a dispatch thread, or the agent
        loop's): the unit of a burst. False when the burst should take no more runs."""
        if self._stopping or self.journal.failure:
            return False
        if not self.ledger.reserve(run["id"], self.config.limit):
            return not (self.config.limit and self.in_flight_count() >= self.config.limit)
        try:
            return self._submit(run)
        except Exception as exc:
            self.ledger.release(run["id"])
            if isinstance(exc, (AuthRefused, UsageError)):
                raise
            log.exception("run %s: submitting failed unexpectedly", run["id"])
            return True

    def in_flight_count(self):
        return self.ledger.in_flight_count()

    def _submit(self, run):
        """Read what the run needs, claim it, and start it only if the server says it is ours.
        Reads come first so that an API failure leaves the run for the next poll, unclaimed;
        a run or answer the agent refuses would be refused again, so that run is claimed and
        crashed with the reason. False when the API is unreachable: the burst stops there."""
        run_id = run["id"]
        refused = run.get(REFUSED)
        needs = None
        try:
            if refused is None:
                try:
                    needs = self.jobs.needs(run)
                except (AnswerRefused, BlockUnusable) as exc:  # so would every read be
                    refused = str(exc)
            claimed = self._claim(run)
        except DeploymentGone:
            self.ledger.release(run_id)
            self.ledger.cancel_orphan(run)
            return True
        except Stopped:  # a claim it cut short is settled on the way out (_hand_back_held_runs)
            self.ledger.release(run_id)
            return False
        except APIError as exc:
            self.ledger.release(run_id)
            log.warning("run %s: not claimed, will try again next poll: %s", run_id, exc)
            return True
        except APIUnreachable as exc:
            self.ledger.release(run_id)
            log.warning("run %s: not claimed, will try again next poll: %s", run_id, exc)
            return False
        except JournalError:  # logged by the journal, once; claims wait until it is writable
            self.ledger.release(run_id)
            return False
        if claimed:
            self._claimed.append(run_id)
        metrics.count("agentpy_runs_claimed_total" if claimed else "agentpy_claims_lost_total")
        if claimed and refused:
            self.ledger.crash_unstarted(run_id, refused)
        elif claimed:
            self._launch(run, needs)
        else:
            self.ledger.release(run_id)
        return True

    def _claim(self, run):
        """Propose PENDING. True only when the run ends up PENDING by our proposal."""
        run_id = run["id"]
        transition_id = random_uuid()
        self.ledger.claiming(run_id, transition_id, run)
        self.api.let_finish(True)
        try:
            result = self.api.set_state(run_id, "PENDING", transition_id=transition_id)
        except APIError:
            self.ledger.claim_lost(run_id)  # refused outright
            raise
        except APIUnreachable as exc:
            # The claim may have landed before the connection broke; until the run itself says
            # whose it is, keep it on the books so it cannot be left Pending with no process.
            self._unsettled[run_id] = (run, transition_id, None)
            if isinstance(exc, Stopped):
                raise
            return self._settle(run_id)
        finally:
            self.api.let_finish(False)
        state = _obj(result.get("state"))
        details = _obj(state.get("state_details"))
        ours = state.get("type") == "PENDING" and (
            result["status"] == "ACCEPT" or details.get("transition_id") == transition_id)
        if ours and details.get("transition_id") is None:
            self.ledger.claimed_as(run_id, state.get("id"))
        if ours and details.get("scheduled_time") is None:
            # The server also accepts PENDING from a final state: the poll's answer was stale
            # and another agent has already run it to the end. Put that end back; run nothing.
            self.ledger.restore(run_id, transition_id)
            return False
        if ours:
            return True
        self.ledger.claim_lost(run_id)
        reason = _obj(result.get("details")).get("reason") or state.get("name") or "no reason"
        log.info("run %s: not ours to start (%s %s: %s)", run_id, result["status"],
                 state.get("type"), reason)
        return False

    def _settle(self, run_id):
        """Whether a claim not yet started is still ours to start: its answer was lost, or a
        restart found it with --limit full. Raises APIUnreachable (and keeps the claim
        unsettled) while the API cannot tell."""
        run, transition_id, claim_state = self._unsettled[run_id]
        current = _obj(self.api.read_run(run_id).get("state"))
        del self._unsettled[run_id]
        ours = _is_our_claim(current, transition_id, claim_state)
        if not ours:
            self.ledger.claim_lost(run_id)
        return ours

    def _settle_unanswered_claims(self):
        for run_id in list(self._unsettled):
            run = self._unsettled[run_id][0]
            if self.ledger.reserve(run_id, self.config.limit):
                try:
                    ours = self._settle(run_id)
                except (APIError, APIUnreachable):
                    self.ledger.release(run_id)
                    raise
                if ours:
                    log.info("run %s: our claim holds; starting it now", run_id)
                    self._submit_claimed(run)
                else:
                    self.ledger.release(run_id)

    def _submit_claimed(self, run):
        if run.get(REFUSED):
            self.ledger.crash_unstarted(run["id"], run[REFUSED])
            return
        try:
            needs = self.jobs.needs(run)
        except (APIError, APIUnreachable, BlockUnusable) as exc:
            self.ledger.crash_unstarted(run["id"], exc)
            return
        self._launch(run, needs)

    def _launch(self, run, needs):
        """Prepare the run's job now; start it at its scheduled time, or at once if it is due."""
        run_id = run["id"]
        if self._stopping and not self.config.run_once:  # a claim in flight when told to stop
            self.ledger.hand_back(run_id, "agent.py was stopped while the run was being claimed")
            return
        self.reporter.log(run_id, "Agent '%s' submitting flow run '%s'" % (self.config.name, run_id))
        try:
            job = self.jobs.job(run, needs, self.pool,
                                self.ledger.output_path(run_id))
        except (JobConfigError, APIError, APIUnreachable) as exc:
            self.ledger.crash_unstarted(run_id, exc)
            return
        wait = max(0.0, (_scheduled_time(run) or 0.0) - time.time())
        if wait > 0.5:
            log.info("run %s: claimed; starts at its scheduled time, in %.1f s", run_id, wait)
        self.timetable.add(run_id, time.monotonic() + wait, lambda: self._start(run, job))

    def _start(self, run, job):
        """Start the run's job with its launcher (on the timetable thread), at most once:
        the start is on disk before the process exists (RunLedger.starting)."""
        run_id = run["id"]
        run_name = run.get("name") or run_id
        output = self.ledger.output_path(run_id)
        try:
            temp_dir = temp_dir_for(run_id) if job.working_dir is None else None
        except OSError as exc:  # its first call imports tempfile, which takes descriptors
            if descriptor_shortage.noted("starting run %s" % run_id, exc):
                self._start_later(run, job)
            else:  # no usable temporary directory (tempfile says FileNotFoundError)
                self.ledger.crash_unstarted(run_id, "no temporary working directory: %s" % exc)
            return
        try:
            self.ledger.starting(run_id, run_name, job, output, temp_dir)
        except JournalError:
            self.ledger.hand_back(run_id, "its start could not be written to the journal, and "
                                          "starting it unrecorded could run it twice")
            return
        launcher = job.launcher
        if launcher.engine_on_host:
            job.env = dict(job.env, **self.supervisor.channel.register(run_id))
        with reaper_hold:  # until the supervisor watches the process
            try:
                child = launcher.start(run_id, run_name, job, output, temp_dir)
            except OutOfDescriptors:
                self.supervisor.channel.forget(run_id)
                self._start_later(run, job)
                return
            except LaunchError as exc:
                self.supervisor.channel.forget(run_id)
                self.ledger.crash_unstarted(run_id, exc)
                return
            self.ledger.running(run_id, child)
            self.supervisor.add(child)
        metrics.count("agentpy_runs_started_total")
        self.reporter.log(run_id, "Flow run '%s' submitted to infrastructure: %s, command %s"
                          % (child.run_name, launcher.where(child), _argv_text(job.argv)))

    def _start_later(self, run, job):
        """Try a start that failed for want of file descriptors again soon. The run never
        began and keeps its claim: crashing it would lose it, and handing it back would offer
        it to this same agent, with an API round trip and a log line per attempt. A stop hands
        it back like any run waiting for its time."""
        self.timetable.add(run["id"], time.monotonic() + START_RETRY_SECONDS,
                           lambda: self._start(run, job))

    def _hand_back_held_runs(self):
        """On stop, runs claimed ahead of their time go back to the pool as Scheduled (for
        another agent, or this one after its restart) instead of waiting Pending for nobody;
        so do claims whose answer was lost, if the run says they landed (RunLedger reads it)."""
        for run_id in self.timetable.held():
            if self.timetable.take(run_id):
                self.ledger.hand_back(run_id, "agent.py was stopped before the run was due")
        for run_id in list(self._unsettled):
            del self._unsettled[run_id]
            self.ledger.hand_back(run_id, "agent.py was stopped while the run was being claimed")

    # -- cancellation ---------------------------------------------------------

    def _check_cancellations(self):
        """Terminate the processes of our runs that someone set to Cancelling; a run not yet
        due is cancelled without being started."""
        watching = [c.run_id for c in self.supervisor.children() if c.stop_reason is None]
        watching += self.timetable.held()
        for offset in range(0, len(watching), 200):
            for run in self.api.runs_in_state(watching[offset:offset + 200],
                                              ["CANCELLING", "CANCELLED"]):
                if not being_cancelled(_obj(run.get("state"))):
                    continue
                run_id = run["id"]
                if self.timetable.take(run_id):
                    metrics.count("agentpy_cancellations_total")
                    self.ledger.cancelled_unstarted(run_id, run.get("name") or run_id)
                elif self.supervisor.terminate(run_id, "cancelled", self.config.cancel_grace_seconds):
                    metrics.count("agentpy_cancellations_total")
                    self.reporter.log(run_id, "Cancellation requested: terminating the flow "
                                      "run's processes (SIGTERM, then SIGKILL after %g s)"
                                      % self.config.cancel_grace_seconds)

    # -- restart recovery -------------------------------------------------------

    def recover(self):
        """Finish what a previous agent on this journal left: launch its claimed runs, adopt
        its still-running children, and deliver the reports it still owed."""
        self.reporter.resend_logs(self.journal.take_logs())
        entries = self.ledger.entries()
        self._processes_of_runs = run_processes(dict.fromkeys(entries))  # one look for all
        for launcher in self.launchers.values():
            launcher.prepare_recovery(entries)
        for run_id, entry in entries.items():
            if self.supervisor.child(run_id) is not None or self.ledger.holds(run_id):
                continue
            if not _is_uuid(run_id):  # it would go into URL paths
                log.error("journal: skipped and dropped the entry of %s: not a flow run id",
                          _id_text(run_id))
                self.journal.forget(run_id)
                continue
            try:
                self._recover_entry(run_id, entry)
            except APIError as exc:  # the API will never take it (deleted run, ...): let it go
                log.warning("run %s: dropping it from the journal: %s", run_id, exc)
                self.ledger.forget(run_id)
            except (APIUnreachable, AuthRefused, UsageError, JournalError):
                raise  # recovery is tried again on the next pass
            except Exception as exc:  # a damaged entry must not stop recovering the rest
                log.error("run %s: skipped and dropped its journal entry, which cannot be "
                          "used: %s", run_id, _describe(exc))
                self.journal.forget(run_id)
        self._recovered = True

    def _recover_entry(self, run_id, entry):
        phase = entry.get("phase")
        if phase == "claiming":
            self._recover_claim(run_id, entry)
        elif phase == "starting":
            self._recover_start(run_id, entry)
        elif phase == "running" and self._recovered_by_launcher(run_id, entry):
            pass
        else:
            owed = entry.get("owed") if phase == "exited" else None
            if not isinstance(owed, dict):
                owed = {"kind": "crash", "message": _gone_while_down(entry.get("pid"))}
            self._stop_leftovers_of(run_id)
            log.info("run %s: delivering what the previous agent owed the API", run_id)
            self.ledger.owed_again(run_id, owed)

    def _recover_start(self, run_id, entry):
        """The previous agent stopped between writing a start down and recording its
        process. Find the process by the run id in its environment and adopt it; start the
        run if it provably never began; else ask its launcher; else report that it may have
        run: never start it again (at most once)."""
        found = self._processes_of_runs.get(run_id, [])
        leaders = [(pid, start_time) for pid, start_time, sid in found if pid == sid]
        if leaders and entry.get("host") == socket.gethostname():
            pid, start_time = leaders[0]
            log.info("run %s: found its process %d, started just before a restart", run_id, pid)
            if not self._recovered_by_launcher(run_id, dict(entry, pid=pid, start_time=start_time)):
                self.ledger.crashed(run_id, _gone_while_down(pid))  # it ended just now
        elif not found and not os.path.exists(entry.get("output") or self.ledger.output_path(run_id)):
            log.info("run %s: its start was written down but never began (it has no output "
                     "file yet); starting it now", run_id)
            _remove(entry.get("temp_dir"))
            self._recover_claim(run_id, entry)
        elif not self._recovered_by_launcher(run_id, entry):
            self._stop_leftovers_of(run_id)
            self.ledger.crashed(run_id, (
                "agent.py was stopped while it was starting this flow run, and found no "
                "process of the run when it restarted: the run may have started and ended, "
                "or never started. So that it runs at most once, it is not started again."))

    def _recovered_by_launcher(self, run_id, entry):
        """Ask the launcher that started the run what became of it: watch it again, or
        report how it ended. False when it found nothing."""
        launcher = self.launchers.get(entry.get("launcher")) or self.launchers["process"]
        with reaper_hold:  # a `docker start --attach` it starts is not watched yet
            found = launcher.recover(run_id, entry, self.ledger.output_path(run_id))
            if found is None:
                return False
            if isinstance(found, str):
                self.ledger.crashed(run_id, found)
                return True
            self.ledger.reserve(run_id)
            self.ledger.running(run_id, found)
            self.supervisor.add(found)
        self.reporter.log(run_id, "Agent '%s' %s after a restart" % (self.config.name, found.recovered))
        return True

    def _stop_leftovers_of(self, run_id):
        """Processes a run left running while no agent watched it, stopped as at its end."""
        found = self._processes_of_runs.get(run_id)
        if found and not self.config.keep_leftover_processes:
            self.ledger.note_leftovers(run_id, found)
            kill_at = time.monotonic() + Supervisor.LEFTOVER_GRACE_SECONDS
            self.supervisor.kill_leftovers_later(stop_leftovers(found, kill_at))

    def _recover_claim(self, run_id, entry):
        try:
            run = self.api.read_run(run_id)
        except AnswerRefused as exc:  # it may be ours; it can run nowhere
            if self.ledger.reserve(run_id):
                self.ledger.crash_unstarted(run_id, exc)
            return
        state = _obj(run.get("state"))
        if _is_our_claim(state, entry.get("transition_id"), entry.get("claim_state")):
            run = dict(_obj(entry.get("run")), **dict(run, id=run_id))
            problem = run_problem(run)
            run = dict(run, **{REFUSED: problem}) if problem else run
            if self.ledger.reserve(run_id, self.config.limit):
                log.info("run %s: claimed before a restart but never started; starting it now", run_id)
                self._submit_claimed(run)
            else:  # --limit is full of adopted runs: a poll starts it once a slot is free
                log.info("run %s: claimed before a restart but never started; starts once "
                         "--limit has room", run_id)
                self._unsettled[run_id] = (run, entry.get("transition_id"), entry.get("claim_state"))
            return
        if being_cancelled(state) and not run.get("infrastructure_pid"):
            self.ledger.cancel_never_started(run_id, state, run.get("name") or run_id)
        else:
            self.ledger.forget(run_id)


def _gone_while_down(pid):
    return ("Flow run process %s was gone when agent.py restarted: it ended while the agent "
            "was down, so its exit code is unknown, and the run never reported a final state."
            % pid)


###############################################################################
# Health server ###############################################################
###############################################################################


def metrics_report(agent, now=None):
    """(200, text) for GET /metrics: Metrics' counters and the agent's gauges."""
    now = time.monotonic() if now is None else now
    return 200, metrics.text((
        ("agentpy_runs_in_flight", "Flow runs claimed and not yet ended.",
         agent.in_flight_count()),
        ("agentpy_seconds_since_last_poll", "Seconds since the last successful poll (NaN "
         "before the first).", None if agent.last_poll is None else now - agent.last_poll)))


def worker_health_report(agent, now=None):
    """(HTTP status, body) for GET /health, as Prefect's worker answers it (--with-healthcheck;
    3.8.8): healthy while the last poll, or before the first one the start, is at most 30
    poll intervals old."""
    now = time.monotonic() if now is None else now
    since = agent.last_poll if agent.last_poll is not None else agent.started
    if now - since <= 30 * agent.config.poll_seconds:
        return 200, {"message": "OK"}
    return 503, {"message": "Worker may be unresponsive at this time"}


def health_report(agent, now=None):
    """(HTTP status, body) for GET /api/health: healthy while polls keep succeeding."""
    now = time.monotonic() if now is None else now
    limit = UNHEALTHY_AFTER_POLLS * agent.config.poll_seconds + agent.config.request_timeout / 2
    body = {"agent": agent.config.name, "pool": agent.config.pool,
            "runs_in_flight": agent.in_flight_count()}
    contact = agent.last_contact
    if contact is None:
        age = now - agent.started
        reason = "has not reached the Prefect API successfully yet"
    else:
        age = now - contact
        reason = "last successful poll was %.0f s ago" % age
    body["seconds_since_last_poll"] = round(age, 1) if contact is not None else None
    if agent.config.tls_insecure_skip_verify and agent.config.api_url.startswith("https:"):
        body["warning"] = ("PREFECT_API_TLS_INSECURE_SKIP_VERIFY is on: the API's TLS "
                           "certificate is not checked")
    failure = agent.journal.failure
    if failure is not None:
        body["status"] = "unhealthy"
        body["reason"] = failure + "; no runs are claimed until it can"
        return 503, body
    if contact is not None and age <= limit:
        body["status"] = "healthy"
        return 200, body
    if contact is None and age <= limit:
        body["status"] = "starting"
        body["reason"] = reason
        return 503, body
    body["status"] = "unhealthy"
    body["reason"] = reason + " (limit %.0f s)" % limit
    return 503, body


class HealthServer(threading.Thread):
    """GET /api/health, and Prefect's worker GET /health, on one address, answered from its
    own thread.

    One thread polls every connection, rather than http.server's thread per connection: an
    idle connection costs a descriptor, never a thread. A probe sends its request as soon as
    it connects, so one silent for REQUEST_SECONDS is dropped, and beyond MAX_CONNECTIONS the
    oldest is, to admit the newest: a flood of idle connections holds at most
    MAX_CONNECTIONS descriptors, and cannot keep a real probe out once it ends. It reads the
    Agent's counters without a lock: each is one attribute, read whole."""

    #: See ControlChannel.MAX_LOGINS for how this leaves descriptors to the agent's own work.
    MAX_CONNECTIONS = 64
    REQUEST_SECONDS = 5.0
    MAX_REQUEST_BYTES = 8192
    ACCEPT_PAUSE_SECONDS = 0.5
    REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
               503: "Service Unavailable"}

    def __init__(self, agent, host, port, routes=None):
        super().__init__(name="health", daemon=True)
        self._agent = agent
        self._routes = routes or {"/api/health": health_report}  # path -> report(agent)
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.server_address = self._listener.getsockname()
        self._waiting = {}  # socket -> (request so far, deadline), oldest first
        self._accept_paused_until = 0.0
        self._stopping = False

    def close(self):
        """Stop serving and wait until the thread has closed every socket."""
        self._stopping = True
        try:
            self._listener.shutdown(socket.SHUT_RD)  # wakes the poll
        except OSError:
            pass
        self.join()

    def run(self):
        while not self._stopping:
            now = time.monotonic()
            sockets = list(self._waiting)
            due = [deadline for _, deadline in list(self._waiting.values())[:1]]
            if now >= self._accept_paused_until:
                sockets.append(self._listener)
            else:
                due.append(self._accept_paused_until)
            for sock in _wait_readable(sockets, max(0.0, min(due) - now) if due else None):
                if sock is self._listener:
                    self._accept()
                elif sock in self._waiting:
                    self._read(sock)
            now = time.monotonic()
            for sock, (_, deadline) in list(self._waiting.items()):
                if now >= deadline:
                    self._drop(sock)
        for sock in [self._listener] + list(self._waiting):
            sock.close()

    def _accept(self):
        for _ in range(self.MAX_CONNECTIONS):  # then the timeouts: no flood holds it here
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of descriptors, or this connection's own trouble: listening on would spin.
                if not self._stopping:
                    descriptor_shortage.noted("accepting a health check", exc)
                    self._accept_paused_until = time.monotonic() + self.ACCEPT_PAUSE_SECONDS
                return
            if len(self._waiting) >= self.MAX_CONNECTIONS:
                self._drop(next(iter(self._waiting)))
            sock.setblocking(False)
            self._waiting[sock] = (b"", time.monotonic() + self.REQUEST_SECONDS)
            self._read(sock)  # a probe's request is usually there already

    def _drop(self, sock):
        del self._waiting[sock]
        sock.close()

    def _read(self, sock):
        data = _recv(sock)
        if data is None:
            return
        request, deadline = self._waiting[sock]
        request += data
        if not data or len(request) > self.MAX_REQUEST_BYTES:
            self._drop(sock)
        elif b"\r\n\r\n" in request or b"\n\n" in request:
            del self._waiting[sock]
            self._answer(sock, request)
        else:
            self._waiting[sock] = (request, deadline)

    def _answer(self, sock, request):
        words = request.split(b"\n", 1)[0].decode("latin-1").split()
        if len(words) != 3:
            status, body = 400, {"detail": "not an HTTP request"}
        elif words[0] != "GET":
            status, body = 405, {"detail": "only GET is answered"}
        elif words[1].split("?")[0].rstrip("/") not in self._routes:
            status, body = 404, {"detail": "not found; try %s" % " or ".join(self._routes)}
        else:
            try:
                status, body = self._routes[words[1].split("?")[0].rstrip("/")](self._agent)
            except Exception:  # a bug of ours must not stop the health checks
                log.exception("answering a health check failed")
                status, body = 503, {"status": "unhealthy", "reason": "see the agent's log"}
        text = isinstance(body, str)  # GET /metrics: Prometheus's text format
        data = body.encode() if text else json.dumps(body).encode()
        kind = "text/plain; version=0.0.4; charset=utf-8" if text else "application/json"
        head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                "Connection: close\r\n\r\n" % (status, self.REASONS[status], kind, len(data)))
        try:
            sock.send(head.encode() + data)  # a few hundred bytes: a new connection takes them
        except OSError:
            pass
        sock.close()


def start_health_server(agent, host, port, routes=None):
    """Serve `routes` (default GET /api/health) on host:port from a daemon thread; returns
    the server."""
    server = HealthServer(agent, host, port, routes)
    server.start()
    return server


###############################################################################
# Command line ################################################################
###############################################################################

BANNER = """\
 agent.py %s: Prefect flow runs from work pool '%s', standard library only
 API %s (from %s), worker name '%s'
 %s"""


def install_flags(argv, config, environ, leave_out=()):
    """What `install` writes for the flags in argv: (the flags, the variables whose values
    come from the service manager's environment, the settings written out as (name, value)).
    No secret is among the flags: a --key flag is dropped and the key, like the auth string
    and the value of each --env KEY=VALUE (which becomes --env KEY), is one of those variables
    (or keep using --key-file); a password in --api, which the agent never uses, is left out.
    Flags named in `leave_out` are dropped."""
    flags, from_environment, given = [], [], set()
    for flag, name, value in _flag_items(argv):
        long_name = flag[0][-1]
        given.add(long_name)
        if long_name == "--key" or long_name in leave_out:
            continue
        if long_name == "--api":
            value = redact_url(value)
        elif long_name == "--env":
            value = value.partition("=")[0]
            from_environment.append(value)
        flags += [name] if value is None else [name, value]
    if "--api" not in given:
        flags += ["--api", redact_url(config.api_url)]
    if config.api_key and "--key-file" not in given:
        from_environment.append("PREFECT_API_KEY")
    if config.auth_string:
        from_environment.append("PREFECT_API_AUTH_STRING")
    from_environment = list(dict.fromkeys(from_environment))
    settings_flags, settings = _settings_to_carry(given, config, environ)
    return (flags + settings_flags, from_environment,
            [(name, value) for name, value in settings if name not in from_environment])


def _settings_to_carry(given, config, environ):
    """The service will not see the environment, .env, prefect.toml or profile that `install`
    read its settings from (nor its working directory), so what they set travels along: as a
    flag where there is one, else as (name, value), none of them secret."""
    flags, settings = [], []
    if "--poll-interval" not in given and config.poll_seconds != DEFAULT_POLL_SECONDS:
        flags += ["--poll-interval", repr(config.poll_seconds)]
    if "--prefetch-seconds" not in given and config.prefetch_seconds != DEFAULT_PREFETCH_SECONDS:
        flags += ["--prefetch-seconds", repr(config.prefetch_seconds)]
    if "--agent-address" not in given and config.health_address:
        host, port = config.health_address
        flags += ["--agent-address", "http://%s:%d" % ("[%s]" % host if ":" in host else host,
                                                       port)]
    if config.api_ssl_cert_file:
        settings.append(("PREFECT_API_SSL_CERT_FILE", config.api_ssl_cert_file))
    if config.tls_insecure_skip_verify:
        settings.append(("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "true"))
    if config.request_timeout != REQUEST_TIMEOUT_SECONDS:
        settings.append(("PREFECT_API_REQUEST_TIMEOUT", repr(config.request_timeout)))
    if config.heartbeat_seconds != SYNC_SECONDS:
        settings.append(("PREFECT_WORKER_HEARTBEAT_SECONDS", repr(config.heartbeat_seconds)))
    if config.worker_health_address not in (None, DEFAULT_WORKER_WEBSERVER):
        host, port = config.worker_health_address
        settings += [("PREFECT_WORKER_WEBSERVER_HOST", host),
                     ("PREFECT_WORKER_WEBSERVER_PORT", str(port))]
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):  # read by ssl's default context
        if environ.get(name):
            settings.append((name, os.path.abspath(environ[name])))
    return flags, settings


def service_name(config):
    return re.sub(r"[^A-Za-z0-9_-]", "-", "prefect-agent-%s" % config.pool)


def supervisord_section(argv, config, environ, executable, script):
    """A supervisord [program] section running the agent with the same flags and settings,
    secrets read from supervisord's own environment (install_flags)."""
    flags, names, settings = install_flags(argv, config, environ)
    program = service_name(config)
    command = " ".join(shlex.quote(part) for part in [executable, script] + flags)
    lines = [
        "; Generated by 'agent.py install'. Add it to supervisord.conf, then: supervisorctl update",
        "[program:%s]" % program,
        "command=%s" % command.replace("%", "%%"),
        "autostart=true",
        "; exit 0: asked to stop; 2: bad flags (restarting will not help); 1: anything else",
        "autorestart=unexpected",
        "exitcodes=0,2",
        "startsecs=5",
        "; SIGTERM: stop claiming and let running flows finish; stopwaitsecs bounds that wait",
        "stopsignal=TERM",
        "stopwaitsecs=600",
        "; flow runs live in their own sessions; the agent signals them itself",
        "stopasgroup=false",
        "killasgroup=false",
        "redirect_stderr=true",
        "stdout_logfile=/var/log/%s.log" % program,
    ]
    if names:
        # supervisord expands %(ENV_KEY)s from its own environment when it reads the file.
        lines.append("; set %s in supervisord's environment: secrets stay out of argv and "
                     "of this file" % ", ".join(names))
    if names or settings:
        # Each reference is quoted for the value it stands for today: supervisord expands it
        # before it parses the line.
        known = dict(config.extra_env, PREFECT_API_KEY=config.api_key,
                     PREFECT_API_AUTH_STRING=config.auth_string)
        entries = [(key, known.get(key) or "", "%%(ENV_%s)s" % key) for key in names]
        entries += [(key, value, value.replace("%", "%%")) for key, value in settings]
        pairs, left_out = [], []
        for key, value, written in entries:
            quote = _supervisord_quote(value)
            if quote:
                pairs.append("%s=%s%s%s" % (key, quote, written, quote))
            else:
                left_out.append(key)
        if pairs:
            lines.append("environment=" + ",".join(pairs))
        if left_out:
            why = ("the value of %s cannot be written in environment= (quotes of both kinds, a "
                   "quote at an end, or a control character): set it in supervisord's own "
                   "environment, which the agent inherits" % ", ".join(left_out))
            log.warning("%s", why)
            lines.append("; " + why)
    return "\n".join(lines) + "\n"


def _supervisord_quote(value):
    """The quote that keeps `value` whole in supervisord's environment=, or None: supervisor
    4.2 expands %(ENV_X)s, splits the line with shlex without escapes, then strips quotes from
    both ends of each value."""
    quote = "'" if '"' in value else '"'
    if quote in value or value[:1] in "'\"" or value[-1:] in "'\"" or \
            re.search(r"[\x00-\x1f\x7f]", value):
        return None
    return quote


#: The longest an agent takes to exit once its drain ends: terminating the runs left
#: (Agent._terminate_all, up to STOP_GRACE_SECONDS + 5), then delivering its reports
#: (REPORT_FLUSH_SECONDS, then 5 s for the reporter to stop), with room to spare.
EXIT_AFTER_DRAIN_SECONDS = STOP_GRACE_SECONDS + 5 + REPORT_FLUSH_SECONDS + 5 + 10


def systemd_unit(argv, config, environ, executable, script):
    """A systemd service unit running the agent with the same flags and settings: secrets in
    an EnvironmentFile (install_flags), the journal in the unit's StateDirectory (a
    --state-dir flag is replaced), a stop that signals the agent alone and lets it drain."""
    flags, names, settings = install_flags(argv, config, environ, leave_out=("--state-dir",))
    unit = service_name(config)
    command = " ".join(_systemd_word(part) for part in [executable, script] + flags)
    if config.drain_timeout is None:
        stop_comment = "set it above your longest flow run"
        stop_seconds = 600
    else:
        stop_comment = "--drain-timeout, then %d s to stop the runs left" % EXIT_AFTER_DRAIN_SECONDS
        stop_seconds = int(config.drain_timeout + EXIT_AFTER_DRAIN_SECONDS) + 1
    lines = [
        "# Generated by 'agent.py install --systemd'. Save as /etc/systemd/system/%s.service,"
        % unit,
        "# then: systemctl daemon-reload && systemctl enable --now %s" % unit,
        "[Unit]",
        # Quoted: a line that ends in a backslash would go on to the next.
        "Description=agent.py: Prefect flow runs from work pool '%s'"
        % escape_controls(config.pool).replace("%", "%%"),
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        "# Flow runs run as the unit's User=, root unless you set one.",
        "ExecStart=%s --state-dir %%S/%s" % (command, unit),
        "# The journal of runs, for restart recovery: /var/lib/%s, made by systemd." % unit,
        "StateDirectory=%s" % unit,
        "StateDirectoryMode=0700",
        "# exit 0: asked to stop; 2: bad flags (restarting will not help); 1: anything else",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "RestartSec=5",
        "# SIGTERM makes the agent stop claiming and let running flows finish. Flow runs share",
        "# the unit's control group: KillMode=mixed sends SIGTERM to the agent alone, which",
        "# drains (the default, control-group, would kill every flow at once). When",
        "# TimeoutStopSec runs out, SIGKILL goes to every process left, flows included.",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        "# TimeoutStopSec bounds the drain, before SIGKILL: " + stop_comment,
        "TimeoutStopSec=%d" % stop_seconds,
    ]
    if settings:
        lines.append("# Settings install read from its shell's environment, .env, prefect.toml "
                     "or profile (none secret):")
        lines += ["Environment=%s" % _systemd_word("%s=%s" % pair, variables=False)
                  for pair in settings]
    if names:
        lines += [
            "# Secrets stay out of argv and of this file: /etc/%s.env" % unit,
            "# (KEY=VALUE lines, owned by root, mode 0600) sets %s." % ", ".join(names),
            "# An EnvironmentFile, not LoadCredential: the agent reads each of them as an",
            "# environment variable and passes them on to every flow run in its environment,",
            "# where a credential file would not keep them from the runs either.",
            "EnvironmentFile=/etc/%s.env" % unit,
        ]
    lines += ["", "[Install]", "WantedBy=multi-user.target"]
    return "\n".join(lines) + "\n"


def _systemd_word(text, variables=True):
    """`text` as one word of an ExecStart= (or Environment=) line: double-quoted with C
    escapes unless plain, and with systemd's specifiers (%) and, where it substitutes
    variables (ExecStart=), its $ doubled so they stay literal."""
    if not re.match(r"^[A-Za-z0-9_@%+=:,./-]+$", text):
        text = '"%s"' % re.sub(r'[\\"]|[\x00-\x1f\x7f]', _c_escape, text)
    text = text.replace("%", "%%")
    return text.replace("$", "$$") if variables else text


def _c_escape(match):
    char = match.group()
    return "\\" + char if char in '\\"' else "\\x%02x" % ord(char)


def install_signal_handlers(agent):
    """First SIGTERM/SIGINT: stop claiming and let running flows finish. A second one: stop
    now. SIGHUP/SIGUSR1/SIGUSR2 are logged and ignored (their default would kill the agent and
    orphan every run). SIGCHLD wakes the supervisor so exits are reaped at once.

    The kernel hands a signal to any thread, and CPython runs a Python handler only on the
    main thread, between two of its bytecodes: once the script has ended the main thread
    sleeps in the interpreter's shutdown (run_after_the_script), and would never run it. So
    the Python handlers do nothing; the C handler that CPython installs with them writes
    each signal's number to a pipe (set_wakeup_fd), on whatever thread it lands, and the
    supervisor thread reads the pipe and passes each number to Agent.on_signal. Called on
    the main thread (set_wakeup_fd must be)."""
    read_fd, write_fd = os.pipe()
    for fd in (read_fd, write_fd):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGCHLD):
        signal.signal(signum, _noted_by_the_wakeup_fd)
    agent.supervisor.take_signals(read_fd, agent.on_signal)


def _noted_by_the_wakeup_fd(signum, frame):
    """The Python half of every handler: nothing (see install_signal_handlers)."""


def _signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


def main(argv=None):
    """agent.py run as a script: the exit code, or 0 when the agent goes on running after
    the script (see run_after_the_script)."""
    agent = start_agent(argv)
    return 0 if agent is None else run_after_the_script(agent)


def start_agent(argv=None):
    """Everything before the loop: flags, logging, health server, signal handlers. The Agent,
    or None when the command is already done ('install'); exits 2 on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "start"
    if argv and argv[0] in ("start", "install"):
        command = argv.pop(0)
    systemd = command == "install" and argv[:1] == ["--systemd"]
    if systemd:
        argv.pop(0)
    try:
        args = parse_flags(argv)
        if args.help:
            sys.stdout.write(help_text())
            return None
        config = parse_config(args, os.environ, read_settings(os.environ))
    except UsageError as exc:
        if command == "install" and "--systemd" in argv:
            exc = "--systemd comes right after install: agent.py install --systemd --pool POOL ..."
        usage_exit(exc)
    if command == "install":
        write = systemd_unit if systemd else supervisord_section
        sys.stdout.write(write(argv, config, os.environ, sys.executable,
                               os.path.abspath(__file__)))
        return None
    log.level = INFO
    if config.install_policy:
        log.info("--install-policy %s: agent.py needs no packages and installs none",
                 config.install_policy)
    try:
        agent = Agent(config)
    except UsageError as exc:
        usage_exit(exc)
    for (host, port), routes in _health_routes(config).items():
        try:
            start_health_server(agent, host, port, routes)
        except OSError as exc:
            usage_exit("cannot serve health checks on %s:%d: %s"
                       % (host, port, exc.strerror or exc))
    install_signal_handlers(agent)
    if not config.hide_welcome:
        print(BANNER % (__version__, config.pool, redact_url(config.api_url),
                        config.api_url_source, config.name,
                        _queues_text(config)))
        line = agent.launchers[config.pool_type or ProcessLauncher.name].banner_line()
        if line:
            print(line)
        print("Agent started! Looking for work from work pool '%s'..." % config.pool, flush=True)
    return agent


def _health_routes(config):
    """{(host, port): {path: report}}: one server per address, both checks on one that both
    name."""
    servers = {}
    if config.health_address:
        servers.setdefault(config.health_address, {})["/api/health"] = health_report
    if config.worker_health_address:
        servers.setdefault(config.worker_health_address, {})["/health"] = worker_health_report
    for routes in servers.values():
        routes["/metrics"] = metrics_report
    return servers


def _queues_text(config):
    """Which queues the banner says the agent serves."""
    named = ["'%s'" % queue for queue in config.queues]
    named += ["those starting with '%s'" % prefix for prefix in config.match]
    return "queues: " + (", ".join(named) if named else "every queue of the pool")


def usage_exit(reason):
    """Exit 2 with one line that says what was wrong with the flags or environment."""
    sys.stderr.write("agent.py: error: %s\n" % escape_controls(str(reason)))
    sys.exit(2)


def run_agent(agent):
    """The agent loop, until it stops: the exit code."""
    try:
        return agent.run()
    except AuthRefused as exc:
        log.error("%s; stopping", exc)
        return 1
    except UsageError as exc:
        log.error("%s; stopping", exc)
        return 2


def run_after_the_script(agent):
    """Run the agent in a thread that outlives this script, and exit with its code.

    CPython keeps a script's syntax tree, 7 MB for this file, until the script ends; the
    agent would idle at 22 MB instead of 16. A thread may outlive the script (the main
    thread waits for it at shutdown, and still runs the signal handlers meanwhile). Python
    3.12.0 to 3.12.2 refuse new threads and processes once the script has ended (CPython
    gh-113964), so there the agent runs inside the script as before."""
    if (3, 12) <= sys.version_info[:3] < (3, 12, 3):
        return run_agent(agent)

    def run_then_exit():
        code = 1
        try:
            code = run_agent(agent)
        except BaseException:
            log.exception("the agent stopped on an unexpected error")
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)  # the script has ended: this is the only way to pass the code on

    trimmer = threading.Timer(1.0, release_freed_memory)  # after start-up, not during it
    trimmer.daemon = True
    trimmer.start()
    threading.Thread(target=run_then_exit, name="agent").start()
    return 0


def release_freed_memory():
    """Once the script has ended and its syntax tree is freed, hand the memory back to the
    system. Only glibc's malloc needs telling; elsewhere this does nothing."""
    threading.main_thread().join()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass  # no ctypes, or not glibc


if __name__ == "__main__":
    sys.exit(main())
