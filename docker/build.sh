#!/usr/bin/env bash
# Builds the container images, one per binary, each holding one statically linked
# binary (FROM scratch, user 65532, OCI labels):
#
#   docker/build.sh [--tool buildah|podman|docker] [--registry R] [--tag T] [IMAGE...]
#
# IMAGE is any of cl-controlplane cl-dataplane cl-operator clusterlink (default: all).
# Images are named <registry>/<image>:<tag>, what `clusterlink deploy peer
# --container-registry R --tag T` renders; the defaults (localhost, latest) match its
# defaults. After building, push them with the tool (e.g. `podman push
# localhost/cl-dataplane:latest docker://registry.example/clusterlink/cl-dataplane:v1`)
# or load them into kind (`kind load docker-image ...`).
#
# The binaries are built with cargo for x86_64-unknown-linux-musl (the target is added
# with rustup when missing; C code is compiled with musl-gcc from Debian's musl-tools),
# or, with CL_IMAGE_TARGET=x86_64-unknown-linux-gnu, against glibc with +crt-static.
# The tool: buildah when installed, else podman, else docker (CL_CONTAINER_TOOL or
# --tool chooses). With buildah or podman the storage and configuration live in
# CL_CONTAINERS_DIR (docker/env.sh); set CL_CONTAINERS_DIR=system for the tool's own.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
all=(cl-controlplane cl-dataplane cl-operator clusterlink)

log() { echo "build.sh: $*" >&2; }
die() { log "$*"; exit 1; }

tool="${CL_CONTAINER_TOOL:-}"
registry="${CL_REGISTRY:-localhost}"
tag="${CL_TAG:-latest}"
images=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tool) tool="${2:?--tool needs a value}"; shift 2 ;;
    --registry) registry="${2?--registry needs a value}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *)
      case " ${all[*]} " in *" $1 "*) images+=("$1") ;; *) die "unknown image $1 (one of: ${all[*]})" ;; esac
      shift ;;
  esac
done
[ ${#images[@]} -eq 0 ] && images=("${all[@]}")
if [ -z "$tool" ]; then
  for t in buildah podman docker; do
    if command -v "$t" >/dev/null 2>&1; then tool="$t"; break; fi
  done
fi
[ -n "$tool" ] || die "no container tool: install buildah or podman (apt-get install buildah podman runc), or Docker"
case "$tool" in buildah|podman|docker) ;; *) die "--tool must be buildah, podman or docker, not $tool" ;; esac
command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
if [ "$tool" != docker ]; then
  # shellcheck source=docker/env.sh
  . "$here/env.sh"
fi

# The static binaries.
target="${CL_IMAGE_TARGET:-x86_64-unknown-linux-musl}"
case "$target" in
  *-musl)
    if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
      log "adding the Rust target $target (rustup target add)"
      rustup target add "$target" >&2 || die "rustup target add $target failed; or build against glibc: CL_IMAGE_TARGET=x86_64-unknown-linux-gnu $0"
    fi
    command -v musl-gcc >/dev/null 2>&1 || die "musl-gcc is needed for the C parts (ring, mimalloc): apt-get install musl-tools"
    cc_var="CC_${target//-/_}"
    export "$cc_var=${!cc_var:-musl-gcc}"
    ;;
  *-gnu)
    # Only for the target: with --target, build scripts and proc-macros stay dynamic.
    flags_var="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
    export "$flags_var=${!flags_var:-} -C target-feature=+crt-static"
    ;;
  *) die "CL_IMAGE_TARGET must be a linux musl or gnu target, not $target" ;;
esac
declare -A pkg=([cl-controlplane]=controlplane [cl-dataplane]=dataplane [cl-operator]=operator [clusterlink]=cli)
cargo_args=()
for i in "${images[@]}"; do cargo_args+=(-p "${pkg[$i]}" --bin "$i"); done
log "building ${images[*]} for $target (cargo --profile image)"
(cd "$repo" && cargo build --locked --profile image --target "$target" "${cargo_args[@]}" >&2)
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
bin_dir="$target_dir/$target/image"

version="$(awk -F'"' '/^\[workspace.package\]/ {w=1} w && $1 ~ /^version *= */ {print $2; exit}' "$repo/Cargo.toml")"
revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && [ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
source_url="${CL_IMAGE_SOURCE:-$(git -C "$repo" remote get-url origin 2>/dev/null || echo "file://$repo")}"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

context_root="$target_dir/images"
for i in "${images[@]}"; do
  bin="$bin_dir/$i"
  [ -x "$bin" ] || die "$bin was not built"
  if readelf -l "$bin" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "$bin is dynamically linked; an image from scratch needs a static binary"
  fi
  # A context with the binary only, so that docker sends nothing else.
  ctx="$context_root/$i"
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp "$bin" "$ctx/$i"
  name="${registry:+${registry%/}/}$i:$tag"
  build_args=(
    -f "$here/$i.Containerfile"
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
    --build-arg "SOURCE=$source_url" --build-arg "CREATED=$created"
    -t "$name"
  )
  case "$tool" in
    buildah) buildah build --quiet --layers=false "${build_args[@]}" "$ctx" >/dev/null ;;
    podman) podman build --quiet "${build_args[@]}" "$ctx" >/dev/null ;;
    docker) docker build --quiet "${build_args[@]}" "$ctx" >/dev/null ;;
  esac
  log "built $name ($(du -h "$ctx/$i" | cut -f1) binary)"
  echo "$name"
done
