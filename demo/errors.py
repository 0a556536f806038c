"""The demo's error: a message for the person at the browser."""

from t2i_personal.errors import UserError


class DemoError(UserError, ValueError):
    """Something typed, picked or uploaded cannot be used; shown as an error toast (the message says what to do)."""
