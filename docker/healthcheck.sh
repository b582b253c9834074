#!/bin/sh
# The images' health check: exit 0 when the service running in this container reports SERVING
# over grpc.health.v1 (a model service once its model is loaded and warmed up, the orchestrator
# once both model services are). One image runs any of the three services, one per container, so
# this probes each service's port, read from the variables the services themselves read (else
# their defaults), and succeeds on the one that answers SERVING.
for port in "${SPECDEC_ORCHESTRATOR_PORT:-50050}" "${SPECDEC_TARGET_PORT:-50051}" "${SPECDEC_DRAFT_PORT:-50052}"; do
    grpc_health_probe -addr="127.0.0.1:${port}" -connect-timeout=2s && exit 0
done
exit 1
