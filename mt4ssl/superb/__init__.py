"""SUPERB probing through s3prl.

- `upstream`: the s3prl upstream for mt4ssl checkpoints (`mt4ssl_local`, `mt4ssl_url`); how
  to use it from this project, s3prl's runner or your own s3prl checkout is in its docstring.
- `register()`: put those names on `s3prl.hub` at run time (never an edit of site-packages),
  so `getattr(s3prl.hub, NAME)` (s3prl's runner) and `S3PRLUpstream(NAME, path_or_url=CKPT)`
  find them:

      import mt4ssl.superb
      mt4ssl.superb.register()

Importing this package does not import s3prl; `register()` does.
"""

from __future__ import annotations

UPSTREAM_NAMES = ("mt4ssl_local", "mt4ssl_url")


def register() -> None:
    """Add `mt4ssl_local` and `mt4ssl_url` to `s3prl.hub` (idempotent)."""
    import s3prl.hub

    from mt4ssl.superb import upstream

    for name in UPSTREAM_NAMES:
        setattr(s3prl.hub, name, getattr(upstream, name))
