#!/usr/bin/env bash
# Sets up the environment (tools/setup.sh --dev, cached) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k codec`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/tools/setup.sh" --dev
cd "$root"
export OMP_WAIT_POLICY=PASSIVE  # two pytest workers share the cores: idle OpenMP threads must not spin
set +e
.venv/bin/python -m pytest -n 2 --dist loadfile "$@" tests
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
[ "$rc" = 5 ] && echo "no tests were collected: failing on purpose" >&2
exit "$rc"
