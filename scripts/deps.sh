#!/usr/bin/env bash
# deps.sh — install what building and testing loom needs, and nothing else.
#
# Debian 12 (bookworm) packages, through apt-get only.  Idempotent: each
# package is checked with `dpkg -s` first; `apt-get update` and
# `apt-get install` run only when something is missing, non-interactively.
# As root it installs; otherwise it uses sudo when that works without a
# password prompt, and else prints the command to run and fails.
#
#   scripts/deps.sh [PKG...]          install what is missing (plus PKGs,
#                                     e.g. clang-format for `make format`)
#   scripts/deps.sh --check [PKG...]  only report; exit 1 if something is
#                                     missing
set -euo pipefail

# package            why
#   build-essential    gcc, make, libc headers
#   cmake              the build
#   clang              sanitizer builds (clang 14 on bookworm)
#   libclang-rt-14-dev ASan/UBSan/TSan runtimes for clang 14
#   valgrind           valgrind/valgrind.h (stack registration) and memcheck
#   gdb                debugging test failures
#   golang-go          Go 1.19, the peer the benchmarks compare with
#   zlib1g-dev         compression in the engine layer
#   pkg-config         consuming the installed library (tests/install)
#   python3            helper scripts
PACKAGES=(
  build-essential
  cmake
  clang
  libclang-rt-14-dev
  valgrind
  gdb
  golang-go
  zlib1g-dev
  pkg-config
  python3
)

check_only=0
for arg in "$@"; do
  case "$arg" in
    --check) check_only=1 ;;
    -h | --help)
      sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "deps.sh: unknown option '$arg' (try --help)" >&2
      exit 2
      ;;
    *) PACKAGES+=("$arg") ;;
  esac
done

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "deps.sh: this script needs a Debian-based system (dpkg, apt-get)." >&2
  echo "deps.sh: install the equivalents of: ${PACKAGES[*]}" >&2
  exit 1
fi

installed() {
  dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed$'
}

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps.sh: all dependencies are installed."
  exit 0
fi

echo "deps.sh: missing: ${missing[*]}"
if [ "$check_only" -eq 1 ]; then
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "deps.sh: not running as root and sudo is not available without a" >&2
    echo "deps.sh: password. Install the missing packages as root:" >&2
    echo >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    echo >&2
    echo "deps.sh: then run this command again." >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

echo "deps.sh: apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
echo "deps.sh: apt-get install ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install "${apt_opts[@]}" --no-install-recommends "${missing[@]}" </dev/null

still=()
for p in "${missing[@]}"; do
  installed "$p" || still+=("$p")
done
if [ ${#still[@]} -ne 0 ]; then
  echo "deps.sh: still missing after apt-get install: ${still[*]}" >&2
  exit 1
fi
echo "deps.sh: installed ${missing[*]}"
