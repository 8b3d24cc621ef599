#!/usr/bin/env bash
# test_cli.sh KVRT_LLAMA [BACKEND]: the command line on a tiny random model:
# generation past the context (shifts), a fork, chat turns, a saved session
# resumed (what the two runs print equals one uninterrupted run), q8 and fp8
# caches (on cpu), and the errors for a prompt longer than the context and a
# truncated checkpoint.
set -euo pipefail
llama="$1"
backend="${2:-cpu}"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "test_cli: $*"; exit 1; }
run() { "$llama" "$dir/model.bin" --backend "$backend" "$@"; }

"$llama" --make-tiny "$dir" -s 5 >/dev/null

run --ctx 32 -n 80 -t 0.8 -s 3 >"$dir/one" 2>"$dir/log"
grep -q '^\[context shift, seq 0: context of 32 full' "$dir/log" || fail "no context shift"
grep -q '^\[speed: prefill' "$dir/log" || fail "no speed line"

run --ctx 32 -n 40 -t 0.8 -s 3 --save "$dir/s.kvll" >"$dir/first" 2>/dev/null
run --ctx 32 -n 40 --load "$dir/s.kvll" >"$dir/second" 2>/dev/null
cat "$dir/first" "$dir/second" | cmp -s - "$dir/one" || fail "save + load printed another text"

if [ "$backend" = cpu ]; then # quantized caches: the CPU backend's for now
    for d in q8 fp8; do
        run --ctx 32 -n 80 -t 0.8 -s 3 --cache-dtype "$d" >/dev/null 2>"$dir/log" ||
            fail "--cache-dtype $d: $(cat "$dir/log")"
        grep -q "^\[model .*kvrt cache on cpu, ${d}[_,]" "$dir/log" || fail "--cache-dtype $d: no $d cache"
        grep -q '^\[context shift, seq 0' "$dir/log" || fail "--cache-dtype $d: no context shift"
    done
fi

run --parallel 3 -n 20 >"$dir/out" 2>"$dir/log"
[ "$(grep -c '^\[fork: kvrt_seq_cp seq 0 -> seq' "$dir/log")" = 2 ] || fail "no forks"
[ "$(grep -c '^--- seq' "$dir/out")" = 3 ] || fail "not 3 sequences"

printf 'hello there\nhow are you\n' | run --chat -n 12 >"$dir/out" 2>"$dir/log"
grep -q '^\[turn 2: .* cached tokens kept, kvrt_seq_rm of' "$dir/log" || fail "no chat turn 2"

if run --ctx 8 -i "a prompt longer than eight tokens" >/dev/null 2>"$dir/log"; then
    fail "a prompt longer than the context ran"
fi
grep -q 'do not fit the context of 8' "$dir/log" || fail "prompt error: $(cat "$dir/log")"

head -c 1000 "$dir/model.bin" >"$dir/cut.bin"
if "$llama" "$dir/cut.bin" -z "$dir/tokenizer.bin" >/dev/null 2>"$dir/log"; then
    fail "a truncated checkpoint loaded"
fi
grep -q 'needs' "$dir/log" || fail "truncated checkpoint: $(cat "$dir/log")"
echo "test_cli: ok"
