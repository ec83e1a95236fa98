#!/bin/sh
# Make the certificates of an install: the API server's serving certificate and the caBundle that kube-apiserver
# uses to trust it, and etcd's serving, peer and client certificates (etcd requires TLS client certificates).
#
#   deploy/make-certs.sh [--out DIR] [--namespace NS] [--service NAME] [--cluster-domain DOMAIN]
#                        [--days N] [--ca-days N] [--new-ca]
#
# Writes into DIR (default: manifests/tls/run-deploy-make-certs.sh-first, which the base kustomization reads; the
# name is what kustomize prints when the files are missing):
#   ca.crt ca.key                  a private CA for the serving certificate (kept for renewals; never in a Secret)
#   tls.crt tls.key                the serving certificate, SANs = every name of the Service, signed by the CA
#   apiservice-cabundle.yaml       a patch that fills the APIService's spec.caBundle with ca.crt
#   etcd-ca.crt etcd-ca.key        a second private CA, trusted by etcd only (kept for renewals; never in a Secret)
#   etcd-server.crt/.key           etcd's serving certificate (every member's name, localhost, 127.0.0.1)
#   etcd-peer.crt/.key             etcd members among themselves (server and client auth, the same names)
#   etcd-client.crt/.key           the API server's client certificate for etcd (CN coredump-apiserver)
# Run it again to renew: the CAs in DIR are kept (so caBundle does not change) unless --new-ca is given.
# Needs only openssl (1.1.1 or 3.x). Nothing here talks to a cluster.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out="$here/../manifests/tls/run-deploy-make-certs.sh-first"
namespace=coredump-system
service=coredump-apiserver
cluster_domain=cluster.local
days=365
ca_days=3650
new_ca=0
apiservice=v1alpha1.coredump.example.io

die() { echo "make-certs: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) need "$@"; out=$2; shift 2 ;;
        --namespace) need "$@"; namespace=$2; shift 2 ;;
        --service) need "$@"; service=$2; shift 2 ;;
        --cluster-domain) need "$@"; cluster_domain=$2; shift 2 ;;
        --days) need "$@"; days=$2; shift 2 ;;
        --ca-days) need "$@"; ca_days=$2; shift 2 ;;
        --new-ca) new_ca=1; shift ;;
        -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
command -v openssl >/dev/null 2>&1 || die "openssl is not installed"
case "$days$ca_days" in *[!0-9]*) die "--days and --ca-days take a number of days" ;; esac

mkdir -p "$out"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

if [ "$new_ca" = 1 ] || [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca.key"
    cat >"$work/ca.cnf" <<CNF
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = coredump-apiserver-ca@$(date +%s)
[ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
    openssl req -x509 -new -sha256 -key "$work/ca.key" -days "$ca_days" -config "$work/ca.cnf" \
        -out "$work/ca.crt" 2>/dev/null
    mv "$work/ca.key" "$out/ca.key"
    mv "$work/ca.crt" "$out/ca.crt"
    echo "make-certs: new CA in $out/ca.crt (keep $out/ca.key private; it is needed only to renew)" >&2
else
    echo "make-certs: reusing the CA in $out/ca.crt" >&2
fi

svc=$service
fqdn="$service.$namespace.svc"
cat >"$work/tls.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $fqdn
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:$svc, DNS:$svc.$namespace, DNS:$fqdn, DNS:$fqdn.$cluster_domain
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
CNF
openssl ecparam -name prime256v1 -genkey -noout -out "$work/tls.key"
openssl req -new -sha256 -key "$work/tls.key" -config "$work/tls.cnf" -out "$work/tls.csr" 2>/dev/null
openssl x509 -req -sha256 -in "$work/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -CAserial "$work/ca.srl" -days "$days" -extfile "$work/tls.cnf" -extensions ext -out "$work/tls.crt" 2>/dev/null
openssl verify -CAfile "$out/ca.crt" -purpose sslserver "$work/tls.crt" >/dev/null \
    || die "the new serving certificate does not verify against $out/ca.crt"
mv "$work/tls.key" "$out/tls.key"
mv "$work/tls.crt" "$out/tls.crt"

# -- etcd: its own CA, so that nothing the API server's CA signs is an etcd client, and the reverse ----------------
new_ca_pair() { # NAME CN: a CA key and self-signed certificate in $out, unless kept
    if [ "$new_ca" = 1 ] || [ ! -s "$out/$1.key" ] || [ ! -s "$out/$1.crt" ]; then
        openssl ecparam -name prime256v1 -genkey -noout -out "$work/$1.key"
        cat >"$work/$1.cnf" <<CNF
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = $2@$(date +%s)
[ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
        openssl req -x509 -new -sha256 -key "$work/$1.key" -days "$ca_days" -config "$work/$1.cnf" \
            -out "$work/$1.crt" 2>/dev/null
        mv "$work/$1.key" "$out/$1.key"
        mv "$work/$1.crt" "$out/$1.crt"
        echo "make-certs: new CA in $out/$1.crt" >&2
    fi
}
issue() { # CA STEM CN EXTENDED-KEY-USAGE SANS PURPOSE
    cat >"$work/$2.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $3
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = $4
${5:+subjectAltName = $5}
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
CNF
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/$2.key"
    openssl req -new -sha256 -key "$work/$2.key" -config "$work/$2.cnf" -out "$work/$2.csr" 2>/dev/null
    openssl x509 -req -sha256 -in "$work/$2.csr" -CA "$out/$1.crt" -CAkey "$out/$1.key" -CAcreateserial \
        -CAserial "$work/$1.srl" -days "$days" -extfile "$work/$2.cnf" -extensions ext -out "$work/$2.crt" 2>/dev/null
    openssl verify -CAfile "$out/$1.crt" -purpose "$6" "$work/$2.crt" >/dev/null \
        || die "the new certificate $2.crt does not verify against $out/$1.crt"
    mv "$work/$2.key" "$out/$2.key"
    mv "$work/$2.crt" "$out/$2.crt"
}
new_ca_pair etcd-ca coredump-etcd-ca
etcd_svc="coredump-etcd.$namespace.svc"
etcd_sans="DNS:*.$etcd_svc, DNS:*.$etcd_svc.$cluster_domain, DNS:$etcd_svc, DNS:$etcd_svc.$cluster_domain"
for i in 0 1 2; do
    etcd_sans="$etcd_sans, DNS:coredump-etcd-$i.$etcd_svc, DNS:coredump-etcd-$i.$etcd_svc.$cluster_domain"
done
etcd_sans="$etcd_sans, DNS:localhost, IP:127.0.0.1"
issue etcd-ca etcd-server coredump-etcd serverAuth "$etcd_sans" sslserver
issue etcd-ca etcd-peer coredump-etcd-peer "serverAuth, clientAuth" "$etcd_sans" sslclient
issue etcd-ca etcd-client "$service" clientAuth "" sslclient
echo "make-certs: etcd serving, peer and client certificates in $out/etcd-{server,peer,client}.crt" >&2

# caBundle is the base64 of the PEM CA certificate, on one line.
ca_bundle=$(openssl base64 -A -in "$out/ca.crt")
umask 022
cat >"$out/apiservice-cabundle.yaml" <<YAML
# Generated by deploy/make-certs.sh: kube-apiserver trusts the API server's serving certificate through this CA.
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: $apiservice
spec:
  caBundle: $ca_bundle
YAML
echo "make-certs: serving certificate for $fqdn in $out/tls.crt (valid $days days); caBundle in $out/apiservice-cabundle.yaml" >&2
