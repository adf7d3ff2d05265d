"""`POST /api/uploads/`: the source archives that build, test and lint jobs name (`{"source": {"upload": id}}`)."""

from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.decorators import api_view, parser_classes, throttle_classes
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs import services
from apps.jobs.archives import ArchiveError
from project.api import SubmitThrottle
from project.parsers import RequestTooLarge, refuse_declared_over


class UploadParser(MultiPartParser):
    def parse(self, stream: object, media_type: str | None = None, parser_context: dict | None = None) -> object:
        # The multipart envelope around the file takes a little room of its own.
        limit = settings.UPLOAD_MAX_BYTES + 64 * 1024
        refuse_declared_over(parser_context, limit, f"Uploads are limited to {settings.UPLOAD_MAX_BYTES} bytes.")
        return super().parse(stream, media_type, parser_context)


@extend_schema(
    request={"multipart/form-data": inline_serializer("UploadIn", {"file": serializers.FileField()})},
    responses={
        201: inline_serializer(
            "Upload",
            {"id": serializers.UUIDField(), "size": serializers.IntegerField(), "sha256": serializers.CharField()},
        )
    },
)
@api_view(["POST"])
@parser_classes([UploadParser])
@throttle_classes([SubmitThrottle])
def upload(request: Request) -> Response:
    """A source archive (tar.gz or zip) for `{"source": {"upload": id}}`; checked now, kept until used."""
    file = request.FILES.get("file")
    if file is None:
        raise ValidationError({"file": ["No file was submitted (multipart field 'file')."]})
    if file.size > settings.UPLOAD_MAX_BYTES:
        raise RequestTooLarge(f"Uploads are limited to {settings.UPLOAD_MAX_BYTES} bytes.")
    try:
        saved = services.save_upload(request.user, file)
    except ArchiveError as exc:
        raise ValidationError({"file": [str(exc)]}) from exc
    return Response({"id": saved.id, "size": saved.size, "sha256": saved.sha256}, status=status.HTTP_201_CREATED)
