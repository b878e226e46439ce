"""``/ping``, ``/roles`` and ``/users`` (contract §9.1-9.3). Thin: parse, call a service, render."""

from __future__ import annotations

import secrets

from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts import services
from apps.accounts.api import schemas
from apps.accounts.api.serializers import FirstRunUserSerializer, RoleListSerializer, UserListSerializer
from apps.accounts.authentication import SESSION
from apps.accounts.crypto import decrypt_password
from apps.accounts.models import Role, User, role_permissions, user_roles
from apps.accounts.permissions import ALL_PERMISSIONS
from esd.api.openapi import Answer
from esd.api.validation import Query
from esd.api.views import EsdViewSet, envelope, operation

NOT_APPLICABLE = "not_applicable"


class PingViewSet(EsdViewSet):
    @operation(
        operation_id="TestConnection",
        summary="Check that the API is reachable and the key is valid",
        tags=["Service"],
        needs_user=False,
        responses={200: Answer(message="pong")},
    )
    def list(self, request: Request) -> Response:
        return envelope(200, message="pong")


class RoleViewSet(EsdViewSet):
    model = Role
    required = {
        "list": ("role:all", "role:list"),
        "create": ("role:all", "role:create"),
        "bulk_destroy": ("role:all",),
    }

    @operation(
        operation_id="ListRoles",
        summary="List the roles visible to the caller",
        tags=["Roles"],
        query=(Query("role", description="Exact role name"),),
        responses={200: RoleListSerializer},
    )
    def list(self, request: Request) -> Response:
        roles = self.get_queryset()
        if request.esd_query["role"] is not None:
            roles = roles.filter(name=request.esd_query["role"])
        rows = list(roles.values_list("pk", "name", "creator"))
        permissions = role_permissions([pk for pk, _, _ in rows])
        items = [
            {"role_name": name, "creator": creator, "permissions": sorted(permissions.get(pk, ()))}
            for pk, name, creator in sorted(rows, key=lambda row: row[1], reverse=True)
        ]
        data = {"roles": items, "previous_evaluated_key": NOT_APPLICABLE, "last_evaluated_key": None}
        return envelope(200, RoleListSerializer.render(data))

    @operation(
        operation_id="CreateRole",
        summary="Create a role or replace its permissions",
        tags=["Roles"],
        body=schemas.CREATE_ROLE,
        first_run_initial=True,
        responses={201: Answer(message="role created")},
    )
    def create(self, request: Request) -> Response:
        body = request.esd_body
        if request.esd_first_run:
            actor = _first_run_actor(request)
            services.save_role(
                actor=actor,
                actor_permissions=ALL_PERMISSIONS,
                name=body["role_name"],
                permissions=body["permissions"],
                checked=False,
            )
        else:
            services.save_role(
                actor=request.user.username,
                actor_permissions=request.esd_permissions,
                name=body["role_name"],
                permissions=body["permissions"],
            )
        return envelope(201, message="role created")

    @operation(
        operation_id="DeleteRoles",
        summary="Delete roles (the default role cannot be deleted)",
        tags=["Roles"],
        body=schemas.DELETE_ROLES,
        keyless_user_ok=True,
        responses={204: None},
    )
    def bulk_destroy(self, request: Request) -> Response:
        names = request.esd_body["role_name_list"]
        visible = list(self.get_queryset().filter(name__in=names).prefetch_related("permissions"))
        services.delete_roles(names, visible=visible, actor_permissions=request.esd_permissions)
        return envelope(204)


class UserViewSet(EsdViewSet):
    model = User
    required = {"list": ("user:all", "user:list"), "create": ("user:all",), "bulk_destroy": ("user:all",)}

    @operation(
        operation_id="ListUsers",
        summary="List the users visible to the caller",
        tags=["Users"],
        query=(
            Query("username", description="Exact user name"),
            Query(
                "show_password",
                kind="bool",
                default=False,
                description="Return a password field for the WebUI's login table (see the contract, §9.3)",
            ),
        ),
        responses={200: UserListSerializer},
    )
    def list(self, request: Request) -> Response:
        users = self.get_queryset()
        if request.esd_query["username"] is not None:
            users = users.filter(username=request.esd_query["username"])
        users = list(users.only("username", "creator", "password", "is_superuser", "encrypted_password"))
        roles = user_roles([user.pk for user in users])
        permissions = role_permissions({role_id for held in roles.values() for role_id, _ in held})
        reveal = self._password_reveal(request)
        items = []
        for user in sorted(users, key=lambda u: u.username, reverse=True):
            held = roles.get(user.pk, [])
            granted = (
                ALL_PERMISSIONS
                if user.is_superuser
                else {p for role_id, _ in held for p in permissions.get(role_id, ())}
            )
            items.append(
                {
                    "username": user.username,
                    "roles": sorted(name for _, name in held),
                    "creator": user.creator,
                    "permissions": sorted(granted),
                    "password": reveal(user),
                }
            )
        data = {"users": items, "previous_evaluated_key": NOT_APPLICABLE, "last_evaluated_key": NOT_APPLICABLE}
        return envelope(200, UserListSerializer.render(data))

    @staticmethod
    def _password_reveal(request: Request):
        """What goes in ``password`` (contract §9.3): masks, or random tokens when the WebUI asks (fail closed).

        Plaintext only with ``ESD_WEBUI_PASSWORD_SYNC``, a service key and an acting user holding ``user:all``.
        """
        if not request.esd_query["show_password"]:
            return lambda user: "********" if user.has_usable_password() else "*"
        trusted = request.auth is not SESSION and request.auth.is_service and "user:all" in request.esd_permissions

        def reveal(user: User) -> str:
            plain = decrypt_password(user.encrypted_password) if trusted else None
            return plain if plain is not None else secrets.token_urlsafe(24)[:32]

        return reveal

    @operation(
        operation_id="CreateUser",
        summary="Create a user or replace their password and roles",
        tags=["Users"],
        body=schemas.CREATE_USER,
        first_run_initial=True,
        responses={
            201: Answer(
                FirstRunUserSerializer,
                description="`data` only when the request had `initial: true`",
                data_required=False,
            )
        },
    )
    def create(self, request: Request) -> Response:
        body = request.esd_body
        initial = body.get("initial") is True
        saved = services.save_user(
            actor=request.user.username if not request.esd_first_run else "",
            actor_permissions=request.esd_permissions,
            username=body["username"],
            password=body["password"],
            roles=body.get("roles", []),
            first_run=request.esd_first_run,
        )
        if not initial:
            return envelope(201)
        all_roles = sorted(Role.objects.values_list("name", flat=True))
        data = {"user": {"username": saved.user.username, "roles": saved.roles}, "all_roles": all_roles}
        return envelope(201, FirstRunUserSerializer.render(data))

    @operation(
        operation_id="DeleteUsers",
        summary="Delete users with their API keys and sessions",
        tags=["Users"],
        body=schemas.DELETE_USERS,
        responses={204: None},
    )
    def bulk_destroy(self, request: Request) -> Response:
        names = request.esd_body["user_name_list"]
        services.delete_users(
            list(self.get_queryset().filter(username__in=names)),
            actor=request.user.username,
            actor_permissions=request.esd_permissions,
        )
        return envelope(204)


def _first_run_actor(request: Request) -> str:
    """During first run the named administrator may not exist yet; record the name the WebUI sent."""
    from apps.accounts.access import named_user

    return named_user(request) or request.user.username
