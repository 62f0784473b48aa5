#!/usr/bin/env python3
"""Instructions electrum-lb spends per answer, counted by callgrind.

Wall-clock and CPU-time figures on a shared machine move with the
neighbours (HAProxy's own cost moved 1.9-4.0 us per answer between runs
here); an instruction count does not. This runs the release binary under
`valgrind --tool=callgrind` in front of the proxy bench's lean mock
upstreams, drives a fixed uncached load through it (pipelined
`blockchain.scripthash.get_history` over the mock chain's scripthashes,
like the `uncached` row of `cargo bench --bench proxy`), and prints the
user-space instructions counted while the load ran, per answer. Counting
is switched on only around the load (start-up, connection set-up and
shutdown are not counted). The kernel's share (syscalls) is not counted:
callgrind sees user space only.

Usage (after `cargo bench --bench proxy --no-run`, which builds both
binaries; needs valgrind):

    python3 benches/instructions.py [--answers N] [--sessions N] [--depth N]
        [--binary PATH] [--top N] [--syscalls]

`--syscalls` runs the binary without valgrind and counts its system
calls per answer instead (`perf stat` on the `raw_syscalls` and
`syscalls` tracepoints): the kernel's side, which callgrind does not
see. The count follows timing (batching), so compare builds in one
sitting.

`--top N` also prints the N functions with the most instructions
(inclusive of what they call, from `callgrind_annotate`). Two builds are
compared by running it with `--binary` pointing at each.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_binary():
    found = [
        p
        for p in glob.glob(os.path.join(ROOT, "target/release/deps/proxy-*"))
        if os.access(p, os.X_OK) and not p.endswith((".d", ".o"))
    ]
    if not found:
        sys.exit("no proxy bench binary: run `cargo bench --bench proxy --no-run` first")
    return max(found, key=os.path.getmtime)


def start_mock():
    env = dict(os.environ, PROXY_BENCH_MOCK="0")
    mock = subprocess.Popen(
        [bench_binary()], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    line = mock.stdout.readline().decode()
    if not line.startswith("LISTEN "):
        sys.exit(f"unexpected line from the mock: {line!r}")
    return mock, line.split()[1:]


def wait_for(pattern, log_path, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"electrum-lb exited: see {log_path}")
        with open(log_path, errors="replace") as f:
            found = re.findall(pattern, f.read())
        if found:
            return found
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {pattern!r} in {log_path}")


def callgrind_control(*args):
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL)


def drive(addr, sessions, depth, answers, scripthashes):
    """`sessions` connections, `depth` requests in flight on each, until
    `answers` answers came back; returns the number of error replies."""
    host, port = addr.rsplit(":", 1)
    conns = []
    for _ in range(sessions):
        s = socket.create_connection((host, int(port)))
        s.sendall(b'{"id":0,"method":"server.version","params":["instr","1.4"]}\n')
        conns.append(s)
    # Each connection's server.version answer first.
    bufs = {s: b"" for s in conns}
    for s in conns:
        while b"\n" not in bufs[s]:
            bufs[s] += s.recv(65536)
        bufs[s] = bufs[s].split(b"\n", 1)[1]
    sent = 0
    got = 0
    errors = 0

    def request():
        nonlocal sent
        sh = scripthashes[sent % len(scripthashes)]
        sent += 1
        return (
            '{"id":%d,"method":"blockchain.scripthash.get_history","params":["%s"]}\n'
            % (sent, sh)
        ).encode()

    for s in conns:
        s.sendall(b"".join(request() for _ in range(depth)))
    while got < answers:
        ready, _, _ = select.select(conns, [], [], 30)
        if not ready:
            sys.exit(f"no answer for 30 s ({got} of {answers})")
        for s in ready:
            data = s.recv(1 << 20)
            if not data:
                sys.exit("electrum-lb closed a connection")
            bufs[s] += data
            *lines, bufs[s] = bufs[s].split(b"\n")
            more = []
            for line in lines:
                got += 1
                if b'"error"' in line:
                    errors += 1
                if sent < answers:
                    more.append(request())
            if more:
                s.sendall(b"".join(more))
    for s in conns:
        s.close()
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/electrum-lb"))
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--syscalls", action="store_true")
    args = ap.parse_args()

    # The mock chain's scripthashes (benches/proxy/chain.rs), the uncached
    # row's 1,000 of them.
    scripthashes = [
        hashlib.sha256(f"script-{i}".encode()).hexdigest() for i in range(1000)
    ]
    mock, upstreams = start_mock()
    work = tempfile.mkdtemp(prefix="instructions-")
    config = os.path.join(work, "electrum-lb.toml")
    with open(config, "w") as f:
        f.write(
            '[metrics]\nlisten = "127.0.0.1:0"\n\n[coins.bench]\n'
            'listen = ["tcp://127.0.0.1:0"]\n'
            "upstreams = [%s]\n" % ", ".join(json.dumps(f"tcp://{u}") for u in upstreams)
        )
    out = os.path.join(work, "callgrind.out")
    log_path = os.path.join(work, "electrum-lb.log")
    log = open(log_path, "w")
    under = [] if args.syscalls else [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]
    proxy = subprocess.Popen(
        under + [
            args.binary,
            "--config",
            config,
        ],
        stdout=log,
        stderr=log,
        env=dict(os.environ, NO_COLOR="1"),
    )
    try:
        addr = wait_for(r'listen="?tcp://([0-9.:]+)', log_path, proxy, 120)[0]
        wait_for(r"(upstream connection up)(?s:.*)upstream connection up", log_path, proxy, 120)
        # Warm up (pool connections, caches of the allocator), not counted.
        drive(addr, args.sessions, args.depth, 2000, scripthashes)
        if args.syscalls:
            return count_syscalls(proxy, addr, args, scripthashes)
        callgrind_control("--instr=on", str(proxy.pid))
        started = time.time()
        errors = drive(addr, args.sessions, args.depth, args.answers, scripthashes)
        took = time.time() - started
        callgrind_control("--instr=off", str(proxy.pid))
        callgrind_control("--dump", str(proxy.pid))
    finally:
        proxy.terminate()
        proxy.wait(timeout=60)
        mock.kill()
    dumps = sorted(glob.glob(out + "*"), key=os.path.getmtime)
    total = 0
    chosen = None
    for d in dumps:
        with open(d) as f:
            for line in f:
                if line.startswith("totals:") or line.startswith("summary:"):
                    n = int(line.split()[1])
                    if n > total:
                        total, chosen = n, d
    if errors:
        print(f"warning: {errors} error replies", file=sys.stderr)
    print(
        f"{args.answers} answers ({args.sessions} sessions x {args.depth} in flight, "
        f"uncached get_history, lean mock) in {took:.1f} s under callgrind: "
        f"{total / args.answers:,.0f} instructions per answer"
    )
    if args.top and chosen:
        ann = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", chosen],
            capture_output=True,
            text=True,
        ).stdout
        rows = [l for l in ann.splitlines() if re.match(r"^\s*[0-9,]+ \(", l)]
        for row in rows[: args.top]:
            print(row[:200])
    print(f"(callgrind output: {chosen})")


SYSCALLS = ["recvfrom", "sendto", "read", "write", "epoll_wait", "futex"]


def count_syscalls(proxy, addr, args, scripthashes):
    """Drive the load with `perf stat` attached; print system calls per
    answer, all and the ones the proxy's data path makes."""
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{n}" for n in SYSCALLS]
    csv = tempfile.mktemp(prefix="syscalls-")
    perf = subprocess.Popen(
        ["perf", "stat", "-x,", "-o", csv, "-e", ",".join(events), "-p", str(proxy.pid)]
    )
    time.sleep(0.5)
    started = time.time()
    errors = drive(addr, args.sessions, args.depth, args.answers, scripthashes)
    took = time.time() - started
    perf.send_signal(2)
    perf.wait(timeout=30)
    counts = {}
    with open(csv) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[0].isdigit():
                counts[parts[2].split(":")[-1].replace("sys_enter_", "")] = int(parts[0])
    if errors:
        print(f"warning: {errors} error replies", file=sys.stderr)
    per = ", ".join(f"{n} {counts.get(n, 0) / args.answers:.3f}" for n in SYSCALLS)
    print(
        f"{args.answers} answers ({args.sessions} sessions x {args.depth} in flight) "
        f"in {took:.1f} s: {counts.get('sys_enter', 0) / args.answers:.3f} system calls "
        f"per answer ({per})"
    )


if __name__ == "__main__":
    main()
