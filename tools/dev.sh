#!/usr/bin/env bash
# `make dev`: the local cluster, the CRDs, the examples and the operator in the foreground.
# Ctrl-C stops the operator and the cluster and leaves no process behind.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=.venv/bin/python
kubeconfig=.local/kubeconfig
kubectl() { .local/bin/kubectl --kubeconfig="$kubeconfig" "$@"; }

started_here=false
if ! $py tools/cluster/localcluster.py status | grep -q running; then
  $py tools/cluster/localcluster.py up
  started_here=true
fi
ln -sfn cluster/kubeconfig .local/kubeconfig  # the well-known path, also for a cluster started earlier
cleanup() {
  trap - EXIT INT TERM
  if $started_here; then $py tools/cluster/localcluster.py down; fi
}
trap cleanup EXIT INT TERM

shopt -s nullglob
crds=(crds/*.yaml)
if ((${#crds[@]})); then
  kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
  kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null
  echo "dev: installed ${#crds[@]} CRD file(s) from crds/"
fi
examples=(examples/*.yaml)
if ((${#examples[@]})); then
  kubectl apply --server-side -f examples/ >/dev/null
  echo "dev: applied ${#examples[@]} example(s) from examples/"
fi

cat <<MSG

The local cluster is up (etcd, kube-apiserver, controller-manager, scheduler, kwok GPU nodes).
Look at it from another terminal:
  export KUBECONFIG=$root/$kubeconfig
  .local/bin/kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.memory
  .local/bin/kubectl get sd -A
Ctrl-C here stops everything.
MSG

if .venv/bin/sd-operator run --help >/dev/null 2>&1; then
  KUBECONFIG=$root/$kubeconfig .venv/bin/sd-operator run --all-namespaces --dev
else
  echo "dev: waiting (Ctrl-C to stop)"
  while :; do sleep 3600; done
fi
