"""The ``prefect-ws`` command: ``serve``, ``run``, ``tail``, ``token`` and ``demo``."""
