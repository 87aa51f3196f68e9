#!/usr/bin/env bash
# The cost of a cold data key with the master key on a token: two SQLite
# stores, A with the master key in a file, B on a SoftHSM2 token, filled by
# the same load, then served again with a key cache of one entry, so that
# reading the global log unwraps a data key for nearly every key it meets
# (counted by eventvault_key_cache_requests_total{outcome="miss"}). Time
# `python3 docs/bench/read-log.py PORT TOKEN` against each, alternately.
#
#   bash docs/bench/hsm-cold-keys.sh     # from the repository, after cargo build --release
set -euo pipefail
R=$(pwd)
BIN=$(realpath "${EVENTVAULT_BIN:-target/release}")
W=${WORK:-/tmp/eventvault-hsm-bench}
mkdir -p "$W"
cd "$W"
rm -rf a b hsm
mkdir -p a b hsm/tokens
cp -r "$R/policies" a/
cp -r "$R/policies" b/
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$W/hsm/tokens" > hsm/softhsm2.conf
export SOFTHSM2_CONF=$W/hsm/softhsm2.conf
softhsm2-util --init-token --free --label bench --pin 1234 --so-pin 5678 > /dev/null
export EVENTVAULT_PKCS11_PIN=1234 EVENTVAULT_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so
start() { # DIR PORT FLAGS…: serve from DIR, wait until ready
  local d=$1 p=$2
  shift 2
  (cd "$d" && exec "$BIN/eventvault" serve --listen "127.0.0.1:$p" "$@" > out.txt 2> err.txt) &
  echo $! > "$d/pid"
  until grep -q '^eventvault ready' "$d/out.txt" 2> /dev/null; do sleep 0.2; done
}
TOKEN_URI='pkcs11:token=bench;object=kek'
start a 18601
start b 18602 --master-key-uri "$TOKEN_URI"
for d in a:18601 b:18602; do
  dir=${d%%:*} port=${d##*:}
  grep '^evt_' "$dir/out.txt" > "$dir/token"
  "$BIN/eventvault-bench" --url "http://127.0.0.1:$port" --token "$(cat "$dir/token")" \
    --clients 16 --batch 100 --seconds 5 --subjects 1000000 --no-read | tail -1
  kill "$(cat "$dir/pid")"
  while kill -0 "$(cat "$dir/pid")" 2> /dev/null; do sleep 0.1; done
done
start a 18601 --key-cache 1
start b 18602 --key-cache 1 --master-key-uri "$TOKEN_URI"
echo "A (file):  python3 $R/docs/bench/read-log.py 18601 $(cat a/token)"
echo "B (token): python3 $R/docs/bench/read-log.py 18602 $(cat b/token)"
echo "stop both: kill $(cat a/pid) $(cat b/pid)"
