#!/bin/sh
# Run one image-build command, trusting extra CA certificates when the build was given some.
#
# Why: behind a TLS-intercepting proxy, downloads from PyPI fail unless the proxy's CA is
# trusted. The CA arrives as the build secret `extra_ca` (a PEM bundle); it is trusted for this
# command only and never stored in an image layer. Without the secret this runs the command as is.
set -eu
if [ -s /run/secrets/extra_ca ]; then
  bundle="$(mktemp)"
  cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca >"$bundle" 2>/dev/null \
    || cat /run/secrets/extra_ca >"$bundle"
  export SSL_CERT_FILE="$bundle" PIP_CERT="$bundle" REQUESTS_CA_BUNDLE="$bundle"
fi
exec "$@"
