#!/usr/bin/env bash
# `make run`: prepare what is missing (a .env with fresh secrets, PostgreSQL and Redis, the database
# schema, the demo admin), then run web, worker, beat and Flower (and the Discord bot, when
# DISCORD_BOT_TOKEN is set) together until Ctrl-C. Safe to run again. PostgreSQL and Redis are the
# ones that answer at DATABASE_URL and REDIS_URL (by default the local ones); when nothing answers
# there, private servers under .run/ are started, and stopped on exit.
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
if ! grep -Eq '^FLOWER_BASIC_AUTH(_FILE)?=.' .env; then
  # Flower does not start without credentials: an .env from before they were required gets the demo
  # admin's, as a new one does.
  password=$(sed -n 's/^DEMO_ADMIN_PASSWORD=//p' .env | tail -n 1)
  echo "FLOWER_BASIC_AUTH=admin:${password:-$(python -c 'import secrets; print(secrets.token_urlsafe(12))')}" >> .env
fi
set -a; . ./.env; set +a

eval "$(python deploy/services.py up)"
trap 'python deploy/services.py down' EXIT
echo "database: $DATABASE_URL"
echo "redis:    $REDIS_URL"

python manage.py migrate --noinput
echo
python manage.py ensure_demo_admin
echo
processes="web worker beat flower"
if [ -n "${DISCORD_BOT_TOKEN:-}" ]; then
  processes="$processes discord"  # inbound Discord messages; without a token there is no bot to run
fi
honcho start -f Procfile $processes
