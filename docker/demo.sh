#!/usr/bin/env bash
# A two-site ClusterLink fabric in containers, from the images of docker/build.sh only:
#
#   docker/demo.sh up       create the fabric and start it; prints where things are
#   docker/demo.sh status   the peers as each control plane sees them
#   docker/demo.sh down     remove every container and network `up` made (by ID)
#
# Topology: networks <name>-a and <name>-b (the sites) and <name>-wan (between the
# sites). Site a runs an echo service (`clusterlink echo-server`) and exports it; site
# b imports it as `echo` on port 9000 of its data plane. Each peer's control plane and
# data plane are containers of their own, on their site's network and on the WAN, with
# their gRPC link over mutual TLS (`clusterlink create site-certs`). Gateways are
# addressed by container name, as remote peers address a NodePort or LoadBalancer.
#
#   <name>-a-echo          site a                   clusterlink echo-server :9000
#   <name>-a-controlplane  site a, wan              cl-controlplane :4444 gRPC, :4446 admin
#   <name>-a-dataplane     site a, wan              cl-dataplane :4443 gateway, :4445 admin
#   <name>-b-controlplane  site b, wan
#   <name>-b-dataplane     site b, wan              ... and the import echo on :9000
#
# Settings (environment): CL_DEMO_NAME (default cl-demo) prefixes every container and
# network; CL_DEMO_DIR (default target/demo/<name>) holds the certificates, resources
# and the record of what was created (ids, env); CL_REGISTRY / CL_TAG name the images
# as docker/build.sh does (default localhost, latest); CL_CONTAINER_TOOL is podman
# (default) or docker; docker/env.sh keeps podman's storage in this checkout.
#
# Failures to try (what the container tests do):
#   podman kill <name>-a-dataplane; docker/demo.sh status   # b: peer-a PeerReachable False
#   podman start <name>-a-dataplane                         # back to True
#   podman network disconnect <name>-wan <name>-b-dataplane # a partition (and reconnect)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=docker/env.sh
. "$here/env.sh"
tool="$CL_CONTAINER_TOOL"
name="${CL_DEMO_NAME:-cl-demo}"
dir="${CL_DEMO_DIR:-$cl_repo/target/demo/$name}"
registry="${CL_REGISTRY:-localhost}"
tag="${CL_TAG:-latest}"
image() { echo "${registry:+${registry%/}/}$1:$tag"; }
fabric=demo
uid=65532

log() { echo "demo.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# Every container and network made is recorded (kind and ID) before anything else
# happens, so that `down` removes exactly these, also after a failed `up`.
record() { echo "$1 $2" >>"$dir/ids"; }

# The user the components run as, and a state directory it can write.
user_args=()
prepare_dir() {
  mkdir -p "$dir/yaml"
  if [ "$(id -u)" = 0 ]; then
    chown -R "$uid:$uid" "$dir"
  else
    # Without root, the containers run as the calling user (podman: its own ID).
    user_args=(--user "$(id -u):$(id -g)")
    [ "$tool" = podman ] && user_args+=(--userns keep-id)
  fi
  chmod 0700 "$dir"
}

# Files the components write or read get their user, when we can give them one.
own() { if [ "$(id -u)" = 0 ]; then chown "$uid:$uid" "$@"; fi; }

# The clusterlink CLI image as a job, the state directory at /work.
cl() {
  "$tool" run --rm --network none "${user_args[@]}" -v "$dir:/work" -w /work "$(image clusterlink)" "$@" >&2
}

network_id() { # name (podman prints the name on create, docker the ID)
  "$tool" network inspect "$1" | python3 -c 'import json,sys; n=json.load(sys.stdin)[0]; print(n.get("id") or n["Id"])'
}

ip_on() { # container network
  "$tool" inspect -f "{{(index .NetworkSettings.Networks \"$2\").IPAddress}}" "$1"
}

# Polls `$@` until it succeeds or `deadline` seconds pass.
wait_for() {
  local what="$1" deadline="$2"; shift 2
  local end=$((SECONDS + deadline))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && die "$what: not within ${deadline}s"
    sleep 0.5
  done
}

ready() { curl -fsS --max-time 2 "http://$1/ready"; }

echoes() { # host port: one round trip through the import
  local got
  exec 3<>"/dev/tcp/$1/$2" || return 1
  printf 'hello through clusterlink\n' >&3
  IFS= read -r -t 5 got <&3 || { exec 3<&-; return 1; }
  exec 3<&-
  [ "$got" = "hello through clusterlink" ]
}

reachable() { # admin peer: PeerReachable of peer as that control plane sees it
  curl -fsS --max-time 2 "http://$1/api/peers/$2" |
    python3 -c 'import json,sys; o=json.load(sys.stdin); c=[x for x in o.get("status",{}).get("conditions",[]) if x.get("type")=="PeerReachable"]; sys.exit(0 if c and c[0].get("status")=="True" else 1)'
}

start_peer() { # site letter
  local p="$1" peer="peer-$1"
  local pdir="/work/$fabric/$peer"
  local cp dp
  cp="$("$tool" run -d --name "$name-$p-controlplane" --network "$name-$p" "${user_args[@]}" \
    -v "$dir/$fabric/$peer:$pdir" -v "$dir/$fabric/cert.pem:/work/$fabric/cert.pem:ro" \
    "$(image cl-controlplane)" \
    --platform local --grpc-addr 0.0.0.0:4444 --admin-addr 0.0.0.0:4446 \
    --resources-dir "$pdir/resources" --token-key-file "$pdir/token.key" \
    --ca-file "/work/$fabric/cert.pem" --cert-file "$pdir/cert.pem" --key-file "$pdir/key.pem" \
    --site-ca-file "$pdir/site/ca.pem" --site-cert-file "$pdir/site/controlplane-cert.pem" \
    --site-key-file "$pdir/site/controlplane-key.pem" --peer-label "site=$p")"
  record container "$cp"
  "$tool" network connect "$name-wan" "$cp"
  dp="$("$tool" run -d --name "$name-$p-dataplane" --network "$name-$p" "${user_args[@]}" \
    -v "$dir/$fabric/$peer:$pdir:ro" -v "$dir/$fabric/cert.pem:/work/$fabric/cert.pem:ro" \
    "$(image cl-dataplane)" \
    --gateway-addr 0.0.0.0:4443 --admin-addr 0.0.0.0:4445 --import-bind 0.0.0.0 \
    --controlplane-host "$name-$p-controlplane:4444" \
    --ca-file "/work/$fabric/cert.pem" --cert-file "$pdir/cert.pem" --key-file "$pdir/key.pem" \
    --site-ca-file "$pdir/site/ca.pem" --site-cert-file "$pdir/site/dataplane-cert.pem" \
    --site-key-file "$pdir/site/dataplane-key.pem")"
  record container "$dp"
  "$tool" network connect "$name-wan" "$dp"
}

apply() { # peer file yaml
  printf '%s' "$3" >"$dir/yaml/$2"
  own "$dir/yaml/$2"
  cl apply --name "$1" --fabric "$fabric" -f "/work/yaml/$2"
}

peer_yaml() { # peer (as the other site sees it)
  printf 'apiVersion: clusterlink.net/v1alpha1\nkind: Peer\nmetadata: {name: peer-%s, namespace: clusterlink-system}\nspec:\n  gateways: [{host: %s, port: 4443}]\n' "$1" "$name-$1-dataplane"
}

allow_all='apiVersion: clusterlink.net/v1alpha1
kind: AccessPolicy
metadata: {name: allow-all, namespace: default}
spec:
  action: allow
  from: [{workloadSelector: {}}]
  to: [{workloadSelector: {}}]
'

up() {
  if [ -s "$dir/ids" ]; then
    die "$dir/ids exists: the demo $name is up (or a failed run left it); run: $0 down"
  fi
  for i in cl-controlplane cl-dataplane clusterlink; do
    "$tool" image exists "$(image "$i")" 2>/dev/null || "$tool" image inspect "$(image "$i")" >/dev/null 2>&1 ||
      die "image $(image "$i") not found: build it first (docker/build.sh)"
  done
  prepare_dir
  : >"$dir/ids"
  log "networks $name-a, $name-b, $name-wan"
  for n in a b wan; do
    "$tool" network create "$name-$n" >/dev/null
    record network "$(network_id "$name-$n")"
  done

  log "fabric $fabric: CA, peer certificates, site certificates (clusterlink image)"
  cl create fabric --name "$fabric"
  for p in a b; do
    cl create peer-cert --name "peer-$p" --fabric "$fabric"
    cl create site-certs --name "peer-$p" --fabric "$fabric"
    mkdir -p "$dir/$fabric/peer-$p/resources"
    own "$dir/$fabric/peer-$p/resources"
  done

  log "echo service on site a"
  record container "$("$tool" run -d --name "$name-a-echo" --network "$name-a" "${user_args[@]}" \
    "$(image clusterlink)" echo-server --listen 0.0.0.0:9000)"
  log "peers a and b: a control plane and a data plane each"
  start_peer a
  start_peer b

  apply peer-a peer-b.yaml "$(peer_yaml b)"
  apply peer-b peer-a.yaml "$(peer_yaml a)"
  apply peer-a allow-all.yaml "$allow_all"
  apply peer-b allow-all-b.yaml "$allow_all"
  apply peer-a export.yaml "apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata: {name: echo, namespace: default}
spec: {host: $name-a-echo, port: 9000}
"
  apply peer-b import.yaml "apiVersion: clusterlink.net/v1alpha1
kind: Import
metadata: {name: echo, namespace: default}
spec:
  port: 9000
  sources: [{peer: peer-a, exportName: echo, exportNamespace: default}]
"

  local a_cp a_dp b_cp b_dp
  a_cp="$(ip_on "$name-a-controlplane" "$name-a"):4446"
  a_dp="$(ip_on "$name-a-dataplane" "$name-a"):4445"
  b_cp="$(ip_on "$name-b-controlplane" "$name-b"):4446"
  b_dp="$(ip_on "$name-b-dataplane" "$name-b")"
  {
    echo "A_CONTROLPLANE_ADMIN=$a_cp"
    echo "A_DATAPLANE_ADMIN=$a_dp"
    echo "B_CONTROLPLANE_ADMIN=$b_cp"
    echo "B_DATAPLANE_ADMIN=$b_dp:4445"
    echo "B_IMPORT=$b_dp:9000"
    for c in a-echo a-controlplane a-dataplane b-controlplane b-dataplane; do
      v="$(echo "$c" | tr 'a-z-' 'A-Z_')"
      echo "${v}_ID=$("$tool" inspect -f '{{.Id}}' "$name-$c")"
    done
    echo "WAN=$name-wan"
  } >"$dir/env"

  log "waiting for the components and for the peers to see each other"
  wait_for "control plane a ready" 60 ready "$a_cp"
  wait_for "control plane b ready" 60 ready "$b_cp"
  wait_for "data plane a ready" 60 ready "$a_dp"
  wait_for "data plane b ready" 60 ready "$b_dp:4445"
  wait_for "peer-b sees peer-a reachable" 60 reachable "$b_cp" peer-a
  wait_for "peer-a sees peer-b reachable" 60 reachable "$a_cp" peer-b
  wait_for "echo through the import" 60 echoes "$b_dp" 9000
  cat <<MSG
The fabric is up: peer-b imports peer-a's echo service.
  try it:    exec 3<>/dev/tcp/$b_dp/9000; echo hi >&3; head -1 <&3
  status:    $0 status
  admin:     peer-a control plane http://$a_cp/api/peers, peer-b http://$b_cp/api/imports
  state:     $dir (env: addresses and container IDs)
  remove:    $0 down
MSG
}

status() {
  [ -s "$dir/env" ] || die "the demo $name is not up ($dir/env missing)"
  # shellcheck disable=SC1091
  . "$dir/env"
  for side in A B; do
    local admin_var="${side}_CONTROLPLANE_ADMIN"
    echo "peer-${side,,} sees:"
    curl -fsS --max-time 2 "http://${!admin_var}/api/peers" | python3 -c '
import json, sys
for p in json.load(sys.stdin).get("items", []):
    c = {x["type"]: x for x in p.get("status", {}).get("conditions", [])}
    r = c.get("PeerReachable", {})
    print("  %-10s PeerReachable=%-7s %s" % (p["metadata"]["name"], r.get("status", "?"), r.get("message", "")))
' || echo "  (control plane not answering)"
  done
}

down() {
  if [ ! -f "$dir/ids" ]; then
    log "nothing recorded in $dir/ids; nothing to remove"
    rm -rf "$dir"
    return 0
  fi
  local kind id
  # Containers first (they hold the networks), in reverse order of creation.
  tac "$dir/ids" | while read -r kind id; do
    if [ "$kind" = container ]; then
      if [ "$tool" = podman ]; then "$tool" rm -f -t 2 "$id"; else "$tool" rm -f "$id"; fi >/dev/null 2>&1 || true
    fi
  done
  tac "$dir/ids" | while read -r kind id; do
    if [ "$kind" = network ]; then "$tool" network rm "$id" >/dev/null 2>&1 || true; fi
  done
  rm -rf "$dir"
  log "removed the demo $name"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
