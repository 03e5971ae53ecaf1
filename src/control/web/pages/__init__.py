"""One module per page: it reads through ``control.services`` with the
session's principal and renders one template."""
