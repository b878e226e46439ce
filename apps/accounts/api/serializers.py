"""Response shapes of ``/roles`` and ``/users`` (contract §9.2-9.3): they render the data and document it."""

from rest_framework import serializers

from esd.api.serializers import EsdSerializer, StringListField


class RoleSerializer(EsdSerializer):
    role_name = serializers.CharField()
    creator = serializers.CharField()
    permissions = StringListField()


class RoleListSerializer(EsdSerializer):
    roles = RoleSerializer(many=True)
    previous_evaluated_key = serializers.CharField(help_text='Always "not_applicable"')
    last_evaluated_key = serializers.CharField(allow_null=True, help_text="Always null: every role is listed")


class UserSerializer(EsdSerializer):
    username = serializers.CharField()
    roles = StringListField()
    creator = serializers.CharField()
    permissions = StringListField()
    password = serializers.CharField(help_text='"********", "*" without password, or a token (contract §9.3)')


class UserListSerializer(EsdSerializer):
    users = UserSerializer(many=True)
    previous_evaluated_key = serializers.CharField(help_text='Always "not_applicable"')
    last_evaluated_key = serializers.CharField(help_text='Always "not_applicable": every user is listed')


class FirstRunUserSerializer(EsdSerializer):
    class CreatedUser(EsdSerializer):
        username = serializers.CharField()
        roles = StringListField()

    user = CreatedUser()
    all_roles = StringListField()
