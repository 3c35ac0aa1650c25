#!/usr/bin/env bash
# Regenerate docs/reference/*.md, the flag and subcommand references, from the
# binaries' own --help. The formatter is the one the drift tests use
# (cli/tests/reference/mod.rs): this runs each tests/reference_in_sync.rs with
# MANDATE_REGENERATE=1, which writes the page instead of comparing it.
#
#   make reference
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$MANDATE_ROOT"

mkdir -p docs/reference
for pkg in mandate-operator mandate-sidecar mandate-cli; do
  log "regenerating the reference of $pkg"
  MANDATE_REGENERATE=1 cargo test -q -p "$pkg" --test reference_in_sync
done
