"""Unit tests of the Helm chart's templates, over `helm template` output, plus the
consistency of the Dockerfile, scripts/build-release.sh and the kustomize base with it.

Run: .tools/venv/bin/pytest -q scripts/deploy-checks/test_chart.py   (helm and kubectl on
PATH: source scripts/tools-env.sh). scripts/check-deploy.sh runs it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "analytics-service"
RELEASE = "analytics-service"
NAMESPACE = "analytics"

# The binary's environment contract, read from its source of truth: every field of a
# `Raw*` struct (what envy deserializes) in src/config/ is the lower-case name of one variable.
def config_rs_variables() -> list[str]:
    names: set[str] = set()
    for path in sorted((REPO_ROOT / "src" / "config").glob("*.rs")):
        source = path.read_text()
        for body in re.findall(r"struct Raw\w* \{\n(.*?)\n\s*\}\n", source, flags=re.DOTALL):
            names.update(re.findall(r"^\s+(\w+):", body, flags=re.MULTILINE))
    return sorted(name.upper() for name in names)


# Variables the chart exposes ahead of the binary (ingestion and security settings).
PLANNED_ENV = """
TLS_CERT_FILE TLS_KEY_FILE TLS_CLIENT_CA_FILE TLS_ALLOWED_CALLERS PII_FIELDS PII_KEYS_FILE
INGEST_BATCH_SIZE INGEST_LINGER_MS INGEST_QUEUE_CAPACITY
""".split()

CONTRACT_ENV = sorted(set(config_rs_variables()) | set(PLANNED_ENV))

# Variables that come from Secrets rather than plain configuration.
SECRET_ENV = {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "OTEL_EXPORTER_OTLP_HEADERS"}


RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


class RenderError(Exception):
    pass


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that rejects duplicate mapping keys, as the API server does."""


def _construct_unique_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_all(text: str) -> list[dict]:
    return [doc for doc in yaml.load_all(text, Loader=StrictLoader) if doc]


def helm_template(*sets: str, values: list[str] | None = None, set_json: list[str] | None = None,
                  chart: Path = CHART, kube_version: str | None = None) -> str:
    command = ["helm", "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    if kube_version:
        command += ["--kube-version", kube_version]
    for value_file in values or []:
        command += ["--values", str(value_file if Path(value_file).is_absolute() else CHART / value_file)]
    for assignment in sets:
        command += ["--set", assignment]
    for assignment in set_json or []:
        command += ["--set-json", assignment]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return result.stdout


def render(*sets: str, **kwargs) -> list[dict]:
    return load_all(helm_template(*sets, **kwargs))


def render_error(*sets: str, **kwargs) -> str:
    with pytest.raises(RenderError) as failure:
        helm_template(*sets, **kwargs)
    return str(failure.value)


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        doc for doc in docs
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = find(docs, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def deployment(docs: list[dict]) -> dict:
    return one(docs, "Deployment", RELEASE)


def server_container(docs: list[dict]) -> dict:
    containers = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "analytics-service")


def migration_jobs(docs: list[dict]) -> list[dict]:
    return [
        doc for doc in find(docs, "Job")
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "migrations"
    ]


def annotations(doc: dict) -> dict:
    return doc["metadata"].get("annotations") or {}


# --- Migrations ------------------------------------------------------------------------------

def job_name(*sets: str) -> str:
    jobs = migration_jobs(render("migrations.mode=job", *sets))
    assert len(jobs) == 1
    return jobs[0]["metadata"]["name"]


def test_job_mode_name_carries_a_hash_that_changes_with_the_image_tag():
    first = job_name("image.tag=1.0.0")
    assert re.fullmatch(rf"{RELEASE}-migrate-[0-9a-f]{{10}}", first), first
    assert job_name("image.tag=1.0.0") == first, "the name must be deterministic"
    assert job_name("image.tag=1.0.1") != first


def test_job_mode_name_changes_with_digest_and_revision_and_fits_a_dns_label():
    base = job_name("image.tag=1.0.0")
    digest = "sha256:" + "a" * 64
    assert job_name("image.tag=1.0.0", f"image.digest={digest}") != base
    assert job_name("image.tag=1.0.0", "migrations.revision=2") != base
    long_name = job_name("fullnameOverride=" + "x" * 80)
    assert len(long_name) <= 63


def test_job_mode_job_is_a_plain_resource_with_limits():
    job = migration_jobs(render("migrations.mode=job"))[0]
    assert not any(key.startswith("helm.sh/hook") for key in annotations(job))
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    assert spec["activeDeadlineSeconds"] == 300
    assert "ttlSecondsAfterFinished" not in spec
    assert spec["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_hook_mode_runs_pre_install_and_pre_upgrade_only():
    docs = render()  # hook is the default mode
    job = one(migration_jobs(docs), "Job", f"{RELEASE}-migrate")
    hook_annotations = annotations(job)
    assert hook_annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "post-" not in hook_annotations["helm.sh/hook"]
    assert hook_annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    # Everything the hook Job needs is itself a hook with a lower weight (it must exist first).
    for kind, name in (("ServiceAccount", f"{RELEASE}-migrate"), ("Secret", f"{RELEASE}-migrate-credentials"),
                       ("ConfigMap", f"{RELEASE}-migrate-config")):
        dependency = one(docs, kind, name)
        assert annotations(dependency)["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(annotations(dependency)["helm.sh/hook-weight"]) < int(hook_annotations["helm.sh/hook-weight"])
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-migrate-credentials"
    # A pre-install hook cannot read the release's ConfigMap (it does not exist yet): it reads
    # the hook copy, whose data is the same.
    env_from = job["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from[0] == {"configMapRef": {"name": f"{RELEASE}-migrate-config"}}
    assert one(docs, "ConfigMap", f"{RELEASE}-migrate-config")["data"] == one(docs, "ConfigMap", RELEASE)["data"]


def test_no_template_uses_post_hooks():
    for values in ("ci/production-values.yaml", "ci/migrations-job-values.yaml", "ci/defaults-values.yaml"):
        for doc in render(values=[values]):
            hook = annotations(doc).get("helm.sh/hook", "")
            assert "post-" not in hook, (doc["kind"], doc["metadata"]["name"], hook)


def test_hook_mode_with_existing_secrets_renders_no_credentials_copy():
    docs = render(
        "postgres.auth.existingSecret=app-db",
        "migrations.auth.existingSecret=owner-db",
        "migrations.auth.usernameKey=username",
    )
    assert not find(docs, "Secret", f"{RELEASE}-migrate-credentials")
    job = migration_jobs(docs)[0]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "owner-db"
    assert env["POSTGRES_USER"]["valueFrom"]["secretKeyRef"] == {"name": "owner-db", "key": "username"}


def test_job_mode_with_own_ddl_credentials_uses_its_own_secret_and_service_account():
    docs = render(values=["ci/migrations-job-values.yaml"])
    job = migration_jobs(docs)[0]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{RELEASE}-migrate"
    assert pod["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POSTGRES_USER"]["value"] == "analytics_owner"
    secret = one(docs, "Secret", f"{RELEASE}-migrate-credentials")
    assert "helm.sh/hook" not in annotations(secret)
    runtime_env = {e["name"]: e for e in server_container(docs)["env"]}
    assert runtime_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-credentials"


def test_external_mode_renders_no_job_but_pods_still_wait_for_the_schema():
    docs = render("migrations.mode=external")
    assert not migration_jobs(docs)
    init = deployment(docs)["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["args"] == ["migrate", "--check", "--wait-seconds", "300"]
    assert init[0]["securityContext"] == server_container(docs)["securityContext"]


# --- PodDisruptionBudget -----------------------------------------------------------------------

def pdbs(*sets: str) -> list[dict]:
    return find(render(*sets), "PodDisruptionBudget")


def test_pdb_only_with_more_than_one_pod():
    assert not pdbs("replicaCount=1")
    assert len(pdbs("replicaCount=2")) == 1
    assert not pdbs("replicaCount=3", "autoscaling.enabled=true", "autoscaling.minReplicas=1")
    assert len(pdbs("replicaCount=1", "autoscaling.enabled=true", "autoscaling.minReplicas=2")) == 1
    assert not pdbs("podDisruptionBudget.enabled=false")


def test_pdb_sets_exactly_one_budget_field_and_the_eviction_policy():
    default = pdbs()[0]["spec"]
    assert default["maxUnavailable"] == 1 and "minAvailable" not in default
    assert default["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    min_available = pdbs("podDisruptionBudget.minAvailable=50%")[0]["spec"]
    assert min_available["minAvailable"] == "50%" and "maxUnavailable" not in min_available
    max_unavailable = pdbs("podDisruptionBudget.maxUnavailable=2")[0]["spec"]
    assert max_unavailable["maxUnavailable"] == 2 and "minAvailable" not in max_unavailable


def test_pdb_render_fails_when_both_fields_are_set():
    error = render_error("podDisruptionBudget.minAvailable=1", "podDisruptionBudget.maxUnavailable=1")
    assert "not both" in error


# --- Probes, lifecycle, security -----------------------------------------------------------------

def test_probes_use_http_on_the_admin_port_even_with_mtls():
    for docs in (render(), render(values=["ci/cert-manager-values.yaml"])):
        container = server_container(docs)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": 50051, "http-metrics": 9090}
        paths = {}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http_get = container[probe]["httpGet"]
            assert http_get["port"] == "http-metrics"
            assert "scheme" not in http_get or http_get["scheme"] == "HTTP"
            paths[probe] = http_get["path"]
        assert paths == {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}


def test_admin_port_value_moves_probes_and_config_together():
    docs = render("service.adminPort=9191")
    container = server_container(docs)
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["http-metrics"] == 9191
    assert one(docs, "ConfigMap", RELEASE)["data"]["PROMETHEUS_PORT"] == "9191"


def test_prestop_sleep_and_grace_period_are_consistent():
    docs = render()
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert server_container(docs)["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert pod["terminationGracePeriodSeconds"] == 30
    assert one(docs, "ConfigMap", RELEASE)["data"]["SHUTDOWN_DRAIN_SECONDS"] == "15"
    # The boundary: 10 + 20 + 5 == 35 renders.
    render("preStopSleepSeconds=10", "shutdownDrainSeconds=20", "terminationGracePeriodSeconds=35")
    assert "lifecycle" not in server_container(render("preStopSleepSeconds=0"))


@pytest.mark.parametrize(
    "sets",
    [
        ("terminationGracePeriodSeconds=20",),
        ("preStopSleepSeconds=10", "shutdownDrainSeconds=20", "terminationGracePeriodSeconds=34"),
        ("shutdownDrainSeconds=60",),
    ],
)
def test_render_fails_when_grace_period_does_not_cover_prestop_and_drain(sets):
    error = render_error(*sets)
    assert "terminationGracePeriodSeconds" in error


def test_every_workload_runs_restricted():
    docs = render(values=["ci/production-values.yaml"]) + render("migrations.mode=job")
    pods = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            pods.append((doc["kind"], doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "Pod":
            pods.append((doc["kind"], doc["spec"]))
    assert {kind for kind, _ in pods} == {"Deployment", "Job", "Pod"}
    for kind, pod in pods:
        assert pod["automountServiceAccountToken"] is False, kind
        assert pod["enableServiceLinks"] is False, kind
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65532
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod.get("initContainers", []) + pod["containers"]:
            for key, value in RESTRICTED_CONTAINER.items():
                assert container["securityContext"][key] == value, (kind, container["name"], key)
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_deployment_rollout_and_spread():
    spec = deployment(render())["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)
    assert "replicas" not in deployment(render("autoscaling.enabled=true"))["spec"]


# --- Services ----------------------------------------------------------------------------------

def test_services_expose_grpc_with_app_protocol_and_a_headless_variant():
    docs = render()
    service = one(docs, "Service", RELEASE)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http-metrics"]["port"] == 9090
    headless = one(docs, "Service", f"{RELEASE}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert headless["spec"]["ports"][0]["appProtocol"] == "grpc"
    assert headless["spec"]["selector"] == service["spec"]["selector"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "server"
    assert one(docs, "ConfigMap", RELEASE)["data"]["GRPC_MAX_CONNECTION_AGE_SECONDS"] == "300"
    assert one(render("config.grpcMaxConnectionAgeSeconds=60"), "ConfigMap", RELEASE)["data"][
        "GRPC_MAX_CONNECTION_AGE_SECONDS"] == "60"


# --- Configuration -----------------------------------------------------------------------------

def configured_env(docs: list[dict]) -> set[str]:
    names = set(one(docs, "ConfigMap", RELEASE)["data"])
    names |= {e["name"] for e in server_container(docs)["env"]}
    return names


def test_the_contract_is_read_from_config_rs():
    variables = config_rs_variables()
    assert "POSTGRES_MAX_CONNECTIONS" in variables and "REDIS_CACHE_TTL" in variables
    assert len(variables) >= 30, variables


def test_kustomize_base_sets_every_plain_variable():
    lines = (REPO_ROOT / "k8s" / "base" / "config.env").read_text().splitlines()
    names = {line.split("=", 1)[0] for line in lines if "=" in line and not line.startswith("#")}
    missing = [name for name in config_rs_variables() if name not in names and name not in SECRET_ENV]
    assert not missing, f"not in k8s/base/config.env: {missing}"


def test_every_contract_variable_can_be_set():
    everything = configured_env(render(values=["ci/production-values.yaml"]))
    # CA files and the OTLP headers are rendered only when their Secrets are named.
    everything |= configured_env(render(values=["ci/dependency-tls-values.yaml"]))
    # The suppression key file is rendered only when its Secret is named.
    everything |= configured_env(render(values=["ci/erasure-mtls-values.yaml"]))
    # The migration address is rendered only when set (behind a transaction pooler).
    everything |= configured_env(render(values=["ci/pgbouncer-values.yaml"]))
    # The sentinel settings are rendered only in sentinel mode.
    everything |= configured_env(render(values=["ci/redis-sentinel-values.yaml"]))
    missing = [name for name in CONTRACT_ENV if name not in everything]
    assert not missing, f"not exposed by the chart: {missing}"


def test_redis_disabled_by_empty_host_drops_its_password():
    docs = render("redis.host=")
    assert one(docs, "ConfigMap", RELEASE)["data"]["REDIS_HOST"] == ""
    assert "REDIS_PASSWORD" not in {e["name"] for e in server_container(docs)["env"]}


def test_redis_topologies_render_their_variables_and_open_their_ports():
    sentinel = render(values=["ci/redis-sentinel-values.yaml"])
    data = one(sentinel, "ConfigMap", RELEASE)["data"]
    assert data["REDIS_MODE"] == "sentinel" and data["REDIS_SENTINEL_MASTER"] == "analytics"
    assert data["REDIS_NODES"].count(":26379") == 3
    assert "REDIS_PASSWORD" in {e["name"] for e in server_container(sentinel)["env"]}
    redis_rule = one(sentinel, "NetworkPolicy", RELEASE)["spec"]["egress"][2]
    assert {port["port"] for port in redis_rule["ports"]} == {6379, 26379}
    cluster = one(render(values=["ci/redis-cluster-values.yaml"]), "ConfigMap", RELEASE)["data"]
    assert cluster["REDIS_MODE"] == "cluster" and "REDIS_SENTINEL_MASTER" not in cluster
    assert "REDIS_NODES" not in one(render(), "ConfigMap", RELEASE)["data"]


def test_redis_topology_mistakes_fail_the_render():
    assert "redis.nodes" in render_error("redis.mode=cluster")
    assert "redis.sentinelMaster" in render_error("redis.mode=sentinel", "redis.nodes[0]=s:26379")
    assert "redis.nodes" in render_error("redis.nodes[0]=s:26379")
    assert "redis.db" in render_error("redis.mode=cluster", "redis.nodes[0]=n:6379", "redis.db=1")
    assert "mode" in render_error("redis.mode=replicated")


def test_existing_secret_key_names_are_configurable_and_no_chart_secret_is_made():
    docs = render(
        "postgres.auth.existingSecret=db", "postgres.auth.usernameKey=user", "postgres.auth.passwordKey=pass",
        "redis.auth.existingSecret=cache", "redis.auth.passwordKey=token",
    )
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server_container(docs)["env"]}
    assert env["POSTGRES_USER"] == {"name": "db", "key": "user"}
    assert env["POSTGRES_PASSWORD"] == {"name": "db", "key": "pass"}
    assert env["REDIS_PASSWORD"] == {"name": "cache", "key": "token"}
    assert not find(docs, "Secret", f"{RELEASE}-credentials")


def checksums(*sets: str) -> dict:
    template_annotations = deployment(render(*sets))["spec"]["template"]["metadata"]["annotations"]
    return {k: v for k, v in template_annotations.items() if k.startswith("checksum/")}


def test_checksum_annotations_follow_config_and_secret_changes():
    base = checksums()
    assert set(base) == {"checksum/config", "checksum/secret"}
    assert checksums("replicaCount=3") == base
    config_changed = checksums("config.logLevel=debug")
    assert config_changed["checksum/config"] != base["checksum/config"]
    assert config_changed["checksum/secret"] == base["checksum/secret"]
    secret_changed = checksums("postgres.auth.password=new")
    assert secret_changed["checksum/secret"] != base["checksum/secret"]
    assert secret_changed["checksum/config"] == base["checksum/config"]


def test_pii_keys_are_mounted_as_a_file():
    docs = render("pii.keys.existingSecret=pii-keys")
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["PII_KEYS_FILE"] == "/etc/analytics-service/pii/keys"
    assert data["PII_FIELDS"] == "email,phone,name,ip_address"
    pod = deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "pii-keys")
    assert volume["secret"]["secretName"] == "pii-keys"
    mount = next(m for m in server_container(docs)["volumeMounts"] if m["name"] == "pii-keys")
    assert mount["readOnly"] is True and mount["mountPath"] == "/etc/analytics-service/pii"



def mounted_file_is_readable(path: str, mounts: list[dict], volumes: list[dict]) -> bool:
    """`path` lies in a mounted Secret volume that projects the file's name."""
    for mount in mounts:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = next(v for v in volumes if v["name"] == mount["name"])
            items = volume["secret"].get("items")
            name = path[len(mount["mountPath"].rstrip("/")) + 1:]
            return items is None or any(item["path"] == name for item in items)
    return False


def test_dependency_ca_bundles_are_mounted_wherever_a_verb_reads_them():
    docs = render(values=["ci/dependency-tls-values.yaml"])
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["POSTGRES_SSLMODE"] == "verify-full"
    assert data["REDIS_TLS"] == "true" and data["REDIS_USERNAME"] == "analytics"
    assert data["READINESS_REQUIRES_DATABASE"] == "true"
    ca_files = {name: data[name] for name in
                ("POSTGRES_SSL_ROOT_CERT", "REDIS_TLS_CA_FILE", "OTEL_EXPORTER_OTLP_CERTIFICATE")}
    pod = deployment(docs)["spec"]["template"]["spec"]
    # The server and its `migrate --check` init container read the same ConfigMap, and
    # start-up fails when a named CA file is missing: both need every mount.
    for container in [server_container(docs), pod["initContainers"][0]]:
        for name, path in ca_files.items():
            assert mounted_file_is_readable(path, container["volumeMounts"], pod["volumes"]), (container["name"], name)
        headers = next(e for e in container["env"] if e["name"] == "OTEL_EXPORTER_OTLP_HEADERS")
        assert headers["valueFrom"]["secretKeyRef"] == {"name": "otel-collector-auth", "key": "headers"}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets["postgres-ca"] == "analytics-db-ca" and secrets["redis-ca"] == "analytics-redis-ca"
    assert secrets["otlp-ca"] == "otel-collector-ca"
    # The migration Job reads the same ConfigMap data (a hook copy in hook mode), so it names
    # the same CA files and needs the same mounts, in both modes.
    for mode in ("hook", "job"):
        docs = render(f"migrations.mode={mode}", values=["ci/dependency-tls-values.yaml"])
        (job,) = migration_jobs(docs)
        job_pod = job["spec"]["template"]["spec"]
        migrate = job_pod["containers"][0]
        (config_map_name,) = [source["configMapRef"]["name"] for source in migrate["envFrom"]]
        assert one(docs, "ConfigMap", config_map_name)["data"] == data, mode
        for name, path in ca_files.items():
            assert mounted_file_is_readable(path, migrate["volumeMounts"], job_pod["volumes"]), (mode, name)
        headers = next(e for e in migrate["env"] if e["name"] == "OTEL_EXPORTER_OTLP_HEADERS")
        assert headers["valueFrom"]["secretKeyRef"] == {"name": "otel-collector-auth", "key": "headers"}


def test_defaults_mount_no_ca_and_keep_readiness_off_the_shared_database():
    docs = render()
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["READINESS_REQUIRES_DATABASE"] == "false"
    assert data["REDIS_TLS"] == "false"
    assert not {"POSTGRES_SSL_ROOT_CERT", "REDIS_TLS_CA_FILE", "OTEL_EXPORTER_OTLP_CERTIFICATE"} & set(data)
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert "volumeMounts" not in pod["initContainers"][0]
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in {e["name"] for e in server_container(docs)["env"]}


def test_a_ca_without_a_verifying_mode_fails_the_render():
    assert "verify-full" in render_error("postgres.sslRootCert.existingSecret=db-ca")
    assert "redis.tls.enabled" in render_error("redis.tls.ca.existingSecret=redis-ca")
    assert "otel/endpoint" in render_error("config.otel.endpoint=otel-collector:4317")


def test_values_schema_rejects_unknown_keys_and_bad_values():
    assert "additional properties" in render_error("unknownTopLevel=1")
    assert "additional properties" in render_error("config.logLevl=debug")
    assert "migrations/mode" in render_error("migrations.mode=sometimes")
    assert "postgres/sslMode" in render_error("postgres.sslMode=verify-everything")


def test_schema_is_self_contained():
    schema_text = (CHART / "values.schema.json").read_text()
    refs = re.findall(r'"\$ref":\s*"([^"]+)"', schema_text)
    assert refs and all(ref.startswith("#/") for ref in refs), refs
    assert json.loads(schema_text)["additionalProperties"] is False


# --- mTLS and cert-manager ---------------------------------------------------------------------

def test_cert_manager_certificate_covers_every_service_name():
    docs = render(values=["ci/cert-manager-values.yaml"])
    certificate = one(docs, "Certificate", RELEASE)
    names = set(certificate["spec"]["dnsNames"])
    for service in (RELEASE, f"{RELEASE}-headless"):
        for suffix in ("", f".{NAMESPACE}", f".{NAMESPACE}.svc", f".{NAMESPACE}.svc.cluster.local"):
            assert service + suffix in names
    assert "analytics.internal.example.com" in names
    assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"])
    pod = deployment(docs)["spec"]["template"]["spec"]
    tls_volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["TLS_CERT_FILE"].endswith("/tls.crt")
    assert data["TLS_KEY_FILE"].endswith("/tls.key")
    assert data["TLS_CLIENT_CA_FILE"].endswith("/ca.crt")


def test_tls_needs_a_certificate_source():
    assert "tls.existingSecret or tls.certManager.enabled" in render_error("tls.enabled=true")
    assert "issuerRef.name" in render_error("tls.enabled=true", "tls.certManager.enabled=true")


def test_helm_test_pod_checks_health_with_client_certificates_when_mtls_is_on():
    plain = one(render(), "Pod")
    assert annotations(plain)["helm.sh/hook"] == "test"
    assert plain["spec"]["containers"][0]["args"] == ["healthcheck", "--addr", f"{RELEASE}:50051"]
    mtls = one(render(values=["ci/production-values.yaml"]), "Pod")
    args = mtls["spec"]["containers"][0]["args"]
    for flag in ("--tls-ca-file", "--tls-cert-file", "--tls-key-file", "--tls-server-name"):
        assert flag in args
    assert args[args.index("--tls-server-name") + 1] == f"{RELEASE}.{NAMESPACE}.svc"
    assert mtls["spec"]["volumes"][0]["secret"]["secretName"] == "analytics-service-test-client-tls"
    allowed = one(render(values=["ci/production-values.yaml"]), "ConfigMap", RELEASE)["data"]["TLS_ALLOWED_CALLERS"]
    assert allowed == "gateway.apps.svc.cluster.local,analytics-service.analytics.svc"


def test_per_rpc_allow_lists_render_in_the_binarys_syntax():
    docs = render(
        "tls.enabled=true", "tls.existingSecret=tls",
        "tls.allowedCallersPerRpc.GetEventCount={spiffe://a}",
        "tls.allowedCallersPerRpc.GetUserCount={spiffe://a,gw.example}",
    )
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["TLS_ALLOWED_CALLERS_PER_RPC"] == "GetEventCount=spiffe://a;GetUserCount=spiffe://a|gw.example"
    assert data["TLS_RELOAD_INTERVAL_SECONDS"] == "10"
    assert "allowedCallersPerRpc" in render_error(
        "tls.enabled=true", "tls.existingSecret=tls", "tls.allowedCallersPerRpc.NoSuchRpc={a}"
    )


# --- Erasure and access requests (AnalyticsAdminService) ----------------------------------------

ADMIN_RPCS = ("DeleteUser", "GetUserDeletion", "LiftSuppression", "ExportUser")


def test_suppression_key_is_mounted_as_a_file_the_server_reads():
    docs = render(values=["ci/erasure-plaintext-values.yaml"])
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert data["SUPPRESSION_KEY_FILE"] == "/etc/analytics-service/suppression/suppression.key"
    pod = deployment(docs)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "suppression-key")
    assert volume["secret"]["secretName"] == "analytics-suppression-key"
    mounts = server_container(docs)["volumeMounts"]
    assert next(m for m in mounts if m["name"] == "suppression-key")["readOnly"] is True
    assert mounted_file_is_readable(data["SUPPRESSION_KEY_FILE"], mounts, pod["volumes"])
    assert "SUPPRESSION_KEY_FILE" not in one(render(), "ConfigMap", RELEASE)["data"]


def test_admin_rpcs_are_closed_by_default_and_opened_per_transport():
    assert one(render(), "ConfigMap", RELEASE)["data"]["ADMIN_RPCS_ENABLED"] == "false"
    plaintext = one(render(values=["ci/erasure-plaintext-values.yaml"]), "ConfigMap", RELEASE)["data"]
    assert plaintext["ADMIN_RPCS_ENABLED"] == "true" and "TLS_ALLOWED_CALLERS_PER_RPC" not in plaintext
    mtls = one(render(values=["ci/erasure-mtls-values.yaml"]), "ConfigMap", RELEASE)["data"]
    assert mtls["ADMIN_RPCS_ENABLED"] == "false"
    entries = dict(rule.split("=", 1) for rule in mtls["TLS_ALLOWED_CALLERS_PER_RPC"].split(";"))
    assert set(entries) == set(ADMIN_RPCS)
    erasure_caller = entries["DeleteUser"]
    assert erasure_caller in mtls["TLS_ALLOWED_CALLERS"].split(","), "the global list applies to admin RPCs too"


def test_admin_settings_without_effect_fail_the_render():
    tls = ("tls.enabled=true", "tls.existingSecret=tls", "suppressionKey.existingSecret=key")
    assert "admin.rpcsEnabled has no effect with tls.enabled" in render_error("admin.rpcsEnabled=true", *tls)
    assert "suppressionKey.existingSecret" in render_error("admin.rpcsEnabled=true")
    error = render_error("tls.enabled=true", "tls.existingSecret=tls", "tls.allowedCallersPerRpc.ExportUser={a}")
    assert "tls.allowedCallersPerRpc.ExportUser" in error and "FAILED_PRECONDITION" in error
    # Non-admin entries and a key without opened RPCs (ingestion still honours suppressions) render.
    render("tls.enabled=true", "tls.existingSecret=tls", "tls.allowedCallersPerRpc.GetEventCount={a}")
    render("suppressionKey.existingSecret=key")


def test_erasure_job_example_calls_delete_user_on_the_releases_service():
    docs = load_all((REPO_ROOT / "docs" / "erasure-job.yaml").read_text())
    job = one(docs, "Job", "analytics-erasure")
    assert job["metadata"]["namespace"] == NAMESPACE
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    image, _, tag = container["image"].partition(":")
    assert image == "fullstorydev/grpcurl" and re.fullmatch(r"v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", tag)
    args = container["args"]
    assert args[-1] == "analytics.v1.AnalyticsAdminService/DeleteUser"
    assert json.loads(args[args.index("-d") + 1]) == {"user_id": "$(USER_ID)", "suppress": True}
    assert container["env"][0]["name"] == "USER_ID" and "secretKeyRef" in container["env"][0]["valueFrom"]
    chart = render(values=["ci/erasure-mtls-values.yaml"])
    port = next(p["port"] for p in one(chart, "Service", RELEASE)["spec"]["ports"] if p["name"] == "grpc")
    assert args[-2] == f"{RELEASE}.{NAMESPACE}.svc:{port}"
    # The name the chart's certificate carries (the helm test verifies the same one).
    certificate = one(render(values=["ci/cert-manager-values.yaml"]), "Certificate", RELEASE)
    assert args[-2].rsplit(":", 1)[0] in certificate["spec"]["dnsNames"]
    mount = container["volumeMounts"][0]["mountPath"]
    for flag, name in (("-cacert", "ca.crt"), ("-cert", "tls.crt"), ("-key", "tls.key")):
        assert args[args.index(flag) + 1] == f"{mount}/{name}"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] > 0 and pod["automountServiceAccountToken"] is False
    # Its own NetworkPolicy lets it reach exactly the release's server pods on the gRPC port.
    policy = one(docs, "NetworkPolicy", "analytics-erasure")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    server_labels = deployment(chart)["spec"]["template"]["metadata"]["labels"]
    to_server = next(rule for rule in policy["egress"] if ("TCP", port) in rule_ports(rule))
    assert to_server["to"][0]["podSelector"]["matchLabels"].items() <= server_labels.items()
    # The ci/ values that document the mTLS wiring admit exactly this Job's pods.
    grpc_rule = one(chart, "NetworkPolicy", RELEASE)["spec"]["ingress"][0]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= job_labels.items()
               and "namespaceSelector" not in peer and peer.get("podSelector", {}).get("matchLabels")
               for peer in grpc_rule["from"])


# --- Autoscaling, monitoring, NetworkPolicy ------------------------------------------------------

def test_hpa_with_cpu_target_custom_metrics_and_behavior():
    hpa = one(render(values=["ci/production-values.yaml"]), "HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 20)
    assert spec["metrics"][0]["resource"]["target"]["averageUtilization"] == 65
    assert spec["metrics"][1]["pods"]["metric"]["name"] == "analytics_ingest_queue_depth"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert "autoscaling.minReplicas" in render_error(
        "autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2")


def test_monitoring_resources_are_opt_in_and_render_without_a_cluster():
    default_kinds = {doc["kind"] for doc in render()}
    assert not default_kinds & {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "Certificate"}
    docs = render("serviceMonitor.enabled=true", "prometheusRule.enabled=true", "grafanaDashboard.enabled=true",
                  "grafanaDashboard.label=dashboards", "grafanaDashboard.labelValue=analytics")
    monitor = one(docs, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http-metrics", "/metrics")
    service = one(docs, "Service", RELEASE)
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert service["metadata"]["labels"][key] == value
    headless = one(docs, "Service", f"{RELEASE}-headless")
    assert any(headless["metadata"]["labels"].get(k) != v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert one(docs, "PrometheusRule")["spec"]["groups"] == rules["groups"]
    dashboard = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["labels"]["dashboards"] == "analytics"
    assert json.loads(dashboard["data"]["analytics-service.json"]) == json.loads(
        (CHART / "files" / "grafana-dashboard.json").read_text())
    default_dashboard = one(render("grafanaDashboard.enabled=true"), "ConfigMap", f"{RELEASE}-dashboard")
    assert default_dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def rule_ports(rule: dict) -> set:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def test_network_policy_limits_ingress_and_egress():
    docs = render(values=["ci/production-values.yaml"])
    server = one(docs, "NetworkPolicy", RELEASE)
    assert set(server["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    grpc_rule, metrics_rule = server["spec"]["ingress"]
    assert rule_ports(grpc_rule) == {("TCP", 50051)}
    assert grpc_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "apps"}
    assert any(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "test"
               for peer in grpc_rule["from"]), "the helm test pod must reach gRPC"
    assert rule_ports(metrics_rule) == {("TCP", 9090)}
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    egress = server["spec"]["egress"]
    dns = egress[0]
    assert rule_ports(dns) == {("UDP", 53), ("TCP", 53)}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert rule_ports(egress[1]) == {("TCP", 5432)} and egress[1]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert rule_ports(egress[2]) == {("TCP", 6379)}
    assert rule_ports(egress[3]) == {("TCP", 4317)}
    assert egress[3]["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
    assert len(egress) == 4
    migrate = one(docs, "NetworkPolicy", f"{RELEASE}-migrate")
    assert "ingress" not in migrate["spec"] and set(migrate["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert [rule_ports(rule) for rule in migrate["spec"]["egress"]] == [
        {("UDP", 53), ("TCP", 53)}, {("TCP", 5432)}, {("TCP", 4317)}]
    one(docs, "NetworkPolicy", f"{RELEASE}-test")


def test_read_replica_is_configured_and_reachable_from_the_server_only():
    docs = render(values=["ci/read-replica-values.yaml"])
    data = one(docs, "ConfigMap", RELEASE)["data"]
    assert (data["POSTGRES_READ_HOST"], data["POSTGRES_READ_PORT"], data["POSTGRES_READ_MAX_CONNECTIONS"]) == (
        "postgresql-read", "5433", "8")
    server_ports = [rule_ports(rule) for rule in one(docs, "NetworkPolicy", RELEASE)["spec"]["egress"]]
    assert {("TCP", 5432)} in server_ports and {("TCP", 5433)} in server_ports
    migrate_ports = [rule_ports(rule) for rule in one(docs, "NetworkPolicy", f"{RELEASE}-migrate")["spec"]["egress"]]
    assert {("TCP", 5433)} not in migrate_ports, "the migration Job never reads the replica"
    # Off by default: empty host and port (the binary then uses POSTGRES_PORT), no extra egress.
    defaults = render("networkPolicy.enabled=true")
    data = one(defaults, "ConfigMap", RELEASE)["data"]
    assert (data["POSTGRES_READ_HOST"], data["POSTGRES_READ_PORT"]) == ("", "")
    assert len([rule for rule in one(defaults, "NetworkPolicy", RELEASE)["spec"]["egress"]
                if ("TCP", 5432) in rule_ports(rule)]) == 1
    # CloudNativePG: the standbys are the Cluster's pods, not the Pooler's.
    cnpg = render("postgres.readHost=analytics-db-ro", values=["ci/cloudnativepg-values.yaml"])
    read_rule = one(cnpg, "NetworkPolicy", RELEASE)["spec"]["egress"][2]
    assert read_rule["to"] == [{"podSelector": {"matchLabels": {"cnpg.io/cluster": "analytics-db"}}}]


def test_network_policy_without_peers_allows_the_port_from_anywhere():
    docs = render("networkPolicy.enabled=true", set_json=["networkPolicy.ingress.grpcFrom=[]"])
    grpc_rule = one(docs, "NetworkPolicy", RELEASE)["spec"]["ingress"][0]
    assert "from" not in grpc_rule and rule_ports(grpc_rule) == {("TCP", 50051)}


# --- Image and build consistency ---------------------------------------------------------------

def test_image_reference_and_pull_policy():
    container = server_container(render())
    assert container["image"] == "ghcr.io/haunted-saas/analytics-service:0.1.0"
    assert container["imagePullPolicy"] == "Always"
    digest = "sha256:" + "b" * 64
    pinned = server_container(render(f"image.digest={digest}", "image.tag=2.0.0"))
    assert pinned["image"] == f"ghcr.io/haunted-saas/analytics-service:2.0.0@{digest}"
    assert pinned["imagePullPolicy"] == "IfNotPresent"


def test_build_release_script_uses_the_dockerfile_command_line():
    script = (REPO_ROOT / "scripts" / "build-release.sh").read_text()
    command = re.search(r"^RELEASE_BUILD_COMMAND=\((.*)\)$", script, re.M).group(1)
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert f"RUN {command} " in dockerfile or f"RUN {command}\n" in dockerfile, command
    words = shlex.split(command)
    assert words[:2] == ["cargo", "build"] and "--release" in words and "--locked" in words
    cook = re.search(r"^RUN cargo chef cook (.*)$", dockerfile, re.M).group(1)
    for flag in words[2:]:
        assert flag in cook.split(), f"cargo chef cook lacks {flag}: dependencies would be rebuilt"


def test_dockerfile_runtime_contract():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.rindex("\nFROM "):]
    assert "distroless" in runtime.splitlines()[1] and "AS runtime" in runtime.splitlines()[1]
    assert "USER 65532:65532" in runtime
    assert 'ENTRYPOINT ["/usr/local/bin/analytics-service"]' in runtime
    assert 'CMD ["serve"]' in runtime
    assert "EXPOSE 50051 9090" in runtime
    for label in ("title", "version", "revision", "source", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in runtime
    assert "apt-get" not in dockerfile, "protoc comes from protoc-bin-vendored; no system packages"


# --- kustomize base equals the chart's defaults -----------------------------------------------

def kustomize(path: str) -> list[dict]:
    output = subprocess.run(["kubectl", "kustomize", str(REPO_ROOT / path)], capture_output=True, text=True, check=True)
    return load_all(output.stdout)


def test_kustomize_base_matches_the_chart_defaults():
    chart = render()
    base = kustomize("k8s/base")
    chart_config = one(chart, "ConfigMap", RELEASE)["data"]
    base_config = next(doc for doc in base if doc["kind"] == "ConfigMap")["data"]
    for key, value in chart_config.items():
        expected = "1.0" if key == "OTEL_TRACES_SAMPLER_RATIO" else value
        assert base_config.get(key) == expected, key
    chart_container = server_container(chart)
    base_container = next(
        c for c in one(base, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"]
        if c["name"] == "analytics-service")
    for field in ("ports", "startupProbe", "livenessProbe", "readinessProbe", "lifecycle", "securityContext", "resources", "args"):
        assert base_container[field] == chart_container[field], field
    chart_pod = deployment(chart)["spec"]["template"]["spec"]
    base_pod = one(base, "Deployment", RELEASE)["spec"]["template"]["spec"]
    for field in ("terminationGracePeriodSeconds", "securityContext", "automountServiceAccountToken", "enableServiceLinks"):
        assert base_pod[field] == chart_pod[field], field
    assert base_pod["initContainers"][0]["args"] == chart_pod["initContainers"][0]["args"]
    for name in (RELEASE, f"{RELEASE}-headless"):
        assert one(base, "Service", name)["spec"]["ports"] == one(chart, "Service", name)["spec"]["ports"]
    assert one(base, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    hpa = one(render("autoscaling.enabled=true"), "HorizontalPodAutoscaler")["spec"]
    base_hpa = one(base, "HorizontalPodAutoscaler")["spec"]
    for field in ("minReplicas", "maxReplicas", "metrics", "behavior"):
        assert base_hpa[field] == hpa[field], field


def test_kustomize_overlays():
    dev = kustomize("k8s/overlays/dev")
    assert all(doc["metadata"].get("namespace") == "analytics-dev" for doc in dev)
    assert not find(dev, "HorizontalPodAutoscaler") and not find(dev, "PodDisruptionBudget")
    assert one(dev, "Deployment", RELEASE)["spec"]["replicas"] == 1
    prod = kustomize("k8s/overlays/prod")
    assert all(doc["metadata"].get("namespace") == "analytics" for doc in prod)
    image = one(prod, "Deployment", RELEASE)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "@sha256:" in image
    prod_pdb = one(prod, "PodDisruptionBudget")["spec"]
    assert prod_pdb["minAvailable"] == 2 and "maxUnavailable" not in prod_pdb
    one(prod, "ServiceMonitor")


def test_config_checksum_is_a_sha256():
    value = checksums()["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", value)
    assert value != hashlib.sha256(b"").hexdigest()
