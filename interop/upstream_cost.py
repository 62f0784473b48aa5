#!/usr/bin/env python3
"""What a real ElectrumX 2.0 spends per request: CPU time, measured.

The proxy benchmark's mock upstream (`cargo bench --bench proxy --
--upstream-us N`) spins N microseconds of CPU per request. This script
measures what N is for a real ElectrumX 2.0 (with its Bitcoin SV node) on
the methods the benchmark drives, so the mock can be set from a figure.

    INTEROP_CACHE=/work/main/interop/.cache \\
      /work/main/interop/.cache/venv/bin/python interop/upstream_cost.py
    ... upstream_cost.py --rounds 3 --secs 4 --warm 2 --conns 16 --depth 32
    ... upstream_cost.py --only tx.get,history     # some workloads only
    ... upstream_cost.py --ssl                     # TLS to ElectrumX instead of TCP
    ... upstream_cost.py --keep                    # keep the state dir (logs)

It uses what interop/setup.sh installed (ElectrumX in the venv, the node
binaries; INTEROP_CACHE points at them) and the process handling of
interop/stack.py (imported, not changed). All of it listens on 127.0.0.1
only, in a temporary directory that is removed at the end; the node and
ElectrumX it started are stopped by pid on the way out, error or not.

Steps:
1. a regtest node; 110 blocks; then 400 wallet payments (`sendmany`), each
   paying 3 of 1,500 "cold" addresses (most get one payment, some none)
   and 1 of 100 "hot" ones (Zipf-weighted: the first gets dozens), with a
   block every 20 payments: 400 txids, some 900 scripthashes with a history.
   The addresses are derived from labels (nobody holds their keys).
2. one ElectrumX 2.0 on plain TCP (the TCP transport of ElectrumX 2.0 pads
   replies and holds them while less than 1 KiB is buffered, up to 1 s:
   see the settings below), started after the chain is built, so it syncs once and
   opens its port; its admin RPC port is opened too, for cache statistics.
3. for each workload and round: fresh connections (`server.version` 1.4.2
   first, as electrum-lb negotiates), each keeping `--depth` requests in
   flight (a new one for each answer, the answers of one read sent back in
   one write), `--warm` seconds not measured, then `--secs` measured:
   answers, the CPU time (utime+stime from /proc/PID/stat, all threads) of
   the ElectrumX process and of the node over exactly that window, latency.

Workloads (one round-robin over the items, shared by all connections):
- ping:          `server.ping`: the floor, what any request costs;
- header:        `blockchain.block.header` at a random height;
- tx.get:        `blockchain.transaction.get` (not verbose) over the 400
                 txids: ElectrumX asks the node (`getrawtransaction`) every
                 time, it has no cache for it;
- history:       `blockchain.scripthash.get_history` over 300 scripthashes
                 that have a history: fewer than its LRU (1,000 entries),
                 so after the warm-up these are served from its cache;
- history.miss:  the same over all 1,600 scripthashes (unused ones too)
                 in a cycle longer than the LRU: every lookup misses and
                 reads LevelDB (the hit rate is printed from its getinfo);
- balance:       `blockchain.scripthash.get_balance` over all 1,600
                 (no cache in ElectrumX: a UTXO read from LevelDB each time).

ElectrumX settings (the environment of the ElectrumX process; see
ELECTRUMX_SETTINGS): COST_SOFT_LIMIT=0 and COST_HARD_LIMIT=0 switch off the
per-session cost throttling (aiorpcx's recalc_concurrency returns before
computing a sleep or a concurrency cut when hard - soft <= 0) and the
excessive-cost disconnect; REQUEST_SLEEP=0; INITIAL_CONCURRENT=1000 (the
per-session semaphore on handlers: the default 10 would let a session
have only 10 requests handled at a time); MAX_SESSIONS=1000; BANDWIDTH_UNIT_COST very high (cost only);
the poll intervals are ElectrumX's defaults (5 s), not the interop suite's
200 ms. The reply padding/holding of the TCP transport (PaddedRSTransport:
MIN_PACKET_SIZE 1024, WAIT_FOR_BUFFER_GROWTH_SECONDS 1.0) has no setting:
it is left as shipped, and --depth is chosen so that the replies in flight on
a connection exceed 1 KiB (depth x smallest reply, a ping's ~40 bytes, is
~1.3 KiB at depth 32), which keeps the hold from stalling a connection.
The `>=0.5s` column counts answers that took half a second or more: a hold
shows there as latencies of ~1 s (try `--conns 64 --depth 8`: ping and
balance drop to depth x conns answers per second). For tx.get the slow
answers are queueing instead: ElectrumX sends at most 10 requests at a time
to the node (Daemon(max_workqueue=10), no setting), each an HTTP round trip
of several milliseconds to bitcoind's RPC server, so tx.get tops out at
1-2 k answers/s with ElectrumX itself far from busy (the `EX cpu` column).

Output: per round and workload, answers per second, microseconds of CPU
per answer for ElectrumX and for the node, latency p50/p99; then the median
and range over the rounds. CPU per answer is the figure to use: the answers
per second depend on what else runs on the machine (this load generator
included: it shares the cores with the servers). The idle CPU of both
processes (ms of CPU per second, measured before the workloads) is printed
too: it is included in the figures and is small next to them.
"""

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no interop/__pycache__ from importing stack.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack as interop  # noqa: E402  (the interop suite's process handling)

ELECTRUMX_SETTINGS = {
    "COST_SOFT_LIMIT": "0",
    "COST_HARD_LIMIT": "0",
    "REQUEST_SLEEP": "0",
    "INITIAL_CONCURRENT": "1000",
    "MAX_SESSIONS": "1000",
    "BANDWIDTH_UNIT_COST": "1000000000",
    "REQUEST_TIMEOUT": "60",
    "LOG_SESSIONS": "0",
}
PROTOCOL = "1.4.2"
COLD, HOT, PAYMENTS, PER_BLOCK = 1500, 100, 400, 20
HISTORY_SET = 300
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKLOADS = ("ping", "header", "tx.get", "history", "history.miss", "balance")


def log(msg):
    print(f"upstream_cost: {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid):
    """utime + stime of the whole process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def address_of(label):
    """The regtest P2PKH address stack.regtest_p2pkh makes of `label`, and
    its Electrum scripthash."""
    h160 = hashlib.sha256(label.encode()).digest()[:20]
    script = b"\x76\xa9\x14" + h160 + b"\x88\xac"
    return interop.regtest_p2pkh(label), hashlib.sha256(script).digest()[::-1].hex()


class CostStack(interop.Stack):
    """The interop stack's node and ElectrumX 1 (plain TCP), with the
    settings of this measurement."""

    tls = False

    def electrumx_env(self, n):
        env = super().electrumx_env(n)
        if self.tls:  # stack.py's ElectrumX 2 is the TLS one: same service, same certificate
            tls = super().electrumx_env(2)
            env.update(SERVICES=f"ssl://127.0.0.1:{self.state['electrumx'][str(n)]}",
                       SSL_CERTFILE=tls["SSL_CERTFILE"], SSL_KEYFILE=tls["SSL_KEYFILE"])
        for k in ("DAEMON_POLL_INTERVAL_BLOCKS", "DAEMON_POLL_INTERVAL_MEMPOOL"):
            env.pop(k, None)  # ElectrumX's defaults, as in production
        env.update(ELECTRUMX_SETTINGS)
        env["SERVICES"] += f",rpc://127.0.0.1:{self.state['electrumx_rpc']}"
        return env

    def electrumx_url(self, n):
        return f"{'ssl' if self.tls else 'tcp'}://127.0.0.1:{self.state['electrumx'][str(n)]}"

    def pid(self, name):
        return self.state["pids"][name]


def build_chain(st, rng):
    """Mine, pay; return (txids, hot+used scripthashes, all scripthashes)."""
    miner = st.rpc("getnewaddress")
    st.rpc("generatetoaddress", 110, miner)
    cold = [address_of(f"upstream_cost cold {i}") for i in range(COLD)]
    hot = [address_of(f"upstream_cost hot {i}") for i in range(HOT)]
    # the scripthash derivation, checked against the node once
    spk = st.rpc("validateaddress", cold[0][0])["scriptPubKey"]
    assert hashlib.sha256(bytes.fromhex(spk)).digest()[::-1].hex() == cold[0][1], spk
    weights = [1 / (k + 1) for k in range(HOT)]
    used = {}
    txids = []
    started = time.monotonic()
    for j in range(PAYMENTS):
        outs = [cold[rng.randrange(COLD)] for _ in range(3)] + rng.choices(hot, weights)
        for a, sh in outs:
            used[sh] = used.get(sh, 0) + 1
        txids.append(st.rpc("sendmany", "", {a: 0.0001 for a, _ in outs}))
        if (j + 1) % PER_BLOCK == 0:
            st.rpc("generatetoaddress", 1, miner)
    st.rpc("generatetoaddress", 1, miner)
    assert not st.rpc("getrawmempool"), "the mempool should be empty"
    hot_sh = [sh for _, sh in hot if sh in used]
    cold_used = [sh for _, sh in cold if sh in used]
    history = hot_sh + cold_used[:HISTORY_SET - len(hot_sh)]
    everything = [sh for _, sh in cold + hot]
    counts = sorted(used.values())
    log(f"{PAYMENTS} payments in {time.monotonic() - started:.1f}s; height {st.rpc('getblockcount')}; "
        f"{len(used)} scripthashes with a history (entries: median {statistics.median(counts)}, "
        f"max {counts[-1]}), {len(everything) - len(used)} unused")
    return txids, history, everything


# --- the load generator --------------------------------------------------------

class Conn(asyncio.Protocol):
    """One client connection: keeps `depth` requests in flight."""

    def __init__(self, run):
        self.run = run
        self.next_id = 1
        self.sent = {}
        self.buf = b""
        self.ready = asyncio.get_running_loop().create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "server.version",
                                    "params": ["upstream_cost", PROTOCOL]}).encode() + b"\n")

    def connection_lost(self, exc):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))
        self.run.lost += 1

    def requests(self, n):
        run, out, now = self.run, [], time.perf_counter()
        for _ in range(n):
            body = run.items[run.next_item % len(run.items)]
            run.next_item += 1
            rid = self.next_id
            self.next_id += 1
            self.sent[rid] = now
            out.append(b'{"jsonrpc":"2.0","id":%d,%s}\n' % (rid, body))
        return b"".join(out)

    def start(self):
        self.transport.write(self.requests(self.run.depth))

    def data_received(self, data):
        self.buf += data
        if b"\n" not in data:
            return
        *lines, self.buf = self.buf.split(b"\n")
        run, now, answered = self.run, time.perf_counter(), 0
        for line in lines:
            # aiorpcx writes the id last; ElectrumX's padding goes before the "}"
            head = line.rstrip(b"} \r")
            rid = int(head[head.rfind(b":") + 1:])
            if rid == 0:
                if b'"error"' in line:
                    self.ready.set_exception(RuntimeError(line.decode()))
                else:
                    self.ready.set_result(True)
                continue
            t = self.sent.pop(rid)
            answered += 1
            if run.measuring:
                run.answers += 1
                run.latencies.append(now - t)
                if b'"error":' in line[:40]:
                    run.errors += 1
                    if run.errors <= 3:
                        log(f"error reply: {line[:300].decode(errors='replace')}")
        if answered and not run.stopping:
            self.transport.write(self.requests(answered))


class Run:
    def __init__(self, items, depth):
        self.items, self.depth = items, depth
        self.measuring = self.stopping = False
        self.answers = self.errors = self.lost = 0
        self.next_item = 0  # one round-robin over the items for all connections
        self.latencies = []


async def rpc_getinfo(port):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b'{"jsonrpc":"2.0","id":1,"method":"getinfo","params":[]}\n')
    line = await r.readline()
    w.close()
    return json.loads(line)["result"]


def history_cache(info):
    m = re.match(r"(\d+) lookups, (\d+) hits", info["caches"]["history"])
    return int(m[1]), int(m[2])


async def measure(st, port, rpc_port, items, a, client_ssl):
    run = Run(items, a.depth)
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(a.conns):
        _, c = await loop.create_connection(lambda: Conn(run), "127.0.0.1", port, ssl=client_ssl)
        conns.append(c)
    await asyncio.wait_for(asyncio.gather(*(c.ready for c in conns)), 30)
    for c in conns:
        c.start()
    await asyncio.sleep(a.warm)
    before = history_cache(await rpc_getinfo(rpc_port))
    ex, node = st.pid("electrumx1"), st.pid("node")
    cpu0 = cpu_seconds(ex), cpu_seconds(node)
    t0 = time.perf_counter()
    run.measuring = True
    await asyncio.sleep(a.secs)
    run.measuring = False
    t1 = time.perf_counter()
    cpu1 = cpu_seconds(ex), cpu_seconds(node)
    answers, lat = run.answers, sorted(run.latencies)
    after = history_cache(await rpc_getinfo(rpc_port))
    run.stopping = True
    deadline = time.monotonic() + 10
    while any(c.sent for c in conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for c in conns:
        c.transport.close()
    if run.lost:
        raise RuntimeError(f"{run.lost} connection(s) lost during the run")
    if not answers:
        raise RuntimeError("no answers in the measured window")
    lookups, hits = after[0] - before[0], after[1] - before[1]
    return {
        "rate": answers / (t1 - t0),
        "ex_us": (cpu1[0] - cpu0[0]) / answers * 1e6,
        "node_us": (cpu1[1] - cpu0[1]) / answers * 1e6,
        "ex_load": (cpu1[0] - cpu0[0]) / (t1 - t0),
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        "slow": sum(1 for x in lat if x >= 0.5),
        "errors": run.errors,
        "hist_hit": (hits / lookups) if lookups else None,
        "answers": answers,
    }


def body(method, params):
    return b'"method":"%s","params":%s' % (method.encode(), json.dumps(params).encode())


def fmt_row(name, r):
    hit = "" if r["hist_hit"] is None else f"{r['hist_hit'] * 100:5.1f}%"
    return (f"{name:<13} {r['rate']:>8.0f} {r['ex_us']:>8.0f} {r['node_us']:>8.0f} {r['ex_load'] * 100:>6.0f}%"
            f" {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['slow']:>6} {r['errors']:>4} {hit:>6}")


HEADER = (f"{'workload':<13} {'answers/s':>8} {'EX us':>8} {'node us':>8} {'EX cpu':>7}"
          f" {'p50 ms':>7} {'p99 ms':>7} {'>=0.5s':>6} {'err':>4} {'hist hit':>6}")


async def drive(st, workloads, a):
    port, rpc_port = st.state["electrumx"]["1"], st.state["electrumx_rpc"]
    results = {w: [] for w in workloads}
    client_ssl = None
    if a.ssl:  # ElectrumX serves the dev certificate; nothing to verify on loopback
        client_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ssl.check_hostname = False
        client_ssl.verify_mode = ssl.CERT_NONE
    for rnd in range(1, a.rounds + 1):
        print(f"\nround {rnd}: {a.conns} {'TLS' if a.ssl else 'TCP'} connections x {a.depth} in flight, "
              f"{a.warm:g}s warm-up, {a.secs:g}s measured; CPU in microseconds per answer")
        print(HEADER)
        for name in workloads:
            r = await measure(st, port, rpc_port, workloads[name], a, client_ssl)
            results[name].append(r)
            print(fmt_row(name, r), flush=True)
    return results


def summary(results, rounds):
    print(f"\nsummary over {rounds} round(s): median [min - max]")
    print(f"{'workload':<13} {'answers/s':>20} {'ElectrumX us/answer':>24} {'node us/answer':>22}")
    for name, rs in results.items():
        def col(key, width):
            v = [r[key] for r in rs]
            return f"{statistics.median(v):>7.0f} [{min(v):.0f} - {max(v):.0f}]".rjust(width)
        print(f"{name:<13} {col('rate', 20)} {col('ex_us', 24)} {col('node_us', 22)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--secs", type=float, default=4.0, help="measured seconds per workload and round")
    p.add_argument("--warm", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--depth", type=int, default=32, help="requests in flight per connection")
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ssl", action="store_true", help="TLS between this client and ElectrumX (default: plain TCP)")
    p.add_argument("--keep", action="store_true", help="keep the state directory (logs) and say where")
    a = p.parse_args()
    only = [w for w in a.only.split(",") if w]
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    for path in (interop.VENV_PYTHON, interop.NODE_BIN / "bitcoind"):
        if not path.exists():
            p.error(f"{path} is missing: run interop/setup.sh, or set INTEROP_CACHE")

    # SIGTERM (and SIGHUP) end the run like Ctrl-C: through the finally below.
    def on_signal(signum, _frame):
        raise SystemExit(f"upstream_cost: signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="upstream-cost-"))
    st = CostStack(tmp)
    st.tls = a.ssl
    try:
        (tmp / "logs").mkdir()
        st.state = {"rpc_port": interop.free_port(),
                    "electrumx": {"1": interop.free_port(), "2": interop.free_port()},
                    "electrumx_rpc": interop.free_port()}
        st.save()
        st.start_node()
        log(f"node: {st.rpc('getnetworkinfo')['subversion']} regtest, RPC on 127.0.0.1:{st.state['rpc_port']}")
        rng = random.Random(a.seed)
        txids, history, everything = build_chain(st, rng)
        height = st.rpc("getblockcount")
        st.electrumx_start(1)
        info = asyncio.run(rpc_getinfo(st.state["electrumx_rpc"]))
        assert info["db height"] == height, f"ElectrumX at {info['db height']}, node at {height}"
        log(f"ElectrumX {info['version']} (Python {sys.version.split()[0]}) synced to {height}; "
            f"settings: " + " ".join(f"{k}={v}" for k, v in ELECTRUMX_SETTINGS.items()))

        idle = 3.0
        ex, node = st.pid("electrumx1"), st.pid("node")
        c0 = cpu_seconds(ex), cpu_seconds(node)
        time.sleep(idle)
        c1 = cpu_seconds(ex), cpu_seconds(node)
        print(f"idle: ElectrumX {(c1[0] - c0[0]) / idle * 1e3:.1f} ms CPU/s, "
              f"node {(c1[1] - c0[1]) / idle * 1e3:.1f} ms CPU/s (over {idle:g}s)")

        shuffled = everything[:]
        rng.shuffle(shuffled)
        all_items = {
            "ping": [body("server.ping", [])],
            "header": [body("blockchain.block.header", [rng.randrange(height + 1)]) for _ in range(1000)],
            "tx.get": [body("blockchain.transaction.get", [t, False]) for t in txids],
            "history": [body("blockchain.scripthash.get_history", [sh]) for sh in history],
            "history.miss": [body("blockchain.scripthash.get_history", [sh]) for sh in shuffled],
            "balance": [body("blockchain.scripthash.get_balance", [sh]) for sh in shuffled],
        }
        print(f"data: {len(txids)} txids, {len(history)} scripthashes with a history (history), "
              f"{len(everything)} scripthashes in all (history.miss, balance), height {height}")
        workloads = {w: all_items[w] for w in only}
        results = asyncio.run(drive(st, workloads, a))
        summary(results, a.rounds)
        return 0
    finally:
        for name in ("electrumx1", "node"):
            try:
                st.stop(name)
            except BaseException as e:  # keep stopping the rest
                log(f"stopping {name}: {e!r}")
        if a.keep:
            log(f"state and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
