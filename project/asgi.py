"""The web process: Django under an ASGI server, so that event streams hold no thread each.

Run by gunicorn with uvicorn's worker (`gunicorn project.asgi:application -k project.asgi.Worker`):
gunicorn manages the processes, uvicorn serves each on its event loop.
"""

import os

from django.core.asgi import get_asgi_application
from uvicorn_worker import UvicornWorker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
application = get_asgi_application()


class Worker(UvicornWorker):
    # Django has no lifespan events; uvloop and httptools are uvicorn's fast paths.
    CONFIG_KWARGS = {"lifespan": "off", "loop": "uvloop", "http": "httptools"}
