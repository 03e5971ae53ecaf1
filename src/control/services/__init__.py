"""The service layer: what a caller may do, one function per action.

Each edge (the gRPC servicers, the HTTP/JSON API, the dashboard pages)
validates its input, calls one method here with the authenticated
``Principal``, and converts the result. A service checks the caller's scope
and account, opens the transaction, writes the audit row, and raises the
error tree of ``control.errors``; it never sees protobuf or HTTP.
"""
