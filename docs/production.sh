#!/usr/bin/env bash
# Production security on one machine, end to end: the master key on a
# hardware token (SoftHSM2 standing in for the bank's HSM), callers from the
# bank's identity provider (its signing key published as a JWKS file, and a
# token it signed), HTTPS with the bank's own CA, a service that
# authenticates with its client certificate, and a browser origin allowed.
# It makes everything in a directory of its own, starts the server there,
# talks to it, stops it (by its process id) and removes the directory.
#
#   bash docs/production.sh
#
# Environment: EVENTVAULT (the binary; default `eventvault` on the PATH,
# else target/release/eventvault), EVENTVAULT_POLICIES_DIR (default
# ./policies), EVENTVAULT_DATABASE_URL and EVENTVAULT_KEYSTORE_URL (default:
# SQLite files in that directory), PKCS11_MODULE (default SoftHSM2's). It
# needs softhsm2-util, openssl, curl and jq.
# tests/integration/production.rs runs it on SQLite and on PostgreSQL, and
# holds the README's copy of it to this file.
set -euo pipefail
EVENTVAULT=$(realpath "${EVENTVAULT:-$(command -v eventvault || echo target/release/eventvault)}")
export EVENTVAULT_POLICIES_DIR=$(realpath "${EVENTVAULT_POLICIES_DIR:-policies}")
WORK=$(mktemp -d)
SERVER=
trap '[ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK"

# 1. The master key on a token: here a SoftHSM2 token of this run's own.
#    In production: the HSM vendor's PKCS#11 module, token and user PIN.
mkdir tokens
printf 'directories.tokendir = %s\n' "$WORK/tokens" > softhsm2.conf
export SOFTHSM2_CONF=$WORK/softhsm2.conf
softhsm2-util --init-token --free --label bank-hsm --so-pin so-Kq2w9 --pin pin-Hx74r > /dev/null
export EVENTVAULT_PKCS11_MODULE=${PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export EVENTVAULT_PKCS11_PIN=pin-Hx74r   # from the environment alone, never a flag
export EVENTVAULT_MASTER_KEY_URI='pkcs11:token=bank-hsm;object=eventvault-kek'

# 2. The bank's CA, the server's certificate, and the payments service's
#    client certificate.
cert() { # NAME CN EXTENSIONS: a P-256 key and a certificate the CA signs
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.csr" 2> /dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -days 30 -out "$1.pem" \
    -extfile <(printf '%s\n' "$3") 2> /dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj /CN=bank-ca -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign -keyout ca.key -out ca.pem 2> /dev/null
cert server localhost 'subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth'
cert payments payments 'extendedKeyUsage=clientAuth'

# 3. The identity provider's signing key (Ed25519), published as a JWKS.
openssl genpkey -algorithm ed25519 -out idp.key
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
X=$(openssl pkey -in idp.key -pubout -outform DER | tail -c 32 | b64url)
printf '{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","use":"sig","kid":"idp-2026","x":"%s"}]}\n' \
  "$X" > jwks.json

# 4. The payments service is a principal bound to its certificate; then
#    the server, HTTPS only, on a free port.
"$EVENTVAULT" principal add payments --role service --client-cert payments.pem
"$EVENTVAULT" serve --listen 127.0.0.1:0 \
  --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem \
  --jwt-issuer https://idp.bank.example --jwt-audience eventvault --jwt-jwks-file jwks.json \
  --cors-origin https://support.bank.example > server.out 2> server.err &
SERVER=$!
until grep -q '^eventvault ready' server.out; do
  kill -0 "$SERVER" 2> /dev/null || { cat server.err >&2; exit 1; }
  sleep 0.2
done
URL=$(sed -n 's/^eventvault listening on //p' server.out)
echo "serving on $URL"

# call STATUS CURL-ARGS…: one request over HTTPS, trusting the bank's CA;
# prints the body, and stops unless the status is STATUS.
call() {
  local want=$1 out
  shift
  out=$(curl -sS --cacert ca.pem -w '\n%{http_code}' "$@")
  printf '%s\n' "${out%$'\n'*}"
  [ "${out##*$'\n'}" = "$want" ] || { echo "expected HTTP $want, got ${out##*$'\n'}" >&2; exit 1; }
}

# 5. The payments service appends with its certificate, and no token.
call 201 --cert payments.pem --key payments.key -H 'Content-Type: application/json' \
  "$URL/streams/accounts-ACC-7/events" -d '{"events":[{"id":"3d1c1f6e-2a4b-4c3d-9e8f-7a6b5c4d3e2f",
  "type":"MoneyDeposited","subject":"cust-7","data":{"account":"ACC-7","amount":"40.00",
  "currency":"EUR","payer_name":"Ada Lovelace","payer_iban":"GB33BUKB20201555555555"}}]}'

# 6. A support officer signed in at the identity provider reads the
#    stream, personal data in clear, with a token it signed (five minutes).
header=$(printf '{"alg":"EdDSA","kid":"idp-2026","typ":"JWT"}' | b64url)
claims=$(printf '{"iss":"https://idp.bank.example","aud":"eventvault","sub":"alice","roles":["support"],"exp":%d}' \
  $(($(date +%s) + 300)) | b64url)
printf '%s.%s' "$header" "$claims" > jwt.input
JWT=$header.$claims.$(openssl pkeyutl -sign -inkey idp.key -rawin -in jwt.input | b64url)
call 200 -H "Authorization: Bearer $JWT" -H 'X-Purpose: customer call 4711' \
  "$URL/streams/accounts-ACC-7/events" | jq -c '.events[] | {type, personal_data, payer_name: .data.payer_name}'

# 7. A token the identity provider did not sign is refused; so is plain HTTP.
call 401 -H "Authorization: Bearer $header.$claims.$(printf forged | b64url)" "$URL/streams/accounts-ACC-7/events" > /dev/null
if curl -sS --max-time 5 "http://${URL#https://}/healthz" > /dev/null 2>&1; then
  echo "plain HTTP was answered" >&2
  exit 1
fi

# 8. The support desk's web application may call the API from a browser.
curl -sS --cacert ca.pem -o /dev/null -D - -X OPTIONS "$URL/streams/accounts-ACC-7/events" \
  -H 'Origin: https://support.bank.example' -H 'Access-Control-Request-Method: GET' \
  -H 'Access-Control-Request-Headers: authorization,x-purpose' | grep -i '^access-control-allow-origin'

# 9. Stopped; the keystore's master key is the one on the token.
kill "$SERVER"
wait "$SERVER" || true
SERVER=
"$EVENTVAULT" keys status
