#!/usr/bin/env bash
# Fills a folder (default: .wheels/ at the repository root, ignored by git) with every wheel that the offline GPU
# machine (nvidia-h200 image: CPython 3.12.3, torch 2.11.0+cu130, triton 3.6.0) lacks, for CPython 3.12 manylinux
# x86_64. Runs on a CPU machine that reaches a package index; any local Python 3 with pip will do.
# Re-running re-uses the wheels already there and removes other versions of the pinned packages, so the folder
# never holds two versions of one package. It ends by checking every wheel's dependencies against the folder and
# the image, prints the files with their sizes and fails if they exceed the carry budget.
set -euo pipefail
shopt -s extglob   # for the wheel-tag patterns of take()

usage="usage: benchmarks/lease/fetch_wheels.sh [-h] [DIR]  (DIR: the wheel folder, default .wheels/ at the repo root)"
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

case $# in
  0) dir=$repo_root/.wheels ;;
  1) case $1 in
       -h | --help) echo "$usage"; exit 0 ;;
       -*) echo "fetch_wheels.sh: unknown option '$1'; $usage" >&2; exit 2 ;;
       *) dir=$1 ;;
     esac ;;
  *) echo "fetch_wheels.sh: at most one argument (DIR), got $#; $usage" >&2; exit 2 ;;
esac
if [[ -e $dir && ! -d $dir ]]; then
  echo "fetch_wheels.sh: '$dir' exists and is not a directory; $usage" >&2; exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# Versions that install together on the image. pydantic 2.11.7 pins pydantic_core==2.33.2 and accepts
# annotated_types>=0.6.0 (0.7.0 is the release pydantic 2.11 was tested with) and typing_inspection>=0.4.0.
# importlib_metadata stays on 8.x: 10.x requires lazy-importer, which the image lacks; 8.7.0 needs only zipp.
# liger_kernel is the optional external baseline of benchmarks/bench_adaln.py (requires torch>=2.1.2, triton>=2.3.1).
# deepspeed is built, not downloaded (PyPI has only its sdist).
downloaded=(diffusers==0.42.1 pydantic==2.11.7 pydantic_core==2.33.2 annotated_types==0.7.0
            typing_inspection==0.4.5 hjson==3.1.0 importlib_metadata==8.7.0 liger_kernel==0.8.5)
built=(deepspeed==0.19.8)
max_mib=40   # the checkout and every carried path share a 64 MiB budget on the GPU machine

# The image's Python packages (KINDS.md of the device tool, 'nvidia-h200', read 2026-11-17), lower-case, '-' joined.
image_packages="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"
# Versions of the image's packages that a session saw there (KINDS.md 'pip list'); the others are checked by name only.
image_versions="accelerate==1.15.0 huggingface-hub==1.33.0 numpy==2.5.2 safetensors==0.8.0 tokenizers==0.23.2
torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 triton==3.6.0"

pip_args=(--disable-pip-version-check --no-input -q --progress-bar off)
target=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# pip reports each index mirror that lacks a project as "Location ... is ignored": noise, dropped here.
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

# "Pydantic-Core" and "pydantic_core" name one project (PEP 503, with '_' as the separator wheel files use).
norm() { local n=${1,,}; echo "${n//[-.]/_}"; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Removes the wheels of $1 other than version $2; returns 0 when version $2 is already in the folder.
prune() {
  local name=$1 version=$2 have=1 f base
  for f in "$dir"/*.whl; do
    [[ -e $f ]] || continue
    base=${f##*/}
    [[ $(norm "${base%%-*}") == "$(norm "$name")" ]] || continue
    if [[ ${base#*-} == "$version"-* ]]; then
      have=0
    else
      echo "  remove  $base (pinned: $name==$version)"
      rm -f "$f"
    fi
  done
  return $have
}

# Moves the one wheel that pip left in $tmp into the folder, after checking its name and tags.
take() {
  local name=$1 version=$2 pattern=$3 files=("$tmp"/*.whl)
  if [[ ${#files[@]} -ne 1 || ! -e ${files[0]} ]]; then
    echo "fetch_wheels.sh: expected one wheel of $name==$version, pip left: ${files[*]##*/}" >&2; exit 1
  fi
  local base=${files[0]##*/}
  # shellcheck disable=SC2053  # $pattern is a glob on purpose
  if [[ $(norm "${base%%-*}") != "$(norm "$name")" || ${base#*-} != "$version"-* || $base != $pattern ]]; then
    echo "fetch_wheels.sh: $name==$version gave $base, not a wheel matching $pattern" >&2; exit 1
  fi
  mv "${files[0]}" "$dir/"
  echo "  $4 $base ($((SECONDS - t0)) s)"
}

echo "wheels for CPython 3.12 manylinux x86_64 in $dir"
for pin in "${downloaded[@]}"; do
  name=${pin%%==*} version=${pin#*==} t0=$SECONDS
  if prune "$name" "$version"; then echo "  present $pin"; continue; fi
  python3 -m pip download "${pip_args[@]}" --no-deps "${target[@]}" -d "$tmp" "$pin" 2>&1 | quiet
  # A wheel for CPython 3.12 on manylinux x86_64, or a pure one.
  take "$name" "$version" "*-@(py3|py2.py3|cp312)-@(none|abi3|cp312)-@(any|manylinux*x86_64).whl" fetched
done

for pin in "${built[@]}"; do
  name=${pin%%==*} version=${pin#*==} t0=$SECONDS
  if prune "$name" "$version"; then echo "  present $pin"; continue; fi
  # DS_BUILD_OPS=0 leaves every op to DeepSpeed's JIT loader, so the wheel is pure Python whatever the local
  # Python; DS_ACCELERATOR=cuda is recorded in the wheel in place of the 'cpu' that a build without a GPU detects.
  # --no-cache-dir: pip's cache would hand back a wheel built earlier under other settings.
  DS_BUILD_OPS=0 DS_ACCELERATOR=cuda python3 -m pip wheel "${pip_args[@]}" --no-cache-dir --no-deps -w "$tmp" "$pin" \
    2>&1 | quiet
  take "$name" "$version" "*-py3-none-any.whl" built
done

# Checks every wheel of the folder: tags, one version per package, and each dependency (markers evaluated for
# CPython 3.12 on Linux x86_64, extras left out) found in the folder or the image, at a version it accepts where
# the version is known. Then prints the table and the total, and fails over the budget.
python3 - "$dir" "$max_mib" "$image_packages" "$image_versions" <<'PY'
import email.parser, os, re, sys, zipfile
try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement

folder, max_mib, image_names, image_pins = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
image = {norm(n): None for n in image_names.split()}
image.update({norm(p.split("==")[0]): p.split("==")[1] for p in image_pins.split()})
wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
ours, errors, unchecked = {}, [], set()
for f in wheels:
    name, version, *_, py, abi, plat = f[:-4].split("-")
    if norm(name) in ours:
        errors.append(f"two versions of {name}: {ours[norm(name)][1]} and {f}")
    ours[norm(name)] = (version, f)
    if py not in ("py3", "py2.py3", "cp312") or abi not in ("none", "abi3", "cp312") or not (
            plat == "any" or (plat.startswith("manylinux") and plat.endswith("x86_64"))):
        errors.append(f"{f}: not a wheel for CPython 3.12 manylinux x86_64")
for f in wheels:
    with zipfile.ZipFile(os.path.join(folder, f)) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        requires = email.parser.HeaderParser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another Python or platform
        dep = norm(req.name)
        if dep in ours:
            version = ours[dep][0]
        elif dep in image:
            version = image[dep]
        else:
            errors.append(f"{f}: needs {req}, neither in the folder nor in the image")
            continue
        if version is None:
            if req.specifier:
                unchecked.add(f"{req.name}{req.specifier}")
        elif not req.specifier.contains(version, prereleases=True):
            errors.append(f"{f}: needs {req}, has {req.name} {version}")
total = 0
for f in wheels:
    size = os.path.getsize(os.path.join(folder, f))
    total += size
    print(f"  {size / 2**20:8.2f} MiB  {f}")
print(f"  {total / 2**20:8.2f} MiB  total, {len(wheels)} wheels (budget {max_mib:g} MiB)")
if unchecked:
    print("  image versions not known here, not checked: " + ", ".join(sorted(unchecked)))
if total > max_mib * 2**20:
    errors.append(f"{total / 2**20:.2f} MiB exceeds the {max_mib:g} MiB budget")
for e in errors:
    print(f"fetch_wheels.sh: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

rel=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$dir" "$repo_root")
if [[ $rel == .. || $rel == ../* ]]; then
  echo "done in $SECONDS s. $dir lies outside the checkout: move it inside to carry it to the GPU machine, then"
  rel=$dir
else
  echo "done in $SECONDS s. On the GPU machine: run with carry=[\"$rel\"] and a command that starts with"
fi
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/wmfast-site $rel/*.whl"
echo "  export PYTHONPATH=/tmp/wmfast-site"
