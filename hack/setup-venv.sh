#!/usr/bin/env bash
# Create (or refresh) the project virtualenv at .venv with both packages (editable) and the
# test tooling. Re-runs only when a dependency file changed. Wheels come from PyPI and stay in
# pip's own cache (~/.cache/pip), so a second machine run is fast.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.rlops-deps"
want=$(cat "$root/operator/pyproject.toml" "$root/rl_engine/pyproject.toml" "$root/requirements-dev.txt" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo "installing Python dependencies into .venv (first run downloads PyTorch; a few minutes)" >&2
log="$venv/pip-install.log"
if ! { "$venv/bin/pip" install --progress-bar off -q --upgrade pip &&
       "$venv/bin/pip" install --progress-bar off -q -e "$root/operator" -e "$root/rl_engine" -r "$root/requirements-dev.txt"; } >"$log" 2>&1; then
  tail -40 "$log" >&2
  echo "pip install failed; full log: $log" >&2
  exit 1
fi
echo "$want" > "$stamp"
