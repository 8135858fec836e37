#!/bin/sh
# docker-compose.yml's Envoys: envoy/envoy.yaml with one change, the filter's JSON gains
# "global": {"cluster": "ratelimit"} (the rate limit service at 127.0.0.1:8081), on the given
# listener and admin ports. Several Envoys in one network namespace need distinct base ids (the
# hot-restart socket is named by it).
#   usage: with-global.sh LISTENER_PORT ADMIN_PORT BASE_ID
set -eu
sed -e 's/"name": "demo", /"name": "demo", "global": {"cluster": "ratelimit"}, /' \
    -e "s/port_value: 10000/port_value: $1/" -e "s/port_value: 9901/port_value: $2/" \
    /app/envoy/envoy.yaml > /tmp/envoy.yaml
exec envoy -c /tmp/envoy.yaml --concurrency 2 --base-id "$3"
