#!/usr/bin/env python3
"""Client side of benches/load/conn-memory.sh: opens many connections to a proxy
and reads the proxy's resident memory (VmRSS from /proc, summed over the PIDs
given) at each step. Standard library only (asyncio for the idle connections,
plain blocking sockets for the slow readers).

    conn-memory-client.py idle --port P --pids 1,2 --n 10000 --cycles 7
    conn-memory-client.py slow --port P --pids 1,2 --n 1000 --path /big

Output: one `key value...` line per figure on stdout (RSS in KiB), progress on
stderr. The shell script turns the lines into the report.
"""

import argparse
import asyncio
import socket
import sys
import time


def rss_kib(pids):
    """Sum of VmRSS over the PIDs (a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def established_to(port):
    """Established TCP connections whose local port is PORT (the proxy's side)."""
    n = 0
    want = f":{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "01":
                        n += 1
        except OSError:
            pass
    return n


def settled_rss(pids, settle):
    """RSS once it stops moving: sample every 0.5 s for up to SETTLE seconds,
    stop when two samples in a row agree within 1 %."""
    prev = rss_kib(pids)
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        time.sleep(0.5)
        cur = rss_kib(pids)
        if abs(cur - prev) <= max(prev // 100, 64):
            return cur
        prev = cur
    return prev


def log(msg):
    print(f"[conn-memory-client] {msg}", file=sys.stderr, flush=True)


REQUEST = b"GET / HTTP/1.1\r\nHost: conn-memory\r\nUser-Agent: conn-memory\r\n\r\n"


async def open_one(port, sem):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=16384)
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        if length:
            await reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"status {status!r}")
        return writer


async def idle(args, pids):
    sem = asyncio.Semaphore(args.concurrency)
    start = settled_rss(pids, args.settle)
    print(f"start {start}", flush=True)
    for cycle in range(1, args.cycles + 1):
        t0 = time.monotonic()
        writers = await asyncio.gather(*(open_one(args.port, sem) for _ in range(args.n)))
        log(f"cycle {cycle}: {len(writers)} connections open and answered in {time.monotonic() - t0:.1f}s")
        open_rss = settled_rss(pids, args.settle)
        for w in writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        writers = None
        deadline = time.monotonic() + 60
        while established_to(args.port) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = established_to(args.port)
        # An allocator that purges on a timer (jemalloc's decay: ~10 s) starts slowly,
        # so "stopped moving" alone would read it too early.
        await asyncio.sleep(args.close_wait)
        closed_rss = settled_rss(pids, args.settle)
        print(f"cycle {cycle} {open_rss} {closed_rss} {left}", flush=True)
        log(f"cycle {cycle}: open {open_rss} KiB, after close {closed_rss} KiB (start {start})")


def slow(args, pids):
    start = settled_rss(pids, args.settle)
    print(f"start {start}", flush=True)
    req = (
        f"GET {args.path} HTTP/1.1\r\nHost: conn-memory\r\nUser-Agent: conn-memory\r\n\r\n"
    ).encode()
    socks = []
    peak = start
    for i in range(args.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connect, so the window the client announces stays small and
        # the proxy, not the kernel on our side, has to hold the unread body.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        s.connect(("127.0.0.1", args.port))
        s.sendall(req)
        s.setblocking(False)
        socks.append(s)
        if i % 50 == 0:
            peak = max(peak, rss_kib(pids))
    log(f"{len(socks)} slow readers connected; holding {args.hold}s")
    got = 0
    deadline = time.monotonic() + args.hold
    next_read = time.monotonic() + 1
    while time.monotonic() < deadline:
        time.sleep(0.1)
        peak = max(peak, rss_kib(pids))
        if args.read_bytes and time.monotonic() >= next_read:
            # The trickle: READ_BYTES per connection per second.
            next_read += 1
            for s in socks:
                try:
                    got += len(s.recv(args.read_bytes))
                except (BlockingIOError, InterruptedError):
                    pass
    end = rss_kib(pids)
    print(f"slow {peak} {end} {got}", flush=True)
    for s in socks:
        s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["idle", "slow"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pids", required=True, help="comma-separated PIDs whose RSS is summed")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--cycles", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--close-wait", type=float, default=0.0)
    p.add_argument("--path", default="/big")
    p.add_argument("--rcvbuf", type=int, default=4096)
    p.add_argument("--hold", type=float, default=15.0)
    p.add_argument("--read-bytes", type=int, default=0)
    args = p.parse_args()
    pids = [int(x) for x in args.pids.split(",") if x]
    if args.mode == "idle":
        asyncio.run(idle(args, pids))
    else:
        slow(args, pids)


if __name__ == "__main__":
    main()
