#!/usr/bin/env bash
# Wheels for a lent GPU machine, which cannot download anything: this downloads, here, into .whl/ (git-ignored) the
# runtime packages the project needs that the machine's image lacks, for its Python 3.12 on x86-64, at the versions
# installed in the environment that runs this script (the development stack, pinned by .ci/constraints.txt).
# benchmarks/README.md gives the device command that installs them there and runs benchmarks/gpu_check.py.
#
#   benchmarks/gpu_wheels.sh           # download into .whl/
#   benchmarks/gpu_wheels.sh --check   # then check them in a throwaway environment that has only the machine's packages
#
# PYTHON: the environment whose versions are carried (default: python); PYTHON312: a Python 3.12 for the --check
# (default: python3.12, skipped when there is none).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

# What `import fastreid_rollback.all` and benchmarks/gpu_check.py import at run time (`python -X importtime`) that the
# machine lacks. fastai declares spacy, which vision code never imports: it stays behind. fastprogress 1.1 imports
# fasthtml, which imports starlette, itsdangerous and python-multipart; their other imports (anyio, python-dateutil,
# rich, typing-extensions, pyyaml, requests, ...) are on the machine.
carry=(fastai fastcore fasttransform fastprogress fastdownload plum-dispatch beartype python-fasthtml starlette itsdangerous python-multipart)

# The lent machine's image (its pip list, 2026-11): the --check gives the throwaway environment only these.
machine_has="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath
msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp"

quiet() { "$@" 2>&1 | { grep -v -e 'is ignored: it is neither' || true; }; return "${PIPESTATUS[0]}"; }
pins=($("$python" -c 'import importlib.metadata as m, sys; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${carry[@]}"))
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p .whl
for n in "${carry[@]}"; do rm -f .whl/"${n//-/_}"-*.whl; done     # one version of each: two stop the install there
quiet "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "${pins[@]}"
size_mb=$(du -sm .whl | cut -f1)
echo "carried in .whl/ (${size_mb} MB): ${pins[*]}"
if [ "$size_mb" -gt 30 ]; then echo "FAIL: .whl/ is ${size_mb} MB; it travels with the working tree (64 MiB in all): keep it under 30 MB"; exit 1; fi
[ "${1:-}" = "--check" ] || exit 0

# ---------------------------------------------------------------- --check
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
wheels=(); for n in "${carry[@]}"; do wheels+=(.whl/"${n//-/_}"-*.whl); done

# 1. They install on Python 3.12 the way the device command installs them (tags, one version of each).
py312=${PYTHON312:-python3.12}
if "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  quiet "$py312" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site312" "${wheels[@]}"
  echo "check 1: the wheels install on Python 3.12"
else echo "check 1 skipped: no Python 3.12 here (set PYTHON312)"; fi

# 2. A throwaway environment with only the machine's packages (linked from this environment: its versions, e.g. torch),
#    the carried wheels installed as the device command installs them, then the library imported and the CPU quick check.
#    Wheels with compiled code for 3.12 are replaced by the same version built for this Python.
base=$("$python" -c 'import sys; print(sys._base_executable)')
"$base" -m venv --without-pip "$tmp/venv"
sim_site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$python" - "$sim_site" "$machine_has" <<'EOF'
import importlib.metadata as md, re, sys
from pathlib import Path
site,has = Path(sys.argv[1]),set(sys.argv[2].split())
norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
for d in md.distributions():
    n = norm(d.metadata['Name'])
    if n not in has and not n.startswith(('nvidia-', 'cuda-')): continue
    for top in {Path(str(f)).parts[0] for f in d.files or [] if not str(f).startswith('..')} - {'__pycache__'}:
        src,dst = Path(d.locate_file(top)),site/top
        if src.exists() and not dst.exists(): dst.symlink_to(src)
EOF
local_wheels=()
for w in "${wheels[@]}"; do
  case "$w" in *-py3-none-any.whl|*-py2.py3-none-any.whl) local_wheels+=("$w") ;;
    *) pin=$(basename "$w" | cut -d- -f1,2 | sed 's/-/==/')
       quiet "$python" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/local" "$pin"
       local_wheels+=("$tmp/local/$(ls "$tmp/local" | grep -i "^$(basename "$w" | cut -d- -f1)-")") ;;
  esac
done
made=(); for d in build fastreid_rollback.egg-info; do [ -e $d ] || made+=($d); done   # setuptools builds the project here
trap 'rm -rf "$tmp" "${made[@]}"' EXIT
quiet "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$tmp/site" "${local_wheels[@]}" .
export PYTHONNOUSERSITE=1
if "$tmp/venv/bin/python" -c 'import fastai' 2>/dev/null; then echo "FAIL: the throwaway environment has a fastai of its own"; exit 1; fi
export PYTHONPATH="$tmp/site"
"$tmp/venv/bin/python" -c 'import fastreid_rollback.all, fastai.vision.all, fastai.callback.fp16; print("check 2: the library imports in the throwaway environment")'
"$tmp/venv/bin/python" benchmarks/gpu_check.py --device cpu --quick --out "$tmp/out"
echo "check 2: the CPU quick check ran in the throwaway environment"
