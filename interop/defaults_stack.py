#!/usr/bin/env python3
"""A regtest node and two ElectrumX 2.0 servers at ElectrumX's DEFAULT session limits.

The interop stack (stack.py) and upstream_cost.py switch ElectrumX's
per-session metering off (COST_SOFT_LIMIT=0 ...). Public servers keep the
defaults, so this stack leaves every metering setting unset: COST_SOFT_LIMIT
1000, COST_HARD_LIMIT 10000, BANDWIDTH_UNIT_COST 5000, INITIAL_CONCURRENT 10,
REQUEST_SLEEP 2500 ms, MAX_SESSIONS 1000 (electrumx/server/env.py). On
127.0.0.1 every session is exempt from the /24 group cost (private
addresses have no group), so each session has a budget of its own here;
on a public address all sessions from one proxy would share one.

    defaults_stack.py --dir DIR up [--tls2]     node, chain (chain.py), ElectrumX 1 and 2
                                                (plain TCP; --tls2: ElectrumX 2 over TLS as
                                                in stack.py), each with an admin RPC port;
                                                writes DIR/chain.json
    defaults_stack.py --dir DIR restart N       stop and start ElectrumX N: fresh sessions,
                                                costs and request counters
    defaults_stack.py --dir DIR rpc N METHOD [ARG..]   ElectrumX N's admin RPC (getinfo,
                                                sessions, ...), JSON out
    defaults_stack.py --dir DIR down            stop what `up` started (by pid; idempotent)

DIR/chain.json: {"electrumx": ["127.0.0.1:P1", ...], "rpc": [R1, R2], "height",
"txids", "tx_heights", "scripthashes", "hot"}. Used by `cargo bench --bench
proxy -- --upstream real` and by defaults_pass.py.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # no interop/__pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))
import chain  # noqa: E402
import stack as interop  # noqa: E402

# What stack.py sets to switch the metering off, and every other setting of
# it: none of them may reach ElectrumX from here.
METERING = ("COST_SOFT_LIMIT", "COST_HARD_LIMIT", "REQUEST_SLEEP", "INITIAL_CONCURRENT",
            "BANDWIDTH_UNIT_COST", "MAX_SESSIONS", "SESSION_TIMEOUT", "REQUEST_TIMEOUT")


class DefaultsStack(interop.Stack):
    """stack.py's node and ElectrumX servers, metering at its defaults."""

    def tls(self, n):
        return n == 2 and self.state.get("tls2", False)

    def electrumx_env(self, n):
        env = super().electrumx_env(n)
        for k in METERING:
            env.pop(k, None)
        port = self.state["electrumx"][str(n)]
        if not self.tls(n):
            env.pop("SSL_CERTFILE", None)
            env.pop("SSL_KEYFILE", None)
        scheme = "ssl" if self.tls(n) else "tcp"
        env["SERVICES"] = f"{scheme}://127.0.0.1:{port},rpc://127.0.0.1:{self.state['electrumx_rpc'][str(n)]}"
        return env

    def electrumx_url(self, n):
        return f"{'ssl' if self.tls(n) else 'tcp'}://127.0.0.1:{self.state['electrumx'][str(n)]}"

    def electrumx_rpc(self, n, method, *params):
        return asyncio.run(admin_rpc(self.state["electrumx_rpc"][str(n)], method, list(params)))

    def up_defaults(self, tls2=False):
        """Node, chain, both ElectrumX; returns what chain.json holds."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.state = {"rpc_port": interop.free_port(),
                      "electrumx": {"1": interop.free_port(), "2": interop.free_port()},
                      "electrumx_rpc": {"1": interop.free_port(), "2": interop.free_port()},
                      "tls2": tls2}
        self.save()
        self.start_node()
        data = chain.build(self)
        for n in (1, 2):
            self.electrumx_start(n)
            info = self.electrumx_rpc(n, "getinfo")
            assert info["db height"] == data["height"], f"ElectrumX {n} at {info['db height']}, node at {data['height']}"
        data.update(electrumx=[self.electrumx_url(n).split("://", 1)[1] for n in (1, 2)],
                    rpc=[self.state["electrumx_rpc"][str(n)] for n in (1, 2)])
        (self.dir / "chain.json").write_text(json.dumps(data))
        self.state["chain"] = str(self.dir / "chain.json")
        self.save()
        interop.log(f"ElectrumX 1 and 2 at their default session limits on {', '.join(data['electrumx'])}")
        return data

    def restart(self, n):
        self.electrumx_stop(n)
        self.electrumx_start(n)

    def down(self):
        for name in ("electrum-lb", "electrumx1", "electrumx2", "node"):
            self.stop(name)


async def admin_rpc(port, method, params=()):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode() + b"\n")
    line = await r.readline()
    w.close()
    reply = json.loads(line)
    if reply.get("error"):
        raise RuntimeError(f"ElectrumX admin RPC {method}: {reply['error']}")
    return reply["result"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("command", choices=("up", "restart", "rpc", "down"))
    p.add_argument("args", nargs="*")
    p.add_argument("--tls2", action="store_true")
    a = p.parse_args()
    st = DefaultsStack(a.dir)
    if a.command == "up":
        st.up_defaults(tls2=a.tls2)
        print(st.dir / "chain.json")
    elif a.command == "restart" and a.args in (["1"], ["2"]):
        st.restart(int(a.args[0]))
    elif a.command == "rpc" and len(a.args) >= 2 and a.args[0] in ("1", "2"):
        print(json.dumps(st.electrumx_rpc(int(a.args[0]), a.args[1], *map(interop.json_arg, a.args[2:]))))
    elif a.command == "down":
        st.down()
    else:
        p.error(f"bad arguments: {a.command} {' '.join(a.args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
