#!/usr/bin/env bash
# Prepare a GPU run of benchmarks/gpu_suite.py on a machine that has torch, transformers,
# accelerate and huggingface_hub but no diffusers/gradio and no network.
#
# Run this HERE (a machine with network), in the repo root:
#     bash benchmarks/gpu_suite.sh
# It downloads the missing wheels (python 3.12, manylinux x86_64; pinned in gpu_suite.py's
# DEVICE_WHEELS) into wheels/ (git-ignored), checks that every requirement of those wheels is either
# among them or already on the GPU image (DEVICE_HAS below), checks that the working tree plus
# wheels/ stay under MAX_MIB (default 64; set it to the upload limit of your GPU machine, if any), and prints
# the command to run on the GPU.
# Options: PYTHON_VERSION=3.11 bash benchmarks/gpu_suite.sh   (another python on the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
WHEELS=wheels
export WHEEL_PY=${PYTHON_VERSION:-3.12}

mkdir -p "$WHEELS"
cmd=$($PY benchmarks/gpu_suite.py --print-wheel-command | sed "s/--python-version 3.12/--python-version $WHEEL_PY/")
echo "+ $cmd" >&2
eval "$cmd -q"

# Every non-optional requirement of a carried wheel must be carried too or be on the GPU image.
# DEVICE_HAS: the packages the target GPU image already has (edit for yours; this list: a stock PyTorch +
# transformers image).
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec h11 hf-xet
httpcore httpx huggingface-hub idna jinja2 markdown-it-py markupsafe matplotlib mdurl networkx numpy packaging
pandas pillow pip protobuf psutil pygments pyparsing python-dateutil pyyaml regex requests rich safetensors
sentencepiece setuptools shellingham six sympy tokenizers torch tqdm transformers typer typing-extensions urllib3
uvloop wheel zipp" \
$PY - "$WHEELS" <<'EOF'
import os, re, sys, zipfile
from pathlib import Path
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
folder = Path(sys.argv[1])
env = {**default_environment(), "python_version": os.environ["WHEEL_PY"],
       "python_full_version": os.environ["WHEEL_PY"] + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
carried, needs = {}, {}
for whl in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = norm(re.search(r"^Name: (.+)$", text, re.M).group(1).strip())
    carried[name] = whl.name
    for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            needs.setdefault(norm(req.name), []).append(name)
# Declared but never imported on python >= 3.8 (diffusers/utils/import_utils.py uses importlib.metadata).
unused = {"importlib-metadata"}
have = set(carried) | {norm(n) for n in os.environ["DEVICE_HAS"].split()} | unused
missing = {req: by for req, by in needs.items() if req not in have}
total = sum((folder / f).stat().st_size for f in carried.values())
print(f"{len(carried)} wheels in {folder}/, {total / 2**20:.1f} MiB", file=sys.stderr)
if missing:
    print("NOT on the GPU image and not carried: " + ", ".join(f"{r} (needed by {', '.join(b)})"
                                                              for r, b in sorted(missing.items())), file=sys.stderr)
    sys.exit(1)
EOF

tree_kib=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
wheel_kib=$(du -sk "$WHEELS" | cut -f1)
total_mib=$(( (tree_kib + wheel_kib) / 1024 ))
echo "working tree ${tree_kib} KiB + $WHEELS/ ${wheel_kib} KiB = ${total_mib} MiB (limit MAX_MIB=${MAX_MIB:-64})" >&2
if (( total_mib >= ${MAX_MIB:-64} )); then
    echo "too large: carry only the diffusers wheel (the app step is then skipped)" >&2
    exit 1
fi

install=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_suite; print(gpu_suite.wheel_install_command())")
cat <<EOT

On the GPU machine, in the repo root (copy wheels/ along with the repository):

  $install && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --json \${OUT:-.}/gpu_suite.json

EOT
