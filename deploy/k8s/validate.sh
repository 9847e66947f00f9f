#!/usr/bin/env bash
# Renders every overlay with `kubectl kustomize` and validates each object against the
# Kubernetes schema in strict mode (kubernetes-validate, from PyPI, into a virtualenv under
# target/): unknown fields, wrong types and missing required fields fail. Needs kubectl
# (Debian `kubernetes-client`) and python3.
set -euo pipefail
cd "$(dirname "$0")"
venv=../../target/kubernetes-validate
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet kubernetes-validate==1.37.0
fi
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for overlay in cpu-tiny cpu-tiny-tls mixtral-8x7b mistral-large; do
  kubectl kustomize "$overlay" > "$rendered/$overlay.yaml"
  "$venv/bin/kubernetes-validate" --strict --quiet "$rendered/$overlay.yaml"
  echo "deploy/k8s/$overlay: $(grep -c '^kind:' "$rendered/$overlay.yaml") objects valid (Kubernetes 1.37, strict)"
done
