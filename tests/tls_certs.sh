#!/bin/sh
# Make the certificates the TLS tests use, in the directory $1 (created), with the openssl
# command: a CA and a second, unrelated one; a server certificate for 127.0.0.1 and localhost
# and one for other.example only (with their SHA-256 fingerprints in NAME.fp); a client
# certificate; an expired server certificate; a revoked client certificate with the
# CA's CRL; a server key encrypted with the password in key.pw; and a server certificate of
# the wrong CA. Every certificate is an EC P-256 key (fast to make). Prints nothing on success.
set -eu
d=$1
mkdir -p "$d"
cd "$d"
exec 3>&1 >openssl.log 2>&1

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# A CA made with `openssl ca`, so that certificates can be given past dates and revoked.
mkca() {
    mkdir -p "$1.db"
    : >"$1.db/index.txt"
    echo 1000 >"$1.db/serial"
    echo 1000 >"$1.db/crlnumber"
    cat >"$1.cnf" <<CNF
[ ca ]
default_ca = ca_sec
[ ca_sec ]
dir = $1.db
database = \$dir/index.txt
serial = \$dir/serial
crlnumber = \$dir/crlnumber
new_certs_dir = \$dir
certificate = $PWD/$1.pem
private_key = $PWD/$1.key
default_md = sha256
default_days = 30
default_crl_days = 30
policy = pol
unique_subject = no
copy_extensions = copy
[ pol ]
commonName = supplied
[ req ]
distinguished_name = dn
[ dn ]
[ v3_ca ]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
CNF
    key "$1.key"
    openssl req -new -x509 -key "$1.key" -subj "/CN=kvferry test $1" -days 30 \
        -config "$1.cnf" -extensions v3_ca -out "$1.pem"
}

# sign CA NAME SAN [startdate enddate]
sign() {
    key "$2.key"
    openssl req -new -key "$2.key" -subj "/CN=$2" -addext "subjectAltName=$3" \
        -config "$1.cnf" -out "$2.csr"
    if [ $# -ge 5 ]; then
        openssl ca -batch -config "$1.cnf" -in "$2.csr" -out "$2.pem" -notext \
            -startdate "$4" -enddate "$5"
    else
        openssl ca -batch -config "$1.cnf" -in "$2.csr" -out "$2.pem" -notext
    fi
}

mkca ca
mkca wrongca
sign ca server "IP:127.0.0.1,DNS:localhost"
sign ca otherhost "DNS:other.example"
sign ca client "DNS:kvferry-client"
sign ca revoked "DNS:kvferry-revoked"
sign ca expired "IP:127.0.0.1,DNS:localhost" 20200101000000Z 20200102000000Z
sign wrongca wrongserver "IP:127.0.0.1,DNS:localhost"
openssl ca -batch -config ca.cnf -revoke revoked.pem
openssl ca -batch -config ca.cnf -gencrl -out crl.pem
# A server certificate revoked too, for a client that checks the store against the CRL.
sign ca revserver "IP:127.0.0.1,DNS:localhost"
openssl ca -batch -config ca.cnf -revoke revserver.pem
openssl ca -batch -config ca.cnf -gencrl -out crl.pem
printf 'correct horse\n' >key.pw
printf 'wrong horse\n' >wrong.pw
openssl pkey -in server.key -aes256 -passout file:key.pw -out server-enc.key
for c in server otherhost; do
    openssl x509 -in $c.pem -noout -fingerprint -sha256 | sed 's/.*=//' >$c.fp
done
chmod 600 ./*.key key.pw wrong.pw
exec 1>&3
