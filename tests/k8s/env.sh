#!/usr/bin/env bash
# A real Kubernetes control plane for tests, on 127.0.0.1 only: etcd, kube-apiserver and
# kube-controller-manager from the k8s.io/kubernetes Go module (tests/k8s/testcluster),
# built once into a cache directory that later runs reuse.
#
#   tests/k8s/env.sh build              build (or find) the helper; prints its path
#   tests/k8s/env.sh start DIR          start a cluster with its state in DIR; prints the
#                                       kubeconfig path (DIR/kubeconfig) when it is ready
#   tests/k8s/env.sh stop DIR           stop that cluster's processes (by PID) and remove DIR
#   tests/k8s/env.sh kubectl DIR ARGS   kubectl (the helper's, same version) against it
#                                       (also DIR/kubectl, without the kubeconfig)
#
# Two DIRs are two clusters. Every port is a free one picked at start; nothing listens
# beyond 127.0.0.1. Needs Go (the module proxy) for the first build, and openssl.
# CL_K8S_CACHE (default ~/.cache/clusterlink-k8s) holds the build; GOMODCACHE as Go sets it.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
src="$here/testcluster"
cache="${CL_K8S_CACHE:-$HOME/.cache/clusterlink-k8s}"

log() { echo "k8s-env: $*" >&2; }

# Go as the machines install it, also where PATH does not name it.
[ -x /usr/local/go/bin/go ] && PATH="$PATH:/usr/local/go/bin"

helper() {
  # The release the servers report (and derive their defaults from), as go.mod pins it.
  local version
  version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' "$src/go.mod")"
  local minor="${version#v1.}"
  minor="${minor%%.*}"
  local v=k8s.io/component-base/version
  local ldflags="-s -w -X $v.gitVersion=$version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
  local key
  key="$( (cat "$src/go.mod" "$src/go.sum" "$src"/*.go; echo "$ldflags") | sha256sum | cut -c1-16)"
  local bin="$cache/testcluster-$key"
  if [ ! -x "$bin" ]; then
    command -v go >/dev/null || { log "go is needed to build $src once"; exit 1; }
    mkdir -p "$cache"
    log "building the test cluster helper for Kubernetes $version (once; several minutes) into $bin"
    (cd "$src" && go build -ldflags="$ldflags" -o "$bin.tmp" .)
    mv "$bin.tmp" "$bin"
  fi
  echo "$bin"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Polls `$@` until it succeeds or `deadline` seconds pass.
wait_for() {
  local what="$1" deadline="$2"; shift 2
  local end=$((SECONDS + deadline))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      log "$what not ready after ${deadline}s"
      return 1
    fi
    sleep 0.2
  done
}

certs() {
  local d="$1"
  local o=(openssl)
  "${o[@]}" req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=clusterlink-test-ca" -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  cat > "$d/serving.ext" <<EOF
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EOF
  "${o[@]}" req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$d/serving.key" -out "$d/serving.csr" 2>/dev/null
  "${o[@]}" x509 -req -in "$d/serving.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/serving.ext" -out "$d/serving.crt" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > "$d/client.ext"
  "${o[@]}" req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/O=system:masters/CN=admin" -keyout "$d/admin.key" -out "$d/admin.csr" 2>/dev/null
  "${o[@]}" x509 -req -in "$d/admin.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/client.ext" -out "$d/admin.crt" 2>/dev/null
  "${o[@]}" genrsa -out "$d/sa.key" 2048 2>/dev/null
  "${o[@]}" rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() {
  local d="$1" port="$2"
  cat > "$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority: $d/ca.crt
users:
- name: admin
  user:
    client-certificate: $d/admin.crt
    client-key: $d/admin.key
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
EOF
}

start() {
  local d="$1"
  if [ -e "$d/pids" ]; then
    log "$d already holds a cluster (stop it first)"
    exit 1
  fi
  local bin
  bin="$(helper)"
  mkdir -p "$d"
  d="$(cd "$d" && pwd)"
  certs "$d"
  local etcd_client etcd_peer api
  etcd_client="$(free_port)"
  etcd_peer="$(free_port)"
  api="$(free_port)"
  : > "$d/pids"
  "$bin" etcd --name test --data-dir "$d/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_client" \
    --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "test=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync --log-level warn > "$d/etcd.log" 2>&1 &
  echo $! >> "$d/pids"
  wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_client/health" || { cat "$d/etcd.log" >&2; stop "$d"; exit 1; }
  "$bin" kube-apiserver \
    --etcd-servers "http://127.0.0.1:$etcd_client" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api" \
    --tls-cert-file "$d/serving.crt" --tls-private-key-file "$d/serving.key" \
    --client-ca-file "$d/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$d/sa.pub" --service-account-signing-key-file "$d/sa.key" \
    --service-cluster-ip-range "${CL_TEST_SERVICE_CIDR:-127.96.0.0/16}" \
    --authorization-mode RBAC \
    --enable-priority-and-fairness=false \
    --v 1 > "$d/kube-apiserver.log" 2>&1 &
  echo $! >> "$d/pids"
  kubeconfig "$d" "$api"
  # kubectl of the same release, for tests that take a kubectl path.
  printf '#!/bin/sh\nexport KUBECONFIG="${KUBECONFIG:-%s}"\nexec "%s" kubectl "$@"\n' "$d/kubeconfig" "$bin" > "$d/kubectl"
  chmod +x "$d/kubectl"
  wait_for kube-apiserver 90 curl -sf --cacert "$d/ca.crt" --cert "$d/admin.crt" --key "$d/admin.key" \
    "https://127.0.0.1:$api/readyz" || { tail -50 "$d/kube-apiserver.log" >&2; stop "$d"; exit 1; }
  "$bin" kube-controller-manager \
    --kubeconfig "$d/kubeconfig" \
    --authentication-kubeconfig "$d/kubeconfig" --authorization-kubeconfig "$d/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 \
    --leader-elect=false \
    --service-account-private-key-file "$d/sa.key" --root-ca-file "$d/ca.crt" \
    --service-cluster-ip-range "${CL_TEST_SERVICE_CIDR:-127.96.0.0/16}" \
    --v 1 > "$d/kube-controller-manager.log" 2>&1 &
  echo $! >> "$d/pids"
  # The default ServiceAccount shows that the controllers run.
  wait_for "kube-controller-manager (default ServiceAccount)" 60 \
    "$bin" kubectl --kubeconfig "$d/kubeconfig" get serviceaccount default -n default \
    || { tail -50 "$d/kube-controller-manager.log" >&2; stop "$d"; exit 1; }
  echo "$d/kubeconfig"
}

stop() {
  local d="$1"
  if [ -f "$d/pids" ]; then
    # Reverse order: controller manager, API server, etcd.
    tac "$d/pids" | while read -r pid; do
      kill "$pid" 2>/dev/null || true
    done
    local end=$((SECONDS + 10))
    while read -r pid; do
      while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    done < "$d/pids"
  fi
  rm -rf "$d"
}

case "${1:-}" in
  build) helper ;;
  start) start "${2:?usage: env.sh start DIR}" ;;
  stop) stop "${2:?usage: env.sh stop DIR}" ;;
  kubectl) d="${2:?usage: env.sh kubectl DIR ARGS}"; shift 2; exec "$(helper)" kubectl --kubeconfig "$d/kubeconfig" "$@" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
