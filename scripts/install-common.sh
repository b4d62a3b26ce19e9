# Sourced by scripts/install.sh and scripts/uninstall.sh (POSIX sh).

# sha256 of the config `make install` wrote, in `sha256sum` format, inside the install:
# `make uninstall` removes the config only if it still has this digest.
CONFIG_RECORD=share/sockscope/config.sha256

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

# ProtectHome=yes (systemd/sockscope.service) makes these invisible to the service.
hidden_from_service() {
  case "$1/" in
    /home/* | /root/* | /run/user/*) return 0 ;;
  esac
  return 1
}

# Absolute, no trailing slash, only characters that need no quoting in sed or a unit file.
check_path() {
  printf '%s\n' "$2" | grep -Eqx '(/[A-Za-z0-9._+-]+)+' ||
    die "$1 must be an absolute path of letters, digits and ._+- without a trailing slash (got '$2')"
}

check_paths() {
  DESTDIR=${DESTDIR%/}
  [ -z "$DESTDIR" ] || check_path DESTDIR "$DESTDIR"
  check_path PREFIX "$PREFIX"
  check_path CONFDIR "$CONFDIR"
  check_path UNITDIR "$UNITDIR"
  if hidden_from_service "$PREFIX"; then
    die "PREFIX=$PREFIX is under /home, /root or /run/user, which the unit's ProtectHome=yes hides from the service"
  fi
}

# A venv with our entry point (any `make install`, including those before the config
# record existed), or an empty directory.
is_sockscope_install() {
  if [ -f "$1/pyvenv.cfg" ] && [ -e "$1/bin/sockscope" ]; then
    return 0
  fi
  [ -d "$1" ] && [ -z "$(ls -A "$1")" ]
}

sha256() {
  sha256sum "$1" | cut -d' ' -f1
}
