"""A wallet-shaped regtest chain: a few hundred payments to about 1,000 scripthashes.

Used by interop/defaults_stack.py (the proxy benchmark against ElectrumX at
its defaults) and interop/defaults_pass.py (the interop pass at the
defaults). The addresses are derived from labels (nobody holds their keys),
as upstream_cost.py derives its own, so a run is repeatable.

    build(stack) -> {"height", "txids", "tx_heights", "scripthashes", "addresses", "hot"}

- 1,000 "wallet" addresses, paid round robin three at a time, so every one
  has a history of one or two payments (what most wallet addresses have);
- 20 "hot" addresses, one of which each payment also pays (Zipf-weighted:
  the first gets dozens of entries, like an exchange's deposit address);
- 400 payments, a block every 20: everything confirmed, the mempool empty.
"""

import hashlib
import random
import time

import upstream_cost

WALLET_ADDRESSES, HOT_ADDRESSES = 1000, 20
PAYMENTS, PER_BLOCK = 400, 20


def build(st, seed=1):
    rng = random.Random(seed)
    miner = st.rpc("getnewaddress")
    st.rpc("generatetoaddress", 110, miner)
    wallet = [upstream_cost.address_of(f"interop chain wallet {i}") for i in range(WALLET_ADDRESSES)]
    hot = [upstream_cost.address_of(f"interop chain hot {i}") for i in range(HOT_ADDRESSES)]
    spk = st.rpc("validateaddress", wallet[0][0])["scriptPubKey"]
    assert hashlib.sha256(bytes.fromhex(spk)).digest()[::-1].hex() == wallet[0][1], spk
    weights = [1 / (k + 1) for k in range(HOT_ADDRESSES)]
    txids, tx_heights, pending = [], {}, []
    started = time.monotonic()
    for j in range(PAYMENTS):
        outs = [wallet[(3 * j + k) % WALLET_ADDRESSES] for k in range(3)] + rng.choices(hot, weights)
        txid = st.rpc("sendmany", "", {a: 0.0001 for a, _ in outs})
        txids.append(txid)
        pending.append(txid)
        if (j + 1) % PER_BLOCK == 0 or j + 1 == PAYMENTS:
            st.rpc("generatetoaddress", 1, miner)
            height = st.rpc("getblockcount")
            for t in pending:
                tx_heights[t] = height
            pending = []
    assert not st.rpc("getrawmempool"), "the mempool should be empty"
    height = st.rpc("getblockcount")
    print(f"chain: {PAYMENTS} payments to {WALLET_ADDRESSES} wallet and {HOT_ADDRESSES} hot addresses "
          f"in {time.monotonic() - started:.1f}s, height {height}", flush=True)
    return {
        "height": height,
        "txids": txids,
        "tx_heights": [tx_heights[t] for t in txids],
        "scripthashes": [sh for _, sh in wallet],
        "addresses": [a for a, _ in wallet],
        "hot": [sh for _, sh in hot],
    }
