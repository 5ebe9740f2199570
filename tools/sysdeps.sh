#!/usr/bin/env bash
# Ensure the Debian packages given as arguments are installed: install them when missing
# and running as root; otherwise stop and name them.
#   tools/sysdeps.sh [--optional] PKG...
# --optional: packages only some tests need (a single-node SLURM cluster): installed when
# root, otherwise named in a note and skipped (those tests are skipped, saying why).
set -euo pipefail
optional=0
if [ "${1:-}" = --optional ]; then optional=1; shift; fi
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
elif [ $optional -eq 1 ]; then
  echo "note: optional Debian packages not installed: ${missing[*]} (tests that need them are skipped;" \
       "install them with: sudo apt-get install ${missing[*]})" >&2
else
  echo "error: missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
