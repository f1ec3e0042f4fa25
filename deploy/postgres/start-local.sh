#!/usr/bin/env bash
# A throwaway PostgreSQL for imgtune's Dagster instance, on 127.0.0.1 only, for development and CI.
#
#   deploy/postgres/start-local.sh start     # init (first time) + start; prints how to load the env
#   source "${IMGTUNE_PG_DIR:-/tmp/imgtune-pg}/env.sh"   # DAGSTER_PG_HOST/PORT/USER/PASSWORD/DB
#   deploy/postgres/start-local.sh status
#   deploy/postgres/start-local.sh stop      # stops this server only (pg_ctl on its own data dir)
#   deploy/postgres/start-local.sh destroy   # stop + delete the data dir
#
# Settings (environment): IMGTUNE_PG_DIR (default /tmp/imgtune-pg), IMGTUNE_PG_PORT (default 5433, so
# it does not collide with a system PostgreSQL on 5432), IMGTUNE_PG_USER / IMGTUNE_PG_DB (default
# dagster). The password is random, made on first start, kept in $IMGTUNE_PG_DIR/env.sh (mode 600).
# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user.
# Needs Debian's `postgresql` package (apt-get install -y postgresql) or initdb/pg_ctl on PATH.
set -euo pipefail

DIR="${IMGTUNE_PG_DIR:-/tmp/imgtune-pg}"
PORT="${IMGTUNE_PG_PORT:-5433}"
PGUSER_NAME="${IMGTUNE_PG_USER:-dagster}"
DB="${IMGTUNE_PG_DB:-dagster}"
HOST=127.0.0.1
DATA="$DIR/data"

find_bin() {
  local candidate
  for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
    if [[ -x "$candidate/initdb" && -x "$candidate/pg_ctl" ]]; then echo "$candidate"; return; fi
  done
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v initdb)")"; return
  fi
  echo "PostgreSQL is missing (no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH)." >&2
  echo "Install it: apt-get update && apt-get install -y postgresql" >&2
  exit 1
}

BIN="$(find_bin)"

# Run a PostgreSQL server program as the server's user (postgres when we are root).
as_server() {
  if [[ "$(id -u)" == 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start() {
  mkdir -p "$DIR"
  if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || { echo "running as root and there is no 'postgres' user" >&2; exit 1; }
    chown postgres: "$DIR"
  fi
  chmod 700 "$DIR"
  if [[ ! -f "$DATA/PG_VERSION" ]]; then
    local password pwfile
    password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    pwfile="$DIR/pwfile"
    (umask 077; printf '%s\n' "$password" > "$pwfile")
    [[ "$(id -u)" == 0 ]] && chown postgres: "$pwfile"
    as_server "$BIN/initdb" -D "$DATA" --username="$PGUSER_NAME" --pwfile="$pwfile" \
      --auth=scram-sha-256 --encoding=UTF8 --locale=C >/dev/null
    rm -f "$pwfile"
    (umask 077; cat > "$DIR/env.sh" <<EOF
export DAGSTER_PG_HOST=$HOST
export DAGSTER_PG_PORT=$PORT
export DAGSTER_PG_USER=$PGUSER_NAME
export DAGSTER_PG_PASSWORD=$password
export DAGSTER_PG_DB=$DB
EOF
    )
  fi
  # shellcheck disable=SC1091
  source "$DIR/env.sh"
  if as_server "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    echo "already running: $DAGSTER_PG_HOST:$DAGSTER_PG_PORT"
  else
    as_server "$BIN/pg_ctl" -D "$DATA" -l "$DIR/server.log" -w -t 60 \
      -o "-c listen_addresses=$HOST -c port=$DAGSTER_PG_PORT -c unix_socket_directories=$DIR" start >/dev/null \
      || { echo "pg_ctl start failed; log:" >&2; tail -20 "$DIR/server.log" >&2; exit 1; }
  fi
  local exists
  exists="$(PGPASSWORD="$DAGSTER_PG_PASSWORD" "$BIN/psql" -h "$HOST" -p "$DAGSTER_PG_PORT" -U "$DAGSTER_PG_USER" \
    -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DAGSTER_PG_DB'")"
  if [[ "$exists" != 1 ]]; then
    PGPASSWORD="$DAGSTER_PG_PASSWORD" "$BIN/createdb" -h "$HOST" -p "$DAGSTER_PG_PORT" -U "$DAGSTER_PG_USER" \
      "$DAGSTER_PG_DB"
  fi
  echo "PostgreSQL on $DAGSTER_PG_HOST:$DAGSTER_PG_PORT, database $DAGSTER_PG_DB, data in $DATA"
  echo "load the connection variables with:  source $DIR/env.sh"
}

stop() {
  if [[ -f "$DATA/postmaster.pid" ]]; then
    as_server "$BIN/pg_ctl" -D "$DATA" -m fast -w stop
  else
    echo "not running ($DATA)"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) as_server "$BIN/pg_ctl" -D "$DATA" status ;;
  destroy) stop; rm -rf "$DIR"; echo "removed $DIR" ;;
  *) echo "usage: $0 [start|stop|status|destroy]" >&2; exit 2 ;;
esac
