#!/usr/bin/env bash
# Test-only system dependency: Debian's docker-registry (the CNCF distribution server), which the push / pull
# tests start on 127.0.0.1 with their own config. Installed when missing and this user can (root + apt-get);
# otherwise those tests skip and say why. The package's own service is never started: tests run `serve`.
set -uo pipefail
if [[ -x /usr/bin/docker-registry ]]; then exit 0; fi
if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "docker-registry not installed (needs root + apt-get): the OCI push/pull tests will skip" >&2; exit 0
fi
echo "installing docker-registry for the OCI push/pull tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends docker-registry >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends docker-registry >/dev/null 2>&1; } \
  || echo "could not install docker-registry: the OCI push/pull tests will skip" >&2
exit 0
