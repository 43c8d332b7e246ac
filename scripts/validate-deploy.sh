#!/usr/bin/env bash
# Renders the kustomizations in deploy/ and validates every object (strict Kubernetes schemas,
# security and wiring rules); no cluster needed. See tests/python/validate_deploy.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tests/python/validate_deploy.py "$@"
