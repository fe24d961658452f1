#!/usr/bin/env bash
# A new user's install, checked from nothing: a fresh virtual environment that holds only a torch (TORCH_SPEC,
# default torch==2.13.0, which resolves to the local 2.13.0+cpu wheel: small, and C++-only), then
#   1. pip install .                       (pip's isolated build: no torch there, so the pure-Python package)
#   2. pip install --no-build-isolation .  (the C++ extension against the venv's torch; CUDA too when torch is a
#                                           CUDA build and nvcc is found)
#   3. pip wheel --no-build-isolation .    (a wheel with the extension)
# each followed by `import rim_fast`, `python -m rim_fast.info --short` and the demo (its pretrained RIM), run outside
# the checkout so that the installed package is the one imported.
#   .ci/fresh_install.sh [WORKDIR]      NO_NVCC=1 (default) hides nvcc: PATH without CUDA, CUDA_HOME pointing nowhere
# TORCH_FROM=SITE_PACKAGES links torch and the distributions it requires from another environment instead of
# installing TORCH_SPEC (a CUDA torch without its ~5 GB download; with NO_NVCC=0, the CUDA build).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-${TMPDIR:-/tmp}/rim_fast_fresh_install}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
rm -rf "$WORK" && mkdir -p "$WORK"
# a copy of the tracked files (and of what a commit would add): the checkout's build products stay out of it
SRC="$WORK/src"
mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC" 2>/dev/null || true)
if [ "${NO_NVCC:-1}" = 1 ]; then
  export PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -E 'cuda|/usr/local/bin' | paste -sd: -)
  export CUDA_HOME="$WORK/no-cuda"
  command -v nvcc && { echo "nvcc is still on PATH" >&2; exit 1; }
fi
T0=$SECONDS
$PYTHON -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
if [ -n "${TORCH_FROM:-}" ]; then
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" - "$TORCH_FROM" "$SITE" <<'PYEOF'
import importlib.metadata as md, os, re, sys
source, site = sys.argv[1:]
dists = {d.metadata["Name"].lower().replace("_", "-"): d for d in md.distributions(path=[source])}
todo, seen = ["torch"], set()
while todo:
    name = todo.pop()
    if name in seen or name not in dists:
        continue
    seen.add(name)
    if name in ("pip", "setuptools"):
        continue  # the venv has its own: installed below, never half-linked
    dist = dists[name]
    for req in dist.requires or []:
        if "extra ==" not in req:
            todo.append(re.split(r"[ ;<>=!~\[(]", req, 1)[0].lower().replace("_", "-"))
    tops = {f.parts[0] for f in dist.files or [] if f.parts and not f.parts[0].endswith(".data")}
    for top in tops:
        target, link = os.path.join(source, top), os.path.join(site, top)
        if os.path.exists(target) and not os.path.lexists(link) and top != "..":
            os.symlink(target, link)
print("linked", len(seen), "distributions from", source)
PYEOF
  # what installing torch brings (torch requires setuptools): a setuptools that reads pyproject.toml's license
  "$PY" -m pip install -q "setuptools>=77" 2>&1 | grep -v "is ignored" || true
else
  "$PY" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
fi
"$PY" -c "import torch; print('fresh venv: torch', torch.__version__, '| CUDA', torch.version.cuda)"
echo "== venv with torch: $((SECONDS - T0)) s"

check() {  # what a user runs after installing
  (cd "$WORK" && "$PY" -c "import rim_fast; print('import rim_fast:', rim_fast.__version__, rim_fast.__file__)" \
    && "$PY" -m rim_fast.info --short \
    && "$PY" -m rim_fast.demo --out "$WORK/demo_$1" | tail -n 3)
}

t=$SECONDS
"$PY" -m pip install -q "$SRC" 2>&1 | grep -v "is ignored" || true
check isolated
(cd "$WORK" && "$PY" -c "import rim_fast._ext as e, sys; m = e.missing() or ''; sys.exit(0 if 'build isolation' in m else 'expected the note about build isolation, got: ' + m)")
echo "== pip install . (isolated build: pure Python): $((SECONDS - t)) s"

t=$SECONDS
"$PY" -m pip uninstall -q -y rim-fast
(cd "$SRC" && rm -rf build && "$PY" -m pip install -q --no-build-isolation . 2>&1 | grep -v "is ignored" || true)
check built
(cd "$WORK" && "$PY" -c "import rim_fast._ext as e, sys; sys.exit(0 if e.module() is not None else 'the extension did not load: ' + str(e.missing()))")
echo "== pip install --no-build-isolation . (with the extension): $((SECONDS - t)) s"

t=$SECONDS
(cd "$SRC" && "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheels" . 2>&1 | grep -v "is ignored" || true)
ls -la "$WORK/wheels"
"$PY" -m zipfile -l "$WORK"/wheels/rim_fast-*.whl | grep -E "_C\.|LICENSE|pretrained/demo_deblur.pt"
echo "== pip wheel --no-build-isolation .: $((SECONDS - t)) s"
echo "fresh install: OK in $((SECONDS - T0)) s"
