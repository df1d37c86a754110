#!/bin/bash
# Entry point of the local stand-in for the official postgres image, configured the same
# way: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB and PGDATA create the cluster on the
# first start; PGPORT is the port; `postgres -c name=value ...` as the command passes
# server settings. Built by deploy/run_compose.py from Debian's postgresql package, for
# machines that cannot pull the official image.
set -euo pipefail

if [[ "${1:-}" == postgres ]]; then
  shift
fi
export PGDATA=${PGDATA:-/var/lib/postgresql/data}

# as the official image: started as root, prepare the directories (a fresh volume, the
# socket directory on a /run tmpfs), then run as postgres
if [[ "$(id -u)" == 0 ]]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 0700 "$PGDATA"
  chmod 3777 /var/run/postgresql
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" postgres "$@"
fi
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}

if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
  if [[ -z "${POSTGRES_PASSWORD:-}" ]]; then
    echo "error: POSTGRES_PASSWORD is not set" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --username="$user" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
  rm -f "$pwfile"
  printf 'host all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
  if [[ "$database" != postgres ]]; then
    printf 'CREATE DATABASE "%s";\n' "$database" | postgres --single -D "$PGDATA" postgres >/dev/null
  fi
  echo "created database $database for user $user in $PGDATA"
fi

exec postgres -D "$PGDATA" -c "listen_addresses=*" "$@"
