"""The operator console for accounts: users with their roles, roles with their ESD permissions, API keys,
webhooks and their deliveries.

Every change goes through ``apps.accounts.services`` so the console and the API apply the same rules.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Model, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from guardian.admin import AdminGroupObjectPermissionsForm, AdminUserObjectPermissionsForm, GuardedModelAdminMixin

from apps.accounts import grants, services, webhooks
from apps.accounts.models import (
    ApiKey,
    Role,
    RoleQuota,
    User,
    Webhook,
    WebhookDelivery,
    esd_permission_queryset,
    permissions_of,
)
from apps.accounts.permissions import ALL_PERMISSIONS, PERMISSIONS, first_not_covered
from esd.api.errors import EsdError

admin.site.site_header = "ESD Server"
admin.site.site_title = "ESD Server"
admin.site.index_title = "Operations"
admin.site.unregister(Group)


def request_permissions(request: HttpRequest) -> frozenset[str]:
    """The console user's ESD permissions, computed once per request."""
    if not hasattr(request, "_esd_permissions"):
        user = request.user
        request._esd_permissions = permissions_of(user) if user.is_authenticated and user.is_active else frozenset()
    return request._esd_permissions


class EsdPermissionsAdmin(admin.ModelAdmin):
    """Console access follows the same ESD permissions as the API (any one listed permission suffices)."""

    view_permissions: tuple[str, ...] = ()
    add_permissions: tuple[str, ...] = ()
    change_permissions: tuple[str, ...] = ()
    # Rows whose deletion must also remove objects elsewhere (storage, remote resources) offer their own action.
    bulk_delete: bool = True

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        if not self.bulk_delete:
            actions.pop("delete_selected", None)
        return actions

    def _holds(self, request: HttpRequest, wanted: tuple[str, ...]) -> bool:
        return not request_permissions(request).isdisjoint(wanted)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self._holds(request, self.view_permissions)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._holds(request, self.view_permissions)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self._holds(request, self.add_permissions)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._holds(request, self.change_permissions)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._holds(request, self.change_permissions)


class _SharingForm:
    """Guardian's per-object permission form as one choice, "owner": an owner name grants the policy's actions
    together, and saving adds or removes the principal's name in the object's owner list (``grants.share``), which
    derives the grants. A grant made here is ESD wire data like any other owner name."""

    principal_name: str

    def get_obj_perms_field_choices(self) -> list[tuple[str, str]]:
        actions = grants.policy_of(type(self.obj)).owner_actions
        label = "Owner (" + ", ".join(actions) + ")"
        return [(grants.codename(type(self.obj), actions[0]), label)]

    def clean(self) -> dict:
        cleaned = super().clean()
        shared = bool(cleaned.get(self.get_obj_perms_field_name()))
        problem = grants.sharing_problem(self.obj, self.principal_name, shared=shared)
        if problem is not None and shared != (self.principal_name in grants.owner_names(self.obj)):
            self.add_error(self.get_obj_perms_field_name(), problem)  # shown beside the choice on guardian's page
        return cleaned

    def save_obj_perms(self) -> None:
        shared = bool(self.cleaned_data[self.get_obj_perms_field_name()])
        if shared != (self.principal_name in grants.owner_names(self.obj)):
            grants.share(self.obj, self.principal_name, shared=shared)


class UserSharingForm(_SharingForm, AdminUserObjectPermissionsForm):
    @property
    def principal_name(self) -> str:
        return self.user.username


class GroupSharingForm(_SharingForm, AdminGroupObjectPermissionsForm):
    @property
    def principal_name(self) -> str:
        return self.group.name


class SharedResourceAdmin(GuardedModelAdminMixin, EsdPermissionsAdmin):
    """An owner-listed resource (checkpoint, endpoint, dataset): its "Object permissions" page shows the guardian
    grants of users and roles, and an operator who may change the object shares it with a role or user there."""

    def get_obj_perms_manage_user_form(self, request: HttpRequest) -> type:
        return UserSharingForm

    def get_obj_perms_manage_group_form(self, request: HttpRequest) -> type:
        return GroupSharingForm

    def _may_share(self, request: HttpRequest, object_pk: str) -> None:
        try:
            obj: Model = get_object_or_404(self.get_queryset(request), pk=unquote(object_pk))
        except (ValidationError, ValueError):  # a malformed id names nothing
            raise Http404 from None
        change = f"{obj._meta.app_label}.{grants.codename(type(obj), 'change')}"
        if not self.has_change_permission(request, obj) or not request.user.has_perm(change, obj):
            raise PermissionDenied

    def obj_perms_manage_view(self, request: HttpRequest, object_pk: str) -> HttpResponse:
        self._may_share(request, object_pk)
        return super().obj_perms_manage_view(request, object_pk)

    def obj_perms_manage_user_view(self, request: HttpRequest, object_pk: str, user_id: int) -> HttpResponse:
        self._may_share(request, object_pk)
        return super().obj_perms_manage_user_view(request, object_pk, user_id)

    def obj_perms_manage_group_view(self, request: HttpRequest, object_pk: str, group_id: int) -> HttpResponse:
        self._may_share(request, object_pk)
        return super().obj_perms_manage_group_view(request, object_pk, group_id)


@admin.register(User)
class EsdUserAdmin(EsdPermissionsAdmin, UserAdmin):
    view_permissions = ("user:all", "user:list")
    add_permissions = change_permissions = ("user:all",)
    list_display = ("username", "role_names", "creator", "is_active", "is_superuser", "last_login")
    list_filter = ("is_active", "is_superuser", "groups")
    search_fields = ("username", "email", "creator")
    ordering = ("username",)
    readonly_fields = ("creator", "last_login", "date_joined")
    fieldsets = (
        (None, {"fields": ("username", "password")}),
        ("Roles", {"fields": ("groups",), "description": "The user's ESD permissions are those of their roles."}),
        ("Profile", {"fields": ("first_name", "last_name", "email", "creator")}),
        ("Console access", {"fields": ("is_active", "is_staff", "is_superuser")}),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    filter_horizontal = ("groups",)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).prefetch_related("groups")

    @admin.display(description="Roles")
    def role_names(self, obj: User) -> str:
        return ", ".join(sorted(g.name for g in obj.groups.all()))

    def formfield_for_manytomany(self, db_field, request, **kwargs):
        if db_field.name == "groups":
            kwargs["label"] = "Roles"
            kwargs["queryset"] = Group.objects.order_by("name")
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: User | None = None):
        # Only a superuser makes superusers or staff; the others would sign in to the admin with rights they lack.
        if request.user.is_superuser:
            return self.readonly_fields
        return (*self.readonly_fields, "is_staff", "is_superuser")

    def _may_manage(self, request: HttpRequest, obj: User | None) -> bool:
        if obj is None:
            return True
        try:
            services.check_may_manage(
                actor=request.user.get_username(), actor_permissions=request_permissions(request), target=obj
            )
        except EsdError:
            return False
        return True

    def has_change_permission(self, request: HttpRequest, obj: User | None = None) -> bool:
        return super().has_change_permission(request, obj) and self._may_manage(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: User | None = None) -> bool:
        return super().has_delete_permission(request, obj) and self._may_manage(request, obj)

    def get_form(self, request: HttpRequest, obj: User | None = None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        actor_permissions = request_permissions(request)

        def clean_groups(self) -> QuerySet:
            """The roles given must carry only permissions the actor holds (as ``save_user`` checks)."""
            groups = self.cleaned_data.get("groups")
            wanted = sorted({p.codename for group in groups or () for p in group.permissions.all()})
            lacking = first_not_covered(actor_permissions, [p for p in wanted if p in ALL_PERMISSIONS])
            if lacking is not None:
                raise forms.ValidationError(f"creator has no permission to assign permission [{lacking}] to others")
            return groups

        return type(form.__name__, (form,), {"clean_groups": clean_groups}) if "groups" in form.base_fields else form

    def save_model(self, request: HttpRequest, obj: User, form, change: bool) -> None:
        if not change and not obj.creator:
            obj.creator = request.user.get_username()
        super().save_model(request, obj, form, change)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        actor = request.user.get_username()
        try:
            services.delete_users(list(queryset), actor=actor, actor_permissions=request_permissions(request))
        except EsdError as exc:
            self.message_user(request, f"Nothing deleted: {exc.message}", messages.ERROR)

    def delete_model(self, request: HttpRequest, obj: User) -> None:
        actor = request.user.get_username()
        services.delete_users([obj], actor=actor, actor_permissions=request_permissions(request))


class RoleForm(forms.ModelForm):
    esd_permissions = forms.MultipleChoiceField(
        label="Permissions",
        choices=[(p, p) for p in PERMISSIONS],
        widget=forms.CheckboxSelectMultiple,
        help_text="{resource}:all includes the resource's list and create actions.",
    )
    actor: User  # set by RoleAdmin.get_form

    class Meta:
        model = Role
        fields = ("name",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["esd_permissions"] = list(
                self.instance.permissions.filter(pk__in=esd_permission_queryset()).values_list("codename", flat=True)
            )

    def clean(self) -> dict:
        data = super().clean()
        name = data.get("name") or self.instance.name
        try:
            services.check_role(
                actor=self.actor.get_username(),
                actor_permissions=permissions_of(self.actor),
                name=name,
                permissions=data.get("esd_permissions", []),
                existing=self.instance if self.instance.pk else None,
            )
        except EsdError as exc:
            raise forms.ValidationError(exc.message) from exc
        return data


class RoleQuotaInline(admin.StackedInline):
    """The role's GPU quota on its page (empty fields: unlimited). Only ``role:all`` changes it: a role's creator
    with ``role:create`` may edit its permissions, but raising their own team's GPU budget is an operator's call."""

    model = RoleQuota
    max_num = 1
    can_delete = True
    verbose_name_plural = "quota (GPU-seconds per day and concurrent jobs per member; empty: unlimited)"

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return not request_permissions(request).isdisjoint(("role:all", "role:list"))

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return "role:all" in request_permissions(request) and not (obj is not None and obj.is_protected)

    has_change_permission = has_add_permission
    has_delete_permission = has_add_permission


@admin.register(Role)
class RoleAdmin(EsdPermissionsAdmin):
    form = RoleForm
    inlines = (RoleQuotaInline,)
    view_permissions = ("role:all", "role:list")
    add_permissions = ("role:all", "role:create")
    change_permissions = ("role:all",)
    list_display = ("name", "creator", "permission_list", "member_count")
    search_fields = ("name", "creator")
    ordering = ("name",)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(members=Count("user")).prefetch_related("permissions")

    def get_readonly_fields(self, request: HttpRequest, obj: Role | None = None):
        # Roles are referenced by name (owners of endpoints and checkpoints): no renames.
        return ("name", "creator") if obj is not None else ("creator",)

    def get_form(self, request: HttpRequest, obj: Role | None = None, change: bool = False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (form,), {"actor": request.user})

    @admin.display(description="Permissions")
    def permission_list(self, obj: Role) -> str:
        return ", ".join(sorted(p.codename for p in obj.permissions.all() if p.codename in ALL_PERMISSIONS))

    @admin.display(description="Members", ordering="members")
    def member_count(self, obj: Role) -> int:
        return obj.members

    def has_change_permission(self, request: HttpRequest, obj: Role | None = None) -> bool:
        if obj is not None and obj.is_protected:
            return False
        if super().has_change_permission(request, obj):
            return True
        # As in the API: a role creator without role:all may edit the roles they created.
        return obj is not None and obj.creator == request.user.get_username() and self._holds(request, ("role:create",))

    def has_delete_permission(self, request: HttpRequest, obj: Role | None = None) -> bool:
        return not (obj is not None and obj.is_protected) and super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: Role, form: RoleForm, change: bool) -> None:
        role, _ = services.save_role(
            actor=request.user.get_username(),
            actor_permissions=permissions_of(request.user),
            name=obj.name,
            permissions=form.cleaned_data["esd_permissions"],
        )
        form.instance = role
        obj.pk = role.pk

    def save_related(self, request, form, formsets, change):
        """The service already set the permissions; only the quota inline is left to save."""
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        services.delete_roles(
            [r.name for r in queryset if not r.is_protected],
            visible=list(queryset),
            actor_permissions=request_permissions(request),
        )

    def delete_model(self, request: HttpRequest, obj: Role) -> None:
        services.delete_roles([obj.name], visible=[obj], actor_permissions=request_permissions(request))


class ApiKeyForm(forms.ModelForm):
    expires_days = forms.IntegerField(
        required=False, min_value=1, help_text="Leave empty for a key that does not expire."
    )
    issuer: User  # set by ApiKeyAdmin.get_form

    class Meta:
        model = ApiKey
        fields = ("user", "name", "kind")

    def clean(self) -> dict:
        data = super().clean()
        if data.get("user") is not None and data.get("kind"):
            try:
                services.check_key_issue(issuer=self.issuer, owner=data["user"], kind=data["kind"])
            except EsdError as exc:
                raise forms.ValidationError(exc.message) from exc
        return data


@admin.register(ApiKey)
class ApiKeyAdmin(EsdPermissionsAdmin):
    form = ApiKeyForm
    # Keys act with their owner's permissions: issuing them for others is user administration.
    view_permissions = add_permissions = change_permissions = ("user:all",)
    list_display = ("prefix", "user", "name", "kind", "status", "created_at", "expires_at", "last_used_at")
    list_filter = ("kind", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("prefix", "name", "user__username")
    list_select_related = ("user",)
    autocomplete_fields = ("user",)
    actions = ["revoke"]

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None):
        if obj is None:
            return ("user", "name", "kind", "expires_days")
        return ("prefix", "user", "name", "kind", "status", "created_at", "expires_at", "revoked_at", "last_used_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None):
        if obj is None:
            return ()
        return self.get_fields(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        # Keys are immutable apart from revocation; the change page is a read-only detail view.
        return obj is None and super().has_change_permission(request, obj)

    def get_form(self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (form,), {"issuer": request.user})

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ApiKeyForm, change: bool) -> None:
        key, raw = services.issue_api_key(
            form.cleaned_data["user"],
            kind=form.cleaned_data["kind"],
            name=form.cleaned_data["name"],
            expires_days=form.cleaned_data.get("expires_days"),
            issuer=request.user,
        )
        form.instance = key
        obj.pk = key.pk
        self.message_user(
            request,
            f"New API key for {key.user.username}: {raw} — copy it now, it will not be shown again.",
            messages.SUCCESS,
        )

    def response_add(self, request, obj, post_url_continue=None):
        return HttpResponseRedirect(reverse("admin:accounts_apikey_changelist"))

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = sum(services.revoke_api_key(key) for key in queryset)
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)


# --- webhooks -----------------------------------------------------------------------------------------------------


class WebhookForm(forms.ModelForm):
    class Meta:
        model = Webhook
        fields = ("user", "role", "url", "events", "active")

    def clean(self) -> dict:
        """The service's rules (the SSRF guard, known events, one owner) for admin edits too."""
        data = super().clean()
        if bool(data.get("user")) == bool(data.get("role")):
            raise forms.ValidationError("A webhook belongs to exactly one user or one role.")
        if not isinstance(data.get("events") or [], list):
            raise forms.ValidationError('Events are a JSON list, e.g. ["inference.ended"].')
        try:
            if data.get("url"):
                data["url"] = webhooks.check_webhook_url(data["url"])
            data["events"] = webhooks.check_events(data.get("events"))
        except EsdError as exc:
            raise forms.ValidationError(exc.message) from exc
        return data


@admin.register(Webhook)
class WebhookAdmin(EsdPermissionsAdmin):
    """Every webhook (users' and roles'): role administration, as in the console. The secret is never shown."""

    form = WebhookForm
    view_permissions = add_permissions = change_permissions = ("role:all",)
    list_display = ("id", "url", "user", "role", "events", "active", "secret_hint", "created_by", "created_at")
    list_filter = ("active", ("role", admin.EmptyFieldListFilter))
    search_fields = ("url", "user__username", "role__name")
    list_select_related = ("user", "role")
    autocomplete_fields = ("user",)
    readonly_fields = ("secret_hint", "created_by", "created_at")
    actions = ["ping"]

    def save_model(self, request: HttpRequest, obj: Webhook, form: WebhookForm, change: bool) -> None:
        if not change:
            created = webhooks.create_webhook(
                url=obj.url, user=obj.user, role=obj.role, events=obj.events, by=request.user.get_username()
            )
            obj.pk, obj.secret = created.pk, created.secret
            self.message_user(
                request,
                f"Webhook {created.pk} created. Signing secret: {created.secret} — copy it now, it will not be "
                "shown again.",
                messages.SUCCESS,
            )
            return
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj, post_url_continue=None):
        return HttpResponseRedirect(reverse("admin:accounts_webhook_changelist"))

    @admin.action(description="Send a ping to the selected webhooks")
    def ping(self, request: HttpRequest, queryset: QuerySet) -> None:
        queued = 0
        for hook in queryset.select_related("user", "role"):
            try:
                webhooks.ping(hook)
            except EsdError as exc:  # tested too recently, or inactive
                self.message_user(request, exc.message, messages.WARNING)
            else:
                queued += 1
        self.message_user(request, f"Queued {queued} ping(s).", messages.SUCCESS)


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(EsdPermissionsAdmin):
    """What was sent where and how it went; read-only (a failed delivery can be sent again, from scratch)."""

    view_permissions = ("role:all",)
    list_display = ("id", "event", "webhook", "job_id", "status", "attempts", "last_status_code", "last_error")
    list_display_links = ("id",)
    list_filter = ("status", "event")
    search_fields = ("id", "job_id", "webhook__url")
    list_select_related = ("webhook__user", "webhook__role")
    date_hierarchy = "created_at"
    actions = ["redeliver"]
    fields = (
        "id",
        "webhook",
        "event",
        "job_id",
        "status",
        "attempts",
        "last_status_code",
        "last_error",
        "created_at",
        "last_attempt_at",
        "leased_until",
        "delivered_at",
        "body",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def get_actions(self, request: HttpRequest):
        # The redeliver action changes rows: only for those who manage webhooks (actions need no change permission).
        return super().get_actions(request) if self._holds(request, ("role:all",)) else {}

    @admin.action(description="Deliver the selected failed deliveries again")
    def redeliver(self, request: HttpRequest, queryset: QuerySet) -> None:
        failed = list(queryset.filter(status="failed"))
        for delivery in failed:
            webhooks.redeliver(delivery)
        self.message_user(request, f"Queued {len(failed)} delivery(ies) again.", messages.SUCCESS)
