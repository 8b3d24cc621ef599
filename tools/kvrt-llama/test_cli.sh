#!/usr/bin/env bash
# test_cli.sh KVRT_LLAMA [BACKEND]: the command line on a tiny random model:
# generation past the context (shifts), a fork, chat turns, a saved session
# resumed (the run that saved prints the start of one uninterrupted run; the
# resumed one restores and continues it, see below), q8 and fp8
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

# A saved session resumed. Up to the save the run is the uninterrupted one's
# arithmetic, step for step, so what it prints is byte for byte the start of
# "one". After the load it is not: the context shifts' kvrt_cache_compact
# reordered the cache's slots and the session file holds the rows in position
# order, so attention sums them in another order, and a sampled token whose
# coin lies within a rounding of a cumulative probability may legitimately
# differ, and with it all that follows (test_llama's test_resume checks the
# resumed logits within a bound, the rows bit-exact). So of the resumed half
# only what holds whatever the tokens: it ran, it restored the tokens saved,
# it ran the pending token and 39 more, and it shifted the context as often
# as the uninterrupted run did after the save.
run --ctx 32 -n 40 -t 0.8 -s 3 --save "$dir/s.kvll" >"$dir/first" 2>"$dir/log1" ||
    fail "--save: $(cat "$dir/log1")"
head -c "$(wc -c <"$dir/first")" "$dir/one" | cmp -s - "$dir/first" ||
    fail "the run that saved printed another text than the uninterrupted run"
saved=$(sed -n 's/^\[save .*: 1 sequence, \([0-9]*\) tokens (kvrt_state_write)\]$/\1/p' "$dir/log1")
[ -n "$saved" ] || fail "no save message: $(cat "$dir/log1")"
run --ctx 32 -n 40 --load "$dir/s.kvll" >"$dir/second" 2>"$dir/log2" ||
    fail "--load: $(cat "$dir/log2")"
grep -q "^\[load .*, seq 0: $saved tokens restored by kvrt_state_read, next token [0-9]" "$dir/log2" ||
    fail "the load did not restore the $saved tokens saved: $(cat "$dir/log2")"
grep -q '^\[speed: prefill 0 tokens .*; decode 40 tokens ' "$dir/log2" ||
    fail "the resumed run did not decode 40 tokens: $(cat "$dir/log2")"
[ -s "$dir/second" ] || fail "the resumed run printed nothing"
shifts() { grep -c '^\[context shift, seq 0:' "$1" || true; }
s1=$(shifts "$dir/log1") s2=$(shifts "$dir/log2") s=$(shifts "$dir/log")
[ $((s1 + s2)) = "$s" ] || fail "save + load shifted the context $s1 + $s2 times, one run $s"
cat "$dir/first" "$dir/second" | cmp -s - "$dir/one" ||
    echo "test_cli: note: the resumed run's text differs from the uninterrupted run's (allowed)"

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
