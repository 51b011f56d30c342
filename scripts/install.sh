#!/usr/bin/env bash
# Installs what the runtime needs (apt: nftables, a C compiler and headers;
# pip: the package, which builds the C core), then runs a first sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root" >&2; exit 1; fi
need=()
# docker-registry, skopeo, umoci, busybox-static: the image tests and bench (a real
# registry on 127.0.0.1, skopeo-made OCI layouts and docker archives, busybox images).
for p in nftables iproute2 gcc libc6-dev python3-dev curl docker-registry skopeo umoci busybox-static; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c 'import sandbox._native_api' # fails loudly if the C core did not build
sandbox run -- echo hello
