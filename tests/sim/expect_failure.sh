#!/usr/bin/env bash
# expect_failure.sh PATTERN CMD [ARGS...]: runs CMD and passes only when it
# fails and its output (stdout and stderr) contains PATTERN: a check of
# kvrt-sim proved on a deliberate bug (a mutant) it must report.
set -u
pattern="$1"
shift
out="$("$@" 2>&1)"
status=$?
if [ "$status" -eq 0 ]; then
    printf '%s\n' "$out" | tail -n 20
    echo "expect_failure: '$*' passed; it must fail with: $pattern"
    exit 1
fi
if ! printf '%s\n' "$out" | grep -qF -- "$pattern"; then
    printf '%s\n' "$out" | tail -n 20
    echo "expect_failure: '$*' failed (status $status) without: $pattern"
    exit 1
fi
printf '%s\n' "$out" | grep -F -m 1 -- "$pattern"
echo "expect_failure: failed as it must (status $status)"
exit 0
