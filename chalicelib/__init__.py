"""Control-plane logic behind the Chalice routes in ``app.py``: one module per concept."""
