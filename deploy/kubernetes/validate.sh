#!/usr/bin/env bash
# Validate the Kubernetes manifests of this directory against the
# Kubernetes API schemas, without a cluster: PyPI `kubernetes-validate`
# bundles the OpenAPI schemas of Kubernetes 1.25 to 1.37 and checks every
# field (--strict: unknown fields are errors too). Installed into a venv
# under target/ on first use; no network afterwards.
#   deploy/kubernetes/validate.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=1.37.0
venv=${KUBE_VALIDATE_VENV:-$root/target/kubernetes-validate}
python=${PYTHON:-python3}

if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$version"; then
  rm -rf "$venv"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's own python3 needs its venv module installed separately.
    rm -rf "$venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
    "$python" -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi

cd "$here"
manifests=()
for f in *.yaml; do
  [[ $f == kustomization.yaml ]] || manifests+=("$f")
done
# The kustomization applies exactly these manifests.
listed=$(sed -n '/^resources:/,/^[a-z]/s/^  - //p' kustomization.yaml | sort)
if [[ $listed != "$(printf '%s\n' "${manifests[@]}" | sort)" ]]; then
  echo "kustomization.yaml resources ($listed) differ from the manifests here (${manifests[*]})" >&2
  exit 1
fi
# The oldest and the newest Kubernetes the schemas cover.
for k in 1.25.0 1.37.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$k" "${manifests[@]}"
  echo "kubernetes manifests valid for Kubernetes $k: ${manifests[*]}"
done
