#!/usr/bin/env bash
# The benchmark suite in one command: builds cl-dataplane, cl-controlplane and cl-bench
# (release) and runs cl-bench with the given flags. With no flags: every configuration
# (direct, ours, ours-h2, ours-http1, stunnel, haproxy, nginx, haproxy-plain), 3 runs,
# about 8 minutes on 2 cores; the table goes to stdout and benches/results/latest.md, the
# chart to benches/results/latest.svg. `benches/run.sh --smoke` is the CI check.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p dataplane -p controlplane
exec cargo run --release -p benches -- "$@"
