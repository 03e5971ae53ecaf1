"""The browser dashboard: server-rendered pages over the service layer.

``app.mount`` adds the pages, the sign-in, the static files and the
security headers to the control plane's aiohttp application. Pages call
``control.services`` with the session's principal, exactly as the gRPC
edge does with a token's, so an account sees only its own objects.
"""
