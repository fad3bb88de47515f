#!/usr/bin/env bash
# Wheels of the project's dependencies that the GPU machine may lack, for Python 3.12 on x86-64 Linux,
# into .whl/ (git-ignored); benchmarks/gpu_check.sh installs the ones that machine is missing from there,
# without any index. Run it on a machine with network access, before the GPU session:
#
#   bash benchmarks/gpu_wheels.sh [WHEEL_DIR]       # default .whl; carry it to the GPU machine
#
# The GPU machine (issue 18) has Python 3.12, torch 2.11 + CUDA 13, lightning 2.6.6, transformers,
# tokenizers, safetensors, tensorboard and pyarrow, so also what those need (numpy, PyYAML,
# packaging, typing-extensions, fsspec, tqdm, ...). The versions are the ones the tests run with.
# The whole folder must stay under the 64 MiB that a device run can carry.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
LIMIT_MIB=64
WHEELS=(
  jsonargparse==4.53.0          # LightningCLI (jsonargparse[signatures])
  docstring-parser==0.18.0      # jsonargparse[signatures]
  typeshed-client==2.15.0       # jsonargparse[signatures]
  torchmetrics==1.9.0           # lightning needs it too: only installed where missing
  lightning-utilities==0.15.3   # torchmetrics, lightning
  matplotlib==3.11.2            # plots of some tools (imported lazily)
  contourpy==1.3.3              # matplotlib
  cycler==0.12.1                # matplotlib
  fonttools==4.68.0             # matplotlib
  kiwisolver==1.5.1             # matplotlib
  pillow==13.0.0                # matplotlib
  pyparsing==3.3.3              # matplotlib
  python-dateutil==4.0.0        # matplotlib
  tzdata==2026.6                # python-dateutil
)
mkdir -p "$DIR"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" "${WHEELS[@]}"

echo "== Requires-Dist of each wheel (without optional extras, but with jsonargparse[signatures])"
for wheel in "$DIR"/*.whl; do
  echo "$(basename "$wheel"):"
  unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /' || true
  unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist.*extra == "signatures"' | sed 's/^/    /' || true
done

# Every requirement (for Python 3.12, with the extras the project uses) must be a wheel here or a
# package the GPU machine is known to have.
python3 - "$DIR" <<'PY'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

ON_MACHINE = {"torch", "lightning", "pytorch-lightning", "transformers", "tokenizers", "safetensors", "tensorboard",
              "pyarrow", "numpy", "pyyaml", "packaging", "typing-extensions", "fsspec", "tqdm", "setuptools",
              "huggingface-hub", "filelock", "requests", "regex", "protobuf", "grpcio", "markdown", "werkzeug",
              "absl-py", "jinja2", "networkx", "sympy", "six", "aiohttp"}
EXTRAS = {"jsonargparse": {"signatures"}}
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wheels = {}
for path in Path(sys.argv[1]).glob("*.whl"):
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M).group(1))
    wheels[name] = [line[len("Requires-Dist: "):] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix"}
missing = []
for name, requires in sorted(wheels.items()):
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e})
                                              for e in EXTRAS.get(name, set()) | {""}):
            continue
        dep = norm(req.name)
        if dep not in wheels and dep not in ON_MACHINE:
            missing.append(f"{dep} (required by {name}: {text})")
if missing:
    sys.exit("missing wheels:\n  " + "\n  ".join(missing))
print(f"== {len(wheels)} wheels; every requirement is a wheel here or on the GPU machine")
PY

TOTAL=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "== total $(( TOTAL / 1024 )) KiB in $DIR (limit ${LIMIT_MIB} MiB)"
if (( TOTAL > LIMIT_MIB * 1024 * 1024 )); then echo "error: over ${LIMIT_MIB} MiB" >&2; exit 1; fi
