#!/usr/bin/env bash
# Copies the relay's and the connector's PKI files from a directory written by `ztna-relay pki`
# into deploy/k8s/base/pki/, where the base's secretGenerator reads them (never committed:
# base/pki/.gitignore). The connector's certificate is named after its identity.
#
#   deploy/k8s/pki.sh PKI_DIR [CONNECTOR_NAME]     (default connector name: conn1)
set -euo pipefail
src=${1:?usage: $0 PKI_DIR [CONNECTOR_NAME]}
conn=${2:-conn1}
dst=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/base/pki
for f in ca.pem relay.pem relay.key "$conn.pem" "$conn.key"; do
    [[ -f $src/$f ]] || { echo "pki.sh: $src/$f is missing (ztna-relay pki issue ...)" >&2; exit 1; }
done
install -m 0644 "$src/ca.pem" "$src/relay.pem" "$dst/"
install -m 0600 "$src/relay.key" "$dst/"
install -m 0644 "$src/$conn.pem" "$dst/connector.pem"
install -m 0600 "$src/$conn.key" "$dst/connector.key"
echo "wrote $dst/{ca.pem,relay.pem,relay.key,connector.pem,connector.key}"
