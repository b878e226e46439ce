"""``/endpoints`` (contract §9.6). Thin: parse, call a service, render through the serializers."""

from __future__ import annotations

from django.db.models import Prefetch, QuerySet
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.models import User
from apps.endpoints import services
from apps.endpoints.api import schemas
from apps.endpoints.api.serializers import EndpointListSerializer, EndpointSerializer
from apps.endpoints.models import Endpoint, EndpointOwner
from esd.api.errors import BadRequest
from esd.api.openapi import Answer
from esd.api.pagination import keyset_page
from esd.api.validation import Problems, Query, check
from esd.api.views import EsdViewSet, Operation, envelope, operation, uuid_list

TAGS = ["Endpoints"]
COUNTS = ("initial_instance_count", "min_instance_number", "max_instance_number")


def with_owners(queryset: QuerySet) -> QuerySet:
    """Owners in their stored order, read once for all rows (``EndpointSerializer`` lists them)."""
    return queryset.prefetch_related(Prefetch("owners", queryset=EndpointOwner.objects.order_by("position")))


class EndpointViewSet(EsdViewSet):
    model = Endpoint
    required = {
        "list": ("sagemaker_endpoint:all", "sagemaker_endpoint:list"),
        "create": ("sagemaker_endpoint:all", "sagemaker_endpoint:create"),
        "bulk_destroy": ("sagemaker_endpoint:all", "sagemaker_endpoint:create"),
    }

    @operation(
        operation_id="ListEndpoints",
        summary="List endpoints visible to the caller, newest first",
        tags=TAGS,
        query=(
            Query("limit", kind="limit", default=10),
            Query("exclusive_start_key", description="last_evaluated_key of the previous page"),
            Query("endpointDeploymentJobId", description="One endpoint by id"),
            Query("username", description="Only endpoints this user can use"),
        ),
        responses={200: EndpointListSerializer},
    )
    def list(self, request: Request) -> Response:
        query = request.esd_query
        endpoints = self.get_queryset()
        if query["endpointDeploymentJobId"] is not None:
            endpoints = endpoints.filter(pk__in=uuid_list([query["endpointDeploymentJobId"]]))
        if query["username"] is not None:
            user = User.objects.filter(username=query["username"]).first()
            if user is None:
                raise BadRequest(f'user: "{query["username"]}" not exist')
            endpoints = endpoints & Endpoint.objects.usable_by(user)
        page = keyset_page(
            with_owners(endpoints),
            order=("start_time", "id"),
            limit=query["limit"],
            start_key=query["exclusive_start_key"],
        )
        data = {"endpoints": page.rows, "last_evaluated_key": page.last_evaluated_key}
        return envelope(200, EndpointListSerializer.render(data))

    def validate(self, request: Request, spec: Operation) -> None:
        """What the schema cannot say: whole counts, and the short name's pattern unless it is ""."""
        if self.action != "create":
            return
        body = request.esd_body
        for field in COUNTS:
            value = body.get(field)
            if isinstance(value, float) and not value.is_integer():
                raise BadRequest(f"{field} must be a whole number")
        name = body.get("endpoint_name", "")
        if name:
            problems = Problems()
            check({"type": "string", "pattern": schemas.NAME_PATTERN}, name, "endpoint_name", problems)
            problems.raise_if_any()

    @operation(
        operation_id="CreateEndpoint",
        summary="Deploy an endpoint on SageMaker or for self-hosted GPU workers",
        tags=TAGS,
        body=schemas.CREATE,
        responses={202: Answer(EndpointSerializer, message="Endpoint deployment started: esd-async-test")},
    )
    def create(self, request: Request) -> Response:
        body = request.esd_body
        endpoint = services.create_endpoint(
            services.EndpointRequest(
                endpoint_type=body["endpoint_type"],
                instance_type=body["instance_type"],
                initial_instance_count=int(body["initial_instance_count"]),
                autoscaling=body["autoscaling_enabled"],
                roles=list(dict.fromkeys(body["assign_to_roles"])),
                name=body.get("endpoint_name", ""),
                min_instance_number=int(body.get("min_instance_number", 0)),
                max_instance_number=int(body.get("max_instance_number", 1)),
                custom_docker_image_uri=body.get("custom_docker_image_uri", ""),
                custom_extensions=body.get("custom_extensions", ""),
                backend=body.get("backend", ""),
            ),
            creator=request.user.username,
        )
        endpoint = with_owners(Endpoint.objects.filter(pk=endpoint.pk)).get()
        return envelope(202, EndpointSerializer.render(endpoint), f"Endpoint deployment started: {endpoint.name}")

    @operation(
        operation_id="DeleteEndpoints",
        summary="Tear endpoints down and delete them",
        tags=TAGS,
        body=schemas.DELETE,
        keyless_user_ok=True,
        responses={204: None},
    )
    def bulk_destroy(self, request: Request) -> Response:
        names = request.esd_body["endpoint_name_list"]
        changeable = Endpoint.objects.changeable_by(request.user, request.esd_permissions)
        services.delete_endpoints(list(changeable.filter(name__in=names)))
        return envelope(204)
