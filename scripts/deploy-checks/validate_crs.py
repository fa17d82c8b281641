"""Validate custom resources in rendered manifests against upstream CRD schemas.

kubernetes-validate knows only built-in kinds. This script splits each rendered file:
custom resources (ServiceMonitor, PrometheusRule, Certificate, GRPCRoute, ...) are validated here
against the openAPIV3Schema of the matching CRD in the CRD folder, strictly (unknown fields
are errors, as with `kubectl apply --validate=strict`); every other document is written to
OUT_DIR/<file name> for kubernetes-validate.

The CRD folder is ../shared/crds relative to the repository root, or $DEPLOY_CRDS_DIR. The
CRDs are read from there at check time and never copied into the project. When the folder is
missing the built-in kinds are still written out, and custom-resource validation fails when
the CI environment variable is set (a missing prerequisite must not pass in CI) or is
reported as skipped (exit status 3) on a workstation.

Usage: python validate_crs.py OUT_DIR RENDERED.yaml...
Exit status: 0 when every custom resource is valid, 3 when skipped, 1 otherwise.
"""

from __future__ import annotations

import copy
import glob
import os
import sys
from pathlib import Path

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# Exit status for "could not check" (scripts/check-deploy.sh reports it as SKIP).
EXIT_SKIPPED = 3


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def crds_dir() -> Path:
    override = os.environ.get("DEPLOY_CRDS_DIR")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "crds"


def strict_schema(schema: object) -> object:
    """Copy of an OpenAPI v3 structural schema that rejects unknown fields.

    An object schema with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` prunes unknown fields in the API server; here
    they become errors, so a typo in a values file cannot silently vanish.
    """
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def load_crd_schemas(directory: Path) -> dict[tuple[str, str, str], dict]:
    """Map (group, version, kind) to a strict JSON schema of the whole object."""
    schemas: dict[tuple[str, str, str], dict] = {}
    for path in sorted(glob.glob(str(directory / "*.yaml")) + glob.glob(str(directory / "*.yml"))):
        with open(path, encoding="utf-8") as handle:
            for document in yaml.safe_load_all(handle):
                if not document or document.get("kind") != "CustomResourceDefinition":
                    continue
                spec = document["spec"]
                for version in spec["versions"]:
                    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                    properties = schema.setdefault("properties", {})
                    # The CRD leaves metadata to the API server; check the basics here.
                    properties["metadata"] = {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "namespace": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    }
                    properties["apiVersion"] = {"type": "string"}
                    properties["kind"] = {"type": "string"}
                    key = (spec["group"], version["name"], spec["names"]["kind"])
                    schemas[key] = strict_schema(schema)
    return schemas


# Groups under k8s.io that are served by CRDs, not by the API server itself.
CRD_GROUPS_UNDER_K8S_IO = {"gateway.networking.k8s.io", "snapshot.storage.k8s.io", "policy.networking.k8s.io"}


def is_builtin(api_version: str) -> bool:
    """Built-in API groups have no dot (core "v1", "apps/v1") or end in .k8s.io, except the
    CRD-served groups above (Gateway API's GRPCRoute, say)."""
    if "/" not in api_version:
        return True
    group = api_version.split("/", 1)[0]
    if group in CRD_GROUPS_UNDER_K8S_IO:
        return False
    return "." not in group or group.endswith(".k8s.io")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    directory = crds_dir()
    schemas = load_crd_schemas(directory) if directory.is_dir() else None
    if schemas is None:
        verdict = "FAIL (CI is set)" if in_ci() else "SKIPPED"
        print(f"validate-crs: {verdict}: custom resource validation: CRD folder {directory} not found "
              "(set DEPLOY_CRDS_DIR)")
    failures = 0
    checked = 0
    for rendered in argv[2:]:
        builtin_documents = []
        with open(rendered, encoding="utf-8") as handle:
            documents = [d for d in yaml.safe_load_all(handle) if d]
        for document in documents:
            api_version = document.get("apiVersion", "")
            kind = document.get("kind", "")
            name = (document.get("metadata") or {}).get("name", "?")
            if is_builtin(api_version):
                builtin_documents.append(document)
                continue
            if schemas is None:
                continue
            group, version = api_version.split("/", 1)
            schema = schemas.get((group, version, kind))
            if schema is None:
                print(f"validate-crs: FAIL {rendered}: {kind} {name}: no CRD for {api_version} in {directory}")
                failures += 1
                continue
            validator = jsonschema.Draft7Validator(schema)
            errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
            checked += 1
            for error in errors:
                location = "/".join(str(part) for part in error.absolute_path) or "(root)"
                print(f"validate-crs: FAIL {rendered}: {kind} {name}: {location}: {error.message}")
                failures += 1
        with open(out_dir / Path(rendered).name, "w", encoding="utf-8") as out:
            yaml.safe_dump_all(builtin_documents, out, sort_keys=False)
    if schemas is None:
        return 1 if in_ci() else EXIT_SKIPPED
    print(f"validate-crs: {checked} custom resources checked against {len(schemas)} CRD versions "
          f"from {directory}, {failures} errors")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
