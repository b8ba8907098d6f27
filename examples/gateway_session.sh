#!/usr/bin/env sh
# A curl session against the HTTP gateway (`feedback serve`).
#   GATEWAY_URL=http://127.0.0.1:8080 TOKEN=... sh examples/gateway_session.sh
set -eu
URL="${GATEWAY_URL:-http://127.0.0.1:8080}"
TOKEN="${TOKEN:?set TOKEN to one of FEEDBACK_INTERNAL_TOKENS}"

post() {  # path, token, body -> prints "<status> <body>"
  curl -s -o /tmp/feedback-gateway-$$.out -w '%{http_code}' -X POST "$URL$1" \
    -H "X-Internal-Token: $2" -H 'Content-Type: application/json' -d "$3"
  printf ' %s\n' "$(cat /tmp/feedback-gateway-$$.out)"
  rm -f /tmp/feedback-gateway-$$.out
}

echo "ready:   $(curl -s "$URL/readyz")"
echo "single:  $(post /internal/feedback "$TOKEN" '{"source": "dream_ui", "type": "thumbs", "user_id": "u-42", "payload": {"direction": "down", "comment": "mail me at jane@example.com"}}')"
echo "batch:   $(post /internal/feedback/batch "$TOKEN" '{"events": [{"source": "oracle", "type": "bad_output", "severity": "error"}, {"source": "oracle"}]}')"
echo "invalid: $(post /internal/feedback "$TOKEN" '{"source": "dream_ui", "type": "rating", "severity": "apocalyptic"}')"
echo "no auth: $(post /internal/feedback wrong-token '{}')"
