#!/usr/bin/env bash
# Installs the Debian packages snapvol needs (FUSE 3 and its headers, libxxhash's headers
# for the C block-checksum module, plus the real programs the test suite drives: man to
# render the man pages, systemd-analyze to check the unit). Safe to run again: it only
# installs what is missing.
set -euo pipefail
pkgs=(fuse3 libfuse3-dev pkg-config libxxhash-dev rsync sqlite3 git tar attr acl man-db systemd)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}"
