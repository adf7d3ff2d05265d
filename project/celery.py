import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("conveyor")
app.config_from_object("django.conf:settings", namespace="CELERY")
# autodiscover_tasks() only finds `<app>.tasks`; the worker code lives in the top-level `tasks/`
# package, so its task modules are listed here.
app.conf.imports = ("tasks.entrypoints",)


def _guard_redis_channel_after_connection_loss() -> None:
    """kombu's Redis channel, closed while the worker handles a lost broker connection, tries to put its
    unacknowledged messages back through a connection that is already gone (`self.connection.client`
    is None) and raises AttributeError, which Celery takes for an unrecoverable error: the worker
    exits (kombu issues #582, #970). Raised as the connection error it is, Celery ignores it while
    closing and reconnects; the messages stay in the broker's unacked set, whence they come back after
    the visibility timeout, and their jobs are published again by the reconciler meanwhile (the row is
    the truth)."""
    import redis
    from kombu.transport import redis as kombu_redis

    connparams = kombu_redis.Channel._connparams

    def guarded(self: kombu_redis.Channel, asynchronous: bool = False) -> dict:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return connparams(self, asynchronous=asynchronous)

    kombu_redis.Channel._connparams = guarded


_guard_redis_channel_after_connection_loss()
