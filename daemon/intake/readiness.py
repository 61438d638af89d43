"""The conditions ``GET /readyz`` reports."""

from __future__ import annotations

__all__ = ["Readiness"]

_NOT_CHECKED = "not checked yet"


class Readiness:
    """Named readiness flags, each either set or failed with a reason.

    The flags are ``config_loaded``, ``listener_bound`` and
    ``credentials_accepted``; all start unset with the reason
    ``"not checked yet"``. The object is used from one trio thread, so no
    locking is done.
    """

    FLAGS = ("config_loaded", "listener_bound", "credentials_accepted")

    def __init__(self) -> None:
        self._reasons: dict[str, str | None] = dict.fromkeys(self.FLAGS, _NOT_CHECKED)

    def set(self, *names: str) -> None:
        """Mark each flag in ``names`` as met. Raise KeyError for an unknown name."""
        for name in names:
            self._check_name(name)
        for name in names:
            self._reasons[name] = None

    def fail(self, name: str, reason: str) -> None:
        """Mark flag ``name`` as unmet because of ``reason``.

        ``reason`` is served by ``GET /readyz``, so it must hold no secret.
        Raise KeyError for an unknown name.
        """
        self._check_name(name)
        self._reasons[name] = reason

    @property
    def ready(self) -> bool:
        """True when every flag is met."""
        return all(reason is None for reason in self._reasons.values())

    def unmet(self) -> dict[str, str]:
        """Return each unmet flag with the reason it is unmet."""
        return {
            name: reason for name, reason in self._reasons.items() if reason is not None
        }

    def _check_name(self, name: str) -> None:
        if name not in self._reasons:
            raise KeyError(
                f"unknown readiness flag {name!r}; expected one of {self.FLAGS!r}"
            )

    def __repr__(self) -> str:
        return f"Readiness(ready={self.ready!r}, unmet={self.unmet()!r})"
