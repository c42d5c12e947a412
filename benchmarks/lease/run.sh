#!/usr/bin/env bash
# The one command of a GPU lease: offline install, then wmfast.bench.lease (CUDA build in the background, stages
# in priority order, each with its own time budget, everything written as it arrives). Ends by itself in 9 minutes.
#
#   bash benchmarks/lease/run.sh [--budget SECONDS] [--out DIR] [--wheels DIR]   on the GPU machine
#   bash benchmarks/lease/run.sh --dry-run [--out DIR]                           on a CPU machine (CI)
#
# Wheels: benchmarks/lease/fetch_wheels.sh fills .wheels/ on a machine with a package index; carry that folder.
# With $OUT set (the device tool), the run directory is also packed into $OUT as one .tar.gz.
set -uo pipefail
usage="usage: bash benchmarks/lease/run.sh [--dry-run] [--budget SECONDS] [--out DIR] [--wheels DIR]"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo" || exit 2
dry_run=0; wheels=$repo/.wheels; args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; args+=(--dry-run); shift ;;
    --budget|--out) [[ $# -ge 2 ]] || { echo "run.sh: $1 needs a value; $usage" >&2; exit 2; }
                    args+=("$1" "$2"); shift 2 ;;
    --wheels) [[ $# -ge 2 ]] || { echo "run.sh: --wheels needs a directory; $usage" >&2; exit 2; }
              wheels=$2; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
python=$(command -v python3 || command -v python)
install_log=$(mktemp -t wmfast-install.XXXXXX)
export PYTHONUNBUFFERED=1

# Offline install: the carried wheels into a private site dir, then wmfast itself (no dependencies, no build:
# the lease builds the CUDA extension in the background). Skipped when there is nothing to install.
t0=$(date +%s)
site=${WMFAST_LEASE_SITE:-/tmp/wmfast-site}
have_wheels=0
compgen -G "$wheels/*.whl" > /dev/null && have_wheels=1
[[ $have_wheels == 1 ]] && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
{
  if [[ $have_wheels == 1 ]]; then
    echo "installing $(find "$wheels" -maxdepth 1 -name "*.whl" | wc -l) wheels from $wheels into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl
  else
    echo "no wheels in $wheels: nothing to install (fetch them with benchmarks/lease/fetch_wheels.sh)"
  fi
  if "$python" -c "import wmfast, wmfast.kernels" 2> /dev/null \
      && [[ $("$python" -c "import wmfast, os; print(os.path.dirname(os.path.dirname(wmfast.__file__)))") == "$repo" ]]; then
    echo "wmfast is already installed from this checkout: not reinstalling"
  elif [[ $dry_run == 1 ]]; then
    echo "dry run: wmfast is not installed from $repo; install it first (pip install -e .)"
  else
    WMFAST_SKIP_CUDA_BUILD=1 "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$repo"
  fi
} 2>&1 | tee "$install_log"
echo "install step: $(( $(date +%s) - t0 )) s" | tee -a "$install_log"

pack=()
[[ -n ${OUT:-} ]] && pack=(--pack "$OUT")
"$python" -m wmfast.bench.lease "${args[@]}" "${pack[@]}" --install-log "$install_log"
code=$?
rm -f "$install_log"
exit $code
