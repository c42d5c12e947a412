#!/usr/bin/env bash
# First contact on a GPU: the README GPU section, offline, time-boxed (draft of benchmarks/lease/run.sh).
set -u
T0=$(date +%s); left() { echo $(( $1 - ($(date +%s) - T0) )); }; el() { echo $(( $(date +%s) - T0 )); }
O=${OUT:-/tmp/out}; R=$O/r; mkdir -p $R
exec > >(tee -a $R/lease.log) 2>&1
export PYTHONUNBUFFERED=1
echo "== install $(date -u)"; nvidia-smi; git log -1 --format=%H 2>/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl && export PYTHONPATH=/tmp/site
WMFAST_SKIP_CUDA_BUILD=1 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
( WMFAST_CUDA_ARCHS=90 MAX_JOBS=16 timeout 200 python3 setup.py build_ext --inplace > $R/build.log 2>&1; echo "build rc=$?" >> $R/build.log ) &
BUILD=$!
echo "== env + ceilings (t=$(el)s)"
timeout 40 python3 - <<'PY'
import torch, triton, time
print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(); y = torch.empty_like(x)
from triton.testing import do_bench
t = do_bench(lambda: y.copy_(x), return_mode="median"); print(f"copy {2*x.numel()/t/1e6:.0f} GB/s")
for (m,n,k) in [(8192,8192,8192),(5120,1536,512),(5120,512,2048),(5120,64000,512)]:
    a = torch.randn(m,k,device="cuda",dtype=torch.bfloat16); b = torch.randn(k,n,device="cuda",dtype=torch.bfloat16)
    t = do_bench(lambda: a@b, return_mode="median"); print(f"matmul {m}x{n}x{k} {2*m*n*k/t/1e9:.0f} TFLOP/s")
PY
echo "== pytest -m gpu (no csrc) (t=$(el)s)"
timeout 130 python3 -m pytest -m gpu -q --timeout 60 -n 8 -p no:cacheprovider --deselect tests/test_csrc.py \
  --ignore tests/test_csrc.py --junitxml $R/junit_triton.xml -rfE 2>&1 | tail -60
echo "== wait build (t=$(el)s)"; wait $BUILD; tail -5 $R/build.log; ls wmfast/*.so
echo "== pytest csrc (t=$(el)s)"
timeout 50 python3 -m pytest -m gpu -q --timeout 40 -n 8 -p no:cacheprovider tests/test_csrc.py --junitxml $R/junit_csrc.xml -rfE 2>&1 | tail -40
echo "== bench ops (t=$(el)s)"
timeout $(left 270) python3 -c "import sys; from wmfast.cli import main; sys.exit(main())" bench --suite ops --out $R/bench 2>&1 | tail -80
echo "== end t=$(el)s"
cd $O && tar czf r.tgz r && rm -rf r
