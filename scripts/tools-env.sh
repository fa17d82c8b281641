# Source this file (bash) to use the tools installed by scripts/install-tools.sh:
#   source scripts/tools-env.sh
# Puts .tools/bin first on PATH (helm, kubectl, hadolint, checkov, kubernetes-validate,
# grpcurl, buf, pytest) and exports TOOLS_PYTHON, the venv's interpreter.
_tools_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TOOLS_DIR="${_tools_repo_root}/.tools"
export TOOLS_PYTHON="${TOOLS_DIR}/venv/bin/python"
case ":${PATH}:" in
  *":${TOOLS_DIR}/bin:"*) ;;
  *) export PATH="${TOOLS_DIR}/bin:${PATH}" ;;
esac
# checkov phones home for its policy metadata unless told not to; keep runs offline.
export BC_SKIP_MAPPING=TRUE
export CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
unset _tools_repo_root
