"""Console pages of this app (namespace ``console``): users, roles, API keys and webhooks.

User and role names travel in the path with the ``path`` converter: the API accepts role names with any characters
(``/`` included), and a name the converter could not carry would break every page that links to it. Deleting is an
action of the object's own page (``?delete`` asks for confirmation), so no second route can collide with a name.
"""

from django.urls import path

from apps.accounts import views

urlpatterns = [
    path("users/", views.users, name="users"),
    path("users/<path:username>/", views.user, name="user"),
    path("roles/", views.roles, name="roles"),
    path("roles/<path:name>/", views.role, name="role"),
    path("keys/", views.keys, name="keys"),
    path("keys/<int:pk>/revoke/", views.revoke_key, name="key-revoke"),
    path("webhooks/", views.webhook_list, name="webhooks"),
    path("webhooks/<int:pk>/delete/", views.webhook_delete, name="webhook-delete"),
    path("webhooks/<int:pk>/test/", views.webhook_test, name="webhook-test"),
]
