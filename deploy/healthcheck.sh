#!/bin/bash
# The image's HEALTHCHECK: GET /livez on this node's HTTP port over loopback, with bash's
# /dev/tcp since the image has no curl. /livez is open even with API tokens (--auth-file).
# The port comes from VOW_HTTP_ADDR, so configure that address through the environment rather
# than --http-addr if the default 7081 changes. With TLS (VOW_TLS_CERT) the HTTP port speaks
# HTTPS, which bash cannot: the check then only makes sure the port accepts connections.
set -u
port="${VOW_HTTP_ADDR:-0.0.0.0:7081}"
port="${port##*:}"
if ! { exec 3<>"/dev/tcp/127.0.0.1/${port}"; } 2>/dev/null; then
  echo "vowd: nothing accepts connections on 127.0.0.1:${port}" >&2
  exit 1
fi
[ -z "${VOW_TLS_CERT:-}" ] || exit 0
printf 'GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
IFS= read -r -t 4 status <&3 || exit 1
case "$status" in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) echo "vowd /livez: ${status%$'\r'}" >&2; exit 1 ;;
esac
