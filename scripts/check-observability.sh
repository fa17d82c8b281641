#!/usr/bin/env bash
# Checks the monitoring artefacts the Helm chart ships:
#   - helm/analytics-service/files/prometheus-rules.yaml   promtool check rules
#   - tests/promtool/*_test.yaml                           promtool test rules (alert unit tests)
#   - helm/analytics-service/files/grafana-dashboard.json  valid JSON, schemaVersion >= 39,
#       unique panel ids, every datasource is the ${datasource} variable, the namespace/job/pod
#       variables exist, every panel query filters on $namespace, and every PromQL
#       expression (targets, annotations, variable queries)
#       parses: each becomes a recording rule in a temporary file for `promtool check rules`
#   - docs/runbook.md                                      a section for every alert's runbook_url
#
# Usage: scripts/check-observability.sh      (exits non-zero on any failure)
# Needs python3 and promtool. Without promtool on PATH it sources scripts/tools-env.sh, then
# falls back to Debian's `prometheus` package (which provides promtool).
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}" || exit 1

rules_file="helm/analytics-service/files/prometheus-rules.yaml"
dashboard_file="helm/analytics-service/files/grafana-dashboard.json"
tests_dir="tests/promtool"
runbook_file="docs/runbook.md"

say() { printf 'check-observability: %s\n' "$*"; }

ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  if [[ -f scripts/tools-env.sh ]]; then
    # shellcheck source=/dev/null
    source scripts/tools-env.sh
    command -v promtool >/dev/null 2>&1 && return 0
  fi
  say "promtool not found, installing Debian package prometheus"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; then
    apt-get update >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1
  fi
  command -v promtool >/dev/null 2>&1
}

if ! command -v python3 >/dev/null 2>&1; then
  say "FAIL: python3 is required"
  exit 1
fi
if ! ensure_promtool; then
  say "FAIL: promtool is not available (tried scripts/tools-env.sh and apt-get install prometheus)"
  exit 1
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT

failures=()
passed=()

run_step() { # name command...
  local name="$1"
  shift
  local log="${work_dir}/step.log"
  if "$@" >"${log}" 2>&1; then
    passed+=("${name}")
  else
    failures+=("${name}")
    say "FAILED: ${name}"
    sed 's/^/    /' "${log}"
  fi
}

# 1. The rules file as Prometheus would load it.
run_step "promtool check rules" promtool check rules "${rules_file}"

# 2. Alert unit tests.
shopt -s nullglob
test_files=("${tests_dir}"/*_test.yaml)
shopt -u nullglob
if ((${#test_files[@]} == 0)); then
  failures+=("promtool test rules")
  say "FAILED: no test files in ${tests_dir}"
else
  run_step "promtool test rules" promtool test rules "${test_files[@]}"
fi

# 3. Dashboard structure; writes its expressions into a rules file for step 4.
dashboard_rules="${work_dir}/dashboard-exprs.rules.json"
dashboard_report="${work_dir}/dashboard-report.txt"
check_dashboard() {
  python3 - "${dashboard_file}" "${dashboard_rules}" "${dashboard_report}" <<'PY'
import json
import re
import sys

dashboard_path, rules_path, report_path = sys.argv[1:4]
EXPECTED_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
REQUIRED_VARIABLES = ("datasource", "namespace", "job", "pod")
REQUIRED_ROWS = ("Traffic", "Errors", "Latency", "Ingestion", "Dependencies", "Rate limiting", "Build info")
problems = []

try:
    with open(dashboard_path) as f:
        dashboard = json.load(f)
except (OSError, ValueError) as err:
    print(f"{dashboard_path}: not valid JSON: {err}")
    sys.exit(1)

if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 39:
    problems.append(f"schemaVersion is {dashboard.get('schemaVersion')!r}, want 39 or later")
for key in ("uid", "title"):
    if not dashboard.get(key):
        problems.append(f"dashboard has no {key}")

# Every datasource reference anywhere in the document must be the ${datasource} variable.
def walk(node, path):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and value != EXPECTED_DATASOURCE:
                problems.append(f"{path}.datasource is {json.dumps(value)}, want {json.dumps(EXPECTED_DATASOURCE)}")
            walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            walk(value, f"{path}[{index}]")

walk(dashboard, "$")

# Template variables.
variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
for name in REQUIRED_VARIABLES:
    if name not in variables:
        problems.append(f"templating variable ${name} is missing")
datasource_variable = variables.get("datasource", {})
if datasource_variable and (datasource_variable.get("type") != "datasource" or datasource_variable.get("query") != "prometheus"):
    problems.append("variable $datasource must be of type datasource with query prometheus")

# Panels, including those nested in collapsed rows.
def all_panels(panels):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))

panels = list(all_panels(dashboard.get("panels", [])))
ids = [p.get("id") for p in panels]
seen = set()
for panel in panels:
    panel_id = panel.get("id")
    if not isinstance(panel_id, int):
        problems.append(f"panel {panel.get('title')!r} has no integer id")
    elif panel_id in seen:
        problems.append(f"panel id {panel_id} is used more than once")
    seen.add(panel_id)
row_titles = [p.get("title") for p in panels if p.get("type") == "row"]
for title in REQUIRED_ROWS:
    if title not in row_titles:
        problems.append(f"row {title!r} is missing")

# Collect every PromQL expression with a name that says where it came from.
exprs = []
for panel in panels:
    if panel.get("type") == "row":
        continue
    targets = panel.get("targets", [])
    if not targets:
        problems.append(f"panel {panel.get('id')} {panel.get('title')!r} has no targets")
    for target in targets:
        expr = target.get("expr", "")
        if not expr.strip():
            problems.append(f"panel {panel.get('id')} target {target.get('refId')} has an empty expr")
            continue
        if "$namespace" not in expr:
            problems.append(f"panel {panel.get('id')} target {target.get('refId')} does not filter on $namespace")
        exprs.append((f"panel_{panel.get('id')}_{target.get('refId', 'X')}", expr))
for index, annotation in enumerate(dashboard.get("annotations", {}).get("list", [])):
    if annotation.get("expr"):
        exprs.append((f"annotation_{index}", annotation["expr"]))
for name, variable in variables.items():
    query = variable.get("query")
    if variable.get("type") != "query":
        continue
    if isinstance(query, dict):
        query = query.get("query", "")
    match = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*", query or "")
    if match:
        exprs.append((f"variable_{name}", match.group(1)))
    elif re.fullmatch(r"\s*query_result\((.*)\)\s*", query or ""):
        exprs.append((f"variable_{name}", re.fullmatch(r"\s*query_result\((.*)\)\s*", query).group(1)))
    else:
        problems.append(f"variable ${name}: cannot check query {query!r}")

# Grafana substitutes its variables before sending a query; do the same with harmless values.
def substitute(expr):
    expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}", "5m", expr)
    expr = re.sub(r"\$__(range_s|range_ms|interval_ms)\b", "300", expr)
    expr = re.sub(r"\$\{[A-Za-z0-9_]+(:[A-Za-z]+)?\}|\$[A-Za-z_][A-Za-z0-9_]*", "x", expr)
    return expr

rules = {"groups": [{"name": "dashboard-exprs", "rules": [
    {"record": f"dashboard:{name}", "expr": substitute(expr)} for name, expr in exprs
]}]}
with open(rules_path, "w") as f:
    json.dump(rules, f, indent=1)
with open(report_path, "w") as f:
    f.write(f"{len(panels)} panels, {len(exprs)} exprs\n")

for problem in problems:
    print(problem)
sys.exit(1 if problems else 0)
PY
}
run_step "dashboard structure" check_dashboard

# 4. Every dashboard expression parses.
if [[ -s "${dashboard_rules}" ]]; then
  run_step "dashboard exprs parse" promtool check rules "${dashboard_rules}"
else
  failures+=("dashboard exprs parse")
  say "FAILED: dashboard exprs parse (no expressions were extracted)"
fi

# 5. Runbook: every alert has a section, every runbook_url points at an existing anchor, and
#    every alert appears in the unit tests.
check_runbook() {
  python3 - "${rules_file}" "${runbook_file}" "${test_files[@]}" <<'PY'
import re
import sys

rules_path, runbook_path, *test_paths = sys.argv[1:]
problems = []
rules_text = open(rules_path).read()
alerts = sorted(set(re.findall(r"^\s*-\s*alert:\s*([A-Za-z0-9_]+)", rules_text, re.M)))
alerting_rule_count = len(re.findall(r"^\s*-\s*alert:", rules_text, re.M))
urls = re.findall(r"^\s*runbook_url:\s*[\"']?([^\"'\s]+)", rules_text, re.M)
if len(urls) != alerting_rule_count:
    problems.append(f"{len(urls)} runbook_url annotations for {alerting_rule_count} alerting rules")
try:
    runbook = open(runbook_path).read()
except OSError as err:
    print(f"{runbook_path}: {err}")
    sys.exit(1)

def github_anchor(heading):
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")

anchors = {github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", runbook, re.M)}
anchors |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", runbook))
for alert in alerts:
    if alert.lower() not in anchors:
        problems.append(f"{runbook_path} has no section for {alert} (anchor #{alert.lower()})")
for url in urls:
    if not url.startswith("docs/runbook.md#"):
        problems.append(f"runbook_url {url} does not point into docs/runbook.md")
    elif url.split("#", 1)[1] not in anchors:
        problems.append(f"runbook_url {url}: no such anchor in {runbook_path}")
tested = set()
for path in test_paths:
    tested |= set(re.findall(r"^\s*alertname:\s*([A-Za-z0-9_]+)", open(path).read(), re.M))
for alert in alerts:
    if alert not in tested:
        problems.append(f"alert {alert} has no promtool unit test")
for problem in problems:
    print(problem)
print(f"{len(alerts)} alerts")
sys.exit(1 if problems else 0)
PY
}
run_step "runbook and test coverage" check_runbook

rule_count="$(promtool check rules "${rules_file}" 2>/dev/null | sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p')"
dashboard_summary="$(cat "${dashboard_report}" 2>/dev/null || echo "dashboard unreadable")"
total=$((${#passed[@]} + ${#failures[@]}))
if ((${#failures[@]} > 0)); then
  say "FAIL: ${#failures[@]} of ${total} checks failed (${failures[*]})"
  exit 1
fi
say "OK: ${total} checks passed (${rule_count:-?} rules, ${#test_files[@]} test file(s), dashboard ${dashboard_summary%$'\n'})"
