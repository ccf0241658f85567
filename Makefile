# llama-orch — the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CACHE ?= $(or $(LLORCH_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llama-orch)
ENGINE := $(CACHE)/bin/llama-server
MODEL := $(CACHE)/models/llorch-tiny.gguf
CARGO ?= cargo
TARGET := $(or $(CARGO_TARGET_DIR),target)

export LLORCH_CACHE_DIR := $(CACHE)
export LLORCH_ENGINE_BINARY := $(ENGINE)

.PHONY: help deps engine model build bins bins-release install check-deploy check-deps check-specs check-modules demo up lint test bench bench-build bench-handoff bench-admission bench-admission-wrk bench-journal bench-stream bench-openai bench-cloud bench-relay-cpu bench-auth bench-cache bench-sustained soak clean-cache

help:
	@echo "make demo           run the stack on the tiny model, stream one task, stop"
	@echo "make up             run the stack in the foreground (Ctrl-C stops it)"
	@echo "make test           build, lint and run every test (installs engine + model first)"
	@echo "make install        binaries, systemd units and examples under PREFIX (default /usr/local)"
	@echo "make check-deploy   verify deploy/systemd (systemd-analyze) and deploy/kubernetes (schemas)"
	@echo "make check-specs    every MUST of .specs/ is covered by a test or scenario (spec-trace)"
	@echo "make check-modules  no import cycle between a daemon's modules (module-graph)"
	@echo "make check-deps     the dependency policy (deny.toml: licenses, bans, sources)"
	@echo "make engine         install the pinned llama-server into $(CACHE)"
	@echo "make model          write the tiny test model to $(MODEL)"
	@echo "make bench          all benchmarks (results go in test-harness/bench/README.md by hand)"
	@echo "make soak           the chaos soak for SOAK_SECS (default 1800) seconds"

deps:
	@scripts/install-deps.sh

engine: deps
	@scripts/install-engine.sh

model:
	@$(CARGO) run -q -p tiny-gguf --bin llorch-tiny-model -- --out $(MODEL)

build:
	$(CARGO) build --workspace --all-targets

bins:
	@$(CARGO) build -q -p pool-managerd -p orchestratord -p llorch

bins-release:
	$(CARGO) build --release -p pool-managerd -p orchestratord -p llorch

# `make install [PREFIX=/usr/local] [DESTDIR=]`: the binaries to $(BINDIR), the systemd units
# (their ExecStart= pointing there) to $(UNITDIR), the sysusers.d and tmpfiles.d snippets, and the
# environment and pools examples with the operator docs to $(DOCDIR). DESTDIR stages the tree
# elsewhere (packages, check-deploy). It builds the release binaries first; INSTALL_PROFILE=debug
# installs the debug build instead. It starts and enables nothing (docs/CLOUD_PROFILE_DEPLOYMENT.md).
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DOCDIR ?= $(PREFIX)/share/doc/llama-orch
INSTALL_PROFILE ?= release

install: $(if $(filter debug,$(INSTALL_PROFILE)),bins,bins-release)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
	  $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(DOCDIR)/examples
	install -m 755 $(addprefix $(TARGET)/$(INSTALL_PROFILE)/,orchestratord pool-managerd llorch) \
	  $(DESTDIR)$(BINDIR)/
	for unit in orchestratord pool-managerd; do \
	  sed -e 's|/usr/local/bin/|$(BINDIR)/|' -e 's|/usr/local/share/doc/llama-orch/|$(DOCDIR)/|' \
	    deploy/systemd/$$unit.service > $(DESTDIR)$(UNITDIR)/$$unit.service; \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$unit.service; \
	done
	install -m 644 deploy/systemd/llama-orch.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/llama-orch.conf
	install -m 644 deploy/systemd/llama-orch.tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/llama-orch.conf
	install -m 644 deploy/systemd/orchestratord.env.example deploy/systemd/pool-managerd.env.example \
	  examples/pools.toml $(DESTDIR)$(DOCDIR)/examples/
	install -m 644 docs/CLOUD_PROFILE_DEPLOYMENT.md docs/SECURITY.md $(DESTDIR)$(DOCDIR)/

# The deployment files: systemd units checked by systemd-analyze verify on a DESTDIR install of
# the debug build, Kubernetes manifests validated offline against the API schemas (a pinned
# kubernetes-validate in $(CACHE)); each check also proves it catches a broken file.
check-deploy: deps bins
	@scripts/check-deploy.sh

demo: engine model bins
	@scripts/stack.sh demo

up: engine model bins
	@scripts/stack.sh up

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Process tests start real engines and daemons: at most TEST_THREADS tests of a binary run at
# once, so a 2-core machine runs them without timing flakes (exact bounds are asserted on
# paused time in process, where parallelism cannot matter).
TEST_THREADS ?= 2

# The dependency policy (deny.toml): licenses we can ship, no wildcard versions, crates.io only.
# cargo-deny is installed once (pinned) into cargo's bin directory; no advisory database is read.
CARGO_DENY_VERSION := 0.20.2
check-deps:
	@command -v cargo-deny >/dev/null && cargo-deny --version | grep -q "$(CARGO_DENY_VERSION)" \
	  || $(CARGO) install --locked --quiet cargo-deny --version $(CARGO_DENY_VERSION)
	$(CARGO) deny --locked check licenses bans sources

# Every MUST of .specs/ has a test or scenario that covers it (`// covers: ID`, `@ID`).
check-specs:
	$(CARGO) run -q -p spec-trace

check-modules:
	$(CARGO) run -q -p module-graph

test: engine model lint check-deps check-deploy check-specs check-modules
	$(CARGO) test --workspace -- --test-threads=$(TEST_THREADS)
	@$(MAKE) --no-print-directory demo

bench: bench-handoff bench-admission bench-admission-wrk bench-journal bench-stream bench-openai bench-cloud bench-relay-cpu bench-auth bench-cache

bench-build:
	$(CARGO) build --release -p pool-managerd -p orchestratord -p llorch-bench

bench-handoff: engine model bench-build
	$(TARGET)/release/handoff-latency --pool-managerd $(TARGET)/release/pool-managerd \
	  --engine $(ENGINE) --model $(MODEL) --files 100

bench-admission: bench-build
	$(TARGET)/release/admission --orchestratord $(TARGET)/release/orchestratord --tasks 50000 --clients 16

# Needs wrk (apt-get install wrk): admission at 100 000 queued, side by side with a bare handler.
bench-admission-wrk: bench-build
	@command -v wrk >/dev/null || { echo "bench-admission-wrk needs wrk: apt-get install wrk" >&2; exit 1; }
	$(TARGET)/release/admission-wrk --orchestratord $(TARGET)/release/orchestratord --bare $(TARGET)/release/bare-admission --queued 100000 --connections 32 --duration 10 --rounds 2

PREFILL_MODEL := $(CACHE)/models/llorch-prefill.gguf

$(PREFILL_MODEL):
	@$(CARGO) run -q --release -p tiny-gguf --bin llorch-tiny-model -- --size prefill --out $(PREFILL_MODEL)

bench-cache: engine bench-build $(PREFILL_MODEL)
	$(TARGET)/release/cache-placement --orchestratord $(TARGET)/release/orchestratord \
	  --pool-managerd $(TARGET)/release/pool-managerd --engine $(ENGINE) --model $(PREFILL_MODEL) --rounds 3

bench-journal: bench-build
	$(TARGET)/release/admission --orchestratord $(TARGET)/release/orchestratord --tasks 30000 --clients 16 --journals none,normal,full

bench-stream: engine model bench-build
	$(TARGET)/release/stream --orchestratord $(TARGET)/release/orchestratord \
	  --engine $(ENGINE) --model $(MODEL) --runs 20 --tokens 1024

bench-openai: engine model bench-build
	$(TARGET)/release/openai-stream --orchestratord $(TARGET)/release/orchestratord \
	  --engine $(ENGINE) --model $(MODEL) --rounds 20 --concurrency 4 --tokens 512

bench-auth: bench-build
	$(TARGET)/release/auth-timing --keys 100 --rounds 200000

# The chaos soak of the tests, run long (a benchmark: figures go in docs/RELIABILITY.md).
SOAK_SECS ?= 1800
soak: engine model
	$(CARGO) build -q -p pool-managerd -p orchestratord -p llorch-fault-proxy
	LLORCH_SOAK_SECS=$(SOAK_SECS) $(CARGO) test -p llorch-e2e-cloud --test chaos -- --nocapture

clean-cache:
	rm -rf $(CACHE)

bench-cloud: engine model bench-build
	$(TARGET)/release/cloud-vs-home --orchestratord $(TARGET)/release/orchestratord \
	  --pool-managerd $(TARGET)/release/pool-managerd --engine $(ENGINE) --model $(MODEL) --runs 20 --tokens 1024

bench-relay-cpu: engine model bench-build
	$(TARGET)/release/relay-cpu --orchestratord $(TARGET)/release/orchestratord \
	  --pool-managerd $(TARGET)/release/pool-managerd --engine $(ENGINE) --model $(MODEL) \
	  --rounds 20 --streams 4 --tokens 512

# Ten minutes of open-loop load on a CLOUD stack in network namespaces (needs root); not in `bench`.
bench-sustained: engine model bench-build
	$(TARGET)/release/sustained-load --orchestratord $(TARGET)/release/orchestratord \
	  --pool-managerd $(TARGET)/release/pool-managerd --engine $(ENGINE) --model $(MODEL) \
	  --rate 1000 --secs 600 --slots 4 --interactive-share 0.2
