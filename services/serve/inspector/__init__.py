"""The memory inspector: a read-only page served by the gateway (`/inspect`) and the JSON endpoints
behind it (`/v1/users`, `/v1/users/{user_id}/memories|sessions|adapters|search`), behind the same
API keys and tenant rules as the rest of the API. `protocol.py` (wire models), `service.py` (the
logic), `router.py` (routes), `page.py` (the static page and its headers), `static/inspector.html`."""
