#!/usr/bin/env bash
# prometheus_rules_test.sh DIR: `promtool check rules` on deploy/prometheus/tvilling.rules.yml and
# `promtool test rules` on its unit tests (each alert fires on the series that should fire it, at
# the time it should, with its annotations, and not on the others). Skipped (77) without promtool
# (Debian's prometheus package, installed by deploy/install-deps.sh).
set -euo pipefail
dir=$1
if ! command -v promtool >/dev/null; then
  echo "SKIP: promtool is not installed (apt-get install prometheus)"
  exit 77
fi
cd "$dir"
promtool check rules tvilling.rules.yml
promtool test rules tvilling.rules.test.yml
