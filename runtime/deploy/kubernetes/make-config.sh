#!/usr/bin/env bash
# Writes what kustomization.yaml and the Secrets need for a TEST network of
# 4 validators and one inference node (devnet keys with the public password
# "devnet": never for real funds):
#   config/genesis.json, config/node-<i>.toml, config/inference.toml
#   keys/node-<i>.json, keys/inference.json
# and prints the kubectl commands that create the Secrets. A real network
# brings its own genesis and keys and writes config/ the same way.
# Usage: runtime/deploy/kubernetes/make-config.sh [path/to/blyan]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
blyan=${1:-blyan}
ns=blyan
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
addrs=""
for i in 0 1 2 3; do
    addrs+="${addrs:+,}blyan-validator-$i.blyan-validator.$ns.svc.cluster.local:7100"
done
"$blyan" devnet-layout --dir "$work" --p2p-addrs "$addrs" --http-addr 0.0.0.0:8100 >/dev/null
mkdir -p "$here/config" "$here/keys"
cp "$work/genesis.json" "$here/config/genesis.json"
# The pods' paths: genesis from the ConfigMap, key and password from the
# Secrets, data on the volume; the embedded model (which the devnet genesis
# registers) instead of a model directory.
pod_paths() {
    sed -e 's|^genesis_file = .*|genesis_file = "/etc/blyan/config/genesis.json"|' \
        -e "s|^key_file = .*|key_file = \"/etc/blyan/keys/$1\"|" \
        -e 's|^data_dir = .*|data_dir = "/var/lib/blyan/data"|' \
        -e 's|^key_password_env = .*|key_password_file = "/etc/blyan/password/password"|' \
        -e '/^model_dir = /d'
}
for i in 0 1 2 3; do
    pod_paths "node-$i.json" <"$work/node-$i/config.toml" >"$here/config/node-$i.toml"
    install -m 0600 "$work/node-$i/key.json" "$here/keys/node-$i.json"
done
rm -f "$here/keys/inference.json"
"$blyan" keys new --out "$here/keys/inference.json" --password devnet >/dev/null
pod_paths inference.json <"$work/node-0/config.toml" |
    sed -e 's|^p2p_addr = .*|p2p_addr = "0.0.0.0:7100"|' \
        -e 's|^device = .*|device = "cuda"|' \
        -e 's|^dtype = .*|dtype = "bf16"|' >"$here/config/inference.toml"
cat <<MSG
wrote $here/config and $here/keys. Create the Secrets, then apply:
  kubectl create namespace $ns
  kubectl -n $ns create secret generic blyan-validator-keys \\
    --from-file=$here/keys/node-0.json --from-file=$here/keys/node-1.json \\
    --from-file=$here/keys/node-2.json --from-file=$here/keys/node-3.json
  kubectl -n $ns create secret generic blyan-validator-password --from-literal=password=devnet
  kubectl -n $ns create secret generic blyan-inference-key --from-file=$here/keys/inference.json
  kubectl -n $ns create secret generic blyan-inference-password --from-literal=password=devnet
  kubectl apply -k $here
MSG
