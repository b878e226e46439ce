from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Users, roles (Django groups carrying ESD permission strings), API keys and their authentication."""

    name = "apps.accounts"
    label = "accounts"
    verbose_name = "Accounts"

    def ready(self) -> None:
        from apps.accounts import checks, signals  # noqa: F401

        signals.connect_shared_models()
