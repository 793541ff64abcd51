#!/usr/bin/env bash
# Validates the Kubernetes manifests offline, without a cluster:
#
#   deploy/k8s/validate.sh
#
# For the base and every overlay under deploy/k8s/overlays: renders it with `kubectl kustomize`
# (or `kustomize build`), validates every rendered object against the Kubernetes OpenAPI
# schemas of each version we claim (kubernetes-validate --strict: unknown fields are errors, a
# kind without a schema is an error too), then runs check-rendered.py (the pieces fit each
# other and vowd's configuration: selectors, named ports, VOW_PEERS against the namespace and
# the StatefulSet, Secret files, probe schemes, ...). The ServiceMonitor (a CRD, no schema here)
# gets only the second kind of check, against the base.
#
# kubernetes-validate (PyPI) is installed, pinned, into a venv at
# ${VOW_CACHE:-~/.cache/vow}/venv-k8s on first use. Exits non-zero on any failure.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${VOW_CACHE:-$HOME/.cache/vow}/venv-k8s
KV_VERSION=1.37.0                  # kubernetes-validate; its schemas go up to Kubernetes 1.37
K8S_MINORS=(1.29 1.30 1.31)        # the versions we claim (spec.ordinals needs >= 1.27)

# --- tools -------------------------------------------------------------------------------------
if [[ -x $venv/bin/kubernetes-validate ]] && [[ $("$venv/bin/kubernetes-validate" --version 2>/dev/null) == "$KV_VERSION" ]]; then
  :
else
  echo "== installing kubernetes-validate $KV_VERSION into $venv"
  command -v python3 >/dev/null || { echo "validate.sh: python3 is needed" >&2; exit 1; }
  if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv" || { echo "validate.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi
py=$venv/bin/python

if command -v kubectl >/dev/null; then
  render() { kubectl kustomize "$1"; }
  renderer="kubectl kustomize ($(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
elif command -v kustomize >/dev/null; then
  render() { kustomize build "$1"; }
  renderer="kustomize build ($(kustomize version 2>/dev/null))"
else
  echo "validate.sh: needs kubectl (or kustomize) on PATH" >&2
  exit 1
fi

# The newest patch version of each claimed minor that this kubernetes-validate has schemas for.
mapfile -t versions < <("$py" - "${K8S_MINORS[@]}" <<'EOF'
import sys
from kubernetes_validate.utils import all_versions
from packaging.version import Version
known = all_versions()
for minor in sys.argv[1:]:
    same = [v for v in known if v.startswith(minor + ".")]
    if not same:
        sys.exit(f"kubernetes-validate knows no {minor}.x (it knows {known[0]} .. {known[-1]})")
    print(max(same, key=Version))
EOF
)
echo "== renderer: $renderer; kubernetes-validate $KV_VERSION --strict against ${versions[*]}"

# --- render and validate -----------------------------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0
targets=(base)
for d in "$here"/overlays/*/; do targets+=("overlays/$(basename "$d")"); done

for target in "${targets[@]}"; do
  out=$tmp/${target//\//-}.yaml
  echo "== $target"
  if ! render "$here/$target" >"$out" 2>"$tmp/err"; then
    sed 's/^/  /' "$tmp/err"
    echo "  FAIL: rendering"
    failed=1
    continue
  fi
  kinds=$("$py" -c 'import sys, yaml; print(", ".join(d["kind"] + "/" + d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$out")
  count=$(grep -c '^kind: ' "$out" || true)
  echo "  rendered $count objects: $kinds"
  for v in "${versions[@]}"; do
    # A kind without a schema is only a warning for kubernetes-validate: an error here.
    if "$venv/bin/kubernetes-validate" --strict -k "$v" "$out" >"$tmp/kv" 2>&1 && ! grep -qv '^INFO ' "$tmp/kv"; then
      echo "  schema $v (strict): $(grep -c '^INFO .* passed ' "$tmp/kv") of $count objects valid"
    else
      grep -v '^INFO ' "$tmp/kv" | sed "s|$out|$target|; s/^/  /"
      echo "  FAIL: schema $v"
      failed=1
    fi
  done
  args=()
  [[ $target == base ]] && args=(--service-monitor "$here/monitoring/servicemonitor.yaml")
  echo "  consistency (check-rendered.py${args:+, with monitoring/servicemonitor.yaml}):"
  "$py" "$here/check-rendered.py" "${args[@]}" "$out" || failed=1
done
echo "== note: monitoring/servicemonitor.yaml is a CRD (monitoring.coreos.com/v1) without a schema" \
     "here: checked against the base above (selector, port, path), not schema-validated"

if [[ $failed != 0 ]]; then
  echo "== FAILED"
  exit 1
fi
echo "== all manifests valid"
