#!/usr/bin/env bash
# On the GPU machine, in one command: install the wheels of .gpu-wheels/ (made here by bench/gpu_wheels.sh) into a
# --target folder, without touching the image's own packages, then run bench.gpu_check under a time limit and print
# its figures (tokens/s, peak memory, MFU per phase); with $OUT set (the device machine's folder that comes back),
# the check's whole log is copied there as gpu_check.log.
#
#     bash bench/gpu_wheels.sh                                                  # here, first: fills .gpu-wheels/
#     run(command="bash bench/gpu_run.sh", carry=[".gpu-wheels"], timeout_s=360)  # there: one H200, one rank
#     GPU_PYTHON=/tmp/py312/bin/python bash bench/gpu_run.sh --tiny --device cpu --precision fp32 [--ranks 2]
#                                                                               # here: install path and a smoke run
#
# Arguments go to bench.gpu_check (default: its ~0.5B Llama, ZeRO-2, bf16; two ranks where there are two GPUs or
# more, one on the single H200). GPU_CHECK_LIMIT (seconds, default 300) bounds the check and ends every process it
# started; GPU_SITE (default /tmp/gpu-site) is the --target folder; GPU_PYTHON (default python3) the interpreter.
#
# Only what the image lacks is installed: a wheel whose distribution the image already has, at the same version or
# a newer one, is left out (so torch 2.11, transformers 5.17, numpy, typing-extensions... stay the image's), pydantic
# and pydantic-core going together (one pins the other). The --target folder comes first on PYTHONPATH, so what it
# holds wins, but it holds only those wheels; a check fails the run if torch or transformers would come from it, and
# the check's import path is imported with prefect, mlflow and boto3 made unimportable.
#
# Verified here (2 cores, no GPU), in a Python 3.12.1 venv made like the image: torch 2.11.0+cu130 (PyPI's CUDA 13
# build: the CPU wheel on disk is for Python 3.11 only), transformers 5.17.0, tokenizers 0.23.3, huggingface-hub
# 1.33.0, peft 0.21.2, accelerate 1.16.0, safetensors 0.8.0, numpy 2.5.5, pyarrow 26.0.1, typing-extensions 4.16.0;
# pydantic uninstalled; no deepspeed, prefect, mlflow, boto3. There `bash bench/gpu_run.sh --tiny --device cpu
# --precision fp32` installed 10 of the 11 wheels (typing-extensions kept) in 4-6 s; pydantic, pydantic-core and
# deepspeed imported from /tmp/gpu-site, torch, transformers and tokenizers from the venv (imports 6-10 s); the check
# passed on 1 rank (86 s the first time, 60 s of it DeepSpeed JIT-building its CPU-only shared-memory comm op, which
# the CUDA accelerator never builds; 17 s on a rerun, the folder kept) and on 2 ranks with gloo (OMP_NUM_THREADS=1:
# 225 s the first time, 31 s on a rerun). GPU_CHECK_LIMIT=12 ended a 2-rank run with status 124, no process left.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${GPU_PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
SITE=${GPU_SITE:-/tmp/gpu-site}
LIMIT=${GPU_CHECK_LIMIT:-300}
start=$SECONDS

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "bench/gpu_run.sh: no wheels in $WHEELS: run bench/gpu_wheels.sh here and carry $WHEELS" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. The wheels the image lacks (or has older), decided by the image's own Python before PYTHONPATH changes.
mapfile -t needed < <("$PYTHON" - "$WHEELS"/*.whl <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    from packaging.version import Version
except ImportError:  # no packaging: install whatever is not the same version
    Version = str


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


wheels = {}
for path in sys.argv[1:]:
    name, ver = Path(path).name.split("-")[:2]
    wheels[canonical(name)] = (path, ver)
needed = set()
for name, (path, ver) in wheels.items():
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    newer = have is not None and (have == ver if Version is str else Version(have) >= Version(ver))
    print(f"  {name:<20} {ver:<10} image: {have or '-':<12} {'kept' if newer else 'installed'}", file=sys.stderr)
    if not newer:
        needed.add(name)
if needed & {"pydantic", "pydantic-core"}:
    needed |= {"pydantic", "pydantic-core"} & wheels.keys()
for name in sorted(needed):
    print(wheels[name][0])
EOF
)
stamp=$(cksum "${needed[@]}" </dev/null | sort)
if [ -f "$SITE/.installed" ] && [ "$(cat "$SITE/.installed")" = "$stamp" ]; then
    echo "the same ${#needed[@]} wheels are in $SITE already"  # kept: a rerun need not rebuild DeepSpeed's JIT ops
else
    rm -rf "$SITE"
    mkdir -p "$SITE"
    if [ ${#needed[@]} -gt 0 ]; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "${needed[@]}"
    fi
    echo "$stamp" >"$SITE/.installed"
    echo "installed ${#needed[@]} wheels into $SITE in $((SECONDS - start)) s"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. Where each import comes from; the image's torch and transformers must not be shadowed.
"$PYTHON" - "$SITE" <<'EOF'
import importlib
import sys
import time
from pathlib import Path

site = Path(sys.argv[1]).resolve()
start = time.perf_counter()
for name in ("torch", "transformers", "tokenizers", "pydantic", "pydantic_core", "deepspeed"):
    module = importlib.import_module(name)
    where = "wheels" if site in Path(module.__file__).resolve().parents else "image"
    print(f"  {name:<14} {getattr(module, '__version__', '?'):<16} from the {where}")
    if name in ("torch", "transformers") and where == "wheels":
        sys.exit(f"bench/gpu_run.sh: {name} would come from {site}, not from the image")
for name in ("prefect", "mlflow", "boto3"):  # as if not installed, wherever this runs (accelerate takes boto3 if it can)
    sys.modules[name] = None
import bench.gpu_check  # noqa: E402,F401  (the check's whole import path: it must not need them)

print(f"  imports took {time.perf_counter() - start:.1f} s")
EOF

# 3. The check, bounded (timeout ends the whole process group: torch.distributed.run and its ranks too).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch-extensions}
log=$(mktemp /tmp/gpu_check.XXXXXX.log)
set +e
timeout --kill-after=15 "$LIMIT" "$PYTHON" -m bench.gpu_check "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "== bench.gpu_check, exit status $status, $((SECONDS - start)) s in all (install, imports, check):"
grep -E '^(Llama|sft|reward|ppo)' "$log" || true
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the device machine's folder that comes back
    cp "$log" "$OUT/gpu_check.log"
fi
exit "$status"
