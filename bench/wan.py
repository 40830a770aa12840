#!/usr/bin/env python3
"""A TCP proxy that adds a round-trip time between a client and a server on one machine.

    python bench/wan.py --listen PORT --target HOST:PORT --rtt-ms 80
    python bench/wan.py --check [--rtt-ms 80]

Every chunk read from either side is written to the other rtt/2 after it arrived, in order,
each on its own clock: chunks in flight do not wait for each other's delay, so throughput is
not one chunk per delay (bandwidth is not limited). A new connection costs one round trip
more before its first bytes reach the server, as a TCP handshake would (TLS is not modelled).
The HTTP/1.1 requests going client to server are logged (arrival, method, target): request
heads are found at message starts and bodies skipped by Content-Length or chunked encoding;
after an upgrade (a websocket) the connection's bytes are not parsed any more.
Run alone, it prints each request it sees; --check measures a round trip through it to an
echo server here. Used by bench/compare.py --rtt-ms. Stdlib only, CPython 3.8+.
"""

import argparse
import asyncio
import signal
import socket
import statistics
import sys
import threading
import time

MAX_HEAD = 65536  # a request head longer than this is not HTTP we can follow: stop parsing


class RequestLog:
    """The requests seen on all connections: (monotonic arrival, method, target)."""

    def __init__(self, echo=False):
        self.lock = threading.Lock()
        self.entries = []
        self.echo = echo

    def add(self, when, method, target):
        with self.lock:
            self.entries.append((when, method, target))
        if self.echo:
            sys.stderr.write("[wan %s] %s %s\n" % (time.strftime("%H:%M:%S"), method, target))

    def since(self, start):
        with self.lock:
            return [e for e in self.entries if e[0] >= start]

    def last_time(self):
        with self.lock:
            return self.entries[-1][0] if self.entries else 0.0


class RequestParser:
    """Finds where each request starts in one connection's client-to-server bytes."""

    def __init__(self, log):
        self.log = log
        self.pending = b""     # an unfinished head or chunk-size line
        self.body_left = 0     # body bytes still to skip (chunk data includes its CRLF)
        self.chunked = False   # in a chunked body, at a chunk-size line
        self.trailers = False  # in a chunked body, after the last chunk
        self.opaque = False    # upgraded, or not HTTP: no more parsing

    def feed(self, data, when):
        if self.opaque:
            return
        data, self.pending, pos = self.pending + data, b"", 0
        while pos < len(data) and not self.opaque:
            if self.body_left:
                step = min(self.body_left, len(data) - pos)
                pos, self.body_left = pos + step, self.body_left - step
                continue
            end = data.find(b"\r\n" if self.chunked else b"\r\n\r\n", pos)
            if end < 0:
                break
            if self.chunked:
                self.chunk_line(data[pos:end])
                pos = end + 2
            else:
                self.head(data[pos:end], when)
                pos = end + 4
        rest = data[pos:]
        self.opaque = self.opaque or len(rest) > MAX_HEAD
        self.pending = b"" if self.opaque else rest

    def chunk_line(self, line):
        if self.trailers:
            self.chunked = self.trailers = bool(line)  # an empty line ends the message
            return
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            self.opaque = True
            return
        if size:
            self.body_left = size + 2
        else:
            self.trailers = True

    def head(self, head, when):
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self.opaque = True
            return
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip().lower()
        method = parts[0].decode("latin-1")
        self.log.add(when, method, parts[1].decode("latin-1"))
        if b"upgrade" in headers or method == "CONNECT":
            self.opaque = True
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            self.chunked = True
        else:
            try:
                self.body_left = int(headers.get(b"content-length") or 0)
            except ValueError:
                self.opaque = True


class LatencyProxy:
    """The proxy, on its own event loop in a thread, so that threaded code can use it:
    start(), .port, .requests (a RequestLog), stop()."""

    def __init__(self, target_host, target_port, rtt_ms, listen_host="127.0.0.1",
                 listen_port=0, echo=False):
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.rtt = rtt_ms / 1000.0
        self.requests = RequestLog(echo)
        self.port = None
        self.loop = None
        self.thread = None
        # asyncio's streams let go of a connection's task once the client is gone, and the
        # task would be collected (and complain) while its server side still runs.
        self.tasks = set()

    def start(self):
        ready = threading.Event()
        failure = []
        self.thread = threading.Thread(target=self._run, args=(ready, failure),
                                       name="wan-proxy", daemon=True)
        self.thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self):
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def _run(self, ready, failure):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # for gather() at the end, outside any coroutine
        try:
            server = loop.run_until_complete(asyncio.start_server(self._connection, *self.listen))
        except OSError as exc:
            failure.append(exc)
            ready.set()
            loop.close()
            return
        self.port = server.sockets[0].getsockname()[1]
        self.loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _connection(self, client_reader, client_writer):
        accepted = time.monotonic()
        task = asyncio.current_task()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        try:
            # The client's first bytes would leave after the handshake's round trip.
            await asyncio.gather(
                self._pipe(client_reader, server_writer, accepted + self.rtt,
                           RequestParser(self.requests)),
                self._pipe(server_reader, client_writer, accepted, None))
        except asyncio.CancelledError:
            pass  # stop(): a cancelled connection task makes asyncio's streams log a traceback
        finally:
            client_writer.close()
            server_writer.close()

    async def _pipe(self, reader, writer, not_before, parser):
        """One direction: read as it comes, each chunk queued with the time it is due."""
        queue = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer))
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except OSError:
                    data = None  # reset: close both sides
                now = time.monotonic()
                if data and parser is not None:
                    parser.feed(data, now)
                queue.put_nowait((max(now, not_before) + self.rtt / 2, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    @staticmethod
    async def _send(queue, writer):
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                if data:
                    writer.write(data)
                    await writer.drain()
                    continue
                if data is not None and writer.can_write_eof():
                    writer.write_eof()  # a half-close travels like data
                else:
                    writer.transport.abort()
            except OSError:
                writer.transport.abort()
            return


# -- the check ---------------------------------------------------------------------------------

def echo_server():
    """A listening socket on 127.0.0.1 whose connections get back what they send."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve(conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return listener


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise OSError("echo connection closed")
        data += more
    return data


def check(rtt_ms, samples=20, burst=50, spacing=0.002):
    """Through a proxy with this rtt to a local echo server: {"connect_first_ms": connect and
    a first round trip (two rtt: handshake and request), "round_trip_ms": median of `samples`
    round trips on the open connection, "burst_last_ms": from the last of `burst` chunks sent
    `spacing` s apart to it coming back (one rtt; were chunks serialised behind each other's
    delay, about burst x rtt)}."""
    listener = echo_server()
    proxy = LatencyProxy("127.0.0.1", listener.getsockname()[1], rtt_ms).start()
    try:
        start = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"x")
            recv_exactly(sock, 1)
            result = {"connect_first_ms": (time.monotonic() - start) * 1000.0}
            trips = []
            for _ in range(samples):
                start = time.monotonic()
                sock.sendall(b"x")
                recv_exactly(sock, 1)
                trips.append((time.monotonic() - start) * 1000.0)
            result["round_trip_ms"] = statistics.median(trips)
            for number in range(burst):
                if number:
                    time.sleep(spacing)
                sock.sendall(b"y" * 100)
            last_sent = time.monotonic()
            recv_exactly(sock, burst * 100)
            result["burst_last_ms"] = (time.monotonic() - last_sent) * 1000.0
        return result
    finally:
        proxy.stop()
        listener.close()


def check_text(rtt_ms, result):
    return ("wan proxy check at %g ms: round trip %.1f ms (median of 20 on an open connection), "
            "connect + first round trip %.1f ms, last of 50 chunks sent 2 ms apart back after "
            "%.1f ms" % (rtt_ms, result["round_trip_ms"], result["connect_first_ms"],
                         result["burst_last_ms"]))


def stop_on_signal(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, metavar="PORT", help="port on 127.0.0.1")
    parser.add_argument("--target", metavar="HOST:PORT", help="the server")
    parser.add_argument("--rtt-ms", type=float, default=80.0, help="round trip added (ms)")
    parser.add_argument("--check", action="store_true",
                        help="measure a round trip through the proxy to a local echo server")
    args = parser.parse_args(argv)
    if args.check:
        print(check_text(args.rtt_ms, check(args.rtt_ms)))
        return 0
    if args.listen is None or not args.target or ":" not in args.target:
        parser.error("--listen PORT and --target HOST:PORT are needed (or --check)")
    host, _, port = args.target.rpartition(":")
    proxy = LatencyProxy(host, int(port), args.rtt_ms, listen_port=args.listen, echo=True)
    proxy.start()
    signal.signal(signal.SIGTERM, stop_on_signal)
    sys.stderr.write("[wan] 127.0.0.1:%d -> %s, %g ms round trip; Ctrl-C ends\n" % (
        proxy.port, args.target, args.rtt_ms))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    sys.stderr.write("[wan] %d requests\n" % len(proxy.requests.since(0.0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
