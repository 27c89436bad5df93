"""The module-level app for ``uvicorn app.main:app``; everything else builds its own."""

from app.config import Settings
from app.factory import create_app
from app.logs import configure_logging

settings = Settings()
configure_logging(settings.log_level, settings.log_format)
app = create_app(settings)
