#!/usr/bin/env bash
# Build dsv2ext._C with AddressSanitizer + UndefinedBehaviorSanitizer
# (DSV2EXT_SANITIZE=1, see setup.py) in a scratch copy of the repository and
# run the kernel and loader tests against that build.
#
# Exits non-zero when the build fails, a test fails, or ASan / UBSan report
# anything: the sanitizers stop the process at the first report (halt_on_error,
# exit codes 99 / 98), pytest runs with --capture=sys so that a report written
# to the process's stderr by the runtime is not swallowed by pytest's fd
# capture, and the whole output is searched for sanitizer reports as well.
# (A report in a subprocess started by a test makes that subprocess exit 98/99,
# which fails the test.)
#
# Usage:  scripts/sanitize.sh [pytest args...]     (the args go to both passes)
# Environment:
#   PYTHON          interpreter with numpy, scipy-openblas32, setuptools and the
#                   test dependencies (default: python3)
#   SANITIZE_TESTS  test files of the first pass (space separated, relative to the repo)
#   SANITIZE_PORTABLE_TESTS  test files of the second pass, run with DSV2EXT_ISA=portable
#                   (empty: no second pass)
#   KEEP=1          keep the scratch directory (printed at the end)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TESTS=${SANITIZE_TESTS:-"tests/test_core.py tests/test_mla.py tests/test_kv_cache.py tests/test_moe.py tests/test_int4.py tests/test_safetensors.py tests/test_loading.py tests/test_hardening.py tests/test_fuzz.py tests/test_amx.py tests/test_fp8.py"}
PORTABLE_TESTS=${SANITIZE_PORTABLE_TESTS-"tests/test_hardening.py tests/test_fuzz.py"}

LIBASAN=$(gcc -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "sanitize.sh: gcc's libasan.so not found ($LIBASAN); install gcc with sanitizer runtimes" >&2
    exit 2
fi
LIBASAN=$(readlink -f "$LIBASAN")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dsv2ext-sanitize.XXXXXX")
cleanup() {
    if [ "${KEEP:-0}" = "1" ]; then echo "sanitize.sh: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== sanitize: copy of the sources in $WORK/src"
mkdir -p "$WORK/src"
# the sources only: no build outputs, no virtual environments, no VCS data
tar -C "$ROOT" \
    --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.o' \
    --exclude=./.ci-venv --exclude=./.venv --exclude=./venv --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=.hypothesis --exclude=./benchmarks/cache \
    -cf - . | tar -C "$WORK/src" -xf -

echo "== sanitize: build with DSV2EXT_SANITIZE=1 (-fsanitize=address,undefined)"
"$PY" -c "import setuptools" 2>/dev/null || "$PY" -m pip install -q setuptools
# CFLAGS=-fno-wrapv: Python's own CFLAGS carry -fwrapv, which makes signed overflow defined
# and hides it from UBSan; the sanitizer build turns it back into a reported error.
(cd "$WORK/src" && DSV2EXT_SANITIZE=1 CFLAGS="-fno-wrapv" "$PY" setup.py -q build_ext --inplace \
    >"$WORK/build.log" 2>&1) || {
    cat "$WORK/build.log" >&2
    echo "sanitize.sh: the sanitizer build failed" >&2
    exit 1
}
SO=$(ls "$WORK"/src/dsv2ext/_C*.so)
if [ "$(nm -D "$SO" | grep -c __asan_init || true)" = "0" ]; then
    echo "sanitize.sh: $SO is not instrumented (no __asan_ symbols)" >&2
    exit 1
fi

# detect_leaks=0: CPython keeps interned objects and arenas until exit by design.
# PYTHONMALLOC=malloc: Python objects come from malloc too, so ASan sees their lifetime.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=99:strict_string_checks=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=98"
export PYTHONMALLOC=malloc
export PYTHONPATH="$WORK/src"
export PYTHONDONTWRITEBYTECODE=1
export DSV2EXT_SANITIZED=1   # tests scale down work that ASan makes slow (fuzz cases, timing tests)
run_pass() {  # label, ISA ("" = the CPU's best), test files...
    local label=$1 isa=$2
    shift 2
    echo "== sanitize: $label: $*"
    set +e
    # shellcheck disable=SC2086
    (cd "$WORK/src" && DSV2EXT_ISA=$isa LD_PRELOAD="$LIBASAN" "$PY" -m pytest -q -p no:cacheprovider \
        --capture=sys "${PYTEST_ARGS[@]}" "$@") 2>&1 | tee "$WORK/pytest-$label.log"
    local status=${PIPESTATUS[0]}
    set -e
    if grep -qE "ERROR: AddressSanitizer|runtime error:|UndefinedBehaviorSanitizer|ERROR: LeakSanitizer" \
            "$WORK/pytest-$label.log"; then
        echo "sanitize.sh: FAILED in pass '$label' (sanitizer report above)" >&2
        exit 1
    fi
    if [ "$status" -ne 0 ]; then
        echo "sanitize.sh: FAILED in pass '$label' (pytest exit status $status; 99 = ASan, 98 = UBSan report)" >&2
        exit "$status"
    fi
}

PYTEST_ARGS=("$@")
# shellcheck disable=SC2086
run_pass vector "" $TESTS
# ASan does not see the accesses of the AVX2 / AVX-512 intrinsics (masked loads, gathers):
# the portable code (same blocking and indexing, plain C) is run once more, through every kernel.
# shellcheck disable=SC2086
[ -z "$PORTABLE_TESTS" ] || run_pass portable portable $PORTABLE_TESTS
echo "== sanitize: clean (no ASan/UBSan report)"
