#!/bin/sh
# The images' health check: exit 0 when the service running in this container reports SERVING
# over grpc.health.v1 (a model service once its model is loaded and warmed up, the orchestrator
# once both model services are). One image runs any of the three services, one per container, so
# this probes each service's port, read from the variables the services themselves read (else
# their defaults), and succeeds on the one that answers SERVING.
#
# A service with TLS (its *_TLS_CERT_FILE set) is probed over TLS without verifying its
# certificate: that names the service's DNS name, not 127.0.0.1, and on the container's own
# loopback there is nobody in between to authenticate. Under mutual TLS (*_TLS_CLIENT_CA_FILE set)
# the probe presents the service's own certificate and key, so that certificate must allow client
# authentication too (extendedKeyUsage clientAuth, or no extendedKeyUsage).
probe() {  # port, then the service's TLS certificate, key and client CA (empty: plaintext)
    port=$1 cert=$2 key=$3 client_ca=$4
    set -- -addr="127.0.0.1:${port}" -connect-timeout=2s
    if [ -n "$cert" ]; then set -- "$@" -tls -tls-no-verify; fi
    if [ -n "$client_ca" ]; then set -- "$@" -tls-client-cert="$cert" -tls-client-key="$key"; fi
    grpc_health_probe "$@"
}
probe "${SPECDEC_ORCHESTRATOR_PORT:-50050}" "${SPECDEC_ORCHESTRATOR_TLS_CERT_FILE:-}" \
    "${SPECDEC_ORCHESTRATOR_TLS_KEY_FILE:-}" "${SPECDEC_ORCHESTRATOR_TLS_CLIENT_CA_FILE:-}" && exit 0
probe "${SPECDEC_TARGET_PORT:-50051}" "${SPECDEC_TARGET_TLS_CERT_FILE:-}" \
    "${SPECDEC_TARGET_TLS_KEY_FILE:-}" "${SPECDEC_TARGET_TLS_CLIENT_CA_FILE:-}" && exit 0
probe "${SPECDEC_DRAFT_PORT:-50052}" "${SPECDEC_DRAFT_TLS_CERT_FILE:-}" \
    "${SPECDEC_DRAFT_TLS_KEY_FILE:-}" "${SPECDEC_DRAFT_TLS_CLIENT_CA_FILE:-}" && exit 0
exit 1
