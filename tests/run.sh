#!/usr/bin/env bash
# Sets up everything from nothing and runs every check: lint, types, packaging, tests.
# README's test command; .ci/run calls it. Works on a fresh Debian/Ubuntu machine (apt-get as root
# for Chromium and systemd-analyze) and in an existing checkout (reuses .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

# System packages: Debian's chromium for the browser tests, systemd for `systemd-analyze verify`.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "== not root or no apt-get: tests needing ${need[*]} will skip"
  fi
fi

# A venv of our own; the first install is a regular (wheel) install, which proves the package data
# and the namespace mapping land in site-packages.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY="$ROOT/.venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
echo "== pip install .[dev] (wheel)"
"$VPY" -m pip install -q ".[dev]"
(cd / && "$VPY" - <<'PYEOF'
import importlib, pathlib
for name in ("stackwatch.engine", "stackwatch.daemon", "stackwatch.web"):
    mod = importlib.import_module(name)
    assert "site-packages" in mod.__file__, mod.__file__
static = pathlib.Path(importlib.import_module("stackwatch.web").__file__).parent / "static"
assert (static / "index.html").is_file(), "web/static missing from the wheel"
import importlib.util
assert importlib.util.find_spec("daemon") is None or "site-packages" not in (importlib.util.find_spec("daemon").origin or ""), "a top-level 'daemon' package was installed"
print("wheel install ok")
PYEOF
)
echo "== mypy (installed package)"
(cd / && "$VPY" -m mypy --config-file "$ROOT/pyproject.toml" -p stackwatch.engine -p stackwatch.daemon -p stackwatch.web)

echo "== pip install -e . (editable)"
"$VPY" -m pip install -q --no-deps -e .
(cd / && "$VPY" -c "import stackwatch.engine as e, sys; p=e.__file__; assert p.startswith('$ROOT'), p; print('editable install ok:', p)")

echo "== ruff"
"$VPY" -m ruff check engine daemon web tests bench

echo "== pytest"
set +e
"$VPY" -m pytest "$@"
rc=$?
set -e
# pytest's 5 means no test ran: that is a failure of the suite, not a pass.
exit $rc
