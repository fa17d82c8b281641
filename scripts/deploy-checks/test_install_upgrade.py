"""What a real cluster and a real GitOps tool do with the rendered objects, asserted over
`helm template` and `kubectl kustomize` output: Kubernetes version floor, immutable Job
names, hook ordering under Helm and Argo CD, one configuration source for the server and
the migration Job, sizing that cannot deadlock, labels without duplicate keys.

Run: .tools/venv/bin/pytest -q scripts/deploy-checks   (after source scripts/tools-env.sh)
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from test_chart import (
    CHART, NAMESPACE, RELEASE, REPO_ROOT, annotations, deployment, find, helm_template,
    kustomize, migration_jobs, one, render, render_error, server_container,
)

CREDENTIAL_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "REDIS_PASSWORD"}
OLDEST_KUBERNETES = "1.30.0"


# --- Kubernetes version floor -------------------------------------------------------------------

def chart_metadata() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def test_chart_requires_the_kubernetes_version_of_the_native_prestop_sleep():
    assert chart_metadata()["kubeVersion"] == ">=1.30.0-0"
    helm_template(kube_version=OLDEST_KUBERNETES)
    error = render_error(kube_version="1.29.9")
    assert "kubeVersion" in error or "incompatible" in error, error


def test_docs_state_one_supported_range_and_no_older_one():
    for path in ("docs/deploy.md", "README.md", "helm/analytics-service/values.yaml",
                 "k8s/base/kustomization.yaml"):
        text = (REPO_ROOT / path).read_text()
        # Not after "/ ": the benchmark tables' measurement pairs ("3.24 / 1.28" ms).
        assert not re.search(r"(?<![0-9.])(?<!/ )1\.2[789]\b", text), f"{path} still mentions Kubernetes 1.27-1.29"
    assert "Kubernetes >= 1.30" in (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert "Kubernetes >= 1.30" in (REPO_ROOT / "k8s" / "base" / "kustomization.yaml").read_text()


def test_check_deploy_validates_at_both_ends_of_the_range():
    script = (REPO_ROOT / "scripts" / "check-deploy.sh").read_text()
    assert "--kube-version" in script
    assert "kubeVersion" in script, "the oldest version must be read from Chart.yaml"
    assert "latest_version" in script, "the newest version must be the newest kubernetes-validate knows"
    assert "1.29" not in script


# --- Immutable Job names -------------------------------------------------------------------------

def copy_chart_with_version(tmp_path: Path, version: str) -> Path:
    target = tmp_path / "analytics-service"
    shutil.copytree(CHART, target)
    chart_yaml = target / "Chart.yaml"
    chart_yaml.write_text(re.sub(r"^version: .*$", f"version: {version}", chart_yaml.read_text(), flags=re.M))
    return target


def job_mode_job(*sets: str, **kwargs) -> dict:
    jobs = migration_jobs(render("migrations.mode=job", *sets, **kwargs))
    assert len(jobs) == 1
    return jobs[0]


@pytest.mark.parametrize(
    "change",
    [
        ("config.logLevel=debug",),
        ("postgres.host=elsewhere.example.com",),
        ("migrations.resources.limits.cpu=2",),
        ("commonLabels.team=payments",),
        ("config.selfTracking=false",),
        ("config.eventMaxAgeDays=7",),
    ],
)
def test_job_mode_name_changes_whenever_the_job_spec_changes(change):
    before = job_mode_job()
    after = job_mode_job(*change)
    assert before["spec"] != after["spec"], f"{change} should change the Job spec"
    assert before["metadata"]["name"] != after["metadata"]["name"], \
        f"{change} changes the immutable Job spec but keeps the name: upgrades fail with 'field is immutable'"


def test_job_mode_name_changes_with_the_chart_version(tmp_path):
    before = job_mode_job()
    after = job_mode_job(chart=copy_chart_with_version(tmp_path, "9.9.9"))
    assert before["spec"] != after["spec"]
    assert before["metadata"]["name"] != after["metadata"]["name"]


def test_job_mode_name_is_stable_for_unchanged_values():
    assert job_mode_job()["metadata"]["name"] == job_mode_job()["metadata"]["name"]
    # Settings that do not reach the Job's spec keep the finished Job.
    assert job_mode_job("replicaCount=5")["metadata"]["name"] == job_mode_job()["metadata"]["name"]


# --- Image tag -----------------------------------------------------------------------------------

def test_numeric_image_tag_is_refused(tmp_path):
    values = tmp_path / "numeric-tag.yaml"
    values.write_text("image:\n  tag: 1.10\n")
    error = render_error(values=[str(values)])
    assert "image" in error and "tag" in error, error
    quoted = tmp_path / "quoted-tag.yaml"
    quoted.write_text('image:\n  tag: "1.10"\n')
    assert server_container(render(values=[str(quoted)]))["image"].endswith(":1.10")


# --- One configuration source for the server and the migration Job ---------------------------

def effective_env(docs: list[dict], container: dict) -> dict:
    env = {}
    for source in container.get("envFrom", []):
        config_map = one(docs, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map["data"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", variable.get("valueFrom"))
    return env


@pytest.mark.parametrize("mode", ["hook", "job"])
@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("config.selfTracking=false", "config.eventMaxAgeDays=7", "config.eventRetentionDays=90"),
        ("postgres.sslMode=require", "config.logFormat=text", "config.otel.endpoint=http://collector:4317"),
    ],
)
def test_migration_job_sees_every_setting_the_server_sees(mode, sets):
    docs = render(f"migrations.mode={mode}", *sets)
    server = effective_env(docs, server_container(docs))
    job = effective_env(docs, migration_jobs(docs)[0]["spec"]["template"]["spec"]["containers"][0])
    differing = {
        name: (value, job.get(name)) for name, value in server.items()
        if name not in CREDENTIAL_ENV and job.get(name) != value
    }
    assert not differing, f"the migration Job disagrees with the server: {differing}"


# --- Sizing that deadlocks -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "sets",
    [
        ("replicaCount=2", "podDisruptionBudget.minAvailable=2"),
        ("replicaCount=3", "podDisruptionBudget.minAvailable=4"),
        ("replicaCount=3", "podDisruptionBudget.minAvailable=100%"),
        ("autoscaling.enabled=true", "autoscaling.minReplicas=3", "podDisruptionBudget.minAvailable=3"),
    ],
)
def test_pdb_that_blocks_every_drain_is_refused(sets):
    error = render_error(*sets)
    assert "podDisruptionBudget.minAvailable" in error, error


def test_pdb_that_leaves_room_renders():
    for sets in (("replicaCount=3", "podDisruptionBudget.minAvailable=2"),
                 ("replicaCount=3", "podDisruptionBudget.minAvailable=50%"),
                 ("autoscaling.enabled=true", "autoscaling.minReplicas=3", "podDisruptionBudget.minAvailable=2")):
        one(render(*sets), "PodDisruptionBudget")


def test_hpa_without_a_cpu_request_is_refused():
    for unset in ('resources.requests=null', 'resources.requests.cpu=null'):
        error = render_error("autoscaling.enabled=true", set_json=[unset])
        assert "resources.requests.cpu" in error, error
    # Without the CPU metric, no request is needed.
    render("autoscaling.enabled=true",
           set_json=['resources.requests=null', 'autoscaling.targetCPUUtilizationPercentage=null'])


def test_default_resources_have_requests():
    assert server_container(render())["resources"]["requests"]["cpu"]


# --- Labels ----------------------------------------------------------------------------------------

def test_labels_the_chart_sets_too_are_merged_not_duplicated():
    docs = render("commonLabels.app\\.kubernetes\\.io/part-of=platform",
                  "podLabels.app\\.kubernetes\\.io/version=pinned", "podLabels.team=payments",
                  "service.labels.app\\.kubernetes\\.io/part-of=edge")
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] in ("platform", "edge"), doc["kind"]
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/version"] == "pinned" and pod_labels["team"] == "payments"
    assert one(docs, "Service", RELEASE)["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edge"


@pytest.mark.parametrize("key", ["app.kubernetes.io/name", "app.kubernetes.io/instance",
                                 "app.kubernetes.io/component", "app.kubernetes.io/managed-by"])
def test_labels_that_selectors_or_helm_rely_on_cannot_be_overridden(key):
    escaped = key.replace(".", "\\.")
    for field in ("commonLabels", "podLabels"):
        error = render_error(f"{field}.{escaped}=other")
        assert field in error and key in error, error


# --- Hooks: cleanup and timeout ----------------------------------------------------------------

def test_hook_service_account_is_deleted_after_the_hooks_succeed():
    docs = render()
    account = one(docs, "ServiceAccount", f"{RELEASE}-migrate")
    policy = annotations(account)["helm.sh/hook-delete-policy"].split(",")
    assert "hook-succeeded" in policy and "before-hook-creation" in policy


def test_hook_deadline_fits_helms_default_timeout():
    job = migration_jobs(render())[0]
    assert job["spec"]["activeDeadlineSeconds"] <= 300, "helm's default --timeout is 5m"
    deploy_docs = (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert "--timeout" in deploy_docs and "activeDeadlineSeconds" in deploy_docs


def test_job_mode_job_is_never_garbage_collected_under_a_gitops_tool():
    job = job_mode_job()
    assert "ttlSecondsAfterFinished" not in job["spec"], \
        "a TTL deletes a tracked resource: Argo CD shows it Missing and self-heal re-runs it"
    assert "ttlSecondsAfterFinished" not in one(kustomize("k8s/overlays/prod"), "Job")["spec"]


# --- Scanner hygiene and skipped checks ----------------------------------------------------------

@pytest.mark.parametrize("values", ["ci/defaults-values.yaml", "ci/dev-values.yaml", "ci/production-values.yaml",
                                    "ci/migrations-job-values.yaml", "ci/cert-manager-values.yaml"])
def test_rendered_manifests_carry_no_scanner_annotations(values):
    for doc in render(values=[values]):
        for owner in (doc, (doc.get("spec") or {}).get("template") or {}):
            meta = (owner.get("metadata") or {}).get("annotations") or {}
            assert not [key for key in meta if key.startswith("checkov.io/")], (doc["kind"], doc["metadata"]["name"])


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_kustomize_manifests_carry_no_scanner_annotations(overlay):
    for doc in kustomize(f"k8s/overlays/{overlay}"):
        assert not [key for key in annotations(doc) if key.startswith("checkov.io/")], doc["metadata"]["name"]


def test_production_renders_pin_the_image_and_enable_network_policy():
    # What the project's checkov skips (CKV_K8S_43, CKV2_K8S_6) would otherwise hide.
    docs = render(values=["ci/production-values.yaml"])
    assert "@sha256:" in server_container(docs)["image"]
    assert find(docs, "NetworkPolicy")
    prod = kustomize("k8s/overlays/prod")
    assert "@sha256:" in one(prod, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert [d for d in prod if d["kind"] == "NetworkPolicy"]


def run_validate_crs(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(helm_template("serviceMonitor.enabled=true"))
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["DEPLOY_CRDS_DIR"] = str(tmp_path / "no-such-folder")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [os.environ.get("TOOLS_PYTHON", "python3"), str(REPO_ROOT / "scripts" / "deploy-checks" / "validate_crs.py"),
         str(tmp_path / "core"), str(rendered)],
        capture_output=True, text=True, env=env, check=False)


def test_missing_crds_fail_in_ci_and_skip_locally_never_pass(tmp_path):
    local = run_validate_crs(tmp_path, ci=None)
    assert local.returncode == 3 and "SKIPPED" in local.stdout, local.stdout
    assert (tmp_path / "core" / "rendered.yaml").exists(), "built-in kinds are still written out"
    in_ci = run_validate_crs(tmp_path, ci="true")
    assert in_ci.returncode == 1 and "FAIL" in in_ci.stdout, in_ci.stdout


def test_check_deploy_reports_a_skipped_check_as_skip():
    script = (REPO_ROOT / "scripts" / "check-deploy.sh").read_text()
    run_check = re.search(r"^readonly SKIPPED=3\n\nrun_check\(\) \{.*?^\}\n", script, re.M | re.S).group(0)
    result = subprocess.run(
        ["bash", "-c", "declare -a summary=(); failed=0\n" + run_check
         + "run_check skipped bash -c 'exit 3'\nrun_check passed true\nrun_check failed false\n"
           "printf '%s\\n' \"${summary[@]}\"; echo \"failed=${failed}\""],
        capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert any(line.startswith("SKIP  skipped") for line in lines), lines
    assert not any(line.startswith("PASS  skipped") for line in lines), lines
    assert any(line.startswith("PASS  passed") for line in lines)
    assert any(line.startswith("FAIL  failed") for line in lines)
    assert lines[-1] == "failed=1"


# --- NetworkPolicy: DNS and the OTLP collector ---------------------------------------------------

def server_policy(*sets: str, **kwargs) -> dict:
    return one(render("networkPolicy.enabled=true", *sets, **kwargs), "NetworkPolicy", RELEASE)


def test_dns_egress_covers_kube_dns_and_node_local_dns_cache_by_default():
    dns = server_policy()["spec"]["egress"][0]
    assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in dns["to"], "NodeLocal DNSCache"
    assert any(peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"} for peer in dns["to"])


def test_dns_egress_is_configurable_for_openshift():
    openshift = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}},
                  "podSelector": {"matchLabels": {"dns.operator.openshift.io/daemonset-dns": "default"}}}]
    dns = server_policy(set_json=[f"networkPolicy.egress.dns.to={json.dumps(openshift)}",
                                  "networkPolicy.egress.dns.ports=[5353]"])["spec"]["egress"][0]
    assert dns["to"] == openshift
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 5353), ("TCP", 5353)}


@pytest.mark.parametrize("endpoint, port", [("http://otel-collector.observability:4317", 4317),
                                            ("https://collector.example.com:4443", 4443),
                                            ("http://otel-collector", 4317)])
def test_otlp_egress_port_follows_the_endpoint(endpoint, port):
    egress = server_policy(f"config.otel.endpoint={endpoint}")["spec"]["egress"]
    assert {("TCP", port)} in [{(p["protocol"], p["port"]) for p in rule.get("ports", [])} for rule in egress]


def test_no_otlp_egress_without_an_endpoint():
    egress = server_policy()["spec"]["egress"]
    assert len(egress) == 3, egress  # DNS, PostgreSQL, Redis


# --- Escape hatches and exposure ---------------------------------------------------------------

def test_escape_hatches_reach_the_pod():
    docs = render(values=["ci/extensions-values.yaml"])
    pod = deployment(docs)["spec"]["template"]
    spec = pod["spec"]
    assert pod["metadata"]["annotations"]["reloader.stakater.com/auto"] == "true"
    assert pod["metadata"]["labels"]["team"] == "analytics"
    assert [c["name"] for c in spec["initContainers"]] == ["wait-for-schema", "announce"]
    assert [c["name"] for c in spec["containers"]] == ["analytics-service", "sidecar"]
    sidecar = spec["containers"][1]
    assert sidecar["image"] == "ghcr.io/haunted-saas/analytics-service:0.1.0", "templates in extraContainers"
    assert sidecar["args"][-1] == "127.0.0.1:50051"
    assert {v["name"] for v in spec["volumes"]} >= {"scratch", "extra-ca"}
    mounts = {m["name"]: m["mountPath"] for m in server_container(docs)["volumeMounts"]}
    assert mounts["scratch"] == "/tmp" and mounts["extra-ca"] == "/etc/analytics-service/extra-ca"
    extra_env = {"configMapRef": {"name": "analytics-service-extra-env"}}
    assert extra_env in server_container(docs)["envFrom"]
    assert extra_env in spec["initContainers"][0]["envFrom"]
    assert extra_env in migration_jobs(docs)[0]["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    objects = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    assert objects["analytics-service-extra-ca"]["metadata"]["namespace"] == NAMESPACE
    assert objects["analytics-service-extra-env"]["data"] == {"EXTRA_FLAG": "1"}
    assert one(docs, "Service", RELEASE)["metadata"]["annotations"]["service.example.com/owner"] == "analytics"


def test_grpc_route_targets_the_grpc_port():
    route = one(render(values=["ci/extensions-values.yaml"]), "GRPCRoute", RELEASE)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"][0]["name"] == "edge"
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": RELEASE, "port": 50051}]
    assert "grpcRoute.parentRefs" in render_error("grpcRoute.enabled=true")


def test_ingress_speaks_grpc_to_the_pods_through_ingress_nginx():
    docs = render(values=["ci/extensions-values.yaml"])
    ingress = one(docs, "Ingress", RELEASE)
    assert annotations(ingress)["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": RELEASE, "port": {"name": "grpc"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "analytics-grpc-ingress-tls"
    mtls = one(render("ingress.enabled=true", "ingress.hosts={a.example.com}", "tls.enabled=true",
                      "tls.existingSecret=tls"), "Ingress", RELEASE)
    assert annotations(mtls)["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert "ingress.hosts" in render_error("ingress.enabled=true")


def test_validate_crs_checks_gateway_api_routes(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "deploy-checks"))
    import validate_crs  # noqa: E402 (a script beside the tests, not a package)
    assert not validate_crs.is_builtin("gateway.networking.k8s.io/v1")
    assert validate_crs.is_builtin("networking.k8s.io/v1") and validate_crs.is_builtin("apps/v1")
    crds = Path(os.environ.get("DEPLOY_CRDS_DIR", REPO_ROOT.parent / "shared" / "crds"))
    if not (crds / "gateway.networking.k8s.io_grpcroutes.yaml").exists():
        crds = Path("/work/shared/crds")
    schemas = validate_crs.load_crd_schemas(crds)
    schema = schemas[("gateway.networking.k8s.io", "v1", "GRPCRoute")]
    route = one(render(values=["ci/extensions-values.yaml"]), "GRPCRoute", RELEASE)
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(route))
    broken = copy.deepcopy(route)
    broken["spec"]["rules"][0]["backendRefs"][0]["prot"] = 1
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


# --- CloudNativePG ---------------------------------------------------------------------------------

def test_cloudnativepg_cluster_is_consumed_directly():
    docs = render("cloudnativePG.enabled=true", "cloudnativePG.clusterName=analytics-db", "networkPolicy.enabled=true")
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["POSTGRES_HOST"] == "analytics-db-rw" and data["POSTGRES_DB"] == "app"
    env = {e["name"]: e for e in server_container(docs)["env"]}
    assert env["POSTGRES_USER"]["valueFrom"]["secretKeyRef"] == {"name": "analytics-db-app", "key": "username"}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "analytics-db-app", "key": "password"}
    job_env = {e["name"]: e for e in migration_jobs(docs)[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "analytics-db-app"
    assert not find(docs, "Secret", f"{RELEASE}-migrate-credentials")
    postgres_rule = one(docs, "NetworkPolicy", RELEASE)["spec"]["egress"][1]
    assert postgres_rule["to"] == [{"podSelector": {"matchLabels": {"cnpg.io/cluster": "analytics-db"}}}]
    assert "cloudnativePG.clusterName" in render_error("cloudnativePG.enabled=true")


def test_cloudnativepg_pooler():
    docs = render(values=["ci/cloudnativepg-values.yaml"])
    assert one(docs, "ConfigMap", RELEASE)["data"]["POSTGRES_HOST"] == "analytics-db-pooler-rw"
    postgres_rule = one(docs, "NetworkPolicy", RELEASE)["spec"]["egress"][1]
    assert postgres_rule["to"] == [{"podSelector": {"matchLabels": {"cnpg.io/poolerName": "analytics-db-pooler-rw"}}}]


# --- Dockerfile ------------------------------------------------------------------------------------

def test_dockerfile_pins_every_base_image_by_digest():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    external = [line.split()[1] for line in dockerfile.splitlines()
                if line.startswith("FROM ") and "/" in line.split()[1]]
    assert len(external) >= 3, external
    for image in external:
        assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", image), f"{image} is not pinned by tag and digest"
    assert "imagetools inspect" in dockerfile, "the bump procedure is documented next to the pins"


def test_dockerfile_healthcheck_uses_the_binary_in_exec_form():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.rindex("\nFROM "):]
    match = re.search(r"^HEALTHCHECK [^\n]*(?:\\\n[^\n]*)*?CMD (\[[^\n]*\])$", runtime, re.M)
    assert match, "the runtime stage has no HEALTHCHECK"
    command = json.loads(match.group(1))
    assert command[:2] == ["/usr/local/bin/analytics-service", "healthcheck"], command


def test_image_metadata_is_reproducible():
    for path in ("Dockerfile", "docs/deploy.md", "README.md"):
        text = (REPO_ROOT / path).read_text()
        assert not re.search(r"CREATED=\"?\$\(date", text), f"{path} stamps the build time"
    assert "git log -1" in (REPO_ROOT / "docs" / "deploy.md").read_text()
