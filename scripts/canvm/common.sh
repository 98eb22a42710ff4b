# Sourced by the canvm scripts: where the build directory is (outside the source tree).
BUILD=${CANVM_DIR:-${XDG_CACHE_HOME:+$XDG_CACHE_HOME/dongle-canvm}}
BUILD=${BUILD:-/var/tmp/dongle-canvm}
