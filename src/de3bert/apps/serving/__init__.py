"""The HTTP prediction service: settings, request and answer schemas, micro-batching, and the FastAPI app."""

from de3bert.apps.serving.app import create_app, model_version, resolve_policy, serve, served_criteria
from de3bert.apps.serving.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app", "model_version", "resolve_policy", "serve", "served_criteria"]
