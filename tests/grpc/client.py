#!/usr/bin/python3
"""A real gRPC client (grpcio) for weir's gRPC end-to-end tests: paced unary calls.

Calls /weir.test.Echo/Call (tests/grpc/server.py) on --target, normally weir's plain
listener: grpcio's insecure channels speak HTTP/2 with prior knowledge (h2c), which weir
accepts there. Raw bytes, no protobuf codegen.

Open loop like `weir traffic`: call i is started at start + i/rate whether or not earlier
calls have answered, so a slow or failing backend does not lower the load. Prints one JSON
line a second with the counts per status code name so far, then a summary line:

    {"t": 3, "sent": 600, "done": 600, "codes": {"OK": 560, "UNAVAILABLE": 40}}
    {"summary": true, "sent": ..., "done": ..., "skipped": 0, "codes": {...}, "p50_ms": ..., "p99_ms": ...}

With --once: one call, one line {"code": "UNAVAILABLE", "details": "...", ...}.

Always ends by itself: --count or --duration bounds the loop, and calls still open at the
end get at most their deadline plus a second.

Usage: /usr/bin/python3 tests/grpc/client.py --target 127.0.0.1:8080 --authority echo.test
           [--rate 200] [--duration 10 | --count N] [--deadline-ms 1000] [--once]
           [--metadata key=value ...] [--method /weir.test.Echo/Call] [--data TEXT]
"""

import argparse
import json
import os
import sys
import threading
import time

import grpc


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="host:port (weir's h2c listener)")
    p.add_argument("--authority", help=":authority to send (weir routes by host)")
    p.add_argument("--rate", type=float, default=100.0, help="calls per second")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, help="seconds of load (default 10)")
    bound.add_argument("--count", type=int, help="number of calls")
    p.add_argument("--deadline-ms", type=int, default=1000, help="per-call deadline")
    p.add_argument("--once", action="store_true", help="one call; print its status")
    p.add_argument("--method", default="/weir.test.Echo/Call")
    p.add_argument("--data", default="ping", help="request bytes (UTF-8 text)")
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata, e.g. x-weir-pool=canary (repeatable)",
    )
    p.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when stdin closes (a parent test that dies takes the client with it)",
    )
    args = p.parse_args()
    if args.rate <= 0:
        p.error("--rate must be > 0")
    if args.count is None and args.duration is None:
        args.duration = 10.0
    return args


def metadata_of(pairs):
    md = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"--metadata {pair!r}: expected KEY=VALUE")
        md.append((key.strip().lower(), value))
    return md


def emit(doc):
    print(json.dumps(doc, sort_keys=True), flush=True)


def once(stub, payload, args, md):
    """One blocking call; the status name and details (the test's oracle for weir's
    own failures: grpcio maps a plain HTTP 502/503/504 to UNAVAILABLE too, but then the
    details say "Received http2 header with status: 502" instead of weir's grpc-message)."""
    try:
        response, call = stub.with_call(payload, timeout=args.deadline_ms / 1000, metadata=md)
        emit(
            {
                "code": call.code().name,
                "details": call.details() or "",
                "response": response.decode("utf-8", "replace"),
            }
        )
    except grpc.RpcError as e:
        emit(
            {
                "code": e.code().name,
                "details": e.details() or "",
                "debug": e.debug_error_string() if hasattr(e, "debug_error_string") else "",
            }
        )


class Counts:
    """Per-code counts and latencies, updated from grpcio's callback threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.codes = {}
        self.done = 0
        self.latencies = []

    def record(self, code, latency):
        with self.lock:
            self.codes[code] = self.codes.get(code, 0) + 1
            self.done += 1
            self.latencies.append(latency)

    def snapshot(self):
        with self.lock:
            return self.done, dict(self.codes)

    def percentile(self, q):
        with self.lock:
            xs = sorted(self.latencies)
        if not xs:
            return None
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2)


def paced(stub, payload, args, md, stop):
    counts = Counts()
    total = args.count if args.count is not None else int(args.duration * args.rate)
    period = 1.0 / args.rate
    start = time.monotonic()
    next_report = start + 1.0
    sent = skipped = 0
    i = 0

    def finished(fut, began):
        try:
            code = fut.code()
        except grpc.FutureCancelledError:
            code = grpc.StatusCode.CANCELLED
        counts.record(code.name if code is not None else "UNKNOWN", time.monotonic() - began)

    while i < total and not stop.is_set():
        now = time.monotonic()
        due = start + i * period
        if due > now:
            # Wake for the next call or the next report, whichever comes first.
            time.sleep(min(due, next_report) - now)
        elif now - due > 1.0:
            # More than a second behind (a starved machine): drop the missed calls rather
            # than send them in a burst, and say so in the summary.
            behind = int((now - due) / period)
            skipped += behind
            i += behind
            continue
        else:
            began = time.monotonic()
            fut = stub.future(payload, timeout=args.deadline_ms / 1000, metadata=md)
            fut.add_done_callback(lambda f, b=began: finished(f, b))
            sent += 1
            i += 1
        now = time.monotonic()
        if now >= next_report:
            done, codes = counts.snapshot()
            emit({"t": round(now - start), "sent": sent, "done": done, "codes": codes})
            next_report += 1.0

    # Calls still open end within their deadline; wait that long and a second more.
    limit = time.monotonic() + args.deadline_ms / 1000 + 1.0
    while counts.snapshot()[0] < sent and time.monotonic() < limit:
        time.sleep(0.01)
    done, codes = counts.snapshot()
    emit(
        {
            "summary": True,
            "elapsed_s": round(time.monotonic() - start, 3),
            "sent": sent,
            "done": done,
            "skipped": skipped,
            "codes": codes,
            "p50_ms": counts.percentile(0.50),
            "p99_ms": counts.percentile(0.99),
        }
    )


def main():
    args = parse_args()
    md = metadata_of(args.metadata)
    options = []
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    stop = threading.Event()
    if args.exit_on_stdin_eof:

        def watch_stdin():
            # os.read: a thread blocked in sys.stdin.buffer holds its lock and makes
            # interpreter shutdown abort.
            try:
                while os.read(0, 4096):
                    pass
            except (OSError, ValueError):
                pass
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()

    with grpc.insecure_channel(args.target, options=options) as channel:
        # Connected before the clock starts, so the first second is not spent connecting.
        try:
            grpc.channel_ready_future(channel).result(timeout=5)
        except grpc.FutureTimeoutError:
            sys.exit(f"no HTTP/2 connection to {args.target} within 5 s")
        # No (de)serializers: requests and responses are raw bytes.
        stub = channel.unary_unary(args.method)
        payload = args.data.encode("utf-8")
        if args.once:
            once(stub, payload, args, md)
        else:
            paced(stub, payload, args, md, stop)


if __name__ == "__main__":
    main()
