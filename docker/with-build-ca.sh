#!/bin/sh
# Runs one build step (its arguments) trusting, besides the image's own CAs, the certificates in
# the build secret `build_ca`, when the build was given one: the CA of a TLS-intercepting proxy
# between the builder and PyPI or the Go module proxy, as on many corporate networks.
#   podman build --secret id=build_ca,src=/path/to/ca.pem ...     (docker buildx build: the same)
# The secret is mounted for that step only and the merged bundle is removed after it, so no
# certificate stays in any layer of the image.
set -u
secret=/run/secrets/build_ca
if [ ! -s "$secret" ]; then
    exec "$@"
fi
bundle=$(mktemp)
cat /etc/ssl/certs/ca-certificates.crt "$secret" > "$bundle"
SSL_CERT_FILE=$bundle PIP_CERT=$bundle CURL_CA_BUNDLE=$bundle "$@"
status=$?
rm -f "$bundle"
exit "$status"
