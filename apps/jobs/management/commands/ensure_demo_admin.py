import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create (or update) the demo superuser `admin` with DEMO_ADMIN_PASSWORD, and print its API token."

    def handle(self, *args: object, **options: object) -> None:
        password = os.environ.get("DEMO_ADMIN_PASSWORD")
        if not password:
            raise CommandError("set DEMO_ADMIN_PASSWORD (make run writes one into .env)")
        user, created = get_user_model().objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True, "email": "admin@localhost"}
        )
        if created or not user.check_password(password):
            user.set_password(password)
            user.save()
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"  admin login: admin / {password}   (http://127.0.0.1:8000/admin/)")
        self.stdout.write(f"  API token:   {token.key}")
        self.stdout.write(f"  Flower:      http://127.0.0.1:5555/  (admin / {password})")
