#!/usr/bin/env bash
# Create (or refresh) the benchmark virtualenv at .venv-bench: both project packages
# (editable, as in .venv) plus the reference libraries of hack/bench/requirements-bench.txt
# (Stable-Baselines3) and CleanRL's ppo.py. It is separate from .venv so the reference
# libraries never become runtime or test dependencies. torch, gymnasium and numpy are pinned
# to the versions .venv has (when .venv exists), so the benchmark compares trainers on the same
# framework versions. Re-runs only when an input changed (stamp file); wheels stay in pip's
# cache (~/.cache/pip), so a rebuild is fast.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-bench"
stamp="$venv/.rlops-bench-deps"
reqs="$root/hack/bench/requirements-bench.txt"
# CleanRL 1.2.0 declares Requires-Python <3.11 and pins gym==0.23.1, stable-baselines3==1.2.0,
# pygame==2.1.0, wandb<0.14 (see requirements-bench.txt): installed without its dependencies;
# its ppo.py needs only gym 0.23.1 (+ gym-notices, and pygame, which gym 0.23.1's CartPole
# imports; 2.1.0 has no Python 3.11 wheel, 2.6.1 has), numpy, torch and tensorboard.
cleanrl_pkgs=(cleanrl==1.2.0 gym==0.23.1 gym-notices==0.1.0 pygame==2.6.1)

pins=""
if [ -x "$root/.venv/bin/python" ]; then
  pins=$("$root/.venv/bin/python" - <<'PY'
from importlib import metadata
for name in ("torch", "gymnasium", "numpy"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
)
fi
want=$( { cat "$root/operator/pyproject.toml" "$root/rl_engine/pyproject.toml" "$reqs";
          echo "$pins"; echo "${cleanrl_pkgs[*]}"; } | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo "installing benchmark dependencies into .venv-bench (first run downloads PyTorch; a few minutes)" >&2
constraints="$venv/constraints-from-venv.txt"
printf '%s\n' "$pins" > "$constraints"
log="$venv/pip-install.log"
if ! { "$venv/bin/pip" install --progress-bar off -q --upgrade pip &&
       "$venv/bin/pip" install --progress-bar off -q -c "$constraints" \
         -e "$root/operator" -e "$root/rl_engine" -r "$reqs" &&
       "$venv/bin/pip" install --progress-bar off -q --no-deps --ignore-requires-python \
         "${cleanrl_pkgs[@]}"; } >"$log" 2>&1; then
  tail -40 "$log" >&2
  echo "pip install failed; full log: $log" >&2
  exit 1
fi
echo "$want" > "$stamp"
