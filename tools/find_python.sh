# Sourced by train.sh, test.sh and tools/slurm_train.sh (ROOT = the repository): sets PYTHON to the
# interpreter that runs blocklab, or prints one line and exits 2. The first of these that has torch:
#   $PYTHON (when set, it must have torch), the active virtual environment ($VIRTUAL_ENV/bin/python),
#   the repository's .venv/bin/python, python3, python.
# Checking for torch with importlib's find_spec takes milliseconds (importing torch takes seconds).
_has_torch() {
  "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' >/dev/null 2>&1
}
_install_hint="run: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
if [ -n "${PYTHON:-}" ]; then
  if ! _has_torch "$PYTHON"; then
    echo "error: PYTHON=$PYTHON cannot import torch; unset PYTHON or $_install_hint" >&2; exit 2
  fi
else
  for _candidate in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin/python"} "$ROOT/.venv/bin/python" python3 python; do
    if command -v "$_candidate" >/dev/null 2>&1 && _has_torch "$_candidate"; then
      PYTHON="$_candidate"; break
    fi
  done
  if [ -z "${PYTHON:-}" ]; then
    echo "error: no Python with torch found (tried \$VIRTUAL_ENV, $ROOT/.venv, python3, python); $_install_hint" >&2
    exit 2
  fi
fi
unset -f _has_torch; unset _candidate _install_hint
