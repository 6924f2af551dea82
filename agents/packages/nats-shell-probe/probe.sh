#!/usr/bin/env bash
# nats-shell-probe: an OPMAS agent in plain bash — no SDK, no NATS client library.
#
# It speaks the NATS text protocol itself over bash's /dev/tcp and honours the agent contract
# (DESIGN §5): a heartbeat on {prefix}.{AGENT_ID}.status and metrics on
# {prefix}.{AGENT_ID}.metrics every AGENT_HEARTBEAT_INTERVAL seconds; request/reply commands on
# {prefix}.{AGENT_ID}.command and .query (`ping` -> "pong", `status`; anything else is an error
# reply), each reply also published on {prefix}.{AGENT_ID}.response. SIGTERM or SIGINT: a last heartbeat, then exit 0.
# Its point: the contract is all an agent needs, whatever it is written in.
#
# Environment: AGENT_ID, AGENT_NAME, AGENT_TYPE, AGENT_VERSION, AGENT_HEARTBEAT_INTERVAL (30),
# NATS_URL (nats://127.0.0.1:4222; user:password@ allowed), NATS_USER, NATS_PASSWORD,
# NATS_SUBJECT_PREFIX (agent).

set -u
export LC_ALL=C # ${#var} must count bytes: NATS message sizes are in bytes
export TZ=UTC   # printf %(...)T formats in the local zone; the contract is UTC

AGENT_ID=${AGENT_ID:-nats-shell-probe}
AGENT_NAME=${AGENT_NAME:-$AGENT_ID}
AGENT_TYPE=${AGENT_TYPE:-probe}
AGENT_VERSION=${AGENT_VERSION:-1.0.0}
INTERVAL=${AGENT_HEARTBEAT_INTERVAL:-30}
PREFIX=${NATS_SUBJECT_PREFIX:-agent}
URL=${NATS_URL:-nats://127.0.0.1:4222}

# -- NATS_URL: nats://[user[:password]@]host[:port][,more servers: only the first is used] --------
URL=${URL%%,*}
rest=${URL#*://}
userinfo=""
if [[ $rest == *@* ]]; then
    userinfo=${rest%%@*}
    rest=${rest#*@}
fi
hostport=${rest%%/*}
if [[ $hostport == *:* ]]; then
    HOST=${hostport%:*}
    PORT=${hostport##*:}
else
    HOST=$hostport
    PORT=4222
fi
NATS_USER=${NATS_USER:-}
NATS_PASSWORD=${NATS_PASSWORD:-}
if [[ -n $userinfo && -z $NATS_USER ]]; then
    NATS_USER=${userinfo%%:*}
    [[ $userinfo == *:* ]] && NATS_PASSWORD=${userinfo#*:}
fi

# -- helpers ------------------------------------------------------------------------------------
json_str() { # JSON string literal of $1, into $JSON
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    JSON="\"$s\""
}

now_ts() { # RFC 3339 UTC with milliseconds, into $TS
    local t=$EPOCHREALTIME
    printf -v TS '%(%Y-%m-%dT%H:%M:%S)T.%sZ' "${t%.*}" "${t#*.}"
    TS="${TS:0:23}Z"
}

now_us() { # microseconds since the epoch, into $NOW
    local t=$EPOCHREALTIME
    NOW=$((${t%.*} * 1000000 + 10#${t#*.}))
}

to_us() { # seconds ("10", "0.5") as microseconds, into $US; bash arithmetic is integer only
    local whole=${1%%.*} frac=""
    [[ $1 == *.* ]] && frac=${1#*.}
    frac="${frac}000000"
    US=$((10#${whole:-0} * 1000000 + 10#${frac:0:6}))
}

log() { # log LEVEL EVENT [extra json members]: one JSON line on stdout
    now_ts
    json_str "$2"
    printf '{"timestamp":"%s","level":"%s","event":%s,"agent_id":"%s"%s}\n' "$TS" "$1" "$JSON" "$AGENT_ID" "${3:+,$3}"
}

send() { printf '%s\r\n' "$1" >&3; }

pub() { # pub SUBJECT PAYLOAD
    printf 'PUB %s %d\r\n%s\r\n' "$1" "${#2}" "$2" >&3
}

to_us "$INTERVAL"
INTERVAL_US=$US
if ((INTERVAL_US <= 0)); then
    log error "invalid configuration" "\"error\":\"AGENT_HEARTBEAT_INTERVAL=$INTERVAL\""
    exit 2
fi
json_str "$AGENT_ID"
ID_JSON=$JSON
json_str "$AGENT_NAME"
NAME_JSON=$JSON
MAX_WAIT_US=250000
HEARTBEATS=0
COMMANDS=0
STATUS=running
stopping=false
trap 'stopping=true' TERM INT
trap '' PIPE # a write to a dead connection must fail, not kill us: we reconnect

heartbeat() {
    now_ts
    local hostname
    hostname=${HOSTNAME:-unknown}
    json_str "$hostname"
    HEARTBEATS=$((HEARTBEATS + 1))
    pub "$PREFIX.$AGENT_ID.status" "{\"agent_id\":$ID_JSON,\"status\":\"$STATUS\",\"timestamp\":\"$TS\",\"metadata\":{\"name\":$NAME_JSON,\"type\":\"$AGENT_TYPE\",\"version\":\"$AGENT_VERSION\",\"pid\":$$,\"hostname\":$JSON,\"uptime_seconds\":$SECONDS,\"implementation\":\"bash\"}}"
    pub "$PREFIX.$AGENT_ID.metrics" "{\"agent_id\":$ID_JSON,\"timestamp\":\"$TS\",\"metrics\":{\"uptime_seconds\":$SECONDS,\"heartbeats\":$HEARTBEATS,\"commands_handled\":$COMMANDS}}"
}

handle_request() { # handle_request SUBJECT REPLY_TO PAYLOAD
    local reply_to=$2 payload=$3 cmd="" status=success result=null error=null
    COMMANDS=$((COMMANDS + 1))
    # Not a JSON parser: enough to find a string member "command" in an object.
    if [[ $payload =~ ^[[:space:]]*\{.*\}[[:space:]]*$ &&
        $payload =~ \"command\"[[:space:]]*:[[:space:]]*\"([^\"\\]*)\" ]]; then
        cmd=${BASH_REMATCH[1]}
    fi
    case $cmd in
    ping) result='"pong"' ;;
    status)
        result="{\"state\":\"$STATUS\",\"uptime_seconds\":$SECONDS,\"pid\":$$,\"implementation\":\"bash\",\"counters\":{\"heartbeats\":$HEARTBEATS,\"commands_handled\":$COMMANDS}}"
        ;;
    "")
        status=error
        error='"malformed request: expected a JSON object with a string \"command\""'
        ;;
    *)
        status=error
        json_str "unknown command '$cmd'; known: ping, status"
        error=$JSON
        ;;
    esac
    json_str "$cmd"
    now_ts
    local response="{\"status\":\"$status\",\"command\":$JSON,\"agent_id\":$ID_JSON,\"result\":$result,\"error\":$error,\"timestamp\":\"$TS\"}"
    [[ -n $reply_to ]] && pub "$reply_to" "$response"
    pub "$PREFIX.$AGENT_ID.response" "$response"
}

connect() {
    exec 3<>"/dev/tcp/$HOST/$PORT" || return 1
    local line=""
    IFS= read -r -t 5 line <&3 || return 1
    [[ $line == INFO* ]] || return 1
    local options="\"verbose\":false,\"pedantic\":false,\"name\":$NAME_JSON,\"lang\":\"bash\",\"version\":\"$AGENT_VERSION\",\"protocol\":0"
    if [[ -n $NATS_USER ]]; then
        json_str "$NATS_USER"
        options+=",\"user\":$JSON"
        json_str "$NATS_PASSWORD"
        options+=",\"pass\":$JSON"
    fi
    send "CONNECT {$options}" &&
        send "SUB $PREFIX.$AGENT_ID.command 1" &&
        send "SUB $PREFIX.$AGENT_ID.query 2" &&
        send "PING" # the server answers PONG, or -ERR when the credentials are refused
}

# One connection's life: read protocol lines, heartbeat when due. Returns when the connection
# ends (EOF, error) or a stop is requested.
session() {
    local line partial="" subject sid reply size payload crlf next
    now_us
    next=$NOW
    while ! $stopping; do
        now_us
        if ((NOW >= next)); then
            heartbeat || return 1
            next=$((NOW + INTERVAL_US))
        fi
        # bash runs a trap only once `read` returns, and a signal does not end `read -t` early:
        # short reads keep SIGTERM prompt.
        local wait_us=$((next - NOW < MAX_WAIT_US ? next - NOW : MAX_WAIT_US))
        printf -v wait_s '%d.%06d' $((wait_us / 1000000)) $((wait_us % 1000000))
        IFS= read -r -t "$wait_s" line <&3
        local rc=$?
        if ((rc != 0)); then
            # >128: timed out (or a signal); keep any partial line for the next read.
            if ((rc > 128)); then
                partial+=$line
                continue
            fi
            log warning "nats connection closed by the server"
            return 1
        fi
        line=${partial}${line%$'\r'}
        partial=""
        case $line in
        PING) send "PONG" || return 1 ;;
        PONG | +OK | INFO*) ;;
        -ERR*)
            json_str "$line"
            log error "nats error" "\"error\":$JSON"
            ;;
        MSG\ *)
            # MSG <subject> <sid> [reply-to] <#bytes>
            read -r _ subject sid reply size <<<"$line"
            if [[ -z $size ]]; then
                size=$reply
                reply=""
            fi
            payload=""
            if ((size > 0)); then
                IFS= read -r -N "$size" -t 5 payload <&3 || return 1
            fi
            IFS= read -r -t 5 crlf <&3 || return 1 # the CRLF after the payload
            handle_request "$subject" "$reply" "$payload" || return 1
            ;;
        *)
            json_str "$line"
            log warning "unexpected protocol line" "\"line\":$JSON"
            ;;
        esac
    done
}

log info "agent starting" "\"nats\":\"$HOST:$PORT\",\"subject_prefix\":\"$PREFIX\",\"heartbeat_interval\":\"$INTERVAL\""
failures=0
while ! $stopping; do
    if connect 2>/dev/null; then
        failures=0
        log info "nats connected" "\"server\":\"$HOST:$PORT\""
        session
        if $stopping; then
            STATUS=stopped
            heartbeat 2>/dev/null # the manager learns the stop was deliberate
        fi
    else
        failures=$((failures + 1))
        # Reconnect forever, as the SDK does; say so on the first failure and every 30th.
        ((failures % 30 == 1)) && log warning "nats unreachable; retrying" "\"attempts\":$failures"
    fi
    exec 3>&-
    if ! $stopping; then
        sleep 1 &
        wait $! # `wait` (unlike sleep) returns at once when SIGTERM arrives
    fi
done
log info "agent stopped" "\"heartbeats\":$HEARTBEATS,\"commands\":$COMMANDS"
exit 0
