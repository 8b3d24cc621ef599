#!/usr/bin/env bash
# quickstart.sh: the README's first command. On Debian 12: installs what is
# missing, configures a release build in build/, builds it and runs the demo
# (arguments are passed to kvrt-demo, e.g. --quick or --backend cpu).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
source tools/deps.sh

kvrt_install_deps
kvrt_configure build --buildtype=release
ninja -C build
exec build/tools/kvrt-demo "$@"
