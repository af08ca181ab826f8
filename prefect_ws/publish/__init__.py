"""The flow-process side: where a run's states and log lines become events.

The engine watch (:mod:`.engine_watch`, the one module that wraps Prefect internals) and the
public state hooks (:mod:`.hooks`) report every state a run enters to :mod:`.lifecycle`, which
decides once what each means for the stream; the logging handler (:mod:`.log_handler`) turns log
lines into ``step_log``; the drop-in decorators (:mod:`.decorators`) and the ``prefect.plugins``
entry point (:mod:`.plugin`) switch it all on; :mod:`.ui_link` links Prefect's UI to the live
page; the background :mod:`.publisher` batches events to the backend. Everything here runs inside
a user's flow process, so it imports little and never blocks or breaks the flow.
"""
