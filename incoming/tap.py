"""Entry point for `twistd incoming` (named by the plugin)."""

from twisted.application.service import IService

from .config import Options
from .service import make_service

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    return make_service(options.config)
