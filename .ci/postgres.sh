#!/usr/bin/env bash
# CI: install Debian's PostgreSQL, start a throwaway cluster on 127.0.0.1 and print its URL.
#
# Usage: export LORACORD_TEST_POSTGRES_URL="$(.ci/postgres.sh)"
# Needs root (apt-get, pg_createcluster). Everything but the URL goes to stderr. Running it again
# reuses the cluster. PG_PORT (default 55432) picks the port; the cluster is named loracord_ci.
set -euo pipefail
port="${PG_PORT:-55432}"
cluster=loracord_ci
db=loracord_test
user=loracord
password=loracord

say() { echo "postgres.sh: $*" >&2; }

if ! command -v pg_createcluster >/dev/null 2>&1; then
    say "installing postgresql with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql >&2
fi

version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version $cluster"; then
    say "creating cluster $version/$cluster on port $port"
    pg_createcluster "$version" "$cluster" --port "$port" \
        -- --auth-local=trust --auth-host=scram-sha-256 >&2
fi
port="$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $3}')"
if ! pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1==v && $2==c {print $4}' \
    | grep -q online; then
    pg_ctlcluster "$version" "$cluster" start -- -o "-c listen_addresses=127.0.0.1" >&2 \
        || pg_ctlcluster "$version" "$cluster" start >&2
fi

psql_run() { su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -qAtc \"$1\""; }
if [ "$(psql_run "SELECT 1 FROM pg_roles WHERE rolname='$user'")" != 1 ]; then
    psql_run "CREATE ROLE $user LOGIN PASSWORD '$password'" >&2
fi
if [ "$(psql_run "SELECT 1 FROM pg_database WHERE datname='$db'")" != 1 ]; then
    psql_run "CREATE DATABASE $db OWNER $user" >&2
fi
say "ready on 127.0.0.1:$port"
echo "postgresql+psycopg://$user:$password@127.0.0.1:$port/$db"
