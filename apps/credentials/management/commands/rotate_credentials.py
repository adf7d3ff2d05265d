from django.core.management.base import BaseCommand

from apps.credentials.services import rotate_all


class Command(BaseCommand):
    help = "Re-encrypt every stored provider key and callback secret under the first key of CREDENTIALS_KEYS."

    def handle(self, *args: object, **options: object) -> None:
        count = rotate_all()
        self.stdout.write(f"re-encrypted {count} key(s) and secret(s) under the first key of CREDENTIALS_KEYS")
