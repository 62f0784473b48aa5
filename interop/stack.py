#!/usr/bin/env python3
"""The interop stack: bring it up, drive it, report on it, take it down.

Everything listens on 127.0.0.1 only, lives in one state directory (--dir),
and is started from this file, so `down` ends exactly the processes `up`
started (by pid). Ports come from the OS: electrum-lb binds port 0 and its
log says what it got; the node and the two ElectrumX servers get a port the
OS just handed out, because an ElectrumX that is stopped and started again
must come back on the same address.

    stack.py --dir DIR up                  node, 2 x ElectrumX, electrum-lb, Electrum wallet
    stack.py --dir DIR down                stop all of it (idempotent)
    stack.py --dir DIR report              the wallet's log about the server; fails on trouble
    stack.py --dir DIR rpc METHOD [ARG..]  node JSON-RPC; each ARG is JSON if it parses, else a string
    stack.py --dir DIR wallet CMD [ARG..]  Electrum command on the watch-only wallet (JSON out)
    stack.py --dir DIR electrum CMD [ARG..]  Electrum command without a wallet (JSON out)
    stack.py --dir DIR electrumx stop|start N   N is 1 or 2; returns once it is down / serving
    stack.py --dir DIR wait-upstream N up|down  until electrum-lb's metrics say so

`up` writes DIR/env (shell `export` lines) and DIR/ctl, a wrapper for this
file with --dir filled in: tests/interop.rs reads the env and calls ctl.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("INTEROP_CACHE", ROOT / "interop" / ".cache"))
NODE_BIN = CACHE / "bsv-node" / "bin"
VENV_PYTHON = CACHE / "venv" / "bin" / "python"
ELECTRUMX = ROOT / "interop" / "electrumx_regtest.py"
ELECTRUM = os.environ.get("INTEROP_ELECTRUM", "electrum")
COIN = "bsv-regtest"
RPC_USER, RPC_PASSWORD = "interop", "interop"
# How long any one condition may take before the stack gives up on it.
TIMEOUT = float(os.environ.get("INTEROP_TIMEOUT", "60"))


def log(msg):
    print(f"interop: {msg}", file=sys.stderr, flush=True)


def wait_for(what, check, timeout=TIMEOUT, interval=0.1):
    """Poll `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            got = check()
            if got:
                return got
        except Exception as e:  # the thing polled is not there yet
            last_error = e
        if time.monotonic() > deadline:
            raise SystemExit(f"interop: timed out after {timeout:.0f}s waiting for {what}"
                             + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def regtest_p2pkh(label):
    """A P2PKH regtest address whose 20-byte hash is derived from `label`:
    nobody holds its key, so no wallet of the node ever spends from it (an
    address of the node's own wallet would get its coins spent as inputs of
    the next payment)."""
    payload = b"\x6f" + hashlib.sha256(label.encode()).digest()[:20]
    check = hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    n = int.from_bytes(payload + check, "big")
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = alphabet[r] + out
    return out  # the version byte is not 0, so there are no leading "1"s


def json_arg(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


class Stack:
    def __init__(self, directory):
        self.dir = Path(directory).resolve()
        self.state_file = self.dir / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save(self):
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def logfile(self, name):
        return self.dir / "logs" / f"{name}.log"

    # --- processes -------------------------------------------------------

    def spawn(self, name, argv, env=None, cwd=None):
        """Start a long-running process in its own session; its output is
        appended to logs/NAME.log (a restart keeps the earlier lines)."""
        out = open(self.logfile(name), "ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
        self.state.setdefault("pids", {})[name] = proc.pid
        self.save()
        return proc.pid

    def alive(self, name):
        pid = self.state.get("pids", {}).get(name)
        if not pid:
            return False
        try:
            # A child of an earlier invocation is re-parented, not reaped by
            # us: a zombie still answers kill(0), so look at its state too.
            stat = Path(f"/proc/{pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    def stop(self, name, timeout=30):
        pid = self.state.get("pids", {}).get(name)
        if not pid or not self.alive(name):
            return
        os.kill(pid, signal.SIGTERM)
        try:
            wait_for(f"{name} (pid {pid}) to exit", lambda: not self.alive(name), timeout=timeout)
        except SystemExit:
            log(f"{name} (pid {pid}) ignored SIGTERM; killing it")
            os.kill(pid, signal.SIGKILL)
            wait_for(f"{name} (pid {pid}) to die", lambda: not self.alive(name), timeout=10)

    # --- the node ----------------------------------------------------------

    def rpc(self, method, *params):
        body = json.dumps({"jsonrpc": "1.0", "id": 0, "method": method, "params": list(params)})
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.state['rpc_port']}/", data=body.encode(),
            headers={"Authorization": "Basic " + b64encode(f"{RPC_USER}:{RPC_PASSWORD}".encode()).decode(),
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                reply = json.load(r)
        except urllib.error.HTTPError as e:  # bitcoind answers errors with 500
            reply = json.load(e)
        if reply.get("error"):
            raise RuntimeError(f"node RPC {method}{list(params)}: {reply['error']}")
        return reply["result"]

    def start_node(self):
        datadir = self.dir / "node"
        datadir.mkdir(exist_ok=True)
        self.spawn("node", [
            str(NODE_BIN / "bitcoind"), "-regtest", f"-datadir={datadir}",
            f"-rpcport={self.state['rpc_port']}", "-rpcbind=127.0.0.1", "-rpcallowip=127.0.0.1",
            f"-rpcuser={RPC_USER}", f"-rpcpassword={RPC_PASSWORD}", "-server=1", "-txindex=1",
            # loopback only: no P2P listener, no outbound peers, no DNS seeds
            "-listen=0", "-connect=0", "-dnsseed=0",
            # the Bitcoin SV node refuses to start without these
            "-excessiveblocksize=1000000000", "-maxstackmemoryusageconsensus=100000000",
            "-minminingtxfee=0.00000500",
        ])
        wait_for("the node's RPC", lambda: self.rpc("getblockcount") is not None)

    # --- ElectrumX ---------------------------------------------------------

    def electrumx_env(self, n):
        port = self.state["electrumx"][str(n)]
        service = "ssl" if n == 2 else "tcp"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "ALLOW_ROOT": "1",
            "DB_ENGINE": "leveldb",
            "DB_DIRECTORY": str(self.dir / f"electrumx{n}"),
            "DAEMON_URL": f"http://{RPC_USER}:{RPC_PASSWORD}@127.0.0.1:{self.state['rpc_port']}/",
            "SERVICES": f"{service}://127.0.0.1:{port}" + self.electrumx_ws_service(n),
            "PEER_DISCOVERY": "off",
            "PEER_ANNOUNCE": "",
            # every loopback session is in one cost group: never throttle it
            "COST_SOFT_LIMIT": "0",
            "COST_HARD_LIMIT": "0",
            "REQUEST_SLEEP": "0",
            # notice blocks and mempool changes quickly (default 5 s each)
            "DAEMON_POLL_INTERVAL_BLOCKS": "200",
            "DAEMON_POLL_INTERVAL_MEMPOOL": "200",
        }
        if service == "ssl":
            env["SSL_CERTFILE"] = str(ROOT / "certs" / "server.crt")
            env["SSL_KEYFILE"] = str(ROOT / "certs" / "server.key")
        return env

    def electrumx_start(self, n):
        name = f"electrumx{n}"
        if self.alive(name):
            raise SystemExit(f"interop: {name} is already running")
        (self.dir / name).mkdir(exist_ok=True)
        self.spawn(name, [str(VENV_PYTHON), str(ELECTRUMX)], env=self.electrumx_env(n))
        port = self.state["electrumx"][str(n)]
        # ElectrumX opens its port only once it has caught up with the node.
        wait_for(f"{name} to serve on port {port}",
                 lambda: port_open(port) or (not self.alive(name) and self.fail(f"{name} exited")))
        log(f"{name} serving on {self.electrumx_url(n)}")

    def electrumx_url(self, n):
        return f"{'ssl' if n == 2 else 'tcp'}://127.0.0.1:{self.state['electrumx'][str(n)]}"

    def electrumx_stop(self, n):
        self.stop(f"electrumx{n}")
        log(f"electrumx{n} stopped")

    # --- electrum-lb ---------------------------------------------------------

    def start_lb(self):
        cert, key = ROOT / "certs" / "server.crt", ROOT / "certs" / "server.key"
        # ElectrumX 2 serves the same self-signed certificate. It is pinned by
        # fingerprint, the mode meant for self-signed upstreams: as `ca_file`
        # it is refused (webpki: CaUsedAsEndEntity) because `openssl req
        # -x509` marks it CA:TRUE.
        pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
        config = self.dir / "electrum-lb.toml"
        config.write_text(f"""\
# written by interop/stack.py
[metrics]
listen = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"

[server]
health_interval_ms = 250

[coins.{COIN}]
listen = ["tcp://127.0.0.1:0", "ssl://127.0.0.1:0", {self.lb_ws_listeners()}]
# regtest base58 versions, so the legacy blockchain.address.* methods (which
# ElectrumX 2.0 no longer has) are translated by the proxy
p2pkh_version = 111
p2sh_version = 196
upstreams = [
  "{self.electrumx_url(1)}",
  {{ url = "{self.electrumx_url(2)}", fingerprint = "{pin}" }},
]
""")
        binary = os.environ.get("ELB_BIN", str(ROOT / "target" / "debug" / "electrum-lb"))
        env = dict(os.environ, NO_COLOR="1", RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.spawn("electrum-lb", [binary, "--config", str(config)], env=env)

        def bound():
            text = self.logfile("electrum-lb").read_text()
            if not self.alive("electrum-lb"):
                self.fail("electrum-lb exited:\n" + text[-2000:])
            found = [re.search(pattern, text) for pattern in (
                r"listening .*listen=tcp://127\.0\.0\.1:(\d+)",
                r"listening .*listen=ssl://127\.0\.0\.1:(\d+)",
                r"metrics, /healthz and /readyz served listen=127\.0\.0\.1:(\d+)")]
            return all(found) and self.lb_ws_ports(text) and [int(m[1]) for m in found]

        tcp_port, ssl_port, metrics_port = wait_for("electrum-lb's listeners", bound)
        self.state.update(lb_tcp=tcp_port, lb_ssl=ssl_port, lb_metrics=metrics_port,
                          **self.lb_ws_ports(self.logfile("electrum-lb").read_text()))
        self.save()
        for n in (1, 2):
            self.wait_upstream(n, True)
        log(f"electrum-lb on tcp://127.0.0.1:{tcp_port} and ssl://127.0.0.1:{ssl_port}, "
            f"metrics on 127.0.0.1:{metrics_port}")

    def upstream_up(self, n):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.state['lb_metrics']}/metrics", timeout=5) as r:
            text = r.read().decode()
        label = re.escape(self.electrumx_url(n))
        m = re.search(rf'^electrum_lb_upstream_up\{{[^}}]*upstream="{label}"[^}}]*\}} (\S+)$', text, re.M)
        return m is not None and float(m[1]) == 1.0

    def wait_upstream(self, n, up):
        wait_for(f"electrum-lb to see upstream {n} {'up' if up else 'down'}",
                 lambda: self.upstream_up(n) == up)

    # --- WebSocket (tests/interop_ws.rs) ---------------------------------------

    def electrumx_ws_service(self, n):
        """ElectrumX 1 also serves ws://: the direct side of the WebSocket
        comparison. Returns the extra SERVICES entry."""
        port = self.state.get("electrumx_ws", {}).get(str(n))
        return f",ws://127.0.0.1:{port}" if port else ""

    @staticmethod
    def lb_ws_listeners():
        return '"ws://127.0.0.1:0", "wss://127.0.0.1:0"'

    @staticmethod
    def lb_ws_ports(log_text):
        """electrum-lb's ws:// and wss:// ports, from its "listening" lines."""
        found = [re.search(rf"listening .*listen={scheme}://127\.0\.0\.1:(\d+)", log_text)
                 for scheme in ("ws", "wss")]
        return all(found) and {"lb_ws": int(found[0][1]), "lb_wss": int(found[1][1])}

    def ws_env(self):
        """What tests/interop_ws.rs reads."""
        s = self.state
        return {
            "INTEROP_ELECTRUMX_WS_URL": f"ws://127.0.0.1:{s['electrumx_ws']['1']}/",
            "INTEROP_WS_URL": f"ws://127.0.0.1:{s['lb_ws']}/",
            "INTEROP_WSS_URL": f"wss://127.0.0.1:{s['lb_wss']}/",
        }

    # --- the Electrum wallet ---------------------------------------------------

    def electrum(self, *args, wallet=False):
        argv = [ELECTRUM, "--regtest", "-D", str(self.dir / "electrum"), *args]
        if wallet:
            argv += ["-w", str(self.dir / "electrum" / "watch-only")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        return json_arg(done.stdout.strip())

    def start_wallet(self):
        height = self.rpc("getblockcount")
        # The daemon and the first `getinfo` poll would otherwise race to
        # create these (Electrum's make_dir checks, then mkdirs: one of them
        # dies with FileExistsError).
        (self.dir / "electrum" / "regtest").mkdir(mode=0o700, parents=True, exist_ok=True)
        self.spawn("electrum", [
            ELECTRUM, "--regtest", "-D", str(self.dir / "electrum"), "-v", "daemon",
            "--oneserver", "--server", f"127.0.0.1:{self.state['lb_ssl']}:s",
        ])

        def synced():
            if not self.alive("electrum"):
                self.fail("the Electrum daemon exited")
            info = self.electrum("getinfo")
            return info["connected"] and info["server_height"] == height and info["blockchain_height"] == height

        wait_for(f"the Electrum wallet to connect and sync headers to {height}", synced)
        address = self.state["wallet_address"]
        self.electrum("restore", address, wallet=True)
        self.electrum("load_wallet", wallet=True)
        wait_for("the watch-only wallet to synchronize", lambda: self.electrum("is_synchronized", wallet=True))
        log(f"Electrum {self.electrum('getinfo')['version']} watching {address} through ssl://127.0.0.1:{self.state['lb_ssl']}")

    # --- up / down / report ---------------------------------------------------

    def fail(self, msg):
        raise SystemExit(f"interop: {msg}")

    def up(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.state = {"rpc_port": free_port(), "electrumx": {"1": free_port(), "2": free_port()},
                      "electrumx_ws": {"1": free_port()}}
        self.save()
        started = time.monotonic()
        self.start_node()
        miner = self.rpc("getnewaddress")
        self.rpc("generatetoaddress", 101, miner)  # one coinbase matures
        self.state.update(miner_address=miner, wallet_address=regtest_p2pkh("interop: Electrum wallet"))
        self.save()
        log(f"node: {self.rpc('getnetworkinfo')['subversion']} regtest at height {self.rpc('getblockcount')}, "
            f"RPC on 127.0.0.1:{self.state['rpc_port']}")
        for n in (1, 2):
            self.electrumx_start(n)
        self.start_lb()
        self.start_wallet()
        ctl = self.dir / "ctl"
        ctl.write_text(f'#!/bin/sh\nexec "{VENV_PYTHON}" "{Path(__file__).resolve()}" --dir "{self.dir}" "$@"\n')
        ctl.chmod(0o755)
        s = self.state
        (self.dir / "env").write_text("".join(f"export {k}={v}\n" for k, v in {
            "INTEROP_DIR": self.dir,
            "INTEROP_CTL": ctl,
            "INTEROP_TCP_URL": f"tcp://127.0.0.1:{s['lb_tcp']}",
            "INTEROP_SSL_URL": f"ssl://127.0.0.1:{s['lb_ssl']}",
            # ElectrumX 1 directly (tests/interop_protocol.rs compares answers)
            "INTEROP_ELECTRUMX_URL": self.electrumx_url(1),
            "INTEROP_MINER_ADDRESS": s["miner_address"],
            "INTEROP_WALLET_ADDRESS": s["wallet_address"],
            **self.ws_env(),
        }.items()))
        log(f"stack up in {time.monotonic() - started:.1f}s; state in {self.dir}")

    def down(self):
        if self.alive("electrum"):
            try:
                self.electrum("stop")
            except Exception as e:
                log(f"electrum stop: {e}")
        for name in ("electrum", "electrum-lb", "electrumx1", "electrumx2", "node"):
            self.stop(name)

    def report(self):
        """Print what the Electrum wallet logged about its server; fail on a
        disconnect, a status mismatch or a second connection."""
        lines = self.logfile("electrum").read_text(errors="replace").splitlines()
        about_server = [l for l in lines if re.search(r"\| [IWE] \| (i/interface|n/network|synchronizer|verifier)", l)]
        print("---- Electrum wallet: what it logged about the server (info and above)")
        for line in about_server:
            print(line)
        problems = [l for l in lines if re.search(r"status mismatch|disconnecting|GracefulDisconnect|"
                                                  r"connection down|\| E \|", l)]
        established = [l for l in lines if "connection established" in l]
        lb_trouble = [l for l in self.logfile("electrum-lb").read_text(errors="replace").splitlines()
                      if " WARN " in l or " ERROR " in l]
        print("---- electrum-lb: warnings and errors")
        for line in lb_trouble:
            print(line)
        print("----")
        if problems or len(established) != 1:
            print(f"interop: FAILED: the wallet connected {len(established)} time(s); problems:")
            for line in problems:
                print(line)
            return 1
        print("interop: the Electrum wallet stayed on one connection: no disconnect, no status mismatch")
        return 0

    def tails(self):
        for f in sorted((self.dir / "logs").glob("*.log")):
            print(f"---- last lines of {f.name}")
            print("\n".join(f.read_text(errors="replace").splitlines()[-40:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("command")
    p.add_argument("args", nargs="*")
    a = p.parse_args()
    stack = Stack(a.dir)
    c, args = a.command, a.args
    if c == "up":
        stack.up()
    elif c == "down":
        stack.down()
    elif c == "report":
        return stack.report()
    elif c == "tails":
        stack.tails()
    elif c == "rpc":
        print(json.dumps(stack.rpc(args[0], *map(json_arg, args[1:]))))
    elif c in ("wallet", "electrum"):
        print(json.dumps(stack.electrum(*args, wallet=c == "wallet")))
    elif c == "electrumx" and len(args) == 2 and args[0] in ("start", "stop") and args[1] in ("1", "2"):
        (stack.electrumx_start if args[0] == "start" else stack.electrumx_stop)(int(args[1]))
    elif c == "wait-upstream" and len(args) == 2 and args[1] in ("up", "down"):
        stack.wait_upstream(int(args[0]), args[1] == "up")
    else:
        p.error(f"unknown command: {c} {' '.join(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
