# loom — the commands a newcomer and CI use.
#
#   make run      install missing tools, build, start the echo server
#   make test     install missing tools, build, run the whole test suite
#
# CMake does the building; this file strings the steps together.  Every
# target that builds first runs scripts/deps.sh (quick when nothing is
# missing; NO_DEPS=1 skips it).  `make help` lists the targets.

SHELL := /bin/bash
MAKEFLAGS += --no-print-directory
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

BUILD_DIR   ?= build
ASAN_DIR    ?= build-asan
TSAN_DIR    ?= build-tsan
BUILD_TYPE  ?= RelWithDebInfo
# Unoptimised, so that ASan instruments every local: frames left on a
# coroutine stack are only visible to it there.
ASAN_BUILD_TYPE ?= Debug
JOBS        ?= $(shell nproc 2>/dev/null || echo 2)
TEST_JOBS   ?= 2
PREFIX      ?= /usr/local
CMAKE       ?= cmake
CTEST       ?= ctest
CMAKE_ARGS  ?=
CTEST_ARGS  ?=
SAN_CC      ?= clang
NO_DEPS     ?=
DEMO_ARGS   ?=
# What `make run` serves: the echo server's --listen URLs.
ECHO_HOST   ?= 127.0.0.1
ECHO_PORT   ?= 7000
ECHO_SOCK   ?= /tmp/loom-echo.sock

# Sanitizer run-time options; values from the environment win.
ASAN_OPTIONS  ?= detect_leaks=1:abort_on_error=1
UBSAN_OPTIONS ?= print_stacktrace=1:halt_on_error=1
TSAN_OPTIONS  ?= halt_on_error=1:second_deadlock_stack=1

CTEST_RUN = $(CTEST) --output-on-failure --no-tests=error -j$(TEST_JOBS) \
            $(CTEST_ARGS)

# The C sources `make format` and `make tidy` look at.
SRC_DIRS := include src tests bench examples fuzz
C_FILES = $(shell find $(SRC_DIRS) -type f \( -name '*.c' -o -name '*.h' \) \
            2>/dev/null | sort)

.PHONY: help deps build run demo test asan tsan bench install clean format \
        format-check tidy

help:
	@echo 'loom make targets:'
	@echo '  run           build, then start examples/echo_server on loopback until Ctrl-C'
	@echo '  demo          build, then run the runtime tour (examples/runtime_demo)'
	@echo '  test          build, then run the test suite with ctest'
	@echo '  build         configure and build into $(BUILD_DIR)/ ($(BUILD_TYPE))'
	@echo '  asan          ASan+UBSan build in $(ASAN_DIR)/ ($(ASAN_BUILD_TYPE)) with clang, run the tests'
	@echo '  tsan          TSan build in $(TSAN_DIR)/ with clang, run the tests'
	@echo '  bench         build, then run bench/run.sh'
	@echo '  install       install the build into PREFIX (now $(PREFIX))'
	@echo '  format        clang-format -i every C source and header'
	@echo '  format-check  fail if a file is not clang-formatted'
	@echo '  tidy          clang-tidy over src/ (uses $(BUILD_DIR)/compile_commands.json)'
	@echo '  clean         remove $(BUILD_DIR)/ $(ASAN_DIR)/ $(TSAN_DIR)/'
	@echo '  deps          install missing build and test tools (scripts/deps.sh)'
	@echo 'variables: BUILD_TYPE ASAN_BUILD_TYPE JOBS TEST_JOBS PREFIX CMAKE_ARGS CTEST_ARGS NO_DEPS=1'
	@echo '           DEMO_ARGS (demo), ECHO_HOST ECHO_PORT ECHO_SOCK (run)'

deps:
ifeq ($(NO_DEPS),)
	@bash scripts/deps.sh
endif

# configure DIR, BUILD-TYPE, EXTRA-CMAKE-ARGS: (re)configure DIR.  Cheap
# when nothing changed, and it applies the build type and CMAKE_ARGS to an
# existing DIR too.
define configure
	echo '==> configure $(1)/ ($(2)$(if $(3), $(strip $(3))))'
	$(CMAKE) -S . -B $(1) -DCMAKE_BUILD_TYPE=$(2) \
	  -DCMAKE_EXPORT_COMPILE_COMMANDS=ON $(3) $(CMAKE_ARGS) >/dev/null
endef

build: deps
	@$(call configure,$(BUILD_DIR),$(BUILD_TYPE),)
	$(CMAKE) --build $(BUILD_DIR) --parallel $(JOBS)

# The echo server on TCP, UDP and a Unix socket at once, until Ctrl-C.
# `exec` makes the server the recipe's process, so Ctrl-C reaches it and
# it stops cleanly (removing its socket file) instead of make killing it.
ECHO_LISTEN = --listen tcp://$(ECHO_HOST):$(ECHO_PORT) \
              --listen udp://$(ECHO_HOST):$(ECHO_PORT) \
              --listen unix://$(ECHO_SOCK)
run: build
	@echo '==> $(BUILD_DIR)/examples/echo_server $(ECHO_LISTEN)'
	@echo 'Load it from another terminal; the client checks every byte:'
	@echo '  $(BUILD_DIR)/examples/echo_client --connect tcp://$(ECHO_HOST):$(ECHO_PORT) --conns 8 --count 10000'
	@echo '  $(BUILD_DIR)/examples/echo_client --connect udp://$(ECHO_HOST):$(ECHO_PORT)'
	@echo '  $(BUILD_DIR)/examples/echo_client --connect unix://$(ECHO_SOCK) --size 100000'
	@echo 'or type at it with netcat-openbsd (what you type comes back):'
	@echo '  nc $(ECHO_HOST) $(ECHO_PORT)            # TCP'
	@echo '  nc -u $(ECHO_HOST) $(ECHO_PORT)         # UDP'
	@echo '  nc -U $(ECHO_SOCK)    # Unix stream socket'
	@echo 'Ctrl-C stops the server.'
	@exec $(BUILD_DIR)/examples/echo_server $(ECHO_LISTEN)

demo: build
	@echo '==> $(BUILD_DIR)/examples/runtime_demo $(DEMO_ARGS)'
	@$(BUILD_DIR)/examples/runtime_demo $(DEMO_ARGS)

test: build
	cd $(BUILD_DIR) && $(CTEST_RUN)

asan: deps
	@$(call configure,$(ASAN_DIR),$(ASAN_BUILD_TYPE),-DCMAKE_C_COMPILER=$(SAN_CC) \
	  -DLOOM_SANITIZE=address$(,)undefined)
	$(CMAKE) --build $(ASAN_DIR) --parallel $(JOBS)
	cd $(ASAN_DIR) && ASAN_OPTIONS='$(ASAN_OPTIONS)' \
	  UBSAN_OPTIONS='$(UBSAN_OPTIONS)' $(CTEST_RUN)

tsan: deps
	@$(call configure,$(TSAN_DIR),$(BUILD_TYPE),-DCMAKE_C_COMPILER=$(SAN_CC) \
	  -DLOOM_SANITIZE=thread)
	$(CMAKE) --build $(TSAN_DIR) --parallel $(JOBS)
	cd $(TSAN_DIR) && TSAN_OPTIONS='$(TSAN_OPTIONS)' $(CTEST_RUN)

bench: build
	@if [ -f bench/run.sh ]; then \
	  bash bench/run.sh '$(BUILD_DIR)'; \
	else \
	  echo 'make bench: bench/run.sh does not exist yet'; \
	fi

install: build
	$(CMAKE) --install $(BUILD_DIR) --prefix '$(PREFIX)'

clean:
	rm -rf $(BUILD_DIR) $(ASAN_DIR) $(TSAN_DIR)

format:
	@NO_DEPS='$(NO_DEPS)'; [ -n "$$NO_DEPS" ] || bash scripts/deps.sh clang-format
	clang-format -i $(C_FILES)

format-check:
	@NO_DEPS='$(NO_DEPS)'; [ -n "$$NO_DEPS" ] || bash scripts/deps.sh clang-format
	clang-format --dry-run -Werror $(C_FILES)

tidy: build
	@NO_DEPS='$(NO_DEPS)'; [ -n "$$NO_DEPS" ] || bash scripts/deps.sh clang-tidy
	clang-tidy -p $(BUILD_DIR) --quiet \
	  $(shell find src -type f -name '*.c' 2>/dev/null | sort)

# A comma inside $(call ...) arguments.
, := ,
