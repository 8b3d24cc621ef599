#!/usr/bin/env bash
# quickstart.sh: the README's first command. On Debian 12: installs what is
# missing, configures a release build in build/, builds it and runs the demo
# (arguments are passed to kvrt-demo, e.g. --quick or --backend cpu), then
# writes a tiny random llama2.c model to build/tiny-llama/ and generates
# from it with kvrt-llama (on the same --backend), past its context.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
source tools/deps.sh

kvrt_install_deps
kvrt_configure build --buildtype=release
ninja -C build
build/tools/kvrt-demo "$@"

backend=cpu
args=("$@")
for ((i = 0; i + 1 < ${#args[@]}; i++)); do
    [ "${args[i]}" = --backend ] && backend="${args[i + 1]}"
done
build/tools/kvrt-llama/kvrt-llama --make-tiny build/tiny-llama
build/tools/kvrt-llama/kvrt-llama build/tiny-llama/model.bin --backend "$backend" \
    --ctx 64 --keep 8 -n 120 -i "Once upon a time"
