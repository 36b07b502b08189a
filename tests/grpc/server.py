#!/usr/bin/python3
"""A real gRPC backend (grpcio, plaintext h2c) for weir's gRPC end-to-end tests.

No protobuf codegen: generic handlers with raw bytes (no (de)serializers), so the only
dependency is Debian's python3-grpcio.

    /weir.test.Echo/Call      unary; echoes the request bytes, or fails by the faults
    /weir.test.Control/Set    unary; request JSON {"fail_rate": 0.3, "code": "UNAVAILABLE",
                              "delay_ms": 0} (code: a grpc.StatusCode name, fail_rate 0..1,
                              delay_ms: how long every Echo call waits first); answers Stats
    /weir.test.Control/Stats  unary; JSON {"calls": n, "codes": {"OK": n, ...}, faults}

Binds 127.0.0.1:0 (or --port) and prints "PORT <n>" as its first stdout line, so a test
can start several in parallel without port races. Exits when stdin reaches EOF (the test
that started it is gone, even if it was SIGKILLed and never ran its cleanup) or on
SIGTERM/SIGINT.

Usage: /usr/bin/python3 tests/grpc/server.py [--port N] [--name NAME] [--fail-rate R --code C]
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc


class Faults:
    """Shared fault settings and per-code counts, changed at run time by Control/Set."""

    def __init__(self, name, fail_rate, code):
        self.lock = threading.Lock()
        self.name = name
        self.calls = 0
        self.codes = {}
        self.budget = 0.0
        self.delay = 0.0
        self.set(fail_rate, code)

    def set(self, fail_rate, code, delay_ms=0):
        delay = float(delay_ms) / 1000.0
        if not 0.0 <= delay <= 60.0:
            raise ValueError(f"delay_ms {delay_ms} is not in 0..60000")
        rate = float(fail_rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fail_rate {rate} is not in 0..1")
        status = grpc.StatusCode[code.upper()]  # KeyError names the bad code
        if status == grpc.StatusCode.OK and rate > 0:
            raise ValueError("failing with OK makes no sense")
        with self.lock:
            self.fail_rate = rate
            self.code = status
            self.delay = delay
            # A fresh budget: the new rate applies from the next call on.
            self.budget = 0.0

    def next_outcome(self):
        """The status code for the next Echo call, counted.

        Deterministic spreading rather than random draws: every call adds fail_rate to a
        budget and fails when the budget reaches 1, so exactly 30% of calls fail, evenly
        spaced. Tests then see the same figures on every run instead of a binomial spread.
        """
        with self.lock:
            self.calls += 1
            self.budget += self.fail_rate
            if self.budget >= 1.0:
                self.budget -= 1.0
                status = self.code
            else:
                status = grpc.StatusCode.OK
            self.codes[status.name] = self.codes.get(status.name, 0) + 1
            return status

    def stats(self):
        with self.lock:
            return {
                "name": self.name,
                "calls": self.calls,
                "codes": dict(self.codes),
                "fail_rate": self.fail_rate,
                "code": self.code.name,
            }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    p.add_argument("--name", default="echo", help="shown in Stats and failure messages")
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--code", default="UNAVAILABLE")
    p.add_argument("--workers", type=int, default=16)
    args = p.parse_args()

    faults = Faults(args.name, args.fail_rate, args.code)

    def echo(request, context):
        if faults.delay > 0:
            time.sleep(faults.delay)
        status = faults.next_outcome()
        if status != grpc.StatusCode.OK:
            # abort raises: the call ends with this status and message in trailers.
            context.abort(status, f"injected fault on {args.name}")
        return request

    def control_set(request, context):
        try:
            doc = json.loads(request.decode("utf-8"))
            faults.set(
                doc.get("fail_rate", 0.0),
                doc.get("code", "UNAVAILABLE"),
                doc.get("delay_ms", 0),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad fault settings: {e!r}")
        return json.dumps(faults.stats()).encode()

    def control_stats(request, context):
        return json.dumps(faults.stats()).encode()

    # request_deserializer/response_serializer left None: handlers get and return bytes.
    handlers = [
        grpc.method_handlers_generic_handler(
            "weir.test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}
        ),
        grpc.method_handlers_generic_handler(
            "weir.test.Control",
            {
                "Set": grpc.unary_unary_rpc_method_handler(control_set),
                "Stats": grpc.unary_unary_rpc_method_handler(control_stats),
            },
        ),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), handlers=handlers)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        sys.exit(f"cannot bind 127.0.0.1:{args.port}")
    server.start()
    print(f"PORT {port}", flush=True)

    done = threading.Event()

    def watch_stdin():
        # Blocks until EOF: the parent closed the pipe or died. os.read, not
        # sys.stdin.buffer: a daemon thread blocked inside the buffered reader holds its
        # lock, and interpreter shutdown (after SIGTERM) then aborts with a fatal error.
        try:
            while os.read(0, 4096):
                pass
        except (OSError, ValueError):
            pass
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    # wait() with a timeout in a loop: signal handlers only run between bytecodes of the
    # main thread, and an untimed Event.wait() can delay them.
    while not done.wait(0.5):
        pass
    server.stop(grace=0.5).wait()


if __name__ == "__main__":
    main()
