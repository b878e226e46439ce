from django.urls import re_path

from apps.accounts.api.views import PingView, RolesView, UsersView

# A trailing slash is optional and both forms are served directly: a redirect would lose DELETE bodies.
urlpatterns = [
    re_path(r"^ping/?$", PingView.as_view(), name="ping"),
    re_path(r"^roles/?$", RolesView.as_view(), name="roles"),
    re_path(r"^users/?$", UsersView.as_view(), name="users"),
]
