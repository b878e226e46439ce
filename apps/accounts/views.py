"""Console pages for users, roles, API keys and webhooks (namespace ``console``).

Every change goes through ``apps.accounts.services``, exactly as the API and the admin do, so a rule lives in one
place; these views only parse forms, decide what to *show* from the user's ESD permissions, and turn a service's
``EsdError`` into a message on the form (with the error's status). Showing less is a courtesy: each POST checks the
permission again, because a hidden button is not a protection.
"""

from __future__ import annotations

import secrets
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth import update_session_auth_hash
from django.core.paginator import Paginator
from django.core.validators import RegexValidator
from django.db import transaction
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from apps.accounts import services, webhooks
from apps.accounts.choices import ApiKeyKind, WebhookEvent
from apps.accounts.models import ApiKey, Role, RoleQuota, User, Webhook, WebhookDelivery, role_permissions, user_roles
from apps.accounts.permissions import ALL_PERMISSIONS, PERMISSIONS, first_not_covered
from esd.api.errors import EsdError
from esd.console import console_view, holds, permissions

USER_ADMIN = ("user:all",)
ROLE_EDITORS = ("role:all", "role:create")
ROLE_DELETERS = ("role:all",)
KEYS_PER_PAGE = 50


# --- forms ------------------------------------------------------------------------------------------------------
# The same limits as the API's request schemas (contract §9.2, §9.3), so the console cannot store what the API
# would refuse; everything beyond shape (who may grant what, which roles exist) is the services' business.


class RoleNamesField(forms.MultipleChoiceField):
    """Role names, passed to the service unchecked: ``save_user`` owns "role exists" and "may assign" and says so
    in its own words (``user roles "X" not exist``), which a choice check here would pre-empt with a vaguer one."""

    def valid_value(self, value: str) -> bool:
        return 0 < len(value) <= 100


class UserForm(forms.Form):
    username = forms.CharField(
        max_length=150, validators=[RegexValidator(r"^[\w.@+-]+\Z", "Letters, digits and . @ + - _ only.")]
    )
    password = forms.CharField(max_length=128, strip=False, widget=forms.PasswordInput)
    roles = RoleNamesField(required=False)

    def clean_roles(self) -> list[str]:
        roles = self.cleaned_data["roles"]
        if len(roles) > 20:
            raise forms.ValidationError("At most 20 roles.")
        return roles


class UserEditForm(UserForm):
    """Editing never renames; an empty password keeps the current one."""

    username = None
    password = forms.CharField(max_length=128, strip=False, required=False, widget=forms.PasswordInput)


class RoleForm(forms.Form):
    name = forms.CharField(max_length=100, strip=False)
    permissions = forms.MultipleChoiceField(choices=[(p, p) for p in PERMISSIONS], widget=forms.CheckboxSelectMultiple)


class RoleEditForm(RoleForm):
    """Roles are referenced by name (owners of endpoints and checkpoints): no renames."""

    name = None


class QuotaForm(forms.Form):
    """A role's GPU quota: empty fields are unlimited."""

    gpu_seconds_per_day = forms.IntegerField(required=False, min_value=0, label="GPU-seconds per day")
    concurrent_jobs = forms.IntegerField(required=False, min_value=0, label="Concurrent jobs")


QUOTA_EDITORS = ("role:all",)  # raising a team's GPU budget is an operator's call, not a role creator's


class KeyForm(forms.Form):
    name = forms.CharField(max_length=100, required=False)
    kind = forms.ChoiceField(choices=ApiKeyKind.choices, initial=ApiKeyKind.PERSONAL)
    expires_days = forms.IntegerField(required=False, min_value=1, max_value=36500)
    user = forms.CharField(max_length=150, required=False)


def _service_error(form: forms.Form, exc: EsdError) -> int:
    """Put a service's message on the form and return its status, so a refused POST is not answered 200."""
    form.add_error(None, exc.message)
    return exc.status


# --- users ------------------------------------------------------------------------------------------------------


@console_view("user:all", "user:list")
def users(request: HttpRequest) -> HttpResponse:
    """The visible users; holders of ``user:all`` also create users here (an existing name is refused, so a slip
    of the keyboard cannot reset someone's password: replacing is the edit page's job)."""
    form = UserForm()
    status = 200
    if request.method == "POST":
        if not holds(request, *USER_ADMIN):
            return _forbidden(request, USER_ADMIN)
        form = UserForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            if User.objects.filter(username=data["username"]).exists():
                form.add_error("username", "This user already exists; open it to change it.")
                status = 400
            else:
                try:
                    services.save_user(
                        actor=request.user.get_username(),
                        actor_permissions=permissions(request),
                        username=data["username"],
                        password=data["password"],
                        roles=data["roles"],
                        validate_password=True,
                    )
                except EsdError as exc:
                    status = _service_error(form, exc)
                else:
                    messages.success(request, f"User {data['username']} created.")
                    return redirect("console:users")
        else:
            status = 400
    return render(request, "console/accounts/users.html", _users_context(request, form), status=status)


def _users_context(request: HttpRequest, form: forms.Form) -> dict[str, Any]:
    """Rows built from flat queries (users, memberships, role permissions): the page costs the same number of
    queries for 5 users or 5,000, like ``GET /users``."""
    can_manage = holds(request, *USER_ADMIN)
    people = list(
        User.objects.visible_to(request.user, permissions(request))
        .only("username", "creator", "is_superuser", "is_active")
        .order_by("username")
    )
    held = user_roles([u.pk for u in people])
    # All roles' permissions when the role picker needs them too: one query serves both.
    granted = role_permissions(None if can_manage else {rid for pairs in held.values() for rid, _ in pairs})
    rows = []
    for person in people:
        pairs = held.get(person.pk, [])
        perms = ALL_PERMISSIONS if person.is_superuser else {p for rid, _ in pairs for p in granted.get(rid, ())}
        rows.append(
            {
                "user": person,
                "roles": sorted(name for _, name in pairs),
                "permissions": sorted(perms),
                "is_self": person.pk == request.user.pk,
            }
        )
    context: dict[str, Any] = {"rows": rows, "can_manage": can_manage, "form": form}
    if can_manage:
        context["role_options"] = _role_options(request, granted, selected=form["roles"].value() or [])
    return context


def _role_options(request: HttpRequest, granted: dict[int, set[str]], selected: list[str]) -> list[dict[str, Any]]:
    """Every role for the picker, flagged when it carries permissions the actor lacks: ``save_user`` would refuse
    it (403), and saying so beforehand saves a round trip. The service still decides."""
    held = permissions(request)
    return [
        {
            "name": name,
            "selected": name in selected,
            "beyond": first_not_covered(held, sorted(granted.get(pk, ()))) is not None,
        }
        for pk, name in Role.objects.order_by("name").values_list("pk", "name")
    ]


@console_view("user:all", "user:list")
def user(request: HttpRequest, username: str) -> HttpResponse:
    """One visible user: their roles and permissions; for ``user:all``, changing password and roles through
    ``save_user`` and deleting through ``delete_users`` (``?delete`` asks for confirmation first)."""
    target = User.objects.visible_to(request.user, permissions(request)).filter(username=username).first()
    if target is None:
        raise Http404("no such user")
    can_manage = holds(request, *USER_ADMIN)
    current = sorted(target.groups.values_list("name", flat=True))
    form = UserEditForm(initial={"roles": current})
    status, confirm_delete = 200, can_manage and "delete" in request.GET
    if request.method == "POST":
        if not can_manage:
            return _forbidden(request, USER_ADMIN)
        if request.POST.get("action") == "delete":
            return _delete_user(request, target)
        form = UserEditForm(request.POST)
        if not form.is_valid():
            status = 400
        else:
            try:
                _save_user(request, target, form.cleaned_data["password"], form.cleaned_data["roles"])
            except EsdError as exc:
                status = _service_error(form, exc)
            else:
                messages.success(request, f"User {target.username} saved.")
                return redirect("console:user", target.username)
    granted = role_permissions()
    context = {
        "target": target,
        "roles": current,
        "permissions": sorted(
            ALL_PERMISSIONS
            if target.is_superuser
            else {p for rid in target.groups.values_list("pk", flat=True) for p in granted.get(rid, ())}
        ),
        "can_manage": can_manage,
        "is_self": target.pk == request.user.pk,
        "confirm_delete": confirm_delete,
        "form": form,
        "key_count": target.api_keys.count(),
    }
    if can_manage:
        chosen = form["roles"].value() if form.is_bound else current
        context["role_options"] = _role_options(request, granted, selected=chosen or [])
    return render(request, "console/accounts/user.html", context, status=status)


def _save_user(request: HttpRequest, target: User, password: str, roles: list[str]) -> None:
    """Replace a user's roles (and password, when one was typed) through ``save_user``.

    ``save_user`` is the API's upsert and always sets a password; the console lets an operator change roles
    without resetting it, so with an empty password the stored hash is put back in the same transaction. All
    the rules (who may assign which role, which roles exist, password strength) still run in the service.
    """
    actor = request.user.get_username()
    with transaction.atomic():
        kept: tuple[str, str] | None = None
        if not password:
            kept = User.objects.select_for_update().values_list("password", "encrypted_password").get(pk=target.pk)
        saved = services.save_user(
            actor=actor,
            actor_permissions=permissions(request),
            username=target.username,
            password=password or secrets.token_urlsafe(32),
            roles=roles,
            validate_password=bool(password),
        )
        if kept is not None:
            User.objects.filter(pk=saved.user.pk).update(password=kept[0], encrypted_password=kept[1])
    if password and saved.user.pk == request.user.pk:
        update_session_auth_hash(request, saved.user)  # changing your own password must not sign you out


def _delete_user(request: HttpRequest, target: User) -> HttpResponse:
    """Delete one user (keys and sessions go with them). Not yourself: that would end this session mid-click and
    could leave no administrator; another operator can do it."""
    if target.pk == request.user.pk:
        messages.error(request, "You cannot delete your own user here.")
        return redirect("console:user", target.username)
    try:
        services.delete_users([target], actor=request.user.get_username(), actor_permissions=permissions(request))
    except EsdError as exc:
        messages.error(request, exc.message)
        return redirect("console:user", target.username)
    messages.success(request, f"User {target.username} deleted.")
    return redirect("console:users")


# --- roles ------------------------------------------------------------------------------------------------------


@console_view("role:all", "role:list")
def roles(request: HttpRequest) -> HttpResponse:
    """The visible roles with permissions and member counts; holders of ``role:all``/``role:create`` create roles
    here (an existing name is refused: ``save_role`` would replace it, which is the edit page's job)."""
    can_create = holds(request, *ROLE_EDITORS)
    form = RoleForm()
    status = 200
    if request.method == "POST":
        if not can_create:
            return _forbidden(request, ROLE_EDITORS)
        form = RoleForm(request.POST)
        if form.is_valid():
            name = form.cleaned_data["name"]
            if Role.objects.filter(name=name).exists():
                form.add_error("name", "This role already exists; open it to change its permissions.")
                status = 400
            else:
                try:
                    services.save_role(
                        actor=request.user.get_username(),
                        actor_permissions=permissions(request),
                        name=name,
                        permissions=form.cleaned_data["permissions"],
                    )
                except EsdError as exc:
                    status = _service_error(form, exc)
                else:
                    messages.success(request, f"Role {name} created.")
                    return redirect("console:roles")
        else:
            status = 400
    visible = Role.objects.visible_to(request.user, permissions(request))
    # Counted over a subquery: counting on ``visible`` itself would reuse its membership join and count only the
    # caller for roles they hold.
    rows = list(
        Role.objects.filter(pk__in=visible.values("pk"))
        .annotate(members=Count("user"))
        .order_by("name")
        .values_list("pk", "name", "creator", "members")
    )
    granted = role_permissions([pk for pk, *_ in rows])
    context = {
        "rows": [
            {"name": name, "creator": creator, "members": members, "permissions": sorted(granted.get(pk, ()))}
            for pk, name, creator, members in rows
        ],
        "can_create": can_create,
        "can_delete": holds(request, *ROLE_DELETERS),
        "form": form,
        "choices": _permission_choices(request, form),
    }
    return render(request, "console/accounts/roles.html", context, status=status)


def _permission_choices(request: HttpRequest, form: forms.Form, current: list[str] = ()) -> list[dict[str, Any]]:
    """The 18 permissions as checkboxes, flagged when the actor could not grant them (``check_role`` would refuse);
    they stay selectable so the service, not the page, has the last word."""
    held = permissions(request)
    chosen = form["permissions"].value() if form.is_bound else list(current)
    may_grant_all = "role:all" in held
    return [
        {
            "value": perm,
            "checked": perm in (chosen or []),
            "beyond": not may_grant_all and first_not_covered(held, [perm]) is not None,
        }
        for perm in PERMISSIONS
    ]


@console_view("role:all", "role:list")
def role(request: HttpRequest, name: str) -> HttpResponse:
    """One visible role. Editable when ``check_role`` allows the actor to replace it (never ``IT Operator``);
    deletable with ``role:all`` (``?delete`` asks for confirmation first)."""
    target = Role.objects.visible_to(request.user, permissions(request)).filter(name=name).first()
    if target is None:
        raise Http404("no such role")
    current = sorted(role_permissions([target.pk]).get(target.pk, ()))
    quota = RoleQuota.objects.filter(role=target).first()
    can_edit = _may_edit_role(request, target)
    can_delete = holds(request, *ROLE_DELETERS) and not target.is_protected
    form = RoleEditForm(initial={"permissions": current})
    status = 200
    if request.method == "POST":
        action = request.POST.get("action", "save")
        if action == "quota":
            return _save_quota(request, target)
        if action == "delete":
            if not holds(request, *ROLE_DELETERS):
                return _forbidden(request, ROLE_DELETERS)
            return _delete_role(request, target)
        if not holds(request, *ROLE_EDITORS):
            return _forbidden(request, ROLE_EDITORS)
        form = RoleEditForm(request.POST)
        if form.is_valid():
            try:
                services.save_role(
                    actor=request.user.get_username(),
                    actor_permissions=permissions(request),
                    name=target.name,
                    permissions=form.cleaned_data["permissions"],
                )
            except EsdError as exc:
                status = _service_error(form, exc)
            else:
                messages.success(request, f"Role {target.name} saved.")
                return redirect("console:role", target.name)
        else:
            status = 400
    return render(
        request,
        "console/accounts/role.html",
        {
            "role": target,
            "permissions": current,
            "members": list(target.user_set.order_by("username").values_list("username", flat=True)[:200]),
            "member_count": target.user_set.count(),
            "can_edit": can_edit,
            "can_delete": can_delete,
            "confirm_delete": can_delete and "delete" in request.GET,
            "form": form,
            "choices": _permission_choices(request, form, current),
            "quota": quota,
            "quota_form": QuotaForm(
                initial={
                    "gpu_seconds_per_day": getattr(quota, "gpu_seconds_per_day", None),
                    "concurrent_jobs": getattr(quota, "concurrent_jobs", None),
                }
            ),
            "can_edit_quota": holds(request, *QUOTA_EDITORS) and not target.is_protected,
        },
        status=status,
    )


def _save_quota(request: HttpRequest, target: Role) -> HttpResponse:
    """Set the role's quota through ``set_role_quota`` (``role:all`` only; the default role has none)."""
    if not holds(request, *QUOTA_EDITORS):
        return _forbidden(request, QUOTA_EDITORS)
    form = QuotaForm(request.POST)
    if target.is_protected or not form.is_valid():
        messages.error(
            request,
            "The quota was not saved: "
            + (
                "; ".join(f"{form.fields[name].label}: {' '.join(errors)}" for name, errors in form.errors.items())
                or f"the default role {target.name} cannot be changed"
            ),
        )
        return redirect("console:role", target.name)
    services.set_role_quota(target, **form.cleaned_data)
    messages.success(request, f"Quota of role {target.name} saved.")
    return redirect("console:role", target.name)


def _may_edit_role(request: HttpRequest, target: Role) -> bool:
    """Ask ``check_role`` itself (with no permissions, so only the name and creator rules speak) whether to show
    the edit form: the page then hides exactly what the service would refuse."""
    if not holds(request, *ROLE_EDITORS):
        return False
    try:
        services.check_role(
            actor=request.user.get_username(),
            actor_permissions=permissions(request),
            name=target.name,
            permissions=[],
            existing=target,
        )
    except EsdError:
        return False
    return True


def _delete_role(request: HttpRequest, target: Role) -> HttpResponse:
    """Delete through ``delete_roles``, which refuses ``IT Operator``; its message comes back on the role page."""
    try:
        services.delete_roles([target.name], visible=[target], actor_permissions=permissions(request))
    except EsdError as exc:
        messages.error(request, exc.message)
        return redirect("console:role", target.name)
    messages.success(request, f"Role {target.name} deleted.")
    return redirect("console:roles")


# --- API keys ---------------------------------------------------------------------------------------------------


@never_cache
@console_view()
def keys(request: HttpRequest) -> HttpResponse:
    """The user's keys (holders of ``user:all``: everyone's) and the issue form.

    A new key is rendered in this POST's own response and stored nowhere (not in the session, not in a message),
    so it is shown exactly once: a reload or a later GET has only its prefix. ``never_cache`` keeps the page that
    shows it out of browser and proxy caches.
    """
    is_admin = holds(request, *USER_ADMIN)
    form = KeyForm(initial={"user": request.user.get_username()})
    status, issued = 200, None
    if request.method == "POST":
        form = KeyForm(request.POST)
        if not form.is_valid():
            status = 400
        else:
            status, issued = _issue_key(request, form, is_admin)
            if issued is not None:
                form = KeyForm(initial={"user": request.user.get_username()})
    own = list(ApiKey.objects.filter(user=request.user).order_by("-created_at"))
    context: dict[str, Any] = {"own": own, "form": form, "is_admin": is_admin, "issued": issued}
    if is_admin:
        others = ApiKey.objects.exclude(user=request.user).select_related("user").order_by("user__username", "-pk")
        owner = request.GET.get("owner", "").strip()
        if owner:
            others = others.filter(user__username=owner)
        context["owner"] = owner
        context["others"] = Paginator(others, KEYS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "console/accounts/keys.html", context, status=status)


def _issue_key(request: HttpRequest, form: KeyForm, is_admin: bool) -> tuple[int, dict[str, Any] | None]:
    """Issue a key as the form asks; service keys and keys for other people are user administration (``user:all``),
    as in the admin, because a service key may act for anyone."""
    data = form.cleaned_data
    owner_name = data["user"] or request.user.get_username()
    if not is_admin and (data["kind"] != ApiKeyKind.PERSONAL or owner_name != request.user.get_username()):
        form.add_error(None, "Service keys and keys for other users need the user:all permission.")
        return 403, None
    owner = (
        request.user if owner_name == request.user.get_username() else User.objects.filter(username=owner_name).first()
    )
    if owner is None:
        form.add_error("user", f"No user {owner_name}.")
        return 400, None
    try:
        key, raw = services.issue_api_key(
            owner, kind=data["kind"], name=data["name"], expires_days=data["expires_days"], issuer=request.user
        )
    except EsdError as exc:
        form.add_error(None, exc.message)
        return exc.status, None
    return 200, {"key": key, "raw": raw}


@require_POST
@console_view()
def revoke_key(request: HttpRequest, pk: int) -> HttpResponse:
    """Revoke one key: your own, or anyone's with ``user:all``. Others' keys are treated as nonexistent."""
    found = ApiKey.objects.select_related("user").filter(pk=pk)
    if not holds(request, *USER_ADMIN):
        found = found.filter(user=request.user)
    key = found.first()
    if key is None:
        raise Http404("no such key")
    if services.revoke_api_key(key):
        messages.success(request, f"Key {key.prefix}… of {key.user.username} revoked.")
    back = request.POST.get("next", "")
    safe = url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}, require_https=request.is_secure())
    return redirect(back if back and safe else reverse("console:keys"))


def _forbidden(request: HttpRequest, needed: tuple[str, ...]) -> HttpResponse:
    """The frame's 403 page, for actions a page offers only to some of its viewers."""
    return render(request, "console/forbidden.html", {"needed": needed}, status=403)


# --- webhooks -----------------------------------------------------------------------------------------------------
# Everyone manages the webhooks of their own jobs; role webhooks (the jobs of every member) are role administration.

ROLE_WEBHOOKS = ("role:all",)
RECENT_DELIVERIES = 50


class WebhookForm(forms.Form):
    url = forms.CharField(max_length=2000, label="URL")
    events = forms.MultipleChoiceField(
        choices=WebhookEvent.choices, required=False, widget=forms.CheckboxSelectMultiple
    )
    role = forms.CharField(max_length=150, required=False, help_text="Empty: your own jobs")


@never_cache
@console_view()
def webhook_list(request: HttpRequest) -> HttpResponse:
    """Webhooks, recent deliveries and the add form. A new webhook's secret is rendered in this POST's response
    only (as a new API key is), so it is shown exactly once."""
    may_role = holds(request, *ROLE_WEBHOOKS)
    form, status, created = WebhookForm(), 200, None
    if request.method == "POST":
        form = WebhookForm(request.POST)
        if not form.is_valid():
            status = 400
        else:
            status, created = _add_webhook(request, form, may_role)
            if created is not None:
                form = WebhookForm()
    hooks = list(webhooks.manageable_by(request.user, permissions(request)))
    deliveries = (
        WebhookDelivery.objects.filter(webhook__in=hooks)
        .select_related("webhook__user", "webhook__role")
        .order_by("-created_at")[:RECENT_DELIVERIES]
    )
    context = {
        "hooks": hooks,
        "deliveries": deliveries,
        "form": form,
        "created": created,
        "may_role": may_role,
        "roles": list(Role.objects.order_by("name").values_list("name", flat=True)) if may_role else [],
        "events": WebhookEvent.choices,
    }
    return render(request, "console/accounts/webhooks.html", context, status=status)


def _add_webhook(request: HttpRequest, form: WebhookForm, may_role: bool) -> tuple[int, Webhook | None]:
    data = form.cleaned_data
    role = None
    if data["role"]:
        if not may_role:
            form.add_error(None, "Webhooks for a role need the role:all permission.")
            return 403, None
        role = Role.objects.filter(name=data["role"]).first()
        if role is None:
            form.add_error("role", f"No role {data['role']}.")
            return 400, None
    try:
        hook = webhooks.create_webhook(
            url=data["url"],
            user=None if role else request.user,
            role=role,
            events=data["events"],
            by=request.user.get_username(),
        )
    except EsdError as exc:
        form.add_error(None, exc.message)
        return exc.status, None
    return 200, hook


def _manageable(request: HttpRequest, pk: int) -> Webhook:
    hook = webhooks.manageable_by(request.user, permissions(request)).filter(pk=pk).first()
    if hook is None:
        raise Http404("no such webhook")
    return hook


@require_POST
@console_view()
def webhook_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete one of the webhooks the page lists (others are treated as nonexistent), with its deliveries."""
    hook = _manageable(request, pk)
    hook.delete()
    messages.success(request, f"Webhook {hook.url} deleted.")
    return redirect("console:webhooks")


@require_POST
@console_view()
def webhook_test(request: HttpRequest, pk: int) -> HttpResponse:
    """Send a ``ping`` event now; its delivery appears in the list below. One per webhook every
    ``ESD_WEBHOOK_PING_INTERVAL`` seconds: a ping too soon is refused with the reason shown as an error."""
    hook = _manageable(request, pk)
    try:
        webhooks.ping(hook)
    except EsdError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Ping queued for {hook.url}.")
    return redirect("console:webhooks")
