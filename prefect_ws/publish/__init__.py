"""The flow-process side: where a run's lifecycle and log lines become events.

Prefect state hooks (:mod:`.hooks`), the logging handler (:mod:`.log_handler`), the drop-in
decorators (:mod:`.decorators`), the ``prefect.plugins`` entry point (:mod:`.plugin`) and the
background :mod:`.publisher` that batches events to the backend. Everything here runs inside a
user's flow process, so it imports little and never blocks or breaks the flow.
"""
