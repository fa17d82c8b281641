"""Ordering of hooks under Helm and Argo CD, checked statically over rendered manifests.

A hook (a Job run before the release's resources) must not reference an object that the
tool creates later: the Job's pod then waits for a ConfigMap, Secret or ServiceAccount that
does not exist yet and the sync hangs until the Job deadline. For every hook this module
collects what its pod references (ServiceAccount, ConfigMaps, Secrets, and the Service its
POSTGRES_HOST names) and asserts that each referenced object the same render creates is
applied in an earlier phase, or earlier in the same phase (Helm hook weight, Argo CD
sync wave; objects a workload must be ready for need an earlier wave).

Argo CD's handling of Helm charts: it renders with `helm template` and maps
helm.sh/hook pre-install/pre-upgrade -> PreSync, post-install/post-upgrade -> PostSync,
helm.sh/hook-weight -> sync wave, and ignores `test` hooks. Flux runs Helm itself
(helm-controller) and has no hook phases of its own for kustomize (kustomize-controller).
"""

from __future__ import annotations

import pytest

from test_chart import REPO_ROOT, annotations, kustomize, render

HELM_TO_ARGO = {"pre-install": "PreSync", "pre-upgrade": "PreSync",
                "post-install": "PostSync", "post-upgrade": "PostSync"}
ARGO_PHASES = ["PreSync", "Sync", "PostSync"]
WORKLOADS = ("Deployment", "StatefulSet")


def argo_position(doc: dict) -> tuple[int, int] | None:
    """(phase, wave) under Argo CD; None for what Argo CD does not apply (helm test hooks)."""
    meta = annotations(doc)
    if "argocd.argoproj.io/hook" in meta:
        phases = [p.strip() for p in meta["argocd.argoproj.io/hook"].split(",")]
    elif "helm.sh/hook" in meta:
        phases = [HELM_TO_ARGO[h.strip()] for h in meta["helm.sh/hook"].split(",") if h.strip() in HELM_TO_ARGO]
    else:
        phases = ["Sync"]
    if not phases:
        return None
    wave = int(meta.get("argocd.argoproj.io/sync-wave", meta.get("helm.sh/hook-weight", 0)))
    return min(ARGO_PHASES.index(p) for p in phases), wave


def helm_position(doc: dict) -> tuple[int, int] | None:
    """(phase, weight) under `helm install`: pre-install hooks, then the release's objects."""
    meta = annotations(doc)
    hooks = [h.strip() for h in meta.get("helm.sh/hook", "").split(",") if h.strip()]
    if not hooks:
        return 1, 0
    if "pre-install" in hooks:
        return 0, int(meta.get("helm.sh/hook-weight", 0))
    return None  # test and post hooks run after everything exists


def is_argo_hook(doc: dict) -> bool:
    meta = annotations(doc)
    return "argocd.argoproj.io/hook" in meta or any(
        h.strip() in HELM_TO_ARGO for h in meta.get("helm.sh/hook", "").split(","))


def is_helm_hook(doc: dict) -> bool:
    return "pre-install" in annotations(doc).get("helm.sh/hook", "")


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] in ("Job",) + WORKLOADS:
        return doc["spec"]["template"]["spec"]
    return None


def references(doc: dict, docs: list[dict]) -> list[tuple[str, str, bool]]:
    """(kind, name, needs_ready) of every object the pod of `doc` uses."""
    spec = pod_spec(doc)
    found: list[tuple[str, str, bool]] = []
    if spec is None:
        return found
    if spec.get("serviceAccountName"):
        found.append(("ServiceAccount", spec["serviceAccountName"], False))
    for secret in spec.get("imagePullSecrets", []):
        found.append(("Secret", secret["name"], False))
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            found.append(("Secret", volume["secret"]["secretName"], False))
        if "configMap" in volume:
            found.append(("ConfigMap", volume["configMap"]["name"], False))
    postgres_hosts = []
    for container in spec.get("initContainers", []) + spec["containers"]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                found.append(("ConfigMap", source["configMapRef"]["name"], False))
                config_map = next((d for d in docs if d["kind"] == "ConfigMap"
                                   and d["metadata"]["name"] == source["configMapRef"]["name"]), None)
                if config_map:
                    postgres_hosts.append(config_map.get("data", {}).get("POSTGRES_HOST", ""))
            if "secretRef" in source:
                found.append(("Secret", source["secretRef"]["name"], False))
        for variable in container.get("env", []):
            value_from = variable.get("valueFrom", {})
            if "secretKeyRef" in value_from:
                found.append(("Secret", value_from["secretKeyRef"]["name"], False))
            if "configMapKeyRef" in value_from:
                found.append(("ConfigMap", value_from["configMapKeyRef"]["name"], False))
            if variable["name"] == "POSTGRES_HOST" and "value" in variable:
                postgres_hosts.append(variable["value"])
    # The database the hook migrates: a Service of the same render (and the pods behind it)
    # must be up before the hook runs.
    for host in postgres_hosts:
        service_name = host.split(".")[0]
        for service in (d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == service_name):
            found.append(("Service", service_name, True))
            selector = service["spec"].get("selector") or {}
            for workload in (d for d in docs if d["kind"] in WORKLOADS):
                labels = workload["spec"]["template"]["metadata"].get("labels", {})
                if selector and all(labels.get(k) == v for k, v in selector.items()):
                    found.append((workload["kind"], workload["metadata"]["name"], True))
    return found


def ordering_violations(docs: list[dict], position, is_hook) -> list[str]:
    violations = []
    for hook in (d for d in docs if is_hook(d)):
        hook_at = position(hook)
        for kind, name, needs_ready in references(hook, docs):
            target = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)
            if target is None:
                continue  # created outside this render (an existing Secret, say)
            target_at = position(target)
            label = f"{hook['kind']} {hook['metadata']['name']} uses {kind} {name}"
            if target_at is None:
                violations.append(f"{label}, which the tool never applies before it")
            elif target_at[0] > hook_at[0]:
                violations.append(f"{label}, created in a later phase ({target_at} > {hook_at})")
            elif target_at[0] == hook_at[0] and target_at[1] > hook_at[1]:
                violations.append(f"{label}, created in a later wave ({target_at} > {hook_at})")
            elif target_at == hook_at and (needs_ready or kind == hook["kind"]):
                violations.append(f"{label}, in the same wave: it is not ready when the hook starts")
    return violations


CHART_RENDERS = {
    "defaults": dict(),
    "hook-chart-secrets": dict(sets=("postgres.auth.password=x", "migrations.auth.password=y")),
    "job": dict(sets=("migrations.mode=job",)),
    "production": dict(values=["ci/production-values.yaml"]),
    "migrations-job": dict(values=["ci/migrations-job-values.yaml"]),
    "extensions": dict(values=["ci/extensions-values.yaml"]),
    "cloudnativepg": dict(values=["ci/cloudnativepg-values.yaml"]),
}


@pytest.mark.parametrize("name", sorted(CHART_RENDERS))
def test_chart_hooks_reference_only_what_exists_before_them_under_helm(name):
    options = CHART_RENDERS[name]
    docs = render(*options.get("sets", ()), values=options.get("values"))
    assert not ordering_violations(docs, helm_position, is_helm_hook)


@pytest.mark.parametrize("name", sorted(CHART_RENDERS))
def test_chart_hooks_reference_only_what_exists_before_them_under_argo_cd(name):
    options = CHART_RENDERS[name]
    docs = render(*options.get("sets", ()), values=options.get("values"))
    assert not ordering_violations(docs, argo_position, is_argo_hook)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_kustomize_hooks_reference_only_what_exists_before_them_under_argo_cd(overlay):
    docs = kustomize(f"k8s/overlays/{overlay}")
    assert not ordering_violations(docs, argo_position, is_argo_hook)


def test_the_ordering_check_catches_a_hook_that_reads_a_later_config_map():
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {}},
        {"apiVersion": "batch/v1", "kind": "Job",
         "metadata": {"name": "migrate", "annotations": {"argocd.argoproj.io/hook": "PreSync"}},
         "spec": {"template": {"spec": {"containers": [
             {"name": "m", "envFrom": [{"configMapRef": {"name": "settings"}}]}]}}}},
    ]
    assert ordering_violations(docs, argo_position, is_argo_hook)


def test_the_ordering_check_catches_a_hook_reading_an_extra_object():
    docs = render("migrations.mode=hook", values=["ci/extensions-values.yaml"])
    violations = ordering_violations(docs, helm_position, is_helm_hook)
    assert any("analytics-service-extra-env" in violation for violation in violations), violations


def test_kustomize_migration_job_runs_under_argo_cd_and_flux():
    for overlay in ("dev", "prod"):
        job = next(d for d in kustomize(f"k8s/overlays/{overlay}") if d["kind"] == "Job")
        meta = annotations(job)
        # Argo CD: a Sync-phase hook, re-created on each sync, after its dependencies' wave.
        assert meta["argocd.argoproj.io/hook"] == "Sync"
        assert meta["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
        # Flux: a plain resource, re-created when an immutable field (the image) changes.
        assert meta["kustomize.toolkit.fluxcd.io/force"] == "enabled"


def test_deploy_docs_have_the_tool_by_mode_table():
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = next(line for line in rows if "Install" in line and "Upgrade" in line and "Rollback" in line)
    assert header
    for tool in ("Helm", "Argo CD", "Flux"):
        for mode in ("`hook`", "`job`", "`external`"):
            assert any(line.startswith(f"| {tool} ") and mode in line for line in rows), (tool, mode)
