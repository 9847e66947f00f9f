#!/usr/bin/env bash
# Makes what components/tls mounts, with openssl, into DIR (made if need be):
#   cluster-ca.crt/.key  the cluster CA (keep its key offline: it admits whoever it signs);
#   cluster.crt/.key     the certificate of every coordinator, worker and etcd member: names
#                        tramontane.cluster (what coordinators and workers check) and etcd's
#                        names (etcd, *.etcd, each also .NS, .NS.svc, .NS.svc.DOMAIN), valid
#                        as server and as client;
#   api-ca.crt/.key      the CA the API clients trust;
#   api.crt/.key         the client APIs' certificate: names coordinator (the workers' preStop
#                        drain reaches it so; .NS, .NS.svc, .NS.svc.DOMAIN too) and every
#                        --api-name (the names clients use from outside);
#   keys.txt, admin-key  API keys, made only when keys.txt is not there yet: one admin key
#                        (`cluster-admin`) that admin-key holds for tramctl in the pods; add
#                        the clients' keys to keys.txt (NAME KEY [rpm=N] [tpm=N] [admin]).
# and prints the kubectl commands that make the Secrets from them. Existing CAs in DIR are
# kept (certificates made again are signed by them).
#   deploy/k8s/components/tls/make-certs.sh DIR [-n NAMESPACE] [-d CLUSTER_DOMAIN] [--days N]
#       [--api-name NAME]... [--cluster-name NAME]...
# --cluster-name adds a name to the cluster certificate (e.g. etcd reached by another name).
set -euo pipefail -f # -f: no globbing (*.etcd is a name)

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
dir=$1
shift
ns=tramontane
domain=cluster.local
days=365
api_names=()
cluster_names=()
while [ $# -gt 0 ]; do
  case $1 in
    -n) ns=$2; shift 2 ;;
    -d) domain=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --api-name) api_names+=("$2"); shift 2 ;;
    --cluster-name) cluster_names+=("$2"); shift 2 ;;
    *) usage ;;
  esac
done
mkdir -p "$dir"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# ca NAME "COMMON NAME": DIR/NAME.crt and .key, unless they exist.
ca() {
  [ -s "$dir/$1.crt" ] && [ -s "$dir/$1.key" ] && return
  key "$dir/$1.key"
  cat > "$tmp/$1.cnf" <<EOF
[req]
distinguished_name = dn
x509_extensions = ca
prompt = no
[dn]
CN = $2
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
EOF
  openssl req -x509 -new -key "$dir/$1.key" -sha256 -days 3650 -config "$tmp/$1.cnf" -out "$dir/$1.crt"
}

# leaf NAME CA "COMMON NAME" EXTENDED_KEY_USAGE DNS_NAME...: DIR/NAME.crt and .key, signed by
# DIR/CA.crt.
leaf() {
  local name=$1 ca=$2 cn=$3 eku=$4
  shift 4
  local san="" n
  for n in "$@"; do san+="${san:+,}DNS:$n"; done
  key "$dir/$name.key"
  cat > "$tmp/$name.cnf" <<EOF
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = $eku
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" -out "$tmp/$name.csr"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$dir/$ca.crt" -CAkey "$dir/$ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -sha256 -days "$days" -extfile "$tmp/$name.cnf" -extensions leaf -out "$dir/$name.crt" 2>/dev/null
}

# A Service's names: NAME, NAME.NS, NAME.NS.svc, NAME.NS.svc.DOMAIN.
service() { echo "$1" "$1.$ns" "$1.$ns.svc" "$1.$ns.svc.$domain"; }

ca cluster-ca "tramontane cluster CA"
ca api-ca "tramontane API CA"
# shellcheck disable=SC2046
leaf cluster cluster-ca tramontane serverAuth,clientAuth tramontane.cluster $(service etcd) $(service '*.etcd') "${cluster_names[@]}"
# shellcheck disable=SC2046
leaf api api-ca coordinator serverAuth $(service coordinator) "${api_names[@]}"
if [ ! -e "$dir/keys.txt" ]; then
  admin=$(openssl rand -hex 24)
  printf '# NAME KEY [rpm=N] [tpm=N] [admin], one key a line (16 characters or more).\ncluster-admin %s admin\n' "$admin" > "$dir/keys.txt"
  printf '%s' "$admin" > "$dir/admin-key" # no newline: it is sent as a header
fi
[ -s "$dir/admin-key" ] || echo "warning: no $dir/admin-key: put an admin key of keys.txt in it (no newline)" >&2
openssl verify -CAfile "$dir/cluster-ca.crt" "$dir/cluster.crt" >/dev/null
openssl verify -CAfile "$dir/api-ca.crt" "$dir/api.crt" >/dev/null

cat <<EOF
Made in $dir. The Secrets (in namespace $ns; kubectl create namespace $ns first if need be):
  kubectl -n $ns create secret generic tramontane-cluster-tls --type=kubernetes.io/tls \\
    --from-file=tls.crt=$dir/cluster.crt --from-file=tls.key=$dir/cluster.key --from-file=ca.crt=$dir/cluster-ca.crt
  kubectl -n $ns create secret generic tramontane-api-tls --type=kubernetes.io/tls \\
    --from-file=tls.crt=$dir/api.crt --from-file=tls.key=$dir/api.key --from-file=ca.crt=$dir/api-ca.crt
  kubectl -n $ns create secret generic tramontane-api-keys \\
    --from-file=api-keys=$dir/keys.txt --from-file=admin-key=$dir/admin-key
Clients trust $dir/api-ca.crt (tramctl --tls-ca, curl --cacert, the SDKs).
EOF
