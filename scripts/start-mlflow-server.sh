#!/usr/bin/env bash
# One MLflow tracking server for many concurrent pipeline jobs (SLURM, DVC, parallel runs).
#
#   scripts/start-mlflow-server.sh [PORT [BACKEND_STORE_URI [ARTIFACTS_DIR]]] [-- MLFLOW_SERVER_OPTIONS...]
#   defaults:                       5000  sqlite:///results/mlflow.db  results/mlartifacts
#
# Why a server: a sqlite file written by several jobs at once (on NFS, from several nodes)
# locks or corrupts; ONE server process owning the sqlite file serialises every write, and
# the jobs only speak HTTP. Point the jobs at it with
#   export MLFLOW_TRACKING_URI=http://<this host>:<PORT>
# Artifacts are uploaded through the server (--serve-artifacts) into ARTIFACTS_DIR, so
# compute nodes need no access to that directory.
#
# Binds 127.0.0.1 unless TVT_MLFLOW_HOST says otherwise (e.g. the login node's cluster
# interface; then also pass `-- --allowed-hosts <name>:<PORT>`). The server has no
# authentication: never bind it to a public interface.
# --workers 1 and no job-execution workers: 2 processes / ~0.5 GB instead of ~15 / 2.5 GB.
# Runs in the foreground (exec), so its pid is the server's: stop it with `kill <pid>`.
set -euo pipefail

positional=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do positional+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the "--"
port=${positional[0]:-5000}
store=${positional[1]:-sqlite:///results/mlflow.db}
artifacts=${positional[2]:-results/mlartifacts}

if [[ "$store" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${store#sqlite:///}")"
fi
mkdir -p "$artifacts"

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
  --host "${TVT_MLFLOW_HOST:-127.0.0.1}" --port "$port" --workers 1 \
  --backend-store-uri "$store" \
  --serve-artifacts --artifacts-destination "$artifacts" \
  "$@"
