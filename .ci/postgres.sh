#!/usr/bin/env bash
# Install and start a throw-away PostgreSQL on 127.0.0.1:5432 with database/user/password 'cellsearch'.
# Tests read CELLSEARCH_TEST_POSTGRES (set in tests/conftest.py's default) and skip the PostgreSQL cases
# only when no server answers; CI always provides one.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -q && break
  sleep 1
done
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_roles WHERE rolname='cellsearch'\"" | grep -q 1 ||
  su postgres -c "psql -q -c \"CREATE ROLE cellsearch LOGIN PASSWORD 'cellsearch'\""
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_database WHERE datname='cellsearch'\"" | grep -q 1 ||
  su postgres -c "psql -q -c \"CREATE DATABASE cellsearch OWNER cellsearch\""
echo "PostgreSQL $version ready on 127.0.0.1:5432"
