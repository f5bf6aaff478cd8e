"""HTTP routes: each one validates, enqueues on the worker or reads the store, and answers."""

from fastapi import APIRouter

from service.routes import adapters, convert, health, infer, model, status

api_router = APIRouter()
for _module in (convert, infer, adapters, model, status, health):
    api_router.include_router(_module.router)

__all__ = ["api_router"]
