#!/usr/bin/env bash
# Builds the coverage-guided fuzz targets of fuzz/ (libFuzzer through libfuzzer-sys) with the
# stable toolchain and runs each one on a copy of its seed corpus.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   build, then fuzz each target that long (default 15)
#   scripts/fuzz.sh --replay               build, then run each target once over its corpus
#   scripts/fuzz.sh --grow SECONDS         fuzz, then merge what grew coverage into fuzz/corpus
#
# FUZZ_TARGETS="request sse" picks targets (default: every [[bin]] of fuzz/Cargo.toml).
# FUZZ_TARGET_DIR (default fuzz/target) is the build's own target dir; FUZZ_WORK (default a
# fresh temporary dir) holds the working corpora and any crash artifacts.
#
# No nightly and no cargo-fuzz: libFuzzer's coverage comes from LLVM's SanitizerCoverage
# passes, which stable rustc runs with -Cpasses=sancov-module (8-bit counters, the PC table and
# compare tracing, as cargo-fuzz asks for), and `--cfg fuzzing` turns on libfuzzer-sys's
# main. The `fuzz` profile (fuzz/Cargo.toml) keeps debug assertions and overflow checks on.
# A target that crashes (a panic, a failed invariant, an abort), leaks past -rss_limit_mb or
# hangs past -timeout fails the script, which prints the input's path.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

mode=fuzz
seconds=15
case "${1:-}" in
  --replay) mode=replay ;;
  --grow) mode=grow; seconds=${2:?--grow needs SECONDS} ;;
  "") ;;
  *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET | --replay | --grow SECONDS]" >&2; exit 2 ;;
  *) seconds=$1 ;;
esac

target_dir=${FUZZ_TARGET_DIR:-$root/fuzz/target}
host=$(rustc -vV | sed -n 's/^host: //p')
all_targets=$(sed -n '/^\[\[bin\]\]/,/^path/s/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml)
targets=${FUZZ_TARGETS:-$all_targets}

# Per target: longest input (bytes). Inputs of a few KiB reach every branch of these parsers;
# longer ones only slow the search.
max_len() {
  case "$1" in
    request | sse) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

flags="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
flags+=" -Cforce-frame-pointers"

echo "fuzz: building $(echo $targets | wc -w) targets into $target_dir"
start=$(date +%s)
# --target: the flags reach the targets' code only, not build scripts or proc macros.
RUSTFLAGS="$flags" CARGO_TARGET_DIR="$target_dir" cargo build --manifest-path fuzz/Cargo.toml \
  --locked --profile fuzz --target "$host" $(for t in $targets; do printf -- '--bin %s ' "$t"; done)
echo "fuzz: built in $(($(date +%s) - start)) s"
bin_dir=$target_dir/$host/fuzz

work=${FUZZ_WORK:-$(mktemp -d -t kvmesh-fuzz.XXXXXX)}
mkdir -p "$work"
failed=()
summary=()
for t in $targets; do
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t"
  rm -rf "$corpus" "$artifacts"
  mkdir -p "$corpus" "$artifacts"
  if [ -d "fuzz/corpus/$t" ]; then
    cp -r "fuzz/corpus/$t/." "$corpus/"
  fi
  log="$work/$t.log"
  args=(-rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len="$(max_len "$t")" -timeout=10
    -artifact_prefix="$artifacts/" -print_final_stats=1)
  if [ -f "fuzz/dicts/$t.dict" ]; then
    args+=(-dict="fuzz/dicts/$t.dict")
  fi
  case "$mode" in
    replay) args+=(-runs=0) ;;
    *) args+=(-max_total_time="$seconds") ;;
  esac
  if [ "$mode" = replay ]; then echo "fuzz: $t (replaying its corpus)"; else echo "fuzz: $t ($seconds s)"; fi
  rc=0
  "$bin_dir/$t" "${args[@]}" "$corpus" >"$log" 2>&1 || rc=$?
  grep -E '^#[0-9]+ +(INITED|DONE)' "$log" | tail -2 | sed 's/^/  /' || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  summary+=("$(printf '%-12s %10s runs %8s/s  corpus %s' "$t" "${execs:-?}" "${rate:-?}" "$(ls "$corpus" | wc -l)")")
  crashes=$(find "$artifacts" -type f | sort)
  if [ "$rc" != 0 ] || [ -n "$crashes" ]; then
    tail -40 "$log" >&2
    echo "fuzz: $t FAILED (exit $rc); its log: $log" >&2
    for c in $crashes; do
      echo "fuzz: $t crashing input: $c" >&2
      echo "fuzz:   replay it: $bin_dir/$t $c" >&2
    done
    failed+=("$t")
  fi
  if [ "$mode" = grow ] && [ "$rc" = 0 ]; then
    mkdir -p "fuzz/corpus/$t"
    "$bin_dir/$t" -merge=1 -max_len="$(max_len "$t")" "fuzz/corpus/$t" "$corpus" >>"$log" 2>&1
  fi
done

echo "fuzz: summary ($mode)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]} (inputs and logs under $work)" >&2
  exit 1
fi
if [ -z "${FUZZ_WORK:-}" ]; then
  rm -rf "$work"
fi
echo "fuzz: all targets passed"
