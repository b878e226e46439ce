"""Content negotiation for the ESD API (kept apart from the views: DRF imports it while loading its settings)."""

from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser


class JsonOnlyNegotiation(BaseContentNegotiation):
    """ESD always answers JSON, whatever ``Accept`` says (ESD clients send all sorts)."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class DeferredBodyParser(BaseParser):
    """Accept any media type and leave the body unread.

    ESD routes read the raw body themselves (``Content-Type`` is not checked, an empty body is ``{}``); this only
    keeps DRF from answering 415 when something (the CSRF check of a session request) touches ``request.POST``.
    """

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        return {}
