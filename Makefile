# One target dir per machine, outside the checkout, so every clone reuses the RocksDB build.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/vow/target

.PHONY: run test build

## Build and start a single-node vow on 127.0.0.1:7001 (gRPC) and :7081 (HTTP), data in ./vow-data.
run: build
	$(CARGO_TARGET_DIR)/debug/vowd --dev

## Run the whole test suite (what CI runs).
test:
	scripts/test.sh

build:
	scripts/setup.sh
	cargo build --workspace --bins
