#!/usr/bin/env bash
# Container tool settings for this repository's scripts (sourced by build.sh, demo.sh
# and the container tests): buildah and podman keep their storage and configuration
# in one work directory instead of the user's or the system's, and podman runs
# containers with settings that work without a daemon on hosts where root lacks
# CAP_SYS_RESOURCE and cgroups are hybrid:
#   runtime runc (crun fails on hybrid cgroups), cgroup_manager cgroupfs (no systemd),
#   events_logger file (no journald), explicit default_ulimits (the defaults ask for
#   more than the hard limit allows).
#
# CL_CONTAINERS_DIR (default: target/containers in this checkout) holds the storage,
# so images built once stay until the directory is removed. A user who already has a
# working Docker or Podman sets CL_CONTAINER_TOOL=docker (or podman) and
# CL_CONTAINERS_DIR=system to use the tool's own configuration.

cl_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${CL_CONTAINERS_DIR:=$cl_repo/target/containers}"
: "${CL_CONTAINER_TOOL:=podman}"
export CL_CONTAINERS_DIR CL_CONTAINER_TOOL

if [ "$CL_CONTAINERS_DIR" != system ]; then
  mkdir -p "$CL_CONTAINERS_DIR/storage" "$CL_CONTAINERS_DIR/run"
  # nofile at most the hard limit, nproc at most 32768.
  cl_nofile="$(ulimit -Hn)"
  [ "$cl_nofile" = unlimited ] && cl_nofile=1048576
  [ "$cl_nofile" -gt 1048576 ] && cl_nofile=1048576
  cl_nproc="$(ulimit -Hu)"
  { [ "$cl_nproc" = unlimited ] || [ "$cl_nproc" -gt 32768 ]; } && cl_nproc=32768
  cl_driver="${CL_STORAGE_DRIVER:-vfs}"
  cat >"$CL_CONTAINERS_DIR/storage.conf.tmp" <<CONF
[storage]
driver = "$cl_driver"
graphroot = "$CL_CONTAINERS_DIR/storage"
runroot = "$CL_CONTAINERS_DIR/run"
CONF
  mv "$CL_CONTAINERS_DIR/storage.conf.tmp" "$CL_CONTAINERS_DIR/storage.conf"
  cat >"$CL_CONTAINERS_DIR/containers.conf.tmp" <<CONF
[containers]
default_ulimits = ["nofile=$cl_nofile:$cl_nofile", "nproc=$cl_nproc:$cl_nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$CL_CONTAINERS_DIR/events.log"
tmp_dir = "$CL_CONTAINERS_DIR/run/libpod"

[network]
network_backend = "netavark"
network_config_dir = "$CL_CONTAINERS_DIR/networks"
CONF
  mv "$CL_CONTAINERS_DIR/containers.conf.tmp" "$CL_CONTAINERS_DIR/containers.conf"
  export CONTAINERS_STORAGE_CONF="$CL_CONTAINERS_DIR/storage.conf"
  export CONTAINERS_CONF="$CL_CONTAINERS_DIR/containers.conf"
  unset cl_nofile cl_nproc cl_driver
fi
