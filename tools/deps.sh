# deps.sh: sourced by quickstart.sh and test.sh. Installs, with apt-get, the
# Debian 12 packages that building and testing kvrt need and that are not
# installed yet (through sudo unless running as root).
kvrt_packages=(build-essential meson ninja-build pkg-config libcmocka-dev libxxhash-dev
               libopenblas-dev libsodium-dev)

kvrt_install_deps() {
    local missing=() p
    for p in "${kvrt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    echo "installing: ${missing[*]}"
    "${sudo[@]}" apt-get update -q &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# kvrt_configure DIR ARGS...: meson setup, or reconfigure when DIR exists.
kvrt_configure() {
    local dir="$1"
    shift
    if [ -f "$dir/build.ninja" ]; then
        meson setup --reconfigure "$dir" "$@"
    else
        meson setup "$dir" "$@"
    fi
}
