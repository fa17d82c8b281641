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
#   render           helm template --kube-version V of each values file, for V the oldest
#                    supported Kubernetes (Chart.yaml kubeVersion, the one place the range is
#                    stated) and the newest kubernetes-validate knows; kubectl kustomize
#                    k8s/overlays/{dev,prod}; the example manifests docs/*-job.yaml as written
#   custom-resources ServiceMonitor, PrometheusRule, Certificate, GRPCRoute against the
#                    upstream CRDs in ../shared/crds (or $DEPLOY_CRDS_DIR). Without them: a
#                    failure when CI is set, SKIP in the summary otherwise (never PASS)
#   kubernetes-OLDEST kubernetes-validate --strict of every built-in resource rendered for
#                    the oldest version, against that version's schema
#   kubernetes-NEWEST the same for the newest version
#   checkov          checkov over every rendered manifest: zero failed checks. Rendered
#                    manifests carry no checkov annotations; the project's justified skips are
#                    in scripts/deploy-checks/checkov.yaml and listed below
#   chart-tests      pytest scripts/deploy-checks (template, ordering and upgrade tests)
#   tiltfile         the Tiltfile parses and dry-runs in starlark-rust with Tilt stubs
#
# Exit status: 0 when every check passed or was skipped, 1 otherwise.
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
# Exit status of a check that could not run for a missing local prerequisite.
readonly SKIPPED=3

run_check() { # name command...
  local name="$1"
  shift
  local check_started=${SECONDS} status=0
  printf '\n=== %s\n' "${name}"
  "$@" || status=$?
  if [[ "${status}" -eq 0 ]]; then
    summary+=("PASS  ${name} ($((SECONDS - check_started)) s)")
  elif [[ "${status}" -eq "${SKIPPED}" ]]; then
    summary+=("SKIP  ${name} ($((SECONDS - check_started)) s)")
  else
    summary+=("FAIL  ${name} ($((SECONDS - check_started)) s)")
    failed=1
  fi
}

# The supported Kubernetes range: from Chart.yaml's kubeVersion (">=1.30.0-0") to the newest
# version whose schemas kubernetes-validate ships.
oldest_kubernetes="$(sed -n 's/^kubeVersion: *"*>= *\([0-9][0-9.]*\)-0"*$/\1/p' "${chart_dir}/Chart.yaml")"
newest_kubernetes="$("${TOOLS_PYTHON}" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
if [[ -z "${oldest_kubernetes}" || -z "${newest_kubernetes}" ]]; then
  echo "check-deploy: FAIL: cannot read kubeVersion from ${chart_dir}/Chart.yaml or kubernetes-validate's newest version"
  exit 1
fi
kubernetes_versions=("${oldest_kubernetes}" "${newest_kubernetes}")

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
  local status=0 values_file name overlay version file
  for version in "${kubernetes_versions[@]}"; do
    mkdir -p "${rendered_dir}/${version}"
    while read -r values_file; do
      name="$(basename "${values_file}" .yaml)"
      if ! helm template analytics-service "${chart_dir}" --namespace analytics --kube-version "${version}" \
        --values "${values_file}" >"${rendered_dir}/${version}/chart-${name}.yaml"; then
        echo "render: FAIL helm template --kube-version ${version} --values ${values_file}"
        status=1
      fi
    done < <(values_files)
    for overlay in dev prod; do
      if ! kubectl kustomize "k8s/overlays/${overlay}" >"${rendered_dir}/${version}/k8s-${overlay}.yaml"; then
        echo "render: FAIL kubectl kustomize k8s/overlays/${overlay}"
        status=1
      fi
    done
    # Example manifests users apply as they are (e.g. docs/erasure-job.yaml): validated and
    # scanned like the renders.
    for file in docs/*-job.yaml; do
      cp "${file}" "${rendered_dir}/${version}/docs-$(basename "${file}")"
    done
    for file in "${rendered_dir}/${version}"/*.yaml; do
      printf 'render: Kubernetes %-7s %-40s %3d resources\n' "${version}" "$(basename "${file}")" "$(grep -c '^kind:' "${file}")"
    done
  done
  return "${status}"
}

check_custom_resources() {
  local status=0 version
  for version in "${kubernetes_versions[@]}"; do
    "${TOOLS_PYTHON}" scripts/deploy-checks/validate_crs.py "${core_dir}/${version}" "${rendered_dir}/${version}"/*.yaml
    local version_status=$?
    if [[ "${version_status}" -ne 0 ]] && [[ "${status}" -ne 1 ]]; then
      status="${version_status}"
    fi
  done
  return "${status}"
}

check_kubernetes() { # version: the built-in resources rendered for it, against its schema
  local status=0
  kubernetes-validate --strict --kubernetes-version "$1" --quiet "${core_dir}/$1"/*.yaml || status=1
  [[ "${status}" -eq 0 ]] && echo "kubernetes-validate: $(ls "${core_dir}/$1" | wc -l) files valid for Kubernetes $1"
  return "${status}"
}

check_checkov() {
  local report="${work_dir}/checkov.json"
  checkov --directory "${rendered_dir}/${newest_kubernetes}" --framework kubernetes \
    --config-file scripts/deploy-checks/checkov.yaml --output json >"${report}" 2>"${work_dir}/checkov.err"
  local checkov_status=$?
  "${TOOLS_PYTHON}" - "${report}" "${checkov_status}" "${work_dir}/checkov.err" <<'PY'
import json, re, sys
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
print(f"checkov: {passed} passed, {failed} failed, {skipped} skipped "
      "(skips: scripts/deploy-checks/checkov.yaml, with their reasons)")
for (check_id, reason), count in sorted(skips.items()):
    print(f"checkov: skipped {check_id} x{count}: {reason}")
unjustified = [key for key in skips if key[1] == "(no reason given)"]
if unjustified:
    print(f"checkov: inline skips in rendered manifests (not allowed): {sorted(unjustified)}")
config_skips = 0
for line in open("scripts/deploy-checks/checkov.yaml", encoding="utf-8"):
    match = re.match(r"^\s*-\s*(CKV\w+)\s*(?:#\s*(.*))?$", line)
    if match:
        config_skips += 1
        reason = (match.group(2) or "").strip()
        print(f"checkov: skipped by scripts/deploy-checks/checkov.yaml {match.group(1)}: {reason or '(no reason given)'}")
        if not reason:
            unjustified.append((match.group(1), "checkov.yaml"))
sys.exit(1 if failed or skips or unjustified or passed == 0 or checkov_status != 0 else 0)
PY
}

check_chart_tests() {
  pytest -q -p no:cacheprovider scripts/deploy-checks
}

check_tiltfile() {
  "${TOOLS_PYTHON}" scripts/deploy-checks/check_tiltfile.py Tiltfile
}

run_check hadolint check_hadolint
run_check helm-lint check_helm_lint
run_check render check_render
run_check custom-resources check_custom_resources
run_check "kubernetes-${oldest_kubernetes}" check_kubernetes "${oldest_kubernetes}"
run_check "kubernetes-${newest_kubernetes}" check_kubernetes "${newest_kubernetes}"
run_check checkov check_checkov
run_check chart-tests check_chart_tests
run_check tiltfile check_tiltfile

passed_count=0
skipped_count=0
for line in "${summary[@]}"; do
  [[ "${line}" == PASS* ]] && passed_count=$((passed_count + 1))
  [[ "${line}" == SKIP* ]] && skipped_count=$((skipped_count + 1))
done
printf '\n=== check-deploy summary (%d s)\n' "$((SECONDS - started))"
printf '%s\n' "${summary[@]}"
printf 'check-deploy: %d passed, %d skipped, %d failed\n' "${passed_count}" "${skipped_count}" \
  "$((${#summary[@]} - passed_count - skipped_count))"
exit "${failed}"
