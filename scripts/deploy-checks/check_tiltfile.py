"""Parse and dry-run the Tiltfile with a real Starlark implementation (starlark-rust via the
PyPI package starlark-pyo3), Tilt's built-ins replaced by recording stubs.

Checks that the Tiltfile is valid Starlark in Tilt's dialect (top-level if/for, f-strings
off), that it runs to the end with both settings of its `release-image` flag, and that what
it asks Tilt to do points at files that exist: the Dockerfile target, the chart, the dev
values file, the kustomize folder, and port-forwards for 50051 and 9090.

Usage: python check_tiltfile.py [Tiltfile]     (exit 0 when every check passes)
"""

from __future__ import annotations

import sys
from pathlib import Path

import starlark as sl

REPO_ROOT = Path(__file__).resolve().parents[2]

# Attribute-style Tilt built-ins (config.parse(), os.getenv()) become structs whose fields
# call the Python stubs registered under private names.
PRELUDE = """
config = struct(
    define_bool = _config_define_bool,
    define_string = _config_define_string,
    define_string_list = _config_define_string_list,
    parse = _config_parse,
)
os = struct(getenv = _os_getenv, path = struct(exists = _os_path_exists, join = _os_path_join))
TRIGGER_MODE_AUTO = "auto"
TRIGGER_MODE_MANUAL = "manual"
"""


class TiltStub:
    """Records what the Tiltfile asks Tilt to do."""

    def __init__(self, flags: dict[str, object]) -> None:
        self.flags = flags
        self.calls: list[tuple[str, tuple, dict]] = []

    def recorder(self, name: str, result=None):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result

        return record

    def called(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]


def run(source: str, flags: dict[str, object]) -> TiltStub:
    stub = TiltStub(flags)
    dialect = sl.Dialect.extended()
    dialect.enable_top_level_stmt = True
    dialect.enable_f_strings = False
    globals_ = sl.Globals.extended_by([sl.LibraryExtension.StructType, sl.LibraryExtension.Print])
    module = sl.Module()
    builtins = {
        "_config_define_bool": stub.recorder("config.define_bool"),
        "_config_define_string": stub.recorder("config.define_string"),
        "_config_define_string_list": stub.recorder("config.define_string_list"),
        "_config_parse": stub.recorder("config.parse", lambda: dict(stub.flags)),
        "_os_getenv": stub.recorder("os.getenv", lambda key, default=None: default),
        "_os_path_exists": stub.recorder("os.path.exists", lambda path: (REPO_ROOT / path).exists()),
        "_os_path_join": stub.recorder("os.path.join", lambda *parts: "/".join(parts)),
        "allow_k8s_contexts": stub.recorder("allow_k8s_contexts"),
        "docker_build": stub.recorder("docker_build"),
        "custom_build": stub.recorder("custom_build"),
        "k8s_yaml": stub.recorder("k8s_yaml"),
        "k8s_resource": stub.recorder("k8s_resource"),
        "helm": stub.recorder("helm", lambda chart, **kwargs: f"<helm {chart}>"),
        "kustomize": stub.recorder("kustomize", lambda path, **kwargs: f"<kustomize {path}>"),
        "local_resource": stub.recorder("local_resource"),
        "local": stub.recorder("local", ""),
        "port_forward": stub.recorder(
            "port_forward", lambda local, container=None, **kwargs: {"local": local, "container": container}
        ),
        "link": stub.recorder("link"),
        "watch_file": stub.recorder("watch_file"),
        "read_file": stub.recorder("read_file", lambda path, default=None: (REPO_ROOT / path).read_text()),
        "update_settings": stub.recorder("update_settings"),
        "fail": stub.recorder("fail", lambda message: (_ for _ in ()).throw(RuntimeError(message))),
    }
    for name, function in builtins.items():
        module.add_callable(name, function)
    sl.eval(module, sl.parse("prelude.star", PRELUDE, dialect), globals_)
    sl.eval(module, sl.parse("Tiltfile", source, dialect), globals_)
    return stub


def check(stub: TiltStub, expect_target: str) -> list[str]:
    problems: list[str] = []
    builds = stub.called("docker_build")
    if len(builds) != 1:
        problems.append(f"expected one docker_build, got {len(builds)}")
    else:
        args, kwargs = builds[0]
        dockerfile = REPO_ROOT / kwargs.get("dockerfile", "Dockerfile")
        target = kwargs.get("target")
        if target != expect_target:
            problems.append(f"docker_build target {target!r}, expected {expect_target!r}")
        if not dockerfile.is_file():
            problems.append(f"docker_build dockerfile {dockerfile} missing")
        elif f" AS {target}" not in dockerfile.read_text():
            problems.append(f"Dockerfile has no stage named {target!r}")
        for path in kwargs.get("only", []):
            if not (REPO_ROOT / path).exists():
                problems.append(f"docker_build only= path {path} missing")
    for args, kwargs in stub.called("helm"):
        if not (REPO_ROOT / args[0] / "Chart.yaml").is_file():
            problems.append(f"helm chart {args[0]} missing")
        for values in kwargs.get("values", []):
            if not (REPO_ROOT / values).is_file():
                problems.append(f"helm values file {values} missing")
    if not stub.called("helm"):
        problems.append("the chart is never deployed (no helm() call)")
    for args, _ in stub.called("kustomize"):
        if not (REPO_ROOT / args[0] / "kustomization.yaml").is_file():
            problems.append(f"kustomize folder {args[0]} has no kustomization.yaml")
    forwarded = set()
    for _, kwargs in stub.called("k8s_resource"):
        for forward in kwargs.get("port_forwards", []) or []:
            forwarded.add(forward["local"] if isinstance(forward, dict) else forward)
    for port in (50051, 9090):
        if port not in forwarded:
            problems.append(f"no port-forward for {port}")
    return problems


def main(argv: list[str]) -> int:
    tiltfile = Path(argv[1]) if len(argv) > 1 else REPO_ROOT / "Tiltfile"
    source = tiltfile.read_text(encoding="utf-8")
    failures = 0
    for flags, target in (({}, "dev"), ({"release-image": True}, "runtime")):
        try:
            stub = run(source, flags)
        except Exception as error:  # starlark.StarlarkError and stub errors alike
            print(f"check-tiltfile: FAIL {tiltfile} with flags {flags}: {error}")
            failures += 1
            continue
        problems = check(stub, target)
        for problem in problems:
            print(f"check-tiltfile: FAIL {tiltfile} with flags {flags}: {problem}")
        failures += len(problems)
        if not problems:
            print(f"check-tiltfile: ok {tiltfile.name} with flags {flags}: {len(stub.calls)} Tilt calls, target {target}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
