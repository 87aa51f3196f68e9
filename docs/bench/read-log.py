# Reads the whole global log of the server on 127.0.0.1:PORT in pages of
# 1000, personal data decrypted; prints how many events it read.
#   python3 docs/bench/read-log.py PORT TOKEN
import json
import sys
import urllib.request

port, token = sys.argv[1], sys.argv[2]
after, n = 0, 0
while True:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/events?after={after}&limit=1000",
        headers={"Authorization": f"Bearer {token}", "X-Purpose": "benchmark"},
    )
    page = json.load(urllib.request.urlopen(req))
    if not page["events"]:
        break
    n += len(page["events"])
    after = page["next"]
print(n)
