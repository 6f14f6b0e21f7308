from __future__ import annotations

from miniml.config import Settings, StorageKind
from miniml.storage.base import ObjectStore


def make_store(settings: Settings) -> ObjectStore:
    if settings.storage.kind is StorageKind.s3:
        from miniml.storage.s3 import S3Store

        return S3Store(settings.storage)
    from miniml.storage.local import LocalStore

    return LocalStore(settings.storage_root)
