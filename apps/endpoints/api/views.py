"""``/endpoints`` (contract §9.6)."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch
from drf_spectacular.utils import OpenApiResponse
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.models import User
from apps.endpoints import services
from apps.endpoints.api import schemas
from apps.endpoints.models import Endpoint, EndpointOwner
from esd.api.errors import BadRequest
from esd.api.formats import utc_string
from esd.api.legacy import EsdView, RouteSpec, envelope_schema, route
from esd.api.pagination import keyset_page
from esd.api.validation import Problems, Query, check
from esd.api.views import envelope, uuid_list

TAGS = ["Endpoints"]
COUNTS = ("initial_instance_count", "min_instance_number", "max_instance_number")


def render_endpoint(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "EndpointDeploymentJobId": str(endpoint.id),
        "autoscaling": endpoint.autoscaling,
        "max_instance_number": str(endpoint.max_instance_number),
        "min_instance_number": str(endpoint.min_instance_number),
        "startTime": utc_string(endpoint.start_time),
        "endTime": utc_string(endpoint.end_time),
        "status": None,
        "instance_type": endpoint.instance_type,
        "current_instance_count": str(endpoint.current_instance_count),
        "endpoint_status": endpoint.status,
        "endpoint_name": endpoint.name,
        "error": endpoint.error or None,
        "endpoint_type": endpoint.endpoint_type,
        "owner_group_or_role": [o.name for o in endpoint.owners.all()],
        "custom_extensions": endpoint.custom_extensions,
        "backend": endpoint.backend,
    }


def with_owners(queryset):
    return queryset.prefetch_related(Prefetch("owners", queryset=EndpointOwner.objects.order_by("position")))


class EndpointsView(EsdView):
    @route(
        operation_id="ListEndpoints",
        summary="List endpoints visible to the caller, newest first",
        tags=TAGS,
        permissions=("sagemaker_endpoint:all", "sagemaker_endpoint:list"),
        query=(
            Query("limit", kind="limit", default=10),
            Query("exclusive_start_key", description="last_evaluated_key of the previous page"),
            Query("endpointDeploymentJobId", description="One endpoint by id"),
            Query("username", description="Only endpoints this user can use"),
        ),
        responses={200: schemas.LIST},
    )
    def get(self, request: Request) -> Response:
        query = request.esd_query
        endpoints = self.visible(Endpoint)
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
        return envelope(
            200, {"endpoints": [render_endpoint(e) for e in page.rows], "last_evaluated_key": page.last_evaluated_key}
        )

    def validate(self, request: Request, spec: RouteSpec) -> None:
        """What the schema cannot say: whole counts, and the short name's pattern unless it is ""."""
        if request.method != "POST":
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

    @route(
        operation_id="CreateEndpoint",
        summary="Deploy an endpoint on SageMaker or for self-hosted GPU workers",
        tags=TAGS,
        permissions=("sagemaker_endpoint:all", "sagemaker_endpoint:create"),
        body=schemas.CREATE,
        responses={
            202: OpenApiResponse(
                response=envelope_schema(202, schemas.ENDPOINT, "Endpoint deployment started: esd-async-test")
            )
        },
    )
    def post(self, request: Request) -> Response:
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
        return envelope(202, render_endpoint(endpoint), f"Endpoint deployment started: {endpoint.name}")

    @route(
        operation_id="DeleteEndpoints",
        summary="Tear endpoints down and delete them",
        tags=TAGS,
        permissions=("sagemaker_endpoint:all", "sagemaker_endpoint:create"),
        body=schemas.DELETE,
        keyless_user_ok=True,
        responses={204: None},
    )
    def delete(self, request: Request) -> Response:
        names = request.esd_body["endpoint_name_list"]
        changeable = Endpoint.objects.changeable_by(request.user, request.esd_permissions)
        services.delete_endpoints(list(changeable.filter(name__in=names)))
        return envelope(204)
