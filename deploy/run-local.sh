#!/usr/bin/env bash
# `make run`: prepare what is missing (a .env with fresh secrets, a local Redis, the database, the
# demo admin), then run web, worker, beat and Flower together until Ctrl-C. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p .run

if [ ! -f .env ]; then
  password=$(python -c 'import secrets; print(secrets.token_urlsafe(12))')
  cat > .env <<ENV
DEBUG=true
SECRET_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(50))')
DEMO_ADMIN_PASSWORD=$password
FLOWER_BASIC_AUTH=admin:$password
ENV
  echo "wrote .env (secrets for this checkout; not committed)"
fi
chmod 600 .env  # secrets: the worker's alone
if ! grep -q '^CREDENTIALS_KEYS=' .env; then
  echo "CREDENTIALS_KEYS=$(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')" >> .env
fi
set -a; . ./.env; set +a
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

# Start a Redis of our own if nothing answers at REDIS_URL (noeviction: the broker must never drop a key).
read -r host port < <(python -c 'import os, urllib.parse as u; p = u.urlparse(os.environ["REDIS_URL"]); print(p.hostname or "127.0.0.1", p.port or 6379)')
if ! python -c "import redis, os; redis.Redis.from_url(os.environ['REDIS_URL'], socket_timeout=1).ping()" 2>/dev/null; then
  case "$host" in
    127.0.0.1|localhost) ;;
    *) echo "Redis at $REDIS_URL does not answer" >&2; exit 1 ;;
  esac
  command -v redis-server >/dev/null || { echo "redis-server is not installed: apt-get install redis-server" >&2; exit 1; }
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
    --maxmemory-policy noeviction --dir "$PWD/.run" --pidfile "$PWD/.run/redis.pid" --logfile "$PWD/.run/redis.log"
  echo "started redis-server on 127.0.0.1:$port (stop it with: kill \$(cat .run/redis.pid))"
fi

python manage.py migrate --noinput
echo
python manage.py ensure_demo_admin
echo
exec honcho start -f Procfile
