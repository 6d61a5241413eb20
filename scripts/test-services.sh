#!/usr/bin/env bash
# Installs the servers that the test suite starts for itself (tests/services.py): PostgreSQL and
# Redis, from Debian's packages, when they are missing. As root, or through password-less sudo.
# Where neither is possible the tests that need them are skipped, except in CI (CI set), where a
# missing server must fail the run rather than hide.
set -euo pipefail

packages=()
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || packages+=(redis-server)
[ -x /usr/bin/chromium ] || packages+=(chromium)  # the browser tests (tests/web) drive Debian's Chromium
if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi

cannot_install() {
    if [ -n "${CI:-}" ]; then
        echo "error: cannot install ${packages[*]}: $1" >&2
        exit 1
    fi
    echo "warning: cannot install ${packages[*]}: $1; the tests that need them will be skipped" >&2
    exit 0
}

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    cannot_install "not root, and no password-less sudo"
fi
command -v apt-get >/dev/null || cannot_install "no apt-get (the tests expect Debian's packages)"

install() {
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${packages[@]}" </dev/null
}
echo "installing ${packages[*]} for the tests"
# the package lists may be missing or stale on a fresh machine: refresh them only then
install || { "${as_root[@]}" apt-get update -q </dev/null && install; }
