"""The console's URLs (namespace ``console``): each app contributes its pages."""

from django.contrib.auth import views as auth_views
from django.urls import include, path

app_name = "console"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="console/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="console:login"), name="logout"),
    path("", include("apps.accounts.urls")),
    path("", include("apps.models_registry.urls")),
    path("", include("apps.endpoints.urls")),
    path("", include("apps.inference.urls")),
    path("", include("apps.training.urls")),
]
