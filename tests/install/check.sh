#!/usr/bin/env bash
# check.sh — install loom into a temporary prefix and build a program
# against it the ways a user would:
#
#   1. cmake --install BUILD_DIR --prefix TMP
#   2. the installed headers compile alone, as C11 and as C++
#   3. the shared library exports loom_* symbols only
#   4. consumer.c built with pkg-config, linked with libloom.a, runs
#   5. consumer.c built with pkg-config, linked with libloom.so, runs
#   6. consumer.c built with CMake's find_package(loom), loom::static, runs
#   7. the same with loom::shared, runs
#
# usage: tests/install/check.sh [BUILD_DIR]      (default: build)
#
# BUILD_DIR must be built already.  The compiler and the sanitizers
# (LOOM_SANITIZE) of that build are used for the consumer too, so the check
# works in build-asan/ and build-tsan/ as well.  Prints "N passed, N failed"
# last; exits non-zero when a step failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
build_arg=${1:-$root/build}

die() {
  echo "install check: $*" >&2
  exit 1
}

[ -d "$build_arg" ] || die "no build directory '$build_arg' (run 'make build' first)"
build=$(cd "$build_arg" && pwd)
[ -f "$build/CMakeCache.txt" ] || die "'$build' is not a CMake build directory"

cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt" | head -n1; }
cc=$(cache CMAKE_C_COMPILER)
cxx_for() { # the C++ compiler that goes with the C one
  case "$(basename "$1")" in
    clang*) echo clang++ ;;
    *) echo g++ ;;
  esac
}
cxx=$(cxx_for "$cc")
san=$(cache LOOM_SANITIZE)
san_flags=()
if [ -n "$san" ]; then
  san_flags=(-fsanitize="$san" -fno-omit-frame-pointer)
fi

for tool in pkg-config readelf nm "$cc"; do
  command -v "$tool" >/dev/null || die "'$tool' not found (run scripts/deps.sh)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/loom-install-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
log=$tmp/log

passed=0
failed=0
# step NAME FUNCTION: run FUNCTION with its output in a log shown on failure.
step() {
  local name=$1
  shift
  if ("$@") >"$log" 2>&1; then
    passed=$((passed + 1))
    printf '  ok    %s\n' "$name"
    sed 's/^/        /' "$log" | grep -E '^        consumer' || true
  else
    failed=$((failed + 1))
    printf '  FAIL  %s\n' "$name"
    sed 's/^/        /' "$log"
  fi
}

echo "install check: $build -> $prefix (cc: $cc${san:+, sanitize: $san})"

# ---- 1. install
do_install() {
  cmake --install "$build" --prefix "$prefix"
  pc=$(find "$prefix" -name loom.pc -path '*/pkgconfig/*' | head -n1)
  [ -n "$pc" ] || {
    echo "no loom.pc installed"
    return 1
  }
  [ -n "$(find "$prefix" -name loomConfig.cmake)" ] || {
    echo "no loomConfig.cmake installed"
    return 1
  }
  [ -f "$prefix/include/loom.h" ] || {
    echo "no include/loom.h installed"
    return 1
  }
  [ -f "$prefix/share/loom/loom-gdb.py" ] || {
    echo "no share/loom/loom-gdb.py installed"
    return 1
  }
  # Internal headers stay in the source tree.
  if find "$prefix/include" -name 'export_test.h' | grep -q .; then
    echo "an internal header was installed"
    return 1
  fi
}
step "cmake --install" do_install
if [ "$failed" -ne 0 ]; then
  echo "install check: $passed passed, $failed failed"
  exit 1
fi

pc=$(find "$prefix" -name loom.pc -path '*/pkgconfig/*' | head -n1)
PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_PATH
libdir=$(dirname "$PKG_CONFIG_PATH")

# ---- loom.pc must describe this install, wherever --prefix put it
do_pc() {
  local var dir real real_prefix
  real_prefix=$(cd "$prefix" && pwd -P)
  for var in libdir includedir; do
    dir=$(pkg-config --variable="$var" loom)
    real=$(cd "$dir" 2>/dev/null && pwd -P) || real=
    case "$real" in
      "$real_prefix"/*) ;;
      *)
        echo "loom.pc says $var=$dir: not inside the prefix it was"
        echo "installed into ($prefix).  loom.pc must find its prefix from"
        echo "its own place (prefix=\${pcfiledir}/../..), not keep the"
        echo "prefix the build was configured with."
        return 1
        ;;
    esac
  done
  pkg-config --cflags --libs loom
}
step "loom.pc points into the install prefix" do_pc

# ---- 2. headers
do_headers() {
  local h
  for h in $(cd "$prefix/include" && find . -name '*.h' | sort); do
    h=${h#./}
    # Twice: the include guard works.  The typedef keeps the unit
    # non-empty for headers that only define macros.
    printf '#include <%s>\n#include <%s>\ntypedef int check_nonempty;\n' \
      "$h" "$h" >"$tmp/h.c"
    "$cc" -std=c11 -pedantic -Wall -Wextra -Werror -fsyntax-only \
      -I"$prefix/include" "$tmp/h.c" || {
      echo "$h does not compile alone as C11"
      return 1
    }
    cp "$tmp/h.c" "$tmp/h.cc"
    "$cxx" -std=c++11 -Wall -Wextra -Werror -fsyntax-only \
      -I"$prefix/include" "$tmp/h.cc" || {
      echo "$h does not compile as C++"
      return 1
    }
  done
}
step "installed headers compile alone (C11, C++11)" do_headers

# ---- 3. exported symbols
do_exports() {
  local so extra
  so=$(find "$libdir" -maxdepth 1 -name 'libloom.so.*' -type f | head -n1)
  [ -n "$so" ] || {
    echo "no libloom.so.* in $libdir"
    return 1
  }
  # Sanitizer builds add their own hooks to the symbol table.
  [ -z "$san" ] || return 0
  extra=$(nm -D --defined-only "$so" | awk '{print $3}' |
    grep -Ev '^(loom_[a-z0-9_]+|_init|_fini)$' || true)
  if [ -n "$extra" ]; then
    echo "libloom.so exports non-API symbols:"
    echo "$extra"
    return 1
  fi
  if nm -D --defined-only "$so" | awk '{print $3}' | grep -q '^loom__'; then
    echo "libloom.so exports internal loom__ symbols"
    return 1
  fi
}
step "libloom.so exports only loom_* symbols" do_exports

needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }

# ---- 4, 5. pkg-config
do_pkgconfig_static() {
  local libs
  # pkg-config names the library -lloom; with libloom.so beside libloom.a
  # the linker would take the shared one, so ask for the archive.
  libs=$(pkg-config --static --libs loom |
    sed 's/-lloom/-Wl,-Bstatic -lloom -Wl,-Bdynamic/')
  # shellcheck disable=SC2046,SC2086
  "$cc" "${san_flags[@]}" -std=c11 -Wall -Wextra -Werror \
    -DCONSUMER_LINK='"pkg-config, static"' $(pkg-config --cflags loom) \
    "$here/consumer.c" -o "$tmp/consumer_pc_static" $libs
  if needed "$tmp/consumer_pc_static" | grep -q libloom; then
    echo "the static consumer depends on libloom.so"
    return 1
  fi
  "$tmp/consumer_pc_static"
}
step "pkg-config --static: build and run against libloom.a" do_pkgconfig_static

do_pkgconfig_shared() {
  # shellcheck disable=SC2046
  "$cc" "${san_flags[@]}" -std=c11 -Wall -Wextra -Werror \
    -DCONSUMER_LINK='"pkg-config, shared"' $(pkg-config --cflags loom) \
    "$here/consumer.c" -o "$tmp/consumer_pc_shared" \
    $(pkg-config --libs loom) -Wl,-rpath,"$libdir"
  needed "$tmp/consumer_pc_shared" | grep -q '^libloom\.so' || {
    echo "the shared consumer does not depend on libloom.so"
    return 1
  }
  "$tmp/consumer_pc_shared"
}
step "pkg-config: build and run against libloom.so" do_pkgconfig_shared

# ---- 6, 7. CMake find_package
do_cmake_configure() {
  cmake -S "$here" -B "$tmp/cmake-build" -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_C_COMPILER="$cc" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_FLAGS="${san_flags[*]}" \
    -DCMAKE_EXE_LINKER_FLAGS="${san_flags[*]}"
  cmake --build "$tmp/cmake-build" --parallel 2
}
do_cmake_static() {
  do_cmake_configure
  if needed "$tmp/cmake-build/consumer_static" | grep -q libloom; then
    echo "consumer_static depends on libloom.so"
    return 1
  fi
  "$tmp/cmake-build/consumer_static"
}
do_cmake_shared() {
  needed "$tmp/cmake-build/consumer_shared" | grep -q '^libloom\.so' || {
    echo "consumer_shared does not depend on libloom.so"
    return 1
  }
  "$tmp/cmake-build/consumer_shared"
}
step "find_package(loom): build and run with loom::static" do_cmake_static
step "find_package(loom): run with loom::shared" do_cmake_shared

echo "install check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
