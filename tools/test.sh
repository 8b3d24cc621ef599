#!/usr/bin/env bash
# test.sh: the README's second command. On Debian 12: installs what is
# missing, configures a release build in build-test/ (cmocka required),
# builds it, runs every test, and ends with "N passed, N failed" counted from
# meson's test log (OK passes, and so does EXPECTEDFAIL, a should_fail test
# that failed as it must; SKIP is neither; anything else fails). Exits
# non-zero when a test failed or the build did.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
source tools/deps.sh

kvrt_install_deps
kvrt_configure build-test --buildtype=release -Dtests_require_cmocka=true
ninja -C build-test
log=build-test/meson-logs/testlog.json
rm -f "$log"
status=0
meson test -C build-test --print-errorlogs || status=$?

if [ ! -f "$log" ]; then
    echo "test.sh: meson test wrote no $log"
    echo "0 passed, 1 failed"
    exit 1
fi
read -r passed failed < <(python3 - "$log" <<'PY'
import json, sys
passed = failed = 0
for line in open(sys.argv[1]):
    if line.strip():
        result = json.loads(line).get("result")
        if result in ("OK", "EXPECTEDFAIL"):
            passed += 1
        elif result != "SKIP":
            failed += 1
print(passed, failed)
PY
)
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$status" -eq 0 ]
