# Sourced by the bench scripts: `serve_in_background BIN PORT [SERVE ARGS...]` starts
# `BIN serve` on PORT with an empty adapters folder, stops it (and removes the folder) when the
# calling script exits, and returns once /health answers (or after two minutes).
serve_in_background() {
    local bin=$1 port=$2
    shift 2
    SERVE_DIR=$(mktemp -d)
    "$bin" serve --port "$port" --adapters-dir "$SERVE_DIR" "$@" > "$SERVE_DIR/serve.log" 2>&1 &
    SERVE_PID=$!
    trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null; rm -rf "$SERVE_DIR"' EXIT
    for _ in $(seq 1 240); do
        curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
        sleep 0.5
    done
}
