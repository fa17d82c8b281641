#!/usr/bin/env bash
# Checks everything that ships the service to a cluster: Dockerfile, Helm chart, kustomize
# manifests and Tiltfile. No cluster, Docker engine or cargo build needed.
#
#   scripts/check-deploy.sh            installs the pinned tools into .tools/ if missing
#                                      (scripts/install-tools.sh), then runs every check
#
# Checks (each runs even when an earlier one failed; the summary lists them all):
#   hadolint         hadolint Dockerfile, no findings
#   helm-lint        helm lint --strict with the defaults and every helm/analytics-service/ci/*.yaml
#   render           helm template of each values file; kubectl kustomize k8s/overlays/{dev,prod}
#   custom-resources ServiceMonitor, PrometheusRule, Certificate against the upstream CRDs in
#                    ../shared/crds (or $DEPLOY_CRDS_DIR); reported as skipped without them
#   kubernetes-1.29  kubernetes-validate --strict of every rendered built-in resource
#   kubernetes-1.35  the same against Kubernetes 1.35
#   checkov          checkov over every rendered manifest: zero failed checks; skips are
#                    justified inline (checkov.io/skipN annotations) and listed below
#   chart-tests      pytest scripts/deploy-checks/test_chart.py (template unit tests)
#   tiltfile         the Tiltfile parses and dry-runs in starlark-rust with Tilt stubs
#
# Exit status: 0 when every check passed, 1 otherwise.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}" || exit 1
started=${SECONDS}

chart_dir="helm/analytics-service"
work_dir="$(mktemp -d -t check-deploy.XXXXXX)"
trap 'rm -rf "${work_dir}"' EXIT

if ! bash scripts/install-tools.sh >"${work_dir}/install-tools.log" 2>&1; then
  cat "${work_dir}/install-tools.log"
  echo "check-deploy: FAIL: scripts/install-tools.sh failed"
  exit 1
fi
grep -v 'already present' "${work_dir}/install-tools.log" | grep -v '^install-tools: done' || true
# shellcheck source=tools-env.sh
source scripts/tools-env.sh
rendered_dir="${work_dir}/rendered"
core_dir="${work_dir}/core"
mkdir -p "${rendered_dir}" "${core_dir}"

declare -a summary=()
failed=0

run_check() { # name command...
  local name="$1"
  shift
  local check_started=${SECONDS}
  printf '\n=== %s\n' "${name}"
  if "$@"; then
    summary+=("PASS  ${name} ($((SECONDS - check_started)) s)")
  else
    summary+=("FAIL  ${name} ($((SECONDS - check_started)) s)")
    failed=1
  fi
}

values_files() {
  find "${chart_dir}/ci" -maxdepth 1 -name '*.yaml' | sort
}

check_hadolint() {
  hadolint Dockerfile && echo "hadolint: Dockerfile clean"
}

check_helm_lint() {
  local status=0 values_file
  echo "helm lint --strict (chart defaults)"
  helm lint --strict "${chart_dir}" --namespace analytics --quiet || status=1
  while read -r values_file; do
    echo "helm lint --strict --values ${values_file}"
    helm lint --strict "${chart_dir}" --namespace analytics --quiet --values "${values_file}" || status=1
  done < <(values_files)
  return "${status}"
}

check_render() {
  local status=0 values_file name overlay
  while read -r values_file; do
    name="$(basename "${values_file}" .yaml)"
    if ! helm template analytics-service "${chart_dir}" --namespace analytics --values "${values_file}" \
      >"${rendered_dir}/chart-${name}.yaml"; then
      echo "render: FAIL helm template --values ${values_file}"
      status=1
    fi
  done < <(values_files)
  for overlay in dev prod; do
    if ! kubectl kustomize "k8s/overlays/${overlay}" >"${rendered_dir}/k8s-${overlay}.yaml"; then
      echo "render: FAIL kubectl kustomize k8s/overlays/${overlay}"
      status=1
    fi
  done
  local file
  for file in "${rendered_dir}"/*.yaml; do
    printf 'render: %-40s %3d resources\n' "$(basename "${file}")" "$(grep -c '^kind:' "${file}")"
  done
  return "${status}"
}

check_custom_resources() {
  "${TOOLS_PYTHON}" scripts/deploy-checks/validate_crs.py "${core_dir}" "${rendered_dir}"/*.yaml
}

check_kubernetes() { # version
  local status=0
  kubernetes-validate --strict --kubernetes-version "$1" --quiet "${core_dir}"/*.yaml || status=1
  [[ "${status}" -eq 0 ]] && echo "kubernetes-validate: $(ls "${core_dir}" | wc -l) files valid for Kubernetes $1"
  return "${status}"
}

check_checkov() {
  local report="${work_dir}/checkov.json"
  checkov --directory "${rendered_dir}" --framework kubernetes --output json >"${report}" 2>"${work_dir}/checkov.err"
  local checkov_status=$?
  "${TOOLS_PYTHON}" - "${report}" "${checkov_status}" "${work_dir}/checkov.err" <<'PY'
import json, sys
from collections import Counter

path, checkov_status, errors = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    with open(path, encoding="utf-8") as handle:
        reports = json.load(handle)
except (OSError, ValueError) as error:
    print(f"checkov: no JSON report ({error}); exit status {checkov_status}")
    print(open(errors, encoding="utf-8").read())
    sys.exit(1)
if isinstance(reports, dict):
    reports = [reports]
passed = failed = skipped = 0
skips = Counter()
for report in reports:
    summary = report.get("summary", {})
    passed += summary.get("passed", 0)
    failed += summary.get("failed", 0)
    skipped += summary.get("skipped", 0)
    results = report.get("results", {})
    for check in results.get("failed_checks", []):
        print(f"checkov: FAILED {check['check_id']} {check.get('check_name', '')}: "
              f"{check.get('resource')} in {check.get('file_path')}")
    for check in results.get("skipped_checks", []):
        reason = (check.get("check_result") or {}).get("suppress_comment", "") or "(no reason given)"
        skips[(check["check_id"], reason)] += 1
print(f"checkov: {passed} passed, {failed} failed, {skipped} skipped (each skip justified inline)")
for (check_id, reason), count in sorted(skips.items()):
    print(f"checkov: skipped {check_id} x{count}: {reason}")
unjustified = [key for key in skips if key[1] == "(no reason given)"]
if unjustified:
    print(f"checkov: skips without a reason: {sorted(unjustified)}")
sys.exit(1 if failed or unjustified or passed == 0 or checkov_status != 0 else 0)
PY
}

check_chart_tests() {
  pytest -q -p no:cacheprovider scripts/deploy-checks/test_chart.py
}

check_tiltfile() {
  "${TOOLS_PYTHON}" scripts/deploy-checks/check_tiltfile.py Tiltfile
}

run_check hadolint check_hadolint
run_check helm-lint check_helm_lint
run_check render check_render
run_check custom-resources check_custom_resources
run_check kubernetes-1.29 check_kubernetes 1.29.0
run_check kubernetes-1.35 check_kubernetes 1.35.0
run_check checkov check_checkov
run_check chart-tests check_chart_tests
run_check tiltfile check_tiltfile

passed_count=0
for line in "${summary[@]}"; do [[ "${line}" == PASS* ]] && passed_count=$((passed_count + 1)); done
printf '\n=== check-deploy summary (%d s)\n' "$((SECONDS - started))"
printf '%s\n' "${summary[@]}"
printf 'check-deploy: %d passed, %d failed\n' "${passed_count}" "$((${#summary[@]} - passed_count))"
exit "${failed}"
