#!/usr/bin/env bash
# Runs every fuzz target for a while on its committed seed corpus (fuzz/corpus/<t>/seed-*):
#
#   fuzz/run.sh [SECONDS]        default 30 per target; .ci/run runs it so
#   fuzz/run.sh 600 mux_server   one target, longer
#
# cargo-fuzz (libFuzzer) is installed from crates.io when missing. It needs a nightly
# compiler: rustup's nightly toolchain when installed, else the stable one with
# RUSTC_BOOTSTRAP=1. Targets build without a sanitizer (--sanitizer none): our crates
# forbid unsafe code, and what the targets look for is panics, hangs and runaway
# memory, which libFuzzer reports by itself; set CL_FUZZ_SANITIZER=address for ASan.
# New inputs go to a temporary corpus, so the committed one changes only by hand;
# a failing input is kept in fuzz/artifacts/<target>/ and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(mux_server resources token snapshot)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked >&2
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
  echo "fuzz/run.sh: rustup's nightly toolchain" >&2
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
  echo "fuzz/run.sh: the stable toolchain with RUSTC_BOOTSTRAP=1 (no nightly installed)" >&2
fi
sanitizer="${CL_FUZZ_SANITIZER:-none}"

"${fuzz[@]}" build --sanitizer "$sanitizer" >&2
work="$(mktemp -d "${TMPDIR:-/tmp}/cl-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  echo "fuzz/run.sh: $t for ${secs} s" >&2
  "${fuzz[@]}" run --sanitizer "$sanitizer" "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$work/$t.log" 2>&1 || {
    tail -40 "$work/$t.log" >&2
    echo "fuzz/run.sh: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  }
  grep -E '^stat::number_of_executed_units|^#[0-9]+.*DONE' "$work/$t.log" | tail -2 >&2 || true
done
echo "fuzz/run.sh: all targets ran ${secs} s without a failure" >&2
