#!/usr/bin/env bash
# The interop suite in one command: real ElectrumX, a real node, BDK's
# electrum-client and the Electrum wallet, all through electrum-lb, on
# 127.0.0.1 only, in a temporary directory that is removed afterwards.
#
#   interop/run.sh                 install (cached), build, bring up, test, report, tear down
#   INTEROP_KEEP=1 interop/run.sh  keep the state directory and its logs
#   ELB_BIN=target/release/electrum-lb interop/run.sh   test another build
#
# Exits non-zero when a client saw something wrong or the Electrum wallet
# logged a disconnect or a status mismatch; then the last lines of every
# log are printed. The last pass runs ElectrumX at its default session
# limits (interop/defaults_pass.py) and fails when any error reaches a
# wallet there.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
section() { echo "== interop: $1 (at $((SECONDS - started))s)"; }

section "setup"
interop/setup.sh
py=${INTEROP_CACHE:-interop/.cache}/venv/bin/python

section "build"
if [[ -z ${ELB_BIN:-} ]]; then
  cargo build --quiet --bin electrum-lb
fi
cargo test --quiet --test interop --test interop_protocol --test interop_ws --no-run

dir=$(mktemp -d "${TMPDIR:-/tmp}/electrum-lb-interop.XXXXXX")
stack() { "$py" interop/stack.py --dir "$dir" "$@"; }
finish() {
  local rc=$?
  trap - EXIT
  stack down || true
  echo "interop: stack down at $((SECONDS - started))s"
  # (the defaults pass has a stack of its own, and says what failed itself)
  if [[ $rc -ne 0 && -z ${defaults_pass:-} ]]; then
    stack tails || true
  fi
  if [[ -n ${INTEROP_KEEP:-} ]]; then
    echo "interop: state and logs kept in $dir"
  else
    rm -rf "$dir"
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

section "stack up"
stack up
# shellcheck disable=SC1091
source "$dir/env"

section "WebSocket: one session direct to ElectrumX's ws service and through electrum-lb"
cargo test --test interop_ws -- --ignored --nocapture

section "BDK electrum-client and the Electrum wallet through electrum-lb"
cargo test --test interop -- --ignored --nocapture

section "protocol 1.6 and 1.7 sessions through electrum-lb against ElectrumX 2.0"
cargo test --test interop_protocol -- --ignored --nocapture

section "report"
stack report
stack down

section "ElectrumX at its default session limits: wallets through electrum-lb (issue 14)"
# A stack of its own (interop/defaults_stack.py): the node, two ElectrumX
# with none of the metering settings set, electrum-lb; see defaults_pass.py.
defaults_pass=1
"$py" interop/defaults_pass.py
echo "interop: passed in $((SECONDS - started))s"
