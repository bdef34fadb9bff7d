"""The ``tandemn`` command-line tool and the local stack."""
