"""Owner lists of shared resources (checkpoints, datasets, endpoints): names of roles or users, or ``*``.

ESD stores owners as names, and names outlive roles (deleting a role keeps it in owner lists, contract §9.2), so
they cannot be foreign keys to groups. Each resource keeps them, in order, in its own indexed table
(``<Resource>Owner(resource, position, name)``): they are the wire data. Who may see or change the resource is
derived from them as django-guardian object permissions by the accounts app, which listens to ``owners_changed``.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import models
from django.db.models import Exists, Model, OuterRef, Q, QuerySet
from django.dispatch import Signal

# Sent with ``resource`` after its owner names were replaced: the grants derived from them follow.
owners_changed = Signal()


class OwnerEntry(models.Model):
    """One name of a resource's owner list, kept in order. Subclasses add ``resource``, the foreign key."""

    position = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=150, db_index=True)

    class Meta:
        abstract = True
        ordering = ["position"]

    def __str__(self) -> str:
        return self.name


def owned_by(owner_model: type[Model], *names: Iterable[str] | QuerySet, unowned: bool) -> Q:
    """Rows with an owner in any of ``names`` (lists, or subqueries of names); ``unowned`` also admits rows
    whose owner list is empty."""
    owners = owner_model.objects.filter(resource=OuterRef("pk"))
    condition = Q()
    for group in names:
        condition |= Q(name__in=group)
    match = Q(Exists(owners.filter(condition)))
    return match | ~Exists(owners) if unowned else match


def save_owners(owner_model: type[Model], resource: Model, names: Iterable[str]) -> None:
    """Replace the owner list, keeping its order and dropping duplicates."""
    owner_model.objects.filter(resource=resource).delete()
    owner_model.objects.bulk_create(
        owner_model(resource=resource, position=index, name=name) for index, name in enumerate(dict.fromkeys(names))
    )
    owners_changed.send(sender=type(resource), resource=resource)
