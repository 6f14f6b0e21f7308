"""The object store: a local folder (default) or S3 through boto3, behind one small interface."""

from miniml.storage.base import ObjectStore
from miniml.storage.factory import make_store

__all__ = ["ObjectStore", "make_store"]
